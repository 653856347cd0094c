/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <json-glib/json-glib.h>

#include "echo.h"
#include "json-util.h"
#include "request.h"

/* The built-in "echo" provider answers in OpenAI's format with the last user message, so a
 * client can be tried with no backend at all. */

static void append_text(GString *s, JsonNode *content) {
        if (!content)
                return;
        if (JSON_NODE_HOLDS_VALUE(content) && json_node_get_value_type(content) == G_TYPE_STRING) {
                g_string_append(s, json_node_get_string(content));
                return;
        }
        if (JSON_NODE_HOLDS_ARRAY(content)) {
                /* [{"type":"text","text":"…"}, …] */
                JsonArray *parts = json_node_get_array(content);
                for (guint i = 0; i < json_array_get_length(parts); i++) {
                        JsonNode *part = json_array_get_element(parts, i);
                        JsonObject *o;
                        if (!JSON_NODE_HOLDS_OBJECT(part))
                                continue;
                        o = json_node_get_object(part);
                        if (json_object_has_member(o, "text") &&
                            JSON_NODE_HOLDS_VALUE(json_object_get_member(o, "text")) &&
                            json_node_get_value_type(json_object_get_member(o, "text")) == G_TYPE_STRING)
                                g_string_append(s, json_object_get_string_member(o, "text"));
                }
        }
}

static uint64_t count_words(const char *s) {
        uint64_t n = 0;
        bool in_word = false;

        for (; *s; s++) {
                bool space = g_ascii_isspace(*s);
                if (!space && !in_word)
                        n++;
                in_word = !space;
        }
        return n;
}

/* Reads the reply text and a rough token count from the request. */
static int echo_read_request(const char *body, size_t body_size, char **ret_reply, uint64_t *ret_prompt_tokens, bool *ret_include_usage) {
        g_autoptr(JsonParser) parser = json_parser_new_immutable();
        g_autoptr(GString) reply = g_string_new(NULL);
        JsonObject *o;
        JsonNode *n;
        uint64_t words = 0;

        if (!json_parser_load_from_data(parser, body, (gssize) body_size, NULL))
                return -EINVAL;
        o = json_node_get_object(json_parser_get_root(parser));

        n = json_object_get_member(o, "messages");
        if (!n || !JSON_NODE_HOLDS_ARRAY(n))
                return -EINVAL;

        JsonArray *messages = json_node_get_array(n);
        for (guint i = 0; i < json_array_get_length(messages); i++) {
                JsonNode *m = json_array_get_element(messages, i);
                g_autoptr(GString) text = g_string_new(NULL);
                JsonObject *mo;
                const char *role;

                if (!JSON_NODE_HOLDS_OBJECT(m))
                        continue;
                mo = json_node_get_object(m);
                append_text(text, json_object_get_member(mo, "content"));
                words += count_words(text->str);
                role = json_object_has_member(mo, "role") &&
                                       JSON_NODE_HOLDS_VALUE(json_object_get_member(mo, "role"))
                               ? json_object_get_string_member(mo, "role")
                               : NULL;
                if (role && streq(role, "user")) {
                        g_string_truncate(reply, 0);
                        g_string_append_len(reply, text->str, (gssize) text->len);
                }
        }

        *ret_include_usage = false;
        n = json_object_get_member(o, "stream_options");
        if (n && JSON_NODE_HOLDS_OBJECT(n)) {
                JsonNode *iu = json_object_get_member(json_node_get_object(n), "include_usage");
                *ret_include_usage = iu && JSON_NODE_HOLDS_VALUE(iu) &&
                                     json_node_get_value_type(iu) == G_TYPE_BOOLEAN && json_node_get_boolean(iu);
        }

        *ret_reply = g_string_free(g_steal_pointer(&reply), FALSE);
        *ret_prompt_tokens = words;
        return 0;
}

static void add_usage(JsonBuilder *b, uint64_t prompt, uint64_t completion) {
        json_builder_set_member_name(b, "usage");
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "prompt_tokens");
        json_builder_add_int_value(b, (gint64) prompt);
        json_builder_set_member_name(b, "completion_tokens");
        json_builder_add_int_value(b, (gint64) completion);
        json_builder_set_member_name(b, "total_tokens");
        json_builder_add_int_value(b, (gint64) (prompt + completion));
        json_builder_end_object(b);
}

static void begin_chunk(JsonBuilder *b, const char *id, gint64 created, const char *model, const char *object) {
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "id");
        json_builder_add_string_value(b, id);
        json_builder_set_member_name(b, "object");
        json_builder_add_string_value(b, object);
        json_builder_set_member_name(b, "created");
        json_builder_add_int_value(b, created);
        json_builder_set_member_name(b, "model");
        json_builder_add_string_value(b, model);
}

static void append_event(GString *out, JsonBuilder *b) {
        g_autofree char *json = json_builder_to_string(b, NULL);
        g_string_append(out, "data: ");
        g_string_append(out, json);
        g_string_append(out, "\n\n");
}

