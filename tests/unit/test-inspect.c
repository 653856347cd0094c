/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Request inspection: what the router reads from a chat request, the model rewrite, and usage. */

#include <json-glib/json-glib.h>

#include "inspect.h"
#include "test-util.h"

static int inspect(const char *body, ChatRequestInfo *info, char **message) {
        *info = (ChatRequestInfo) {};
        *message = NULL;
        return inspect_chat_request(body, strlen(body), info, message);
}

#define assert_rejected(body, ...)                                                      \
        do {                                                                            \
                ChatRequestInfo _info;                                                  \
                g_autofree char *_m = NULL;                                             \
                ck_assert_int_eq(inspect((body), &_info, &_m), -EINVAL);                \
                ck_assert_msg(_m, "no message for %s", (body));                         \
                ck_assert_msg(test_str_has_all(_m, __VA_ARGS__, NULL), "message for %s: %s", (body), _m); \
                ck_assert_ptr_null(_info.model); /* nothing to free after a failure */  \
        } while (0)

static bool test_str_has_all(const char *s, const char *first, ...) {
        va_list ap;
        bool all = true;

        va_start(ap, first);
        for (const char *w = first; w; w = va_arg(ap, const char *))
                if (!strstr(s, w))
                        all = false;
        va_end(ap);
        return all;
}

START_TEST(test_valid_requests) {
        static const struct {
                const char *body;
                const char *model;
                bool stream;
                bool has_messages;
        } cases[] = {
                { "{\"model\":\"qwen3-coder\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}", "qwen3-coder", false, true },
                { "{\"model\":\"m\",\"stream\":true,\"messages\":[]}", "m", true, true },
                { "{\"model\":\"m\",\"stream\":false,\"messages\":[]}", "m", false, true },
                { "{\"messages\":[{\"role\":\"user\",\"content\":\"no model\"}]}", NULL, false, true },
                { "{\"model\":null,\"stream\":null}", NULL, false, false },
                { "{}", NULL, false, false },
                { "  {\"model\" : \"spaced\" }  \n", "spaced", false, false },
                { "{\"model\":\"\\u043c\\u043e\\u0434\\u0435\\u043b\\u044c\"}", "модель", false, false },
                { "{\"model\":\"llama3:8b\",\"messages\":{}}", "llama3:8b", false, false },
                { "{\"model\":\"m\",\"stream\":true,\"tools\":[{\"type\":\"function\"}],\"stream_options\":{\"include_usage\":true}}",
                  "m", true, false },
                /* Duplicate members: the last one counts, as in most JSON parsers. */
                { "{\"model\":\"first\",\"model\":\"second\"}", "second", false, false },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                ChatRequestInfo info;
                g_autofree char *message = NULL;
                int r = inspect(cases[i].body, &info, &message);

                ck_assert_msg(r == 0, "case %zu refused: %s", i, strna(message));
                ck_assert_ptr_null(message);
                if (cases[i].model)
                        ck_assert_str_eq(info.model, cases[i].model);
                else
                        ck_assert_ptr_null(info.model);
                ck_assert_int_eq(info.stream, cases[i].stream);
                ck_assert_int_eq(info.has_messages, cases[i].has_messages);
                chat_request_info_clear(&info);
                ck_assert_ptr_null(info.model);
                ck_assert(!info.stream);
        }
}
END_TEST

START_TEST(test_size_is_honoured) {
        /* The body is not NUL-terminated where the size ends: only size bytes count. */
        const char buf[] = "{\"model\":\"a\",\"stream\":true}GARBAGE";
        ChatRequestInfo info = {};
        g_autofree char *message = NULL;

        ck_assert_int_eq(inspect_chat_request(buf, strlen(buf) - STRLEN("GARBAGE"), &info, &message), 0);
        ck_assert_str_eq(info.model, "a");
        ck_assert(info.stream);
        chat_request_info_clear(&info);

        ck_assert_int_eq(inspect_chat_request(buf, strlen(buf), &info, &message), -EINVAL);
        ck_assert_ptr_nonnull(message);
}
END_TEST

