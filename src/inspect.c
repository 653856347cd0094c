/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "inspect.h"
#include "json-scan.h"

void chat_request_info_clear(ChatRequestInfo *info) {
        g_clear_pointer(&info->model, g_free);
        g_clear_pointer(&info->user, g_free);
        info->stream = false;
        info->has_messages = false;
}

typedef struct ChatScan {
        ChatRequestInfo *info;
        const char *error;
} ChatScan;

static int chat_member(const JsonSpan *key, const JsonSpan *value, void *userdata) {
        ChatScan *c = userdata;

        if (json_span_equal(key, "model")) {
                if (value->type == JSON_VALUE_NULL) {
                        g_clear_pointer(&c->info->model, g_free);
                        return 0;
                }
                if (value->type != JSON_VALUE_STRING) {
                        c->error = "'model' must be a string.";
                        return -EINVAL;
                }
                g_free(c->info->model);
                c->info->model = json_span_to_string(value);
                if (!c->info->model) {
                        c->error = "'model' must not contain NUL characters.";
                        return -EINVAL;
                }
        } else if (json_span_equal(key, "stream")) {
                if (value->type != JSON_VALUE_TRUE && value->type != JSON_VALUE_FALSE && value->type != JSON_VALUE_NULL) {
                        c->error = "'stream' must be a boolean.";
                        return -EINVAL;
                }
                c->info->stream = value->type == JSON_VALUE_TRUE;
        } else if (json_span_equal(key, "user")) {
                /* Only a plain string is a key; anything else is the provider's to judge. */
                g_free(c->info->user);
                c->info->user = value->type == JSON_VALUE_STRING && value->size <= 514 ? json_span_to_string(value) : NULL;
        } else if (json_span_equal(key, "messages"))
                c->info->has_messages = value->type == JSON_VALUE_ARRAY;
        return 0;
}

static bool starts_with_object(const char *body, size_t size) {
        for (size_t i = 0; i < size; i++) {
                if (body[i] == ' ' || body[i] == '\t' || body[i] == '\n' || body[i] == '\r')
                        continue;
                return body[i] == '{';
        }
        return false;
}

int inspect_chat_request(const char *body, size_t size, ChatRequestInfo *ret, char **ret_message) {
        ChatScan c = { .info = ret };
        JsonScanError e = {};
        int r;

        g_assert(ret);
        g_assert(ret_message);

        *ret = (ChatRequestInfo) {};
        if (size == 0) {
                *ret_message = g_strdup("The request body is empty; expected a JSON object.");
                return -EINVAL;
        }

        r = json_scan(body, size, chat_member, &c, &e);
        if (r < 0) {
                chat_request_info_clear(ret);
                if (c.error)
                        *ret_message = g_strdup(c.error);
                else
                        *ret_message = g_strdup_printf("The request body is not valid JSON: %s at byte %zu.",
                                                       e.reason, e.offset);
                return -EINVAL;
        }
        if (!starts_with_object(body, size)) {
                chat_request_info_clear(ret);
                *ret_message = g_strdup("The request body must be a JSON object.");
                return -EINVAL;
        }
        return 0;
}

typedef struct ModelMember {
        JsonSpan value;
        bool found;
} ModelMember;

static int model_member(const JsonSpan *key, const JsonSpan *value, void *userdata) {
        ModelMember *m = userdata;

        /* Each one found replaces the one before: the last counts, as in inspect_chat_request(). */
        if (json_span_equal(key, "model")) {
                m->value = *value;
                m->found = true;
        }
        return 0;
}

/* model as a JSON string, quotes included. */
static GString *json_quote(const char *model) {
        GString *s = g_string_sized_new(strlen(model) + 8);

        g_string_append_c(s, '"');
        for (const char *c = model; *c; c++) {
                if (*c == '"' || *c == '\\') {
                        g_string_append_c(s, '\\');
                        g_string_append_c(s, *c);
                } else if ((unsigned char) *c < 0x20)
                        g_string_append_printf(s, "\\u%04x", (unsigned) (unsigned char) *c);
                else
                        g_string_append_c(s, *c);
        }
        g_string_append_c(s, '"');
        return s;
}

