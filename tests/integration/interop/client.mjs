// SPDX-License-Identifier: LGPL-2.1-or-later
// Third-party OpenAI clients, used as their users use them, for the interop test.
//
//   node client.mjs CLIENT BASE_URL PLAN.json
//
// CLIENT is one of: openai (the official `openai` package), ai-sdk (Vercel AI SDK `ai` with
// `@ai-sdk/openai-compatible`), langchain (`@langchain/openai`). BASE_URL ends in /v1. PLAN.json
// holds a list of scenarios ({name, kind, ...}); each runs in turn and the script prints one JSON
// object {name: result} on its last line. A result holds what the client saw, normalised the
// same way whatever the base URL: text, tool calls, usage, finish reason, the error's class,
// status and body, the model list, and the response headers a client relies on. The Python test
// runs the same plan direct and through the router and compares the two.
//
// Kinds: chat, stream, tools (stream: bool), models, model_get (id), responses (stream: bool).
// Common fields: model, message, headers (extra request headers), organization, project,
// api_key, include_usage (stream).
import { readFileSync } from 'node:fs';

const [clientName, baseURL, planPath] = process.argv.slice(2);
if (!clientName || !baseURL || !planPath) {
  console.error('usage: node client.mjs openai|ai-sdk|langchain BASE_URL PLAN.json');
  process.exit(2);
}
const plan = JSON.parse(readFileSync(planPath, 'utf8'));
const API_KEY = 'sk-test-not-a-real-key';

// Response headers a client (or its user) acts on. Hop-by-hop and framing headers are not here.
const HEADERS_OF_INTEREST = /^(content-type|retry-after|x-ratelimit-.*|x-request-id|x-provider-request-id|x-provider|openai-.*)$/;

function pickHeaders(h) {
  if (!h) return null;
  const out = {};
  const entries = typeof h.entries === 'function' ? [...h.entries()] : Object.entries(h);
  for (const [k, v] of entries) {
    const name = k.toLowerCase();
    if (HEADERS_OF_INTEREST.test(name)) out[name] = String(v);
  }
  return Object.fromEntries(Object.entries(out).sort());
}

