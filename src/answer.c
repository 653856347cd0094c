/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <stdarg.h>

#include <json-glib/json-glib.h>

#include "answer.h"

/* A whole (not streamed) answer is read at most this far; a stream's single event too. */
#define ANSWER_BODY_MAX (4 * 1024 * 1024)

void answer_summary_init(AnswerSummary *s, const char *provider) {
        *s = (AnswerSummary) {
                .provider = g_strdup(provider),
                .ttfb_usec = USEC_INFINITY,
                .prompt_tokens = UINT64_MAX,
                .completion_tokens = UINT64_MAX,
                .tool_calls = g_ptr_array_new_with_free_func(g_free),
                .text = g_string_new(NULL),
        };
}

void answer_summary_clear(AnswerSummary *s) {
        g_free(s->provider);
        g_free(s->finish_reason);
        if (s->tool_calls)
                g_ptr_array_unref(s->tool_calls);
        if (s->text)
                g_string_free(s->text, TRUE);
        g_free(s->error);
        *s = (AnswerSummary) {};
}

void answer_summary_copy(AnswerSummary *dst, const AnswerSummary *src) {
        answer_summary_init(dst, src->provider);
        dst->status = src->status;
        dst->ttfb_usec = src->ttfb_usec;
        dst->duration_usec = src->duration_usec;
        dst->prompt_tokens = src->prompt_tokens;
        dst->completion_tokens = src->completion_tokens;
        dst->finish_reason = g_strdup(src->finish_reason);
        for (guint i = 0; src->tool_calls && i < src->tool_calls->len; i++)
                g_ptr_array_add(dst->tool_calls, g_strdup(src->tool_calls->pdata[i]));
        if (src->text)
                g_string_append_len(dst->text, src->text->str, (gssize) src->text->len);
        dst->answer_length = src->answer_length;
        dst->error = g_strdup(src->error);
}

double answer_summary_tokens_per_sec(const AnswerSummary *s) {
        usec_t generating;

        if (s->completion_tokens == UINT64_MAX || s->completion_tokens == 0 || s->ttfb_usec == USEC_INFINITY ||
            s->duration_usec <= s->ttfb_usec)
                return 0;
        generating = s->duration_usec - s->ttfb_usec;
        return (double) s->completion_tokens * (double) USEC_PER_SEC / (double) generating;
}

void answer_summary_set_error(AnswerSummary *s, const char *format, ...) {
        va_list ap;

        if (s->error)
                return; /* the first reason is the one */
        va_start(ap, format);
        s->error = g_strdup_vprintf(format, ap);
        va_end(ap);
}

static void add_text(AnswerSummary *s, const char *text) {
        size_t n = strlen(text);

        s->answer_length += n;
        if (s->text->len < ANSWER_TEXT_MAX)
                g_string_append_len(s->text, text, (gssize) MIN(n, ANSWER_TEXT_MAX - s->text->len));
}

static void add_tool_call(AnswerSummary *s, const char *name) {
        if (!isempty(name) && s->tool_calls->len < ANSWER_TOOL_CALLS_MAX)
                g_ptr_array_add(s->tool_calls, g_strdup(name));
}

static void set_finish(AnswerSummary *s, const char *reason) {
        if (isempty(reason))
                return;
        g_free(s->finish_reason);
        s->finish_reason = g_strdup(reason);
}

void answer_summary_set_answer(AnswerSummary *s, const char *text, const char *finish_reason) {
        add_text(s, text);
        set_finish(s, finish_reason);
}

static const char *member_string(JsonObject *o, const char *name) {
        JsonNode *n = o ? json_object_get_member(o, name) : NULL;

        if (!n || !JSON_NODE_HOLDS_VALUE(n) || json_node_get_value_type(n) != G_TYPE_STRING)
                return NULL;
        return json_node_get_string(n);
}

static JsonObject *member_object(JsonObject *o, const char *name) {
        JsonNode *n = o ? json_object_get_member(o, name) : NULL;
        return n && JSON_NODE_HOLDS_OBJECT(n) ? json_node_get_object(n) : NULL;
}

static JsonArray *member_array(JsonObject *o, const char *name) {
        JsonNode *n = o ? json_object_get_member(o, name) : NULL;
        return n && JSON_NODE_HOLDS_ARRAY(n) ? json_node_get_array(n) : NULL;
}

static bool member_uint(JsonObject *o, const char *name, uint64_t *ret) {
        JsonNode *n = o ? json_object_get_member(o, name) : NULL;

        if (!n || !JSON_NODE_HOLDS_VALUE(n) || json_node_get_value_type(n) != G_TYPE_INT64 || json_node_get_int(n) < 0)
                return false;
        *ret = (uint64_t) json_node_get_int(n);
        return true;
}

static void read_usage(AnswerSummary *s, JsonObject *usage) {
        uint64_t v;

        if (!usage)
                return;
        /* Chat and completions say prompt/completion, the Responses API input/output. */
        if (member_uint(usage, "prompt_tokens", &v) || member_uint(usage, "input_tokens", &v))
                s->prompt_tokens = v;
        if (member_uint(usage, "completion_tokens", &v) || member_uint(usage, "output_tokens", &v))
                s->completion_tokens = v;
}

static void read_tool_calls(AnswerSummary *s, JsonArray *calls) {
        for (guint i = 0; calls && i < json_array_get_length(calls); i++) {
                JsonNode *n = json_array_get_element(calls, i);
                if (JSON_NODE_HOLDS_OBJECT(n))
                        add_tool_call(s, member_string(member_object(json_node_get_object(n), "function"), "name"));
        }
}

