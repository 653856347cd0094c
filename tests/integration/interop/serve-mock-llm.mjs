// SPDX-License-Identifier: LGPL-2.1-or-later
// @dwmkerr/mock-llm (a third-party OpenAI-compatible mock server) as a provider for the interop
// test, on a loopback port chosen by the kernel. Its own entry point listens on a fixed port
// (PORT, default 6556) and never says which one it got, so this starts the same server the same
// way on port 0.
//
//   node serve-mock-llm.mjs PORT_FILE CONFIG.yaml
//
// Writes the port to PORT_FILE once it listens; SIGTERM stops it with exit status 0.
import { renameSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const { createServer } = require('@dwmkerr/mock-llm/dist/server.js');
const { loadConfig } = require('@dwmkerr/mock-llm/dist/config.js');

const [portFile, configPath] = process.argv.slice(2);
if (!portFile || !configPath) {
  console.error('usage: node serve-mock-llm.mjs PORT_FILE CONFIG.yaml');
  process.exit(2);
}

const HOST = '127.0.0.1';
const config = loadConfig(configPath);
// The server object needs the port for its A2A/MCP routes only, which the test does not use.
const app = createServer(config, HOST, 0);
const server = app.listen(0, HOST, () => {
  const { port } = server.address();
  writeFileSync(portFile + '.tmp', String(port));
  renameSync(portFile + '.tmp', portFile);
  console.error(`mock-llm listening on http://${HOST}:${port}`);
});
server.on('error', (err) => {
  console.error(err);
  process.exit(1);
});

let stopping = false;
const stop = () => {
  if (stopping) return;
  stopping = true;
  server.close(() => process.exit(0));
  server.closeAllConnections?.();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