static void append_delta_chunk(GString *out, const char *id, gint64 created, const char *model, const char *role,
                               const char *content, const char *finish_reason) {
        g_autoptr(JsonBuilder) b = json_builder_new_immutable();

        begin_chunk(b, id, created, model, "chat.completion.chunk");
        json_builder_set_member_name(b, "choices");
        json_builder_begin_array(b);
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "index");
        json_builder_add_int_value(b, 0);
        json_builder_set_member_name(b, "delta");
        json_builder_begin_object(b);
        if (role) {
                json_builder_set_member_name(b, "role");
                json_builder_add_string_value(b, role);
        }
        if (content) {
                json_builder_set_member_name(b, "content");
                json_builder_add_string_value(b, content);
        }
        json_builder_end_object(b);
        json_builder_set_member_name(b, "finish_reason");
        if (finish_reason)
                json_builder_add_string_value(b, finish_reason);
        else
                json_builder_add_null_value(b);
        json_builder_end_object(b);
        json_builder_end_array(b);
        json_builder_end_object(b);
        append_event(out, b);
}

void echo_respond(Request *r, Provider *p, const ChatRequestInfo *info) {
        g_autofree char *reply = NULL, *id = NULL;
        const char *model = info->model ?: (p->config->default_model ?: "echo");
        gint64 created = g_get_real_time() / G_USEC_PER_SEC;
        uint64_t prompt_tokens = 0, completion_tokens;
        bool include_usage = false;
        const char *body;
        size_t body_size;
        char *data;
        size_t size;

        if (!streq(strempty(r->subpath), "/chat/completions")) {
                request_respond_error(r, 400, "invalid_request_error", p->name,
                                      "Provider '%s' answers chat completions only.", p->name);
                return;
        }
        body = exchange_body(r->exchange, &body_size);
        if (echo_read_request(body, body_size, &reply, &prompt_tokens, &include_usage) < 0) {
                request_respond_error(r, 400, "invalid_request_error", p->name, "'messages' must be an array of messages.");
                return;
        }
        completion_tokens = count_words(reply);
        id = g_strconcat("chatcmpl-", r->record.request_id, NULL);
        r->record.ttfb = worker_now(r->worker) - r->record.start;
        r->record.prompt_tokens = prompt_tokens;
        r->record.completion_tokens = completion_tokens;

        if (info->stream) {
                g_autoptr(GString) out = g_string_new(NULL);
                const char *q0 = reply;

                append_delta_chunk(out, id, created, model, "assistant", "", NULL);
                /* One chunk per word, spaces kept, as a model would stream it. */
                while (*q0) {
                        const char *q = q0;
                        while (*q && g_ascii_isspace(*q))
                                q++;
                        while (*q && !g_ascii_isspace(*q))
                                q++;
                        g_autofree char *piece = g_strndup(q0, (gsize) (q - q0));
                        append_delta_chunk(out, id, created, model, NULL, piece, NULL);
                        q0 = q;
                }
                append_delta_chunk(out, id, created, model, NULL, NULL, "stop");
                if (include_usage) {
                        g_autoptr(JsonBuilder) b = json_builder_new_immutable();
                        begin_chunk(b, id, created, model, "chat.completion.chunk");
                        json_builder_set_member_name(b, "choices");
                        json_builder_begin_array(b);
                        json_builder_end_array(b);
                        add_usage(b, prompt_tokens, completion_tokens);
                        json_builder_end_object(b);
                        append_event(out, b);
                }
                g_string_append(out, "data: [DONE]\n\n");
                size = out->len;
                data = g_string_free(g_steal_pointer(&out), FALSE);
                exchange_add_header(r->exchange, "Content-Type", "text/event-stream");
                exchange_add_header(r->exchange, "Cache-Control", "no-cache");
                exchange_add_header(r->exchange, "X-Accel-Buffering", "no");
        } else {
                g_autoptr(JsonBuilder) b = json_builder_new_immutable();

                begin_chunk(b, id, created, model, "chat.completion");
                json_builder_set_member_name(b, "choices");
                json_builder_begin_array(b);
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "index");
                json_builder_add_int_value(b, 0);
                json_builder_set_member_name(b, "message");
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "role");
                json_builder_add_string_value(b, "assistant");
                json_builder_set_member_name(b, "content");
                json_builder_add_string_value(b, reply);
                json_builder_end_object(b);
                json_builder_set_member_name(b, "finish_reason");
                json_builder_add_string_value(b, "stop");
                json_builder_end_object(b);
                json_builder_end_array(b);
                add_usage(b, prompt_tokens, completion_tokens);
                json_builder_end_object(b);
                data = json_builder_to_string(b, &size);
                exchange_add_header(r->exchange, "Content-Type", "application/json");
        }

        if (r->worker->config->log_responses)
                record_keep_response(&r->record, data, size);
        request_respond(r, 200, data, size);
}
