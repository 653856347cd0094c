/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>
#include <stdarg.h>

#include <json-glib/json-glib.h>

#include "json-util.h"
#include "log.h"
#include "models.h"
#include "probe.h"

typedef enum ProbeStep {
        STEP_MODELS,
        STEP_PLAIN,
        STEP_STREAM,
        STEP_USAGE,
        STEP_TOOL_ARGS,
        _STEP_MAX,
} ProbeStep;

struct Probe {
        Worker *worker;
        ProviderSet *set;            /* ref: keeps the provider */
        Provider *provider;
        char request_id[72];
        ProbeStep step;
        Mirror *mirror;
        sd_event_source *defer;
        ProbeResult result;
        ProbeDoneFunc done;
        void *userdata;

        /* what the current stream's events showed */
        uint64_t events;
        bool saw_done;
        bool event_after_done;
        uint64_t tool_deltas;
        uint64_t tool_deltas_without_index;
        uint64_t argument_pieces;
};

static void probe_check_free(gpointer p) {
        ProbeCheck *c = p;
        g_free(c->detail);
        g_free(c);
}

static void probe_add(Probe *p, const char *name, bool ok, const char *format, ...) _printf_(4, 5);
static void probe_add(Probe *p, const char *name, bool ok, const char *format, ...) {
        ProbeCheck *c = g_new0(ProbeCheck, 1);
        va_list ap;

        c->name = name;
        c->ok = ok;
        va_start(ap, format);
        c->detail = g_strdup_vprintf(format, ap);
        va_end(ap);
        g_ptr_array_add(p->result.checks, c);
        if (!ok)
                p->result.passed = false;
}

static void probe_free(Probe *p) {
        p->mirror = mirror_cancel(p->mirror);
        sd_event_source_disable_unref(p->defer);
        provider_set_unref(p->set);
        g_free(p->result.provider);
        g_free(p->result.model);
        g_ptr_array_unref(p->result.checks);
        g_free(p);
}

Probe *probe_cancel(Probe *p) {
        if (p)
                probe_free(p);
        return NULL;
}

static char *probe_body(Probe *p, ProbeStep step) {
        g_autoptr(JsonBuilder) b = json_builder_new_immutable();
        const char *prompt = step == STEP_TOOL_ARGS
                                     ? "Record this sentence with the record_sentence tool: The quick brown fox jumps over the lazy dog."
                                     : "Reply with one word: pong";

        json_builder_begin_object(b);
        json_builder_add_chat(b, provider_model_name(p->provider, p->result.model), prompt);
        json_builder_set_member_name(b, "max_tokens");
        json_builder_add_int_value(b, step == STEP_TOOL_ARGS ? 128 : 16);
        if (step != STEP_PLAIN) {
                json_builder_set_member_name(b, "stream");
                json_builder_add_boolean_value(b, true);
        }
        if (step == STEP_USAGE) {
                json_builder_set_member_name(b, "stream_options");
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "include_usage");
                json_builder_add_boolean_value(b, true);
                json_builder_end_object(b);
        }
        if (step == STEP_TOOL_ARGS) {
                json_builder_set_member_name(b, "tools");
                json_builder_begin_array(b);
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "type");
                json_builder_add_string_value(b, "function");
                json_builder_set_member_name(b, "function");
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "name");
                json_builder_add_string_value(b, "record_sentence");
                json_builder_set_member_name(b, "description");
                json_builder_add_string_value(b, "Records one sentence.");
                json_builder_set_member_name(b, "parameters");
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "type");
                json_builder_add_string_value(b, "object");
                json_builder_set_member_name(b, "properties");
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "sentence");
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "type");
                json_builder_add_string_value(b, "string");
                json_builder_end_object(b);
                json_builder_end_object(b);
                json_builder_set_member_name(b, "required");
                json_builder_begin_array(b);
                json_builder_add_string_value(b, "sentence");
                json_builder_end_array(b);
                json_builder_end_object(b);
                json_builder_end_object(b);
                json_builder_end_object(b);
                json_builder_end_array(b);
                json_builder_set_member_name(b, "tool_choice");
                json_builder_add_string_value(b, "required");
        }
        json_builder_end_object(b);
        return json_builder_to_string(b, NULL);
}

