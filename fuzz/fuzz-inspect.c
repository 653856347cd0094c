/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* A client's request body as the router reads it: inspect_chat_request() and, under it, the JSON
 * scanner with every span helper; usage counts from the same bytes; the model rewrites, which
 * must leave every other byte as it was. */
#include <assert.h>
#include <stdint.h>

#include "inspect.h"
#include "json-scan.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct Bounds {
        const char *start, *end;
} Bounds;

static void check_span(const Bounds *b, const JsonSpan *s) {
        assert(s->data >= b->start && s->data + s->size <= b->end);
        if (s->type == JSON_VALUE_STRING)
                assert(s->size >= 2 && s->data[0] == '"' && s->data[s->size - 1] == '"');
}

static int on_member(const JsonSpan *key, const JsonSpan *value, void *userdata) {
        const Bounds *b = userdata;
        g_autofree char *k = NULL, *v = NULL;
        uint64_t u;

        assert(key->type == JSON_VALUE_STRING);
        check_span(b, key);
        check_span(b, value);
        k = json_span_to_string(key);
        if (k && !key->escaped)
                assert(json_span_equal(key, k));
        if (value->type == JSON_VALUE_STRING)
                v = json_span_to_string(value);
        else if (value->type == JSON_VALUE_NUMBER)
                (void) json_span_to_uint64(value, &u);
        else if (value->type == JSON_VALUE_OBJECT)
                /* A member's object is itself one valid value. */
                assert(json_scan(value->data, value->size, NULL, NULL, NULL) == 0);
        return 0;
}

/* The rewritten body is JSON, names the model, and differs from body only in [at, at + n). */
static void check_rewrite(const char *body, size_t size, const char *out, size_t out_size, const char *model) {
        ChatRequestInfo info = {};
        g_autofree char *message = NULL;
        size_t prefix = 0, suffix = 0;

        assert(out && out[out_size] == 0);
        assert(json_scan(out, out_size, NULL, NULL, NULL) == 0);
        assert(inspect_chat_request(out, out_size, &info, &message) == 0);
        assert(info.model && strcmp(info.model, model) == 0);
        chat_request_info_clear(&info);

        /* One contiguous change: what precedes and follows it is the client's, byte for byte. */
        while (prefix < size && prefix < out_size && body[prefix] == out[prefix])
                prefix++;
        while (suffix < size - prefix && suffix < out_size - prefix &&
               body[size - 1 - suffix] == out[out_size - 1 - suffix])
                suffix++;
        assert(out_size - prefix - suffix <= strlen(model) * 6 + 16);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        const char *body = (const char *) data;
        Bounds b = { body, body + size };
        ChatRequestInfo info = {};
        g_autofree char *message = NULL;
        JsonScanError e = {};
        uint64_t p, c;
        int r;

        r = inspect_chat_request(body, size, &info, &message);
        if (r >= 0) {
                g_autofree char *set = NULL, *replaced = NULL;
                size_t n = 0, m = 0;
                int k;

                assert(!message);
                /* Every request the router accepts can be given a model, and a model it has
                 * can be replaced; the result is checked either way. */
                assert(inspect_set_model(body, size, "fuzz \"model\"", &set, &n) == 0);
                check_rewrite(body, size, set, n, "fuzz \"model\"");
                k = inspect_replace_model(body, size, "per-provider", &replaced, &m);
                assert(k == 0 || k == -ENOENT);
                if (k == 0)
                        check_rewrite(body, size, replaced, m, "per-provider");
                else
                        assert(!replaced);
        } else {
                assert(r == -EINVAL);
                assert(message);
                assert(!info.model);
        }
        chat_request_info_clear(&info);

        r = json_scan(body, size, on_member, &b, &e);
        if (r < 0)
                assert(e.reason && e.offset <= size);

        r = inspect_usage(body, size, &p, &c);
        assert(r == 0 || r == -ENOENT || r == -EINVAL);
        return 0;
}
