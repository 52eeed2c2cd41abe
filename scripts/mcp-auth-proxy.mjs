#!/usr/bin/env node
// A loopback-only HTTP proxy that adds `Authorization: Bearer TOKEN` to every request and passes
// everything else through unchanged: method, path, body, and every header, Host and Origin
// included (so the node's DNS-rebinding guard sees exactly what the client sent). Responses,
// SSE streams included, are piped back as they arrive.
//
// Why it exists: the MCP conformance suite (@modelcontextprotocol/conformance) has no option to
// send an Authorization header, and every troupe MCP request needs a bearer token. Rather than
// give the node a "no auth" switch, the suite talks to this proxy for the length of one run.
//
// Usage: node scripts/mcp-auth-proxy.mjs TARGET_ORIGIN TOKEN
//   TARGET_ORIGIN is the node, e.g. http://127.0.0.1:7070 (it must be a loopback address).
//   The token is read from the TROUPE_PROXY_TOKEN environment variable when TOKEN is "-".
// Prints `listening http://127.0.0.1:PORT` on stdout once ready; exits when stdin closes, or
// on SIGTERM/SIGINT.

import http from "node:http";

const [target, tokenArgument] = process.argv.slice(2);
if (!target || !tokenArgument) {
  console.error("usage: mcp-auth-proxy.mjs TARGET_ORIGIN TOKEN|-");
  process.exit(2);
}
const token = tokenArgument === "-" ? process.env.TROUPE_PROXY_TOKEN : tokenArgument;
if (!token) {
  console.error("TOKEN is '-' but TROUPE_PROXY_TOKEN is empty");
  process.exit(2);
}
const upstream = new URL(target);
const loopback = ["127.0.0.1", "localhost", "[::1]", "::1"];
if (upstream.protocol !== "http:" || !loopback.includes(upstream.hostname)) {
  console.error(`the target must be http:// on a loopback address, not ${target}`);
  process.exit(2);
}

const server = http.createServer((request, response) => {
  const headers = { ...request.headers };
  if (!headers.authorization) {
    headers.authorization = `Bearer ${token}`;
  }
  const forwarded = http.request(
    {
      host: upstream.hostname.replace(/^\[|\]$/g, ""),
      port: upstream.port || 80,
      method: request.method,
      path: request.url,
      headers,
    },
    (answer) => {
      response.writeHead(answer.statusCode ?? 502, answer.rawHeaders);
      answer.pipe(response);
    },
  );
  forwarded.on("error", (error) => {
    if (!response.headersSent) {
      response.writeHead(502, { "content-type": "text/plain" });
    }
    response.end(`proxy: ${error.message}\n`);
  });
  // A client that goes away ends the upstream request too (the node sees it disconnect).
  response.on("close", () => forwarded.destroy());
  request.pipe(forwarded);
});

server.listen(0, "127.0.0.1", () => {
  const { port } = server.address();
  process.stdout.write(`listening http://127.0.0.1:${port}\n`);
});

const stop = () => {
  server.close();
  server.closeAllConnections();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
process.stdin.on("end", stop);
process.stdin.on("error", stop);
process.stdin.resume();