function parseMaybeJSON(text) {
  if (typeof text !== 'string') return text ?? null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

const WEATHER_PARAMETERS = {
  type: 'object',
  properties: {
    city: { type: 'string' },
    unit: { type: 'string', enum: ['celsius', 'fahrenheit'] },
  },
  required: ['city'],
  additionalProperties: false,
};

// Every client is given this fetch: it remembers the last answer, so that a client whose API
// hides the response headers (LangChain) or extra body members still shows them.
let lastAnswer = null;
async function recordingFetch(input, init) {
  const response = await fetch(input, init);
  lastAnswer = { headers: pickHeaders(response.headers), received_headers: null };
  if ((response.headers.get('content-type') ?? '').startsWith('application/json')) {
    try {
      const body = await response.clone().json();
      lastAnswer.received_headers = body?.received_headers ?? null;
    } catch {
      // not JSON after all: nothing to remember
    }
  }
  return response;
}

const SYSTEM = 'You are a test.';

function messagesFor(s) {
  return [
    { role: 'system', content: SYSTEM },
    { role: 'user', content: s.message },
  ];
}

// --- openai -------------------------------------------------------------------------------------

async function openaiClient() {
  const { default: OpenAI } = await import('openai');

  const make = (s) =>
    new OpenAI({
      baseURL,
      apiKey: s.api_key ?? API_KEY,
      organization: s.organization ?? null,
      project: s.project ?? null,
      maxRetries: 0,
      timeout: 30_000,
      defaultHeaders: s.headers ?? {},
      fetch: recordingFetch,
    });

  const error = (e) => {
    if (!(e instanceof OpenAI.APIError)) throw e;
    return {
      error: {
        class: e.constructor.name,
        status: e.status ?? null,
        body: e.error ?? null,
        code: e.code ?? null,
        type: e.type ?? null,
        message: e.message,
        headers: pickHeaders(e.headers),
      },
    };
  };

  const tools = [{ type: 'function', function: { name: 'get_weather', description: 'Weather in a city.', parameters: WEATHER_PARAMETERS } }];

  return {
    async chat(s) {
      const client = make(s);
      try {
        const { data, response } = await client.chat.completions
          .create({ model: s.model, messages: messagesFor(s), ...(s.tools ? { tools } : {}) })
          .withResponse();
        const c = data.choices[0];
        return {
          text: c.message.content,
          tool_calls: (c.message.tool_calls ?? []).map((t) => ({ id: t.id, name: t.function.name, arguments: t.function.arguments })),
          finish_reason: c.finish_reason,
          usage: data.usage ?? null,
          model: data.model,
          id: data.id,
          received_headers: lastAnswer?.received_headers ?? null,
          headers: pickHeaders(response.headers),
        };
      } catch (e) {
        return error(e);
      }
    },
    async tools(s) {
      if (!s.stream) return this.chat({ ...s, tools: true });
      return this.stream({ ...s, tools: true });
    },
    async stream(s) {
      const client = make(s);
      try {
        const { data: stream, response } = await client.chat.completions
          .create({
            model: s.model,
            messages: messagesFor(s),
            stream: true,
            ...(s.include_usage ? { stream_options: { include_usage: true } } : {}),
            ...(s.tools ? { tools } : {}),
          })
          .withResponse();
        const deltas = [];
        const calls = {};
        let finish = null;
        let usage = null;
        let chunks = 0;
        for await (const chunk of stream) {
          chunks++;
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices ?? []) {
            if (choice.delta?.content) deltas.push(choice.delta.content);
            for (const t of choice.delta?.tool_calls ?? []) {
              const c = (calls[t.index] ??= { id: null, name: '', arguments: '' });
              if (t.id) c.id = t.id;
              if (t.function?.name) c.name += t.function.name;
              if (t.function?.arguments) c.arguments += t.function.arguments;
            }
            finish = choice.finish_reason ?? finish;
          }
        }
        return {
          text: deltas.join(''),
          deltas,
          chunks,
          tool_calls: Object.values(calls),
          finish_reason: finish,
          usage,
          headers: pickHeaders(response.headers),
        };
      } catch (e) {
        return error(e);
      }
    },
    async models(s) {
      const client = make(s);
      try {
        const { data: page, response } = await client.models.list().withResponse();
        return { models: page.data, headers: pickHeaders(response.headers) };
      } catch (e) {
        return error(e);
      }
    },
    async model_get(s) {
      const client = make(s);
      try {
        const { data, response } = await client.models.retrieve(s.id).withResponse();
        return { model: data, headers: pickHeaders(response.headers) };
      } catch (e) {
        return error(e);
      }
    },
    async responses(s) {
      const client = make(s);
      try {
        if (!s.stream) {
          const { data, response } = await client.responses.create({ model: s.model, input: s.message }).withResponse();
          return { text: data.output_text, status: data.status, usage: data.usage ?? null, id: data.id, headers: pickHeaders(response.headers) };
        }
        const { data: stream, response } = await client.responses
          .create({ model: s.model, input: s.message, stream: true })
          .withResponse();
        const types = [];
        const deltas = [];
        let done = null;
        for await (const ev of stream) {
          types.push(ev.type);
          if (ev.type === 'response.output_text.delta') deltas.push(ev.delta);
          if (ev.type === 'response.completed') done = ev.response;
        }
        return {
          text: deltas.join(''),
          deltas,
          event_types: types,
          status: done?.status ?? null,
          usage: done?.usage ?? null,
          headers: pickHeaders(response.headers),
        };
      } catch (e) {
        return error(e);
      }
    },
  };
}

// --- Vercel AI SDK ------------------------------------------------------------------------------

