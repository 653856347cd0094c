/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* What a transfer sends the provider: which of the client's headers pass, the router's own lines,
 * the list in one block; and how a provider's answer head is read. */

#include "upstream.h"
#include "test-util.h"

typedef struct Headers {
        const char *const *lines; /* name, value, …, NULL */
} Headers;

static void foreach_test_header(const void *source, UpstreamHeaderFunc func, void *userdata) {
        const Headers *h = source;

        for (const char *const *l = h->lines; l[0]; l += 2)
                if (!func(l[0], l[1], userdata))
                        return;
}

/* The list as one string, lines separated by '|'. */
static char *build(const UpstreamRequest *req) {
        g_autoptr(GString) s = g_string_new(NULL);
        size_t size = 0;
        struct curl_slist *l = upstream_headers_new(req, &size);

        ck_assert_ptr_nonnull(l);
        for (struct curl_slist *i = l; i; i = i->next) {
                /* Every node and string lies inside the one block. */
                ck_assert((char *) i >= (char *) l && (char *) (i + 1) <= (char *) l + size);
                ck_assert(i->data >= (char *) l && i->data + strlen(i->data) < (char *) l + size);
                g_string_append_printf(s, "%s%s", s->len ? "|" : "", i->data);
        }
        upstream_headers_free(l, size);
        return g_string_free(g_steal_pointer(&s), FALSE);
}

START_TEST(test_forwarded_names) {
        static const char *const dropped[] = {
                "Connection", "keep-alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding", "Upgrade",
                "Proxy-Authorization", "PROXY-AUTHENTICATE", "Host", "Content-Length", "Expect", "Accept-Encoding",
                "X-Provider", "x-compare", "X-Request-Id", "Authorization",
        };
        static const char *const passed[] = {
                "User-Agent", "Accept", "Content-Type", "OpenAI-Organization", "OpenAI-Project", "OpenAI-Beta",
                "X-Title", "HTTP-Referer", "Accept-Language", "x-stainless-lang", "Cookie", "X", "TEx",
                "X-Provider-Tried", "Authorization2", "Hostname", "X-Request-Ids",
        };

        for (size_t i = 0; i < ELEMENTSOF(dropped); i++)
                ck_assert_msg(!upstream_header_is_forwarded(dropped[i], strlen(dropped[i])), "%s passed", dropped[i]);
        for (size_t i = 0; i < ELEMENTSOF(passed); i++)
                ck_assert_msg(upstream_header_is_forwarded(passed[i], strlen(passed[i])), "%s dropped", passed[i]);
        /* Only n bytes of the name count. */
        ck_assert(!upstream_header_is_forwarded("Hostile", 4));
}
END_TEST

START_TEST(test_client_headers) {
        static const char *const lines[] = {
                "User-Agent", "client/1",
                "Connection", "keep-alive, X-Hop ,x-other",
                "X-Hop", "dropped",
                "OpenAI-Organization", "org-1",
                "X-Dup", "one",
                "Accept", "application/json",
                "X-Other", "dropped too",
                "X-Empty", "",
                "Connection", "X-Late",
                "X-Late", "named by the second Connection",
                "X-Dup", "two",
                "Authorization", "Bearer client-key",
                "Host", "router.example",
                "Content-Type", "application/json; charset=utf-8",
                NULL,
        };
        Headers h = { lines };
        UpstreamRequest req = {
                .post = true,
                .body_size = 10,
                .authorization = "Bearer client-key",
                .request_id = "rid-1",
                .client_headers = foreach_test_header,
                .client = &h,
        };
        g_autofree char *got = build(&req);

        ck_assert_str_eq(got, "User-Agent: client/1|OpenAI-Organization: org-1|X-Dup: one|Accept: application/json|"
                              "X-Empty;|X-Dup: two|Content-Type: application/json; charset=utf-8|"
                              "Authorization: Bearer client-key|X-Request-Id: rid-1");
}
END_TEST

START_TEST(test_router_lines) {
        static const char *const none[] = { NULL };
        Headers h = { none };
        UpstreamRequest req = { .client_headers = foreach_test_header, .client = &h };
        g_autofree char *get = NULL, *stream = NULL, *large = NULL;

        get = build(&req);
        ck_assert_str_eq(get, "Accept: application/json|User-Agent: provider-router/" PACKAGE_VERSION);

        req = (UpstreamRequest) { .post = true, .stream = true, .body_size = 100, .request_id = "r" };
        stream = build(&req);
        ck_assert_str_eq(stream, "Content-Type: application/json|Accept: text/event-stream|"
                                 "User-Agent: provider-router/" PACKAGE_VERSION "|X-Request-Id: r");

        /* The provider's own key wins over the client's header; a large body waits for no
         * "100 Continue". */
        req = (UpstreamRequest) { .post = true, .body_size = 1024 * 1024, .api_key = "sk-own",
                                  .authorization = "Bearer client" };
        large = build(&req);
        ck_assert_str_eq(large, "Expect:|Content-Type: application/json|Accept: application/json|"
                                "User-Agent: provider-router/" PACKAGE_VERSION "|Authorization: Bearer sk-own");
}
END_TEST