START_TEST(test_rejected_requests) {
        assert_rejected("", "empty");
        assert_rejected("[]", "JSON object");
        assert_rejected("[{\"model\":\"m\"}]", "JSON object");
        assert_rejected("\"model\"", "JSON object");
        assert_rejected("42", "JSON object");
        assert_rejected("null", "JSON object");
        assert_rejected("true", "JSON object");

        assert_rejected("{\"model\":42}", "'model'", "string");
        assert_rejected("{\"model\":true}", "'model'", "string");
        assert_rejected("{\"model\":[\"m\"]}", "'model'", "string");
        assert_rejected("{\"model\":{\"name\":\"m\"}}", "'model'", "string");

        assert_rejected("{\"model\":\"m\",\"stream\":\"true\"}", "'stream'", "boolean");
        assert_rejected("{\"model\":\"m\",\"stream\":1}", "'stream'", "boolean");
        assert_rejected("{\"model\":\"m\",\"stream\":[]}", "'stream'", "boolean");
        assert_rejected("{\"stream\":{}}", "'stream'", "boolean");
}
END_TEST

START_TEST(test_malformed_json) {
        static const char *const bodies[] = {
                "{",
                "{\"model\":",
                "{\"model\":\"m\",}",
                "{\"model\":\"m\"",
                "{model:\"m\"}",
                "{\"model\":\"m\"}}",
                "{\"model\":\"unterminated}",
                "not json at all",
                "\xff\xfe{}",
        };

        for (size_t i = 0; i < ELEMENTSOF(bodies); i++) {
                ChatRequestInfo info;
                g_autofree char *message = NULL;

                ck_assert_msg(inspect(bodies[i], &info, &message) == -EINVAL, "'%s' accepted", bodies[i]);
                ck_assert_ptr_nonnull(message);
                ck_assert_msg(g_str_has_prefix(message, "The request body is not valid JSON"),
                              "message for '%s': %s", bodies[i], message);
                ck_assert(g_utf8_validate(message, -1, NULL));
                ck_assert_ptr_null(info.model);
        }
}
END_TEST

START_TEST(test_whitespace_only_body) {
        ChatRequestInfo info;
        g_autofree char *message = NULL;

        ck_assert_int_eq(inspect(" \n\t ", &info, &message), -EINVAL);
        ck_assert_ptr_nonnull(message);
}
END_TEST

static JsonObject *parse_object(JsonParser *parser, const char *data, size_t size) {
        g_autoptr(GError) error = NULL;
        JsonNode *root;

        ck_assert_msg(json_parser_load_from_data(parser, data, (gssize) size, &error), "not JSON: %s: %.*s",
                      error ? error->message : "?", (int) size, data);
        root = json_parser_get_root(parser);
        ck_assert_ptr_nonnull(root);
        ck_assert(JSON_NODE_HOLDS_OBJECT(root));
        return json_node_get_object(root);
}

START_TEST(test_set_model_adds_model) {
        const char *body =
                "{\"messages\":[{\"role\":\"user\",\"content\":\"héllo \\\"quoted\\\"\\n\"}],"
                "\"stream\":true,\"temperature\":0.7,\"max_tokens\":128,"
                "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":{}}}],"
                "\"user\":null}";
        g_autoptr(JsonParser) parser = json_parser_new();
        g_autofree char *out = NULL;
        size_t n = 0;
        JsonObject *o, *m;
        JsonArray *a;

        ck_assert_int_eq(inspect_set_model(body, strlen(body), "qwen3-max", &out, &n), 0);
        ck_assert_ptr_nonnull(out);
        ck_assert_uint_eq(n, strlen(out));

        o = parse_object(parser, out, n);
        ck_assert_str_eq(json_object_get_string_member(o, "model"), "qwen3-max");
        ck_assert(json_object_get_boolean_member(o, "stream"));
        ck_assert(json_object_get_double_member(o, "temperature") == 0.7);
        ck_assert_int_eq(json_object_get_int_member(o, "max_tokens"), 128);
        ck_assert(json_object_has_member(o, "user"));
        ck_assert(json_object_get_null_member(o, "user"));
        a = json_object_get_array_member(o, "messages");
        ck_assert_uint_eq(json_array_get_length(a), 1);
        m = json_array_get_object_element(a, 0);
        ck_assert_str_eq(json_object_get_string_member(m, "role"), "user");
        ck_assert_str_eq(json_object_get_string_member(m, "content"), "héllo \"quoted\"\n");
        a = json_object_get_array_member(o, "tools");
        ck_assert_str_eq(json_object_get_string_member(
                                 json_object_get_object_member(json_array_get_object_element(a, 0), "function"), "name"),
                         "f");
        ck_assert_uint_eq(json_object_get_size(o), 7);

        /* And the router reads back what it wrote. */
        {
                ChatRequestInfo info = {};
                g_autofree char *message = NULL;
                ck_assert_int_eq(inspect_chat_request(out, n, &info, &message), 0);
                ck_assert_str_eq(info.model, "qwen3-max");
                ck_assert(info.stream);
                ck_assert(info.has_messages);
                chat_request_info_clear(&info);
        }
}
END_TEST