async function aiSdkClient() {
  const { generateText, streamText, tool, jsonSchema, APICallError } = await import('ai');
  const { createOpenAICompatible } = await import('@ai-sdk/openai-compatible');

  const provider = (s) =>
    createOpenAICompatible({
      name: 'interop',
      baseURL,
      apiKey: s.api_key ?? API_KEY,
      headers: {
        ...(s.organization ? { 'OpenAI-Organization': s.organization } : {}),
        ...(s.project ? { 'OpenAI-Project': s.project } : {}),
        ...(s.headers ?? {}),
      },
      includeUsage: !!s.include_usage,
      fetch: recordingFetch,
    });

  const tools = { get_weather: tool({ description: 'Weather in a city.', inputSchema: jsonSchema(WEATHER_PARAMETERS) }) };

  const error = (e) => {
    // Without retries the SDK throws the API call's own error.
    const err = APICallError.isInstance(e) ? e : e?.cause && APICallError.isInstance(e.cause) ? e.cause : null;
    if (!err) throw e;
    return {
      error: {
        class: err.name,
        status: err.statusCode ?? null,
        body: parseMaybeJSON(err.responseBody),
        retryable: err.isRetryable,
        message: err.message,
        headers: pickHeaders(err.responseHeaders),
      },
    };
  };

  const usage = (u) => (u ? { input: u.inputTokens ?? null, output: u.outputTokens ?? null, total: u.totalTokens ?? null } : null);

  const sdk = {
    async chat(s) {
      try {
        const r = await generateText({
          model: provider(s).chatModel(s.model),
          system: SYSTEM,
          prompt: s.message,
          maxRetries: 0,
          ...(s.tools ? { tools } : {}),
        });
        return {
          text: r.text,
          tool_calls: r.toolCalls.map((t) => ({ id: t.toolCallId, name: t.toolName, arguments: JSON.stringify(t.input) })),
          finish_reason: r.finishReason,
          usage: usage(r.usage),
          model: r.response.modelId,
          id: r.response.id,
          received_headers: lastAnswer?.received_headers ?? null,
          headers: pickHeaders(r.response.headers),
        };
      } catch (e) {
        return error(e);
      }
    },
    async tools(s) {
      return s.stream ? sdk.stream({ ...s, tools: true }) : sdk.chat({ ...s, tools: true });
    },
    async stream(s) {
      let failure = null;
      const r = streamText({
        model: provider(s).chatModel(s.model),
        system: SYSTEM,
        prompt: s.message,
        maxRetries: 0,
        ...(s.tools ? { tools } : {}),
        onError: ({ error: e }) => {
          failure = e;
        },
      });
      const deltas = [];
      const calls = [];
      let finish = null;
      let u = null;
      try {
        for await (const part of r.fullStream) {
          if (part.type === 'text-delta') deltas.push(part.text);
          else if (part.type === 'tool-call') calls.push({ id: part.toolCallId, name: part.toolName, arguments: JSON.stringify(part.input) });
          else if (part.type === 'finish') {
            finish = part.finishReason;
            u = part.totalUsage;
          } else if (part.type === 'error') failure = part.error;
        }
      } catch (e) {
        failure = e;
      }
      if (failure) return error(failure);
      const response = await r.response;
      return { text: deltas.join(''), deltas, tool_calls: calls, finish_reason: finish, usage: usage(u), headers: pickHeaders(response.headers) };
    },
  };
  return sdk;
}

// --- LangChain ----------------------------------------------------------------------------------

