// SPDX-License-Identifier: LGPL-2.1-or-later
// @copilotkit/aimock (a third-party OpenAI-compatible mock server) as a provider for the interop
// test, on a loopback port chosen by the kernel.
//
//   node serve-aimock.mjs PORT_FILE FIXTURES.json
//
// Writes the port to PORT_FILE once it listens; SIGTERM stops it with exit status 0.
import { renameSync, writeFileSync } from 'node:fs';
import { LLMock } from '@copilotkit/aimock';

const [portFile, fixtures] = process.argv.slice(2);
if (!portFile || !fixtures) {
  console.error('usage: node serve-aimock.mjs PORT_FILE FIXTURES.json');
  process.exit(2);
}

// Small chunks so that a short answer is a stream of several events; no artificial latency.
const mock = new LLMock({ host: '127.0.0.1', port: 0, chunkSize: 8, latency: 0, logLevel: 'warn' });
mock.loadFixtureFile(fixtures);
await mock.start();
// Renamed into place: the reader never sees a half-written file.
writeFileSync(portFile + '.tmp', String(mock.port));
renameSync(portFile + '.tmp', portFile);
console.error(`aimock listening on ${mock.url}`);

let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  await mock.stop();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
