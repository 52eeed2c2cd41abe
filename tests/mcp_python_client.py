"""Drives troupe's MCP server with the official Python MCP SDK (`pip install mcp`).

Usage:
    python3 tests/mcp_python_client.py http URL TOKEN
    python3 tests/mcp_python_client.py stdio TROUPE_BIN DATA_DIR WORKDIR
    python3 tests/mcp_python_client.py bridge TROUPE_BIN URL TOKEN

Each transport is exercised twice: with the current protocol (mode="auto": 2026-07-28, no
handshake) and the legacy one (mode="legacy": initialize, 2025-11-25). `stdio` runs
`troupe mcp --standalone` (an embedded node); `bridge` runs `troupe mcp`, which must attach to
the running node at URL through local discovery (TROUPE_DISCOVERY_DIR is passed on): the session
it spawns is then read back from that node over HTTP. Each run lists the tools, calls
node_health, spawns a session with wait=true and a progress callback, and reads it back. Prints
one `OK <label> ...` line per run; exits 1 with a traceback on the first failure.
"""

import os
import sys

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

EXPECTED_TOOLS = {
    "spawn_session",
    "get_session",
    "list_sessions",
    "cancel_session",
    "session_output",
    "node_health",
    "list_providers",
    "cluster_members",
}


async def exercise(label, server, **options):
    progress = []

    async def on_progress(value, total, message):
        progress.append((value, total, message))

    async with Client(server, **options) as client:
        tools = await client.list_tools()
        names = {tool.name for tool in tools.tools}
        missing = EXPECTED_TOOLS - names
        assert not missing, f"missing tools {missing}"
        spawn = next(tool for tool in tools.tools if tool.name == "spawn_session")
        assert spawn.input_schema["type"] == "object", spawn.input_schema

        health = await client.call_tool("node_health", {})
        assert not health.is_error, health
        assert health.structured_content["status"] == "healthy", health.structured_content

        spawned = await client.call_tool(
            "spawn_session",
            {
                "session": {"kind": "command", "program": "sh", "args": ["-c", "echo py; echo thon"]},
                "wait": True,
            },
            progress_callback=on_progress,
        )
        assert not spawned.is_error, spawned
        record = spawned.structured_content
        assert record["state"] == "succeeded", record
        assert progress, "progress notifications arrived"

        got = await client.call_tool("get_session", {"id": record["id"]})
        assert got.structured_content["id"] == record["id"], got
        output = await client.call_tool("session_output", {"id": record["id"]})
        texts = [line["text"] for line in output.structured_content["lines"]]
        assert texts == ["py", "thon"], texts

        denied = await client.call_tool("get_session", {"id": "s-unknown"})
        assert denied.is_error, denied
        print(
            f"OK {label} protocol={client.protocol_version} tools={len(names)} "
            f"progress={len(progress)} session={record['id']}",
            flush=True,
        )
        return record["id"]


def http_client(url, token):
    return httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})


async def main(argv):
    if argv[1] == "http":
        url, token = argv[2], argv[3]
        for label, mode in [("http-current", "auto"), ("http-legacy", "legacy")]:
            async with http_client(url, token) as http:
                await exercise(label, streamable_http_client(url, http_client=http), mode=mode)
    elif argv[1] == "stdio":
        binary, data_dir, workdir = argv[2], argv[3], argv[4]
        params = StdioServerParameters(
            command=binary,
            args=["mcp", "--standalone", "--data-dir", data_dir],
            cwd=workdir,
        )
        for label, mode in [("stdio-current", "auto"), ("stdio-legacy", "legacy")]:
            await exercise(label, params, mode=mode)
    elif argv[1] == "bridge":
        binary, url, token = argv[2], argv[3], argv[4]
        # The SDK passes only a few variables to the server by default; discovery needs
        # TROUPE_DISCOVERY_DIR (and the user's runtime directory) to find the node.
        params = StdioServerParameters(command=binary, args=["mcp"], env=dict(os.environ))
        for label, mode in [("bridge-current", "auto"), ("bridge-legacy", "legacy")]:
            session = await exercise(label, params, mode=mode)
            async with http_client(url, token) as http:
                async with Client(streamable_http_client(url, http_client=http)) as client:
                    got = await client.call_tool("get_session", {"id": session})
                    assert not got.is_error, f"{session} is not on the node at {url}: {got}"
            print(f"OK {label}-same-node session={session} url={url}", flush=True)
    else:
        raise SystemExit(f"unknown transport {argv[1]!r}; use http, stdio or bridge")


if __name__ == "__main__":
    anyio.run(main, sys.argv)