/* Each event of a streamed check: [DONE] last, tool-call deltas with their index. */
static void probe_on_event(const char *event, size_t size, void *userdata) {
        Probe *p = userdata;
        g_autoptr(GString) data = sse_event_data_joined(event, size);
        g_autoptr(JsonParser) parser = NULL;
        JsonNode *root, *n;
        JsonArray *choices, *calls;

        if (!data)
                return;
        if (p->saw_done)
                p->event_after_done = true;
        p->events++;
        if (streq(data->str, "[DONE]")) {
                p->saw_done = true;
                return;
        }
        if (p->step != STEP_TOOL_ARGS)
                return;

        parser = json_parser_new_immutable();
        if (!json_parser_load_from_data(parser, data->str, (gssize) data->len, NULL))
                return;
        root = json_parser_get_root(parser);
        if (!root || !JSON_NODE_HOLDS_OBJECT(root))
                return;
        n = json_object_get_member(json_node_get_object(root), "choices");
        if (!n || !JSON_NODE_HOLDS_ARRAY(n) || json_array_get_length(choices = json_node_get_array(n)) == 0)
                return;
        n = json_array_get_element(choices, 0);
        if (!JSON_NODE_HOLDS_OBJECT(n) || !(n = json_object_get_member(json_node_get_object(n), "delta")) ||
            !JSON_NODE_HOLDS_OBJECT(n) || !(n = json_object_get_member(json_node_get_object(n), "tool_calls")) ||
            !JSON_NODE_HOLDS_ARRAY(n))
                return;
        calls = json_node_get_array(n);
        for (guint i = 0; i < json_array_get_length(calls); i++) {
                JsonNode *c = json_array_get_element(calls, i), *f, *a;
                JsonObject *o;

                if (!JSON_NODE_HOLDS_OBJECT(c))
                        continue;
                o = json_node_get_object(c);
                p->tool_deltas++;
                if (!json_object_has_member(o, "index"))
                        p->tool_deltas_without_index++;
                f = json_object_get_member(o, "function");
                if (f && JSON_NODE_HOLDS_OBJECT(f) && (a = json_object_get_member(json_node_get_object(f), "arguments")) &&
                    JSON_NODE_HOLDS_VALUE(a) && json_node_get_value_type(a) == G_TYPE_STRING &&
                    !isempty(json_node_get_string(a)))
                        p->argument_pieces++;
        }
}

static void probe_next(Probe *p);

static void probe_models_done(Probe *p, const AnswerSummary *s, const GByteArray *body) {
        g_auto(GStrv) ids = NULL;
        const ProviderConfig *pc = p->provider->config;
        const char *wanted = pc->default_model ?: (pc->models ? pc->models[0] : NULL);

        if (s->status != 200 || !body || models_parse_list((const char *) body->data, body->len, &ids) < 0) {
                probe_add(p, "models", false, "GET /models: %s", s->error ?: "not a model list");
                p->result.model = g_strdup(wanted ?: "gpt-4o-mini");
                return;
        }
        if (wanted) {
                bool listed = g_strv_contains((const char *const *) ids, provider_model_name(p->provider, wanted));
                p->result.model = g_strdup(wanted);
                probe_add(p, "models", listed, listed ? "lists '%s' (%u model(s))" : "does not list '%s' (%u model(s))",
                          provider_model_name(p->provider, wanted), g_strv_length(ids));
                return;
        }
        p->result.model = g_strdup(ids[0] ?: "gpt-4o-mini");
        probe_add(p, "models", ids[0] != NULL, ids[0] ? "lists %u model(s), e.g. '%s'" : "lists no model",
                  g_strv_length(ids), strempty(ids[0]));
}