/* body with [at, at + removed) replaced by insert, NUL-terminated. */
static void splice(const char *body, size_t size, size_t at, size_t removed, const char *insert, size_t insert_size,
                   char **ret_body, size_t *ret_size) {
        size_t n = size - removed + insert_size;
        char *out = g_malloc(n + 1);

        memcpy(out, body, at);
        memcpy(out + at, insert, insert_size);
        memcpy(out + at + insert_size, body + at + removed, size - at - removed);
        out[n] = 0;
        *ret_body = out;
        *ret_size = n;
}

static int find_model(const char *body, size_t size, const char *model, ModelMember *ret) {
        if (!g_utf8_validate(model, -1, NULL))
                return -EINVAL;
        if (!starts_with_object(body, size))
                return -EINVAL;
        *ret = (ModelMember) {};
        return json_scan(body, size, model_member, ret, NULL);
}

int inspect_replace_model(const char *body, size_t size, const char *model, char **ret_body, size_t *ret_size) {
        g_autoptr(GString) quoted = NULL;
        ModelMember m;
        int r;

        r = find_model(body, size, model, &m);
        if (r < 0)
                return r;
        if (!m.found)
                return -ENOENT;
        quoted = json_quote(model);
        splice(body, size, (size_t) (m.value.data - body), m.value.size, quoted->str, quoted->len, ret_body, ret_size);
        return 0;
}

int inspect_set_model(const char *body, size_t size, const char *model, char **ret_body, size_t *ret_size) {
        g_autoptr(GString) member = NULL, quoted = NULL;
        ModelMember m;
        size_t brace, next;
        int r;

        r = find_model(body, size, model, &m);
        if (r < 0)
                return r;
        if (m.found)
                /* "model": null counts as none; it gets the value rather than a second member. */
                return inspect_replace_model(body, size, model, ret_body, ret_size);

        for (brace = 0; body[brace] != '{'; brace++)
                ;
        for (next = brace + 1; next < size && (body[next] == ' ' || body[next] == '\t' || body[next] == '\r' ||
                                               body[next] == '\n'); next++)
                ;
        quoted = json_quote(model);
        member = g_string_new("\"model\":");
        g_string_append_len(member, quoted->str, (gssize) quoted->len);
        /* A valid object has its '}' after the '{'. */
        if (next < size && body[next] != '}')
                g_string_append_c(member, ',');
        splice(body, size, brace + 1, 0, member->str, member->len, ret_body, ret_size);
        return 0;
}

typedef struct UsageScan {
        uint64_t prompt, completion;
        bool have_prompt, have_completion, have_usage;
} UsageScan;

static int usage_counts_member(const JsonSpan *key, const JsonSpan *value, void *userdata) {
        UsageScan *u = userdata;

        if (json_span_equal(key, "prompt_tokens"))
                u->have_prompt = json_span_to_uint64(value, &u->prompt) >= 0;
        else if (json_span_equal(key, "completion_tokens"))
                u->have_completion = json_span_to_uint64(value, &u->completion) >= 0;
        return 0;
}

static int usage_member(const JsonSpan *key, const JsonSpan *value, void *userdata) {
        UsageScan *u = userdata;

        if (!json_span_equal(key, "usage") || value->type != JSON_VALUE_OBJECT)
                return 0;
        u->have_usage = true;
        u->have_prompt = u->have_completion = false;
        return json_scan(value->data, value->size, usage_counts_member, u, NULL);
}

int inspect_usage(const char *body, size_t size, uint64_t *ret_prompt, uint64_t *ret_completion) {
        UsageScan u = {};

        /* Cheap test first: most stream chunks carry no usage. */
        if (!memmem(body, size, "\"usage\"", STRLEN("\"usage\"")))
                return -ENOENT;
        if (json_scan(body, size, usage_member, &u, NULL) < 0)
                return -EINVAL;
        if (!u.have_usage || (!u.have_prompt && !u.have_completion))
                return -ENOENT;
        *ret_prompt = u.have_prompt ? u.prompt : 0;
        *ret_completion = u.have_completion ? u.completion : 0;
        return 0;
}