START_TEST(test_set_model_replaces_model) {
        const char *body = "{\"model\":null,\"messages\":[]}";
        const char *body2 = "{\"model\":\"old\",\"n\":2}";
        g_autoptr(JsonParser) parser = json_parser_new();
        g_autoptr(JsonParser) parser2 = json_parser_new();
        g_autofree char *out = NULL, *out2 = NULL;
        size_t n, n2;
        JsonObject *o;

        ck_assert_int_eq(inspect_set_model(body, strlen(body), "new \"model\" ü", &out, &n), 0);
        o = parse_object(parser, out, n);
        ck_assert_str_eq(json_object_get_string_member(o, "model"), "new \"model\" ü");
        ck_assert_uint_eq(json_object_get_size(o), 2);

        ck_assert_int_eq(inspect_set_model(body2, strlen(body2), "m", &out2, &n2), 0);
        o = parse_object(parser2, out2, n2);
        ck_assert_str_eq(json_object_get_string_member(o, "model"), "m");
        ck_assert_int_eq(json_object_get_int_member(o, "n"), 2);
        ck_assert_uint_eq(json_object_get_size(o), 2);
}
END_TEST

START_TEST(test_set_model_invalid_input) {
        static const char *const bodies[] = { "", "[]", "\"x\"", "{", "{\"a\":}", "null" };
        char *out = (char *) 0x1;
        size_t n = 7;

        for (size_t i = 0; i < ELEMENTSOF(bodies); i++) {
                ck_assert_int_eq(inspect_set_model(bodies[i], strlen(bodies[i]), "m", &out, &n), -EINVAL);
                ck_assert_ptr_eq(out, (char *) 0x1);
                ck_assert_uint_eq(n, 7);
        }
}
END_TEST

static void assert_rewrite(int (*f)(const char *, size_t, const char *, char **, size_t *), const char *body,
                           const char *model, const char *want) {
        g_autofree char *out = NULL;
        size_t n = 0;

        ck_assert_msg(f(body, strlen(body), model, &out, &n) == 0, "refused: %s", body);
        ck_assert_uint_eq(n, strlen(out));
        ck_assert_msg(streq(out, want), "for %s\n got: %s\nwant: %s", body, out, want);
}

START_TEST(test_set_model_byte_exact) {
        /* Numbers json-glib would have re-serialised, whitespace, key order, escapes, duplicate
         * keys: all stay as sent. */
        assert_rewrite(inspect_set_model,
                       "{\"messages\":[{\"role\":\"user\",\"content\":\"h\\u00e9\"}],\"seed\":18446744073709551615,"
                       "\"temperature\":0.7,\"top_p\":1e2,\"n\":-0,\"x\":1.0E-7}",
                       "qwen3-max",
                       "{\"model\":\"qwen3-max\",\"messages\":[{\"role\":\"user\",\"content\":\"h\\u00e9\"}],"
                       "\"seed\":18446744073709551615,\"temperature\":0.7,\"top_p\":1e2,\"n\":-0,\"x\":1.0E-7}");
        assert_rewrite(inspect_set_model, "  {\n  \"a\" : 1 ,\n  \"a\": 2\n}\n", "m",
                       "  {\"model\":\"m\",\n  \"a\" : 1 ,\n  \"a\": 2\n}\n");
        assert_rewrite(inspect_set_model, "{}", "m", "{\"model\":\"m\"}");
        assert_rewrite(inspect_set_model, "{ \r\n\t}", "m", "{\"model\":\"m\" \r\n\t}");
        /* "model": null counts as no model: it is given the value, not a second member. */
        assert_rewrite(inspect_set_model, "{\"model\" : null , \"n\":2.50}", "m", "{\"model\" : \"m\" , \"n\":2.50}");
        /* Escaped for JSON; any UTF-8 kept. */
        assert_rewrite(inspect_set_model, "{\"n\":1}", "a\"b\\c\x01 ü",
                       "{\"model\":\"a\\\"b\\\\c\\u0001 ü\",\"n\":1}");
        /* A "model" nested deeper is not the request's. */
        assert_rewrite(inspect_set_model, "{\"x\":{\"model\":\"inner\"}}", "m",
                       "{\"model\":\"m\",\"x\":{\"model\":\"inner\"}}");
}
END_TEST

