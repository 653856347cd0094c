// SPDX-License-Identifier: LGPL-2.1-or-later
// The official openai client, used as a user would, against provider-router.
//
//   node chat.mjs BASE_URL [PROVIDER]
//
// Runs a normal chat, a streamed chat and a request to an unknown provider, and prints one JSON
// object with what the client saw; the Python test judges it. PROVIDER, when given, is sent as
// X-Provider on every request.
import OpenAI from 'openai';

const [baseURL, provider] = process.argv.slice(2);
if (!baseURL) {
  console.error('usage: node chat.mjs BASE_URL [PROVIDER]');
  process.exit(2);
}

const client = new OpenAI({
  baseURL,
  apiKey: 'sk-test-not-a-real-key',
  maxRetries: 0,
  timeout: 30_000,
  defaultHeaders: provider ? { 'X-Provider': provider } : {},
});

const messages = [
  { role: 'system', content: 'You are a test.' },
  { role: 'user', content: 'Say hello to the router' },
];
const out = {};

{
  const { data, response } = await client.chat.completions
    .create({ model: 'test-model', messages })
    .withResponse();
  out.chat = {
    content: data.choices[0].message.content,
    finish_reason: data.choices[0].finish_reason,
    model: data.model,
    usage: data.usage ?? null,
    x_provider: response.headers.get('x-provider'),
    x_request_id: response.headers.get('x-request-id'),
  };
}

{
  const { data: stream, response } = await client.chat.completions
    .create({ model: 'test-model', messages, stream: true })
    .withResponse();
  let content = '';
  let chunks = 0;
  let finish = null;
  for await (const chunk of stream) {
    chunks++;
    for (const choice of chunk.choices ?? []) {
      content += choice.delta?.content ?? '';
      finish = choice.finish_reason ?? finish;
    }
  }
  out.stream = {
    content,
    chunks,
    finish_reason: finish,
    x_provider: response.headers.get('x-provider'),
    content_type: response.headers.get('content-type'),
  };
}

try {
  await client.chat.completions.create(
    { model: 'test-model', messages },
    { headers: { 'X-Provider': 'no-such-provider' } },
  );
  out.error = { thrown: false };
} catch (e) {
  out.error = {
    thrown: true,
    is_api_error: e instanceof OpenAI.APIError,
    status: e.status ?? null,
    type: e.type ?? e.error?.type ?? null,
    message: e.message,
  };
}

console.log(JSON.stringify(out));