static void probe_on_done(Mirror *m, const AnswerSummary *s, void *userdata) {
        Probe *p = userdata;

        p->mirror = NULL;
        switch (p->step) {
        case STEP_MODELS:
                probe_models_done(p, s, m ? mirror_body(m) : NULL);
                break;
        case STEP_PLAIN:
                if (s->error)
                        probe_add(p, "plain", false, "%s", s->error);
                else if (s->text->len > 0)
                        probe_add(p, "plain", true, "answered '%.40s'", s->text->str);
                else
                        probe_add(p, "plain", false, "answered with no text");
                break;
        case STEP_STREAM:
                p->result.ttfb_usec = s->ttfb_usec;
                if (s->error)
                        probe_add(p, "stream", false, "%s", s->error);
                else if (p->saw_done && !p->event_after_done)
                        probe_add(p, "stream", true, "%" PRIu64 " event(s), ends with [DONE]", p->events);
                else if (p->saw_done)
                        probe_add(p, "stream", false, "%" PRIu64 " event(s), more after [DONE]", p->events);
                else
                        probe_add(p, "stream", false, "%" PRIu64 " event(s), no [DONE] at the end", p->events);
                if (s->ttfb_usec != USEC_INFINITY)
                        probe_add(p, "ttfb", true, "first byte after %.1f ms", (double) s->ttfb_usec / USEC_PER_MSEC);
                else
                        probe_add(p, "ttfb", false, "no byte came");
                break;
        case STEP_USAGE:
                if (s->error)
                        probe_add(p, "usage", false, "%s", s->error);
                else if (s->completion_tokens != UINT64_MAX)
                        probe_add(p, "usage", true, "usage chunk: %" PRIu64 " prompt + %" PRIu64 " completion tokens",
                                  s->prompt_tokens == UINT64_MAX ? 0 : s->prompt_tokens, s->completion_tokens);
                else
                        probe_add(p, "usage", false, "no usage chunk with stream_options.include_usage");
                break;
        case STEP_TOOL_ARGS:
                if (s->error)
                        probe_add(p, "tool-args", false, "%s", s->error);
                else if (p->tool_deltas == 0)
                        probe_add(p, "tool-args", false, "no tool-call deltas in the stream");
                else if (p->tool_deltas_without_index > 0)
                        probe_add(p, "tool-args", false, "%" PRIu64 " of %" PRIu64 " tool-call deltas have no index",
                                  p->tool_deltas_without_index, p->tool_deltas);
                else if (p->argument_pieces >= 2)
                        probe_add(p, "tool-args", true, "arguments in %" PRIu64 " pieces, each with its index",
                                  p->argument_pieces);
                else
                        probe_add(p, "tool-args", false, "arguments arrived in %" PRIu64 " piece, not incrementally",
                                  p->argument_pieces);
                break;
        default:
                g_assert_not_reached();
        }
        p->step++;
        probe_next(p);
}

static int probe_on_defer(sd_event_source *s, void *userdata) {
        Probe *p = userdata;

        p->done(p, &p->result, p->userdata);
        probe_free(p);
        return 0;
}

static void probe_next(Probe *p) {
        g_autofree char *body = NULL;
        int r;

        if (p->step >= _STEP_MAX) {
                /* Told from the loop, never from inside a transfer's callback. */
                r = sd_event_add_defer(p->worker->event, &p->defer, probe_on_defer, p);
                if (r < 0)
                        log_warning_errno(r, "Failed to finish the probe of '%s': %m", p->provider->name);
                return;
        }
        p->events = p->tool_deltas = p->tool_deltas_without_index = p->argument_pieces = 0;
        p->saw_done = p->event_after_done = false;

        if (p->step != STEP_MODELS)
                body = probe_body(p, p->step);
        MirrorRequest req = {
                .provider = p->provider,
                .suffix = p->step == STEP_MODELS ? "/models" : "/chat/completions",
                .get = p->step == STEP_MODELS,
                .body = body,
                .body_size = body ? strlen(body) : 0,
                .stream = p->step != STEP_MODELS && p->step != STEP_PLAIN,
                .request_id = p->request_id,
                .keep_body = p->step == STEP_MODELS,
                .timeout = PROBE_STEP_TIMEOUT_USEC,
                .on_event = probe_on_event,
                .event_data = p,
        };
        r = mirror_pool_start(p->worker->mirrors, &req, false, probe_on_done, p, NULL, &p->mirror);
        if (r < 0) {
                AnswerSummary s;
                answer_summary_init(&s, p->provider->name);
                answer_summary_set_error(&s, "could not be started: %s", g_strerror(-r));
                /* As if it had failed: the next step runs, on the same path. */
                probe_on_done(NULL, &s, p);
                answer_summary_clear(&s);
        }
}

int probe_start(Worker *w, Provider *provider, ProbeDoneFunc done, void *userdata, Probe **ret) {
        Probe *p;

        if (provider->config->kind != PROVIDER_KIND_OPENAI)
                return -EOPNOTSUPP;
        p = g_new0(Probe, 1);
        p->worker = w;
        p->set = provider_set_ref(provider->set);
        p->provider = provider;
        p->done = done;
        p->userdata = userdata;
        p->result.provider = g_strdup(provider->name);
        p->result.passed = true;
        p->result.ttfb_usec = USEC_INFINITY;
        p->result.checks = g_ptr_array_new_with_free_func(probe_check_free);
        worker_next_request_id(w, p->request_id, sizeof(p->request_id));
        log_info("%s: probing provider '%s'.", p->request_id, provider->name);
        probe_next(p);
        *ret = p;
        return 0;
}