START_TEST(test_replace_model) {
        assert_rewrite(inspect_replace_model, "{\"seed\":18446744073709551615,\"model\":\"client\",\"t\":0.7}", "provider-name",
                       "{\"seed\":18446744073709551615,\"model\":\"provider-name\",\"t\":0.7}");
        assert_rewrite(inspect_replace_model, "{ \"model\" :\t\"a\\u0062\" }", "b", "{ \"model\" :\t\"b\" }");
        /* The last of duplicate members is the one that counts, and the one replaced. */
        assert_rewrite(inspect_replace_model, "{\"model\":\"one\",\"model\":\"two\"}", "x",
                       "{\"model\":\"one\",\"model\":\"x\"}");
        /* Whatever the value was, it becomes the string. */
        assert_rewrite(inspect_replace_model, "{\"model\":42}", "m", "{\"model\":\"m\"}");
        assert_rewrite(inspect_replace_model, "{\"model\":{\"a\":[1,2]},\"b\":1e2}", "m", "{\"model\":\"m\",\"b\":1e2}");
        assert_rewrite(inspect_replace_model, "{\"m\\u006fdel\":\"escaped key\"}", "m", "{\"m\\u006fdel\":\"m\"}");
}
END_TEST

START_TEST(test_replace_model_refused) {
        static const char *const invalid[] = { "", "[]", "\"model\"", "{", "{\"model\":}", "null", "{\"model\":\"m\"}x" };
        char *out = (char *) 0x1;
        size_t n = 7;

        for (size_t i = 0; i < ELEMENTSOF(invalid); i++) {
                ck_assert_int_eq(inspect_replace_model(invalid[i], strlen(invalid[i]), "m", &out, &n), -EINVAL);
                ck_assert_ptr_eq(out, (char *) 0x1);
        }
        ck_assert_int_eq(inspect_replace_model("{\"x\":{\"model\":\"inner\"}}", STRLEN("{\"x\":{\"model\":\"inner\"}}"), "m",
                                               &out, &n),
                         -ENOENT);
        ck_assert_int_eq(inspect_replace_model("{}", 2, "m", &out, &n), -ENOENT);
        /* Not UTF-8: the result would not be JSON. */
        ck_assert_int_eq(inspect_replace_model("{\"model\":\"a\"}", STRLEN("{\"model\":\"a\"}"), "\xff", &out, &n), -EINVAL);
        ck_assert_int_eq(inspect_set_model("{}", 2, "\xc3", &out, &n), -EINVAL);
        ck_assert_ptr_eq(out, (char *) 0x1);
        ck_assert_uint_eq(n, 7);
}
END_TEST

START_TEST(test_usage_present) {
        const char *body =
                "{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion\","
                "\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"hi\"}}],"
                "\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":34,\"total_tokens\":46}}";
        uint64_t p = 0, c = 0;

        ck_assert_int_eq(inspect_usage(body, strlen(body), &p, &c), 0);
        ck_assert_uint_eq(p, 12);
        ck_assert_uint_eq(c, 34);
}
END_TEST

