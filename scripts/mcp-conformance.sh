#!/usr/bin/env bash
# Runs the MCP conformance suite (@modelcontextprotocol/conformance) against a running troupe
# node: the server scenarios server-initialize, tools-list, http-header-validation,
# dns-rebinding-protection and server-stateless.
#
# Usage: scripts/mcp-conformance.sh URL TOKEN [RESULTS_DIR]
#   URL    the node's MCP endpoint, e.g. http://127.0.0.1:7070/mcp (a loopback address)
#   TOKEN  a bearer token of the node (e.g. "$(cat ~/.local/share/troupe/admin.token)")
#
# Needs Node >= 22. Uses target/ci-node (what .ci/run installs from scripts/node/package.json)
# when it is there, else `npx` fetches the pinned version. TROUPE_CI_NODE overrides the prefix.
#
# The suite cannot send an Authorization header, and every troupe MCP request needs one. So the
# suite talks to scripts/mcp-auth-proxy.mjs, a loopback proxy that adds the header and passes
# everything else (Host and Origin included) through unchanged: the node keeps its security
# defaults, and its DNS-rebinding guard sees the suite's own headers.
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,9p' "$0" >&2
  exit 2
fi
url=$1
token=$2
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
prefix="${TROUPE_CI_NODE:-$root/target/ci-node}"
results="${3:-$(mktemp -d -t troupe-conformance.XXXXXX)}"
version=0.2.0-alpha.12
mkdir -p "$results"

if [ -x "$prefix/node_modules/.bin/node" ]; then
  export PATH="$prefix/node_modules/.bin:$PATH"
fi
major=$(node --version 2>/dev/null | sed -E 's/^v([0-9]+).*/\1/' || true)
if [ -z "$major" ] || [ "$major" -lt 22 ]; then
  echo "the conformance suite needs Node >= 22 (found: $(node --version 2>/dev/null || echo none));" \
    "install it with: npm ci --prefix target/ci-node (after copying scripts/node/package*.json there)" >&2
  exit 3
fi
if [ -x "$prefix/node_modules/.bin/conformance" ]; then
  conformance=("$prefix/node_modules/.bin/conformance")
else
  conformance=(npx --yes "@modelcontextprotocol/conformance@$version")
fi

origin=$(printf '%s' "$url" | sed -E 's#^(https?://[^/]+).*#\1#')
path=${url#"$origin"}
# The proxy reads its token from the environment (not argv, which other users can see), and
# exits when this script does (its stdin is ours).
coproc PROXY { TROUPE_PROXY_TOKEN="$token" exec node "$here/mcp-auth-proxy.mjs" "$origin" -; }
proxy_pid=$PROXY_PID
trap 'kill "$proxy_pid" 2>/dev/null || true' EXIT
if ! read -r -t 30 ready <&"${PROXY[0]}" || [[ $ready != listening* ]]; then
  echo "the auth proxy did not start" >&2
  exit 1
fi
proxied="${ready#listening }$path"

failed=0
for scenario in server-initialize tools-list http-header-validation dns-rebinding-protection server-stateless; do
  log="$results/$scenario.log"
  if "${conformance[@]}" server --url "$proxied" --scenario "$scenario" \
    --expected-failures "$here/mcp-conformance-baseline.yml" -o "$results/$scenario" \
    >"$log" 2>&1; then
    outcome=PASS
  else
    outcome=FAIL
    failed=1
  fi
  summary=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E '^(Passed|Total):' | tail -1 || true)
  if grep -q 'all failures are expected' "$log"; then
    summary="$summary (each failure is in scripts/mcp-conformance-baseline.yml)"
  fi
  echo "$outcome $scenario: ${summary:-no summary (see $log)}"
  if [ "$outcome" = FAIL ]; then
    sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E 'FAILURE|Error|expected|baseline' | head -40 >&2 || true
  fi
done
echo "results in $results"
exit "$failed"