/* choices[0] of a chat completion (message) or chunk (delta), or of a legacy completion (text). */
static void read_choice(AnswerSummary *s, JsonObject *choice) {
        JsonObject *m = member_object(choice, "message") ?: member_object(choice, "delta");
        const char *t;

        if (m) {
                if ((t = member_string(m, "content")))
                        add_text(s, t);
                read_tool_calls(s, member_array(m, "tool_calls"));
        } else if ((t = member_string(choice, "text")))
                add_text(s, t);
        set_finish(s, member_string(choice, "finish_reason"));
}

/* The Responses API's output items: messages with output_text parts, function calls. */
static void read_output(AnswerSummary *s, JsonArray *output) {
        for (guint i = 0; output && i < json_array_get_length(output); i++) {
                JsonNode *n = json_array_get_element(output, i);
                JsonObject *item;
                const char *type;

                if (!JSON_NODE_HOLDS_OBJECT(n))
                        continue;
                item = json_node_get_object(n);
                type = member_string(item, "type");
                if (type && streq(type, "function_call"))
                        add_tool_call(s, member_string(item, "name"));
                else if (type && streq(type, "message")) {
                        JsonArray *parts = member_array(item, "content");
                        for (guint j = 0; parts && j < json_array_get_length(parts); j++) {
                                JsonNode *p = json_array_get_element(parts, j);
                                if (JSON_NODE_HOLDS_OBJECT(p)) {
                                        const char *t = member_string(json_node_get_object(p), "text");
                                        if (t)
                                                add_text(s, t);
                                }
                        }
                }
        }
}

static void read_response_object(AnswerSummary *s, JsonObject *response) {
        read_output(s, member_array(response, "output"));
        read_usage(s, member_object(response, "usage"));
        set_finish(s, member_string(response, "status"));
}

/* One JSON object: a whole answer, or a stream's chunk or event. */
static void read_object(AnswerSummary *s, JsonObject *o, bool stream) {
        JsonArray *choices = member_array(o, "choices");
        JsonObject *error = member_object(o, "error");
        const char *type = member_string(o, "type");

        if (error) {
                answer_summary_set_error(s, "%s", member_string(error, "message") ?: "error");
                return;
        }
        if (choices && json_array_get_length(choices) > 0) {
                JsonNode *c = json_array_get_element(choices, 0);
                if (JSON_NODE_HOLDS_OBJECT(c))
                        read_choice(s, json_node_get_object(c));
        }
        read_usage(s, member_object(o, "usage"));

        if (!stream) {
                if (member_array(o, "output"))
                        read_response_object(s, o);
                return;
        }
        /* Responses API stream events. */
        if (!type)
                return;
        if (streq(type, "response.output_text.delta")) {
                const char *d = member_string(o, "delta");
                if (d)
                        add_text(s, d);
        } else if (streq(type, "response.output_item.added") || streq(type, "response.output_item.done")) {
                JsonObject *item = member_object(o, "item");
                const char *t = member_string(item, "type");
                if (t && streq(t, "function_call") && streq(type, "response.output_item.added"))
                        add_tool_call(s, member_string(item, "name"));
        } else if (streq(type, "response.completed") || streq(type, "response.incomplete") ||
                   streq(type, "response.failed")) {
                JsonObject *r = member_object(o, "response");
                read_usage(s, member_object(r, "usage"));
                set_finish(s, member_string(r, "status"));
        }
}

static void read_json(AnswerSummary *s, const char *data, size_t size, bool stream) {
        g_autoptr(JsonParser) parser = json_parser_new_immutable();
        JsonNode *root;

        if (!json_parser_load_from_data(parser, data, (gssize) size, NULL)) {
                if (!stream)
                        answer_summary_set_error(s, "the answer is not JSON");
                return;
        }
        root = json_parser_get_root(parser);
        if (root && JSON_NODE_HOLDS_OBJECT(root))
                read_object(s, json_node_get_object(root), stream);
}

void answer_reader_init(AnswerReader *r, AnswerSummary *summary, bool stream) {
        *r = (AnswerReader) {
                .summary = summary,
                .stream = stream,
                .buf = g_byte_array_new(),
        };
}

void answer_reader_clear(AnswerReader *r) {
        if (r->buf)
                g_byte_array_unref(r->buf);
        *r = (AnswerReader) {};
}

void answer_reader_event(AnswerReader *r, const char *event, size_t size) {
        g_autoptr(GString) data = sse_event_data_joined(event, size);

        if (!data || data->len == 0 || data->str[0] != '{')
                return; /* comments, [DONE] */
        read_json(r->summary, data->str, data->len, true);
}

static void on_event(const char *event, size_t size, void *userdata) {
        answer_reader_event(userdata, event, size);
}

void answer_reader_feed(AnswerReader *r, const char *data, size_t size) {
        if (r->too_large)
                return;
        if (r->buf->len + size > ANSWER_BODY_MAX) {
                r->too_large = true;
                answer_summary_set_error(r->summary, "the answer is larger than %u bytes", ANSWER_BODY_MAX);
                return;
        }
        g_byte_array_append(r->buf, (const guint8 *) data, (guint) size);
        if (!r->stream)
                return;
        sse_scanner_scan(&r->sse, (const char *) r->buf->data, r->buf->len, on_event, r);
        if (r->sse.boundary > 0) {
                size_t n = r->sse.boundary;
                g_byte_array_remove_range(r->buf, 0, (guint) n);
                sse_scanner_consumed(&r->sse, n);
        }
}

void answer_reader_finish(AnswerReader *r) {
        if (!r->stream && !r->too_large && r->buf->len > 0)
                read_json(r->summary, (const char *) r->buf->data, r->buf->len, false);
        g_byte_array_set_size(r->buf, 0);
}