START_TEST(test_usage_stream_chunk) {
        /* The last chunk of a stream with stream_options.include_usage. */
        const char *chunk = "{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],"
                            "\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":0}}";
        const char *only_completion = "{\"usage\":{\"completion_tokens\":9}}";
        const char *only_prompt = "{\"usage\":{\"prompt_tokens\":3}}";
        const char *big = "{\"usage\":{\"prompt_tokens\":4294967296,\"completion_tokens\":1}}";
        uint64_t p, c;

        ck_assert_int_eq(inspect_usage(chunk, strlen(chunk), &p, &c), 0);
        ck_assert_uint_eq(p, 5);
        ck_assert_uint_eq(c, 0);

        ck_assert_int_eq(inspect_usage(only_completion, strlen(only_completion), &p, &c), 0);
        ck_assert_uint_eq(p, 0);
        ck_assert_uint_eq(c, 9);

        ck_assert_int_eq(inspect_usage(only_prompt, strlen(only_prompt), &p, &c), 0);
        ck_assert_uint_eq(p, 3);
        ck_assert_uint_eq(c, 0);

        ck_assert_int_eq(inspect_usage(big, strlen(big), &p, &c), 0);
        ck_assert_uint_eq(p, 4294967296ULL);
        ck_assert_uint_eq(c, 1);
}
END_TEST

START_TEST(test_usage_absent) {
        static const char *const bodies[] = {
                "{\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}",
                "{\"usage\":null}",
                "{\"usage\":{}}",
                "{\"usage\":{\"total_tokens\":3}}",
                "{\"usage\":\"none\"}",
                "{\"usage\":[1,2]}",
                "{\"usage\":{\"prompt_tokens\":-1,\"completion_tokens\":\"2\"}}",
                "{\"usage\":{\"prompt_tokens\":1.5}}",
                /* "usage" only inside a string or a nested object: not the response's usage. */
                "{\"choices\":[{\"delta\":{\"content\":\"the \\\"usage\\\" field\"}}]}",
                "{\"choices\":[{\"usage\":{\"prompt_tokens\":1}}]}",
                "",
        };
        uint64_t p = 77, c = 88;

        for (size_t i = 0; i < ELEMENTSOF(bodies); i++) {
                ck_assert_msg(inspect_usage(bodies[i], strlen(bodies[i]), &p, &c) == -ENOENT, "case %zu: %s", i,
                              bodies[i]);
                ck_assert_uint_eq(p, 77);
                ck_assert_uint_eq(c, 88);
        }
}
END_TEST

START_TEST(test_usage_invalid) {
        static const char *const bodies[] = {
                "{\"usage\":{\"prompt_tokens\":1}",
                "[{\"usage\":{\"prompt_tokens\":1}}]",
                "\"usage\"",
        };
        uint64_t p = 77, c = 88;

        for (size_t i = 0; i < ELEMENTSOF(bodies); i++) {
                ck_assert_msg(inspect_usage(bodies[i], strlen(bodies[i]), &p, &c) < 0, "case %zu", i);
                ck_assert_uint_eq(p, 77);
                ck_assert_uint_eq(c, 88);
        }
}
END_TEST

START_TEST(test_usage_size_is_honoured) {
        const char buf[] = "{\"choices\":[]}{\"usage\":{\"prompt_tokens\":1}}";

        uint64_t p = 77, c = 88;
        ck_assert_int_eq(inspect_usage(buf, STRLEN("{\"choices\":[]}"), &p, &c), -ENOENT);
        ck_assert_uint_eq(p, 77);
}
END_TEST

static Suite *inspect_suite(void) {
        Suite *s = suite_create("inspect");
        TCase *tc;

        tc = tcase_create("chat-request");
        tcase_add_test(tc, test_valid_requests);
        tcase_add_test(tc, test_size_is_honoured);
        tcase_add_test(tc, test_rejected_requests);
        tcase_add_test(tc, test_malformed_json);
        tcase_add_test(tc, test_whitespace_only_body);
        suite_add_tcase(s, tc);

        tc = tcase_create("set-model");
        tcase_add_test(tc, test_set_model_adds_model);
        tcase_add_test(tc, test_set_model_replaces_model);
        tcase_add_test(tc, test_set_model_invalid_input);
        tcase_add_test(tc, test_set_model_byte_exact);
        tcase_add_test(tc, test_replace_model);
        tcase_add_test(tc, test_replace_model_refused);
        suite_add_tcase(s, tc);

        tc = tcase_create("usage");
        tcase_add_test(tc, test_usage_present);
        tcase_add_test(tc, test_usage_stream_chunk);
        tcase_add_test(tc, test_usage_absent);
        tcase_add_test(tc, test_usage_invalid);
        tcase_add_test(tc, test_usage_size_is_honoured);
        suite_add_tcase(s, tc);

        return s;
}

int main(void) {
        return test_run_suite(inspect_suite());
}