START_TEST(test_many_client_headers) {
        g_autoptr(GPtrArray) lines = g_ptr_array_new_with_free_func(g_free);
        g_autofree char *got = NULL;
        Headers h;
        UpstreamRequest req = { .client_headers = foreach_test_header };
        size_t n = 0;

        /* More Connection: headers than the builder keeps on its stack. */
        for (unsigned i = 0; i < 40; i++) {
                g_ptr_array_add(lines, g_strdup("Connection"));
                g_ptr_array_add(lines, g_strdup_printf("X-Hop-%u", i));
                g_ptr_array_add(lines, g_strdup_printf("X-Hop-%u", i));
                g_ptr_array_add(lines, g_strdup("dropped"));
                g_ptr_array_add(lines, g_strdup_printf("X-Kept-%u", i));
                g_ptr_array_add(lines, g_strnfill(1000, 'v'));
        }
        g_ptr_array_add(lines, NULL);
        h.lines = (const char *const *) lines->pdata;
        req.client = &h;
        got = build(&req);
        ck_assert_ptr_null(strstr(got, "X-Hop"));
        for (const char *p = got; (p = strstr(p, "X-Kept-")); p++)
                n++;
        ck_assert_uint_eq(n, 40);
}
END_TEST

START_TEST(test_parse_head_line) {
        long status = 0;
        size_t name_len = 0, value_len = 0;
        const char *value = NULL;
        const char *field = "x-request-id:  req-42 \r\n";

        ck_assert_int_eq(upstream_parse_head_line("HTTP/1.1 201 Created\r\n", 22, &status, &name_len, &value, &value_len),
                         UPSTREAM_HEAD_STATUS);
        ck_assert_int_eq(status, 201);
        ck_assert_int_eq(upstream_parse_head_line("\r\n", 2, &status, &name_len, &value, &value_len), UPSTREAM_HEAD_END);
        ck_assert_int_eq(upstream_parse_head_line(field, strlen(field), &status, &name_len, &value, &value_len),
                         UPSTREAM_HEAD_FIELD);
        ck_assert_uint_eq(name_len, STRLEN("x-request-id"));
        ck_assert_uint_eq(value_len, STRLEN("req-42"));
        ck_assert(memcmp(value, "req-42", value_len) == 0);
}
END_TEST

START_TEST(test_escape_path) {
        static const struct {
                const char *path, *want;
        } cases[] = {
                { "/responses", "/responses" },
                { "/models/llama3:8b", "/models/llama3:8b" },
                { "/models/Qwen/Qwen3-Coder", "/models/Qwen/Qwen3-Coder" },
                { "/a b/c?d#e%", "/a%20b/c%3Fd%23e%25" },
                { "/audio/speech/", "/audio/speech" },
                { "/x/.../y", "/x/.../y" },
                { "/ü~_-.@", "/%C3%BC~_-.@" },
                /* refused */
                { "", NULL }, { "responses", NULL }, { "/", NULL }, { "//", NULL }, { "/a//b", NULL },
                { "/.", NULL }, { "/..", NULL }, { "/a/../b", NULL }, { "/a/./b", NULL }, { "/a/..", NULL },
                { "/a/.//", NULL },
        };
        g_autofree char *long_path = g_strnfill(2100, 'a');

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                g_autofree char *got = upstream_escape_path(cases[i].path);
                if (cases[i].want)
                        ck_assert_msg(got && streq(got, cases[i].want), "'%s': got '%s'", cases[i].path, strna(got));
                else
                        ck_assert_msg(!got, "'%s' accepted as '%s'", cases[i].path, got);
        }
        long_path[0] = '/';
        ck_assert_ptr_null(upstream_escape_path(long_path));
        ck_assert_ptr_null(upstream_escape_path(NULL));
}
END_TEST

static Suite *upstream_suite(void) {
        Suite *s = suite_create("upstream");
        TCase *tc = tcase_create("headers");

        tcase_add_test(tc, test_forwarded_names);
        tcase_add_test(tc, test_client_headers);
        tcase_add_test(tc, test_router_lines);
        tcase_add_test(tc, test_many_client_headers);
        tcase_add_test(tc, test_parse_head_line);
        tcase_add_test(tc, test_escape_path);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        return test_run_suite(upstream_suite());
}