async function langchainClient() {
  const { ChatOpenAI } = await import('@langchain/openai');

  const make = (s, extra = {}) =>
    new ChatOpenAI({
      model: s.model,
      apiKey: s.api_key ?? API_KEY,
      maxRetries: 0,
      timeout: 30_000,
      streamUsage: !!s.include_usage,
      configuration: {
        baseURL,
        organization: s.organization ?? null,
        project: s.project ?? null,
        defaultHeaders: s.headers ?? {},
        fetch: recordingFetch,
      },
      ...extra,
    });

  const error = (e) => {
    if (typeof e?.status !== 'number') throw e;
    return {
      error: {
        class: e.constructor.name,
        name: e.name,
        status: e.status,
        body: e.error ?? null,
        code: e.code ?? null,
        lc_error_code: e.lc_error_code ?? null,
        message: e.message,
        headers: pickHeaders(e.headers),
      },
    };
  };

  const tools = [{ type: 'function', function: { name: 'get_weather', description: 'Weather in a city.', parameters: WEATHER_PARAMETERS } }];

  const usage = (m) => m.usage_metadata ? { input: m.usage_metadata.input_tokens, output: m.usage_metadata.output_tokens, total: m.usage_metadata.total_tokens } : null;
  const calls = (m) => (m.tool_calls ?? []).map((t) => ({ id: t.id, name: t.name, arguments: JSON.stringify(t.args) }));

  const lc = {
    async chat(s) {
      try {
        let model = make(s);
        if (s.tools) model = model.bindTools(tools);
        const m = await model.invoke(messagesFor(s));
        return {
          text: m.content,
          tool_calls: calls(m),
          finish_reason: m.response_metadata?.finish_reason ?? null,
          usage: usage(m),
          model: m.response_metadata?.model_name ?? null,
          id: m.id ?? null,
          received_headers: lastAnswer?.received_headers ?? null,
          headers: lastAnswer?.headers ?? null,
        };
      } catch (e) {
        return error(e);
      }
    },
    async tools(s) {
      return s.stream ? lc.stream({ ...s, tools: true }) : lc.chat({ ...s, tools: true });
    },
    async stream(s) {
      try {
        let model = make(s);
        if (s.tools) model = model.bindTools(tools);
        const deltas = [];
        let all = null;
        for await (const chunk of await model.stream(messagesFor(s))) {
          if (typeof chunk.content === 'string' && chunk.content) deltas.push(chunk.content);
          all = all ? all.concat(chunk) : chunk;
        }
        return {
          text: deltas.join(''),
          deltas,
          tool_calls: all ? calls(all) : [],
          finish_reason: all?.response_metadata?.finish_reason ?? null,
          usage: all ? usage(all) : null,
          headers: lastAnswer?.headers ?? null,
        };
      } catch (e) {
        return error(e);
      }
    },
    async responses(s) {
      try {
        const model = make(s, { useResponsesApi: true });
        if (!s.stream) {
          const m = await model.invoke(s.message);
          return { text: m.text, usage: usage(m), status: m.response_metadata?.status ?? null, headers: lastAnswer?.headers ?? null };
        }
        const deltas = [];
        let all = null;
        for await (const chunk of await model.stream(s.message)) {
          if (chunk.text) deltas.push(chunk.text);
          all = all ? all.concat(chunk) : chunk;
        }
        return { text: deltas.join(''), deltas, usage: all ? usage(all) : null, status: all?.response_metadata?.status ?? null, headers: lastAnswer?.headers ?? null };
      } catch (e) {
        return error(e);
      }
    },
  };
  return lc;
}

// --- main ---------------------------------------------------------------------------------------

const factories = { openai: openaiClient, 'ai-sdk': aiSdkClient, langchain: langchainClient };
if (!factories[clientName]) {
  console.error(`unknown client '${clientName}'`);
  process.exit(2);
}
const client = await factories[clientName]();
const out = {};
for (const s of plan) {
  const run = client[s.kind];
  if (!run) {
    out[s.name] = { unsupported: true };
    continue;
  }
  lastAnswer = null;
  try {
    out[s.name] = await run.call(client, s);
  } catch (e) {
    // Not an API error: the client itself failed (a parse error, a broken stream…). Reported,
    // not hidden: the test compares it like any other result.
    out[s.name] = { exception: { class: e?.constructor?.name ?? typeof e, name: e?.name ?? null, message: String(e?.message ?? e) } };
  }
}
console.log(JSON.stringify(out));
process.exit(0);
