#!/usr/bin/env bash
# Drives a running troupe node with real MCP clients, not only troupe's own:
#
#   python     the official Python MCP SDK (`pip install mcp`, tests/mcp_python_client.py):
#              Streamable HTTP with the current protocol (2026-07-28) and the legacy one
#              (2025-11-25); `troupe mcp` over stdio bridged to the node (found through local
#              discovery); `troupe mcp --standalone` over stdio (an embedded node)
#   inspector  the MCP Inspector CLI (@modelcontextprotocol/inspector): tools/list and
#              tools/call node_health over Streamable HTTP, and tools/list through `troupe mcp`
#
# Usage: scripts/mcp-real-clients.sh python|inspector|all URL TOKEN
#   URL    the node's MCP endpoint, e.g. http://127.0.0.1:7070/mcp
#   TOKEN  a bearer token of the node with the operator role (the admin token will do)
#
# Environment: PYTHON (default python3), TROUPE_BIN (default `troupe` on PATH, else
# target/debug/troupe), TROUPE_DISCOVERY_DIR (where `troupe mcp` looks for the node; the
# default per-user directory otherwise), TROUPE_CI_NODE (the npm prefix .ci/run installs,
# default target/ci-node; without it `npx` fetches the pinned Inspector, which needs Node >= 22).
# Prints one `OK …` line per check; exits non-zero on the first failure.
set -euo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,21p' "$0" >&2
  exit 2
fi
which=$1
url=$2
token=$3
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
python="${PYTHON:-python3}"
troupe="${TROUPE_BIN:-$(command -v troupe || echo "$root/target/debug/troupe")}"
prefix="${TROUPE_CI_NODE:-$root/target/ci-node}"
scratch=$(mktemp -d -t troupe-clients.XXXXXX)
trap 'rm -rf "$scratch"' EXIT

run_python() {
  "$python" "$root/tests/mcp_python_client.py" http "$url" "$token"
  "$python" "$root/tests/mcp_python_client.py" bridge "$troupe" "$url" "$token"
  mkdir -p "$scratch/work"
  "$python" "$root/tests/mcp_python_client.py" stdio "$troupe" "$scratch/stdio-data" "$scratch/work"
}

inspector() {
  if [ -x "$prefix/node_modules/.bin/mcp-inspector" ]; then
    PATH="$prefix/node_modules/.bin:$PATH" "$prefix/node_modules/.bin/mcp-inspector" --cli "$@"
  else
    npx --yes @modelcontextprotocol/inspector@2.12.0 --cli "$@"
  fi
}

# Fails unless the JSON on stdin satisfies the Python expression `check` (over `answer`).
expect() {
  "$python" -c 'import json, sys
answer = json.load(sys.stdin)
if not eval(sys.argv[1]):
    sys.exit(f"unexpected answer for {sys.argv[2]}: {json.dumps(answer)[:2000]}")' "$1" "$2"
}

run_inspector() {
  local tools='sorted(tool["name"] for tool in answer["tools"]) == ["cancel_session", "cluster_members", "get_session", "list_providers", "list_sessions", "node_health", "session_output", "spawn_session"]'
  inspector "$url" --transport http --header "Authorization: Bearer $token" --method tools/list \
    | expect "$tools" "tools/list over HTTP"
  echo "OK inspector-http tools/list"
  local health
  health=$(inspector "$url" --transport http --header "Authorization: Bearer $token" \
    --method tools/call --tool-name node_health)
  expect 'answer["isError"] is False and answer["structuredContent"]["status"] == "healthy"' \
    "tools/call node_health over HTTP" <<<"$health"
  echo "OK inspector-http tools/call node_health"
  # Over stdio: the Inspector launches `troupe mcp`, which must bridge to the same node (the
  # Inspector passes the server only the environment given with -e).
  local started
  started=$("$python" -c 'import json, sys; print(json.load(sys.stdin)["structuredContent"]["started_at"])' <<<"$health")
  local env=()
  if [ -n "${TROUPE_DISCOVERY_DIR:-}" ]; then
    env=(-e "TROUPE_DISCOVERY_DIR=$TROUPE_DISCOVERY_DIR")
  fi
  inspector --transport stdio "${env[@]}" --method tools/call --tool-name node_health -- "$troupe" mcp \
    | expect "answer['structuredContent']['started_at'] == '$started'" \
      "tools/call node_health over stdio (the same node as over HTTP)"
  echo "OK inspector-stdio tools/call node_health (bridged to the node at $url)"
}

case "$which" in
  python) run_python ;;
  inspector) run_inspector ;;
  all) run_python; run_inspector ;;
  *) echo "unknown client set $which; use python, inspector or all" >&2; exit 2 ;;
esac
