/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "test-util.h"

#include <json-glib/json-glib.h>

#include "json-scan.h"

/* Documents that every strict JSON parser must accept. */
static const char *const valid[] = {
        "{}", "[]", "0", "-0", "1", "-1", "12.5", "1e10", "1E+2", "1e-2", "-0.0e0", "123456789012345678901234567890",
        "true", "false", "null", "\"\"", "\"a\"", "\"\\\"\\\\\\/\\b\\f\\n\\r\\t\"", "\"\\u0041\\u00e9\"",
        "\"\\ud83d\\ude00\"", "\"h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80\"", " \t\r\n{ \"a\" : [ 1 , 2 ] } \n",
        "{\"a\":{\"b\":{\"c\":[{\"d\":null}]}}}", "[[[[[[[[[[]]]]]]]]]]", "{\"\":\"\"}", "[\"\\u0000\"]",
        "{\"model\":\"qwen3-max\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":true}",
        "\"\xef\xbf\xbf\"", "\"\xf4\x8f\xbf\xbf\"", "[1,\"two\",{\"three\":3},[4],true,false,null]",
};

/* Documents that json-glib accepts or that are malformed in other ways: all must be refused. */
static const char *const invalid[] = {
        "", " ", "{", "}", "[", "]", "{\"a\"}", "{\"a\":}", "{\"a\" 1}", "{\"a\":1,}", "[1,]", "[,1]", "{,}",
        "{'a':1}", "['a']", "{a:1}", "/* c */ {}", "{} // c", "{}#", "0x10", "01", "00", "-", "-a", ".5", "1.",
        "1e", "1e+", "+1", "NaN", "Infinity", "-Infinity", "tru", "nul", "True", "\"\\x41\"", "\"\\a\"", "\"\\u12\"",
        "\"\\u12G4\"", "\"\\ud800\"", "\"\\udc00\"", "\"\\ud800\\u0041\"", "\"a\tb\"", "\"a\nb\"", "\"unterminated",
        "\"\x80\"", "\"\xc0\xaf\"", "\"\xc1\xbf\"", "\"\xe0\x80\xaf\"", "\"\xed\xa0\x80\"", "\"\xf5\x80\x80\x80\"",
        "\"\xf4\x90\x80\x80\"", "\"\xe2\x82\"", "\"\xff\"", "{}{}", "[] []", "1 2", "{\"a\":1}x", "\xef\xbb\xbf{}",
        "[1 2]", "{\"a\":1 \"b\":2}", "{\"a\"::1}", "[\"a\":1]", "{1:2}", "{null:1}",
};

START_TEST(test_valid) {
        for (size_t i = 0; i < G_N_ELEMENTS(valid); i++) {
                JsonScanError e = {};
                int r = json_scan(valid[i], strlen(valid[i]), NULL, NULL, &e);
                ck_assert_msg(r == 0, "refused valid JSON '%s': %s at %zu", valid[i], e.reason, e.offset);
        }
}
END_TEST

START_TEST(test_invalid) {
        for (size_t i = 0; i < G_N_ELEMENTS(invalid); i++) {
                JsonScanError e = {};
                int r = json_scan(invalid[i], strlen(invalid[i]), NULL, NULL, &e);
                ck_assert_msg(r == -EINVAL, "accepted invalid JSON '%s'", invalid[i]);
                ck_assert_ptr_nonnull(e.reason);
                ck_assert_uint_le(e.offset, strlen(invalid[i]));
        }
}
END_TEST

/* Every byte value at every position of a long string, so the 16- and 8-byte fast paths and
 * the byte-by-byte tail all see it. */
START_TEST(test_every_byte_everywhere) {
        for (int pos = 0; pos < 40; pos++)
                for (int c = 1; c < 256; c++) {
                        char doc[64];
                        bool ok;
                        memset(doc, 'a', sizeof(doc));
                        doc[0] = '"';
                        doc[1 + pos] = (char) c;
                        doc[42] = '"';
                        /* Alone, a byte is fine in a string if it is printable ASCII other than
                         * the quote and the backslash (bytes >= 0x80 are not UTF-8 alone). */
                        ok = c >= 0x20 && c < 0x80 && c != '"' && c != '\\';
                        ck_assert_msg((json_scan(doc, 43, NULL, NULL, NULL) == 0) == ok,
                                      "byte 0x%02x at %d: expected %s", c, pos, ok ? "valid" : "invalid");
                }
}
END_TEST

START_TEST(test_embedded_nul_refused) {
        static const char doc[] = "{\"a\":\"b\0c\"}";
        ck_assert_int_eq(json_scan(doc, sizeof(doc) - 1, NULL, NULL, NULL), -EINVAL);
        ck_assert_int_eq(json_scan("{}\0", 3, NULL, NULL, NULL), -EINVAL);
}
END_TEST

START_TEST(test_depth_limit) {
        g_autoptr(GString) ok = g_string_new(NULL), deep = g_string_new(NULL);

        for (int i = 0; i < JSON_SCAN_MAX_DEPTH; i++)
                g_string_append_c(ok, '[');
        for (int i = 0; i < JSON_SCAN_MAX_DEPTH; i++)
                g_string_append_c(ok, ']');
        ck_assert_int_eq(json_scan(ok->str, ok->len, NULL, NULL, NULL), 0);

        for (int i = 0; i < JSON_SCAN_MAX_DEPTH + 1; i++)
                g_string_append_c(deep, '[');
        for (int i = 0; i < JSON_SCAN_MAX_DEPTH + 1; i++)
                g_string_append_c(deep, ']');
        JsonScanError e = {};
        ck_assert_int_eq(json_scan(deep->str, deep->len, NULL, NULL, &e), -EINVAL);
        ck_assert_str_eq(e.reason, "nesting too deep");
}
END_TEST

typedef struct Collected {
        GPtrArray *keys;
        GPtrArray *values;
        GArray *types;
} Collected;

static int collect(const JsonSpan *key, const JsonSpan *value, void *userdata) {
        Collected *c = userdata;
        g_ptr_array_add(c->keys, json_span_to_string(key));
        g_ptr_array_add(c->values, g_strndup(value->data, value->size));
        g_array_append_val(c->types, value->type);
        return 0;
}

START_TEST(test_members_reported) {
        const char *doc = " { \"model\" : \"m\\u00e9\" , \"n\":-1.5e3,\"o\":{\"x\":[1,{\"y\":2}]},\"a\":[ ],\"t\":true,"
                          "\"f\":false,\"z\":null,\"e\\u0073c\":\"\\\"\" } ";
        Collected c = {
                .keys = g_ptr_array_new_with_free_func(g_free),
                .values = g_ptr_array_new_with_free_func(g_free),
                .types = g_array_new(FALSE, FALSE, sizeof(JsonValueType)),
        };
        static const char *const keys[] = { "model", "n", "o", "a", "t", "f", "z", "esc" };
        static const char *const values[] = { "\"m\\u00e9\"", "-1.5e3", "{\"x\":[1,{\"y\":2}]}", "[ ]", "true", "false", "null",
                                              "\"\\\"\"" };
        static const JsonValueType types[] = { JSON_VALUE_STRING, JSON_VALUE_NUMBER, JSON_VALUE_OBJECT, JSON_VALUE_ARRAY,
                                               JSON_VALUE_TRUE, JSON_VALUE_FALSE, JSON_VALUE_NULL, JSON_VALUE_STRING };

        ck_assert_int_eq(json_scan(doc, strlen(doc), collect, &c, NULL), 0);
        ck_assert_uint_eq(c.keys->len, G_N_ELEMENTS(keys));
        for (size_t i = 0; i < G_N_ELEMENTS(keys); i++) {
                ck_assert_str_eq(c.keys->pdata[i], keys[i]);
                ck_assert_str_eq(c.values->pdata[i], values[i]);
                ck_assert_int_eq(g_array_index(c.types, JsonValueType, i), types[i]);
        }
        g_ptr_array_unref(c.keys);
        g_ptr_array_unref(c.values);
        g_array_unref(c.types);
}
END_TEST

START_TEST(test_no_members_for_arrays) {
        Collected c = {
                .keys = g_ptr_array_new_with_free_func(g_free),
                .values = g_ptr_array_new_with_free_func(g_free),
                .types = g_array_new(FALSE, FALSE, sizeof(JsonValueType)),
        };
        ck_assert_int_eq(json_scan("[{\"a\":1}]", 9, collect, &c, NULL), 0);
        ck_assert_uint_eq(c.keys->len, 0);
        g_ptr_array_unref(c.keys);
        g_ptr_array_unref(c.values);
        g_array_unref(c.types);
}
END_TEST

static int stop_at_b(const JsonSpan *key, const JsonSpan *value, void *userdata) {
        (*(int *) userdata)++;
        return json_span_equal(key, "b") ? -ENOTRECOVERABLE : 0;
}

START_TEST(test_callback_stops_scan) {
        int n = 0;
        ck_assert_int_eq(json_scan("{\"a\":1,\"b\":2,\"c\":3}", 19, stop_at_b, &n, NULL), -ENOTRECOVERABLE);
        ck_assert_int_eq(n, 2);
}
END_TEST

START_TEST(test_span_helpers) {
        JsonSpan s = { .data = "\"a\\nb\\u00e9\\ud83d\\ude00\\/\"", .type = JSON_VALUE_STRING, .escaped = true };
        s.size = strlen(s.data);
        g_autofree char *u = json_span_to_string(&s);
        ck_assert_str_eq(u, "a\nb\xc3\xa9\xf0\x9f\x98\x80/");

        JsonSpan nul = { .data = "\"a\\u0000\"", .size = 9, .type = JSON_VALUE_STRING, .escaped = true };
        ck_assert_ptr_null(json_span_to_string(&nul));

        JsonSpan key = { .data = "\"mo\\u0064el\"", .size = 12, .type = JSON_VALUE_STRING, .escaped = true };
        ck_assert(json_span_equal(&key, "model"));
        ck_assert(!json_span_equal(&key, "mode"));
        JsonSpan plain = { .data = "\"model\"", .size = 7, .type = JSON_VALUE_STRING };
        ck_assert(json_span_equal(&plain, "model"));
        ck_assert(!json_span_equal(&plain, "models"));

        uint64_t v;
        JsonSpan n1 = { .data = "18446744073709551615", .size = 20, .type = JSON_VALUE_NUMBER };
        ck_assert_int_eq(json_span_to_uint64(&n1, &v), 0);
        ck_assert(v == UINT64_MAX);
        JsonSpan n2 = { .data = "18446744073709551616", .size = 20, .type = JSON_VALUE_NUMBER };
        ck_assert_int_eq(json_span_to_uint64(&n2, &v), -ERANGE);
        JsonSpan n3 = { .data = "-1", .size = 2, .type = JSON_VALUE_NUMBER };
        ck_assert_int_eq(json_span_to_uint64(&n3, &v), -EINVAL);
        JsonSpan n4 = { .data = "1.5", .size = 3, .type = JSON_VALUE_NUMBER };
        ck_assert_int_eq(json_span_to_uint64(&n4, &v), -EINVAL);
}
END_TEST

/* Random documents built from valid pieces must be accepted by both json-glib and us; random
 * byte flips must never crash and, whenever we accept, json-glib must accept as well. */
static void random_value(GString *s, GRand *rand, int depth) {
        switch (g_rand_int_range(rand, 0, depth > 4 ? 5 : 7)) {
        case 0: g_string_append(s, "null"); break;
        case 1: g_string_append(s, g_rand_boolean(rand) ? "true" : "false"); break;
        case 2: g_string_append_printf(s, "%d", g_rand_int_range(rand, -100000, 100000)); break;
        case 3: g_string_append_printf(s, "%d.%de%d", g_rand_int_range(rand, -9, 9), g_rand_int_range(rand, 0, 999),
                                       g_rand_int_range(rand, -5, 5)); break;
        case 4: {
                static const char *const strs[] = { "\"\"", "\"plain\"", "\"es\\\"c\\\\\"", "\"\\u00e9\"", "\"\xc3\xa9\"",
                                                   "\"\\ud83d\\ude00\"", "\"a long string with spaces and digits 0123456789\"" };
                g_string_append(s, strs[g_rand_int_range(rand, 0, G_N_ELEMENTS(strs))]);
                break;
        }
        case 5: {
                int n = g_rand_int_range(rand, 0, 4);
                g_string_append_c(s, '[');
                for (int i = 0; i < n; i++) {
                        if (i)
                                g_string_append(s, g_rand_boolean(rand) ? "," : " , ");
                        random_value(s, rand, depth + 1);
                }
                g_string_append_c(s, ']');
                break;
        }
        default: {
                int n = g_rand_int_range(rand, 0, 4);
                g_string_append_c(s, '{');
                for (int i = 0; i < n; i++) {
                        if (i)
                                g_string_append_c(s, ',');
                        g_string_append_printf(s, "\"k%d\":", i);
                        random_value(s, rand, depth + 1);
                }
                g_string_append_c(s, '}');
        }
        }
}

static int collect_element(const char *data, size_t size, void *userdata) {
        GPtrArray *out = userdata;

        g_ptr_array_add(out, g_strndup(data, size));
        return out->len == 99 ? -ECANCELED : 0;
}

static int take_array(const JsonSpan *key, const JsonSpan *value, void *userdata) {
        *(JsonSpan *) userdata = *value;
        return 0;
}

START_TEST(test_array_foreach) {
        static const char body[] =
                "{\"a\": [ 1 , \"x,]\\\"y\" ,{\"k\":[2,3],\"s\":\"}\\\\\"}, [ [] ],\"\\\\\",true\n]}";
        g_autoptr(GPtrArray) out = g_ptr_array_new_with_free_func(g_free);
        JsonSpan a = {};

        ck_assert_int_ge(json_scan(body, strlen(body), take_array, &a, NULL), 0);
        ck_assert_int_eq(json_array_foreach(&a, collect_element, out), 0);
        ck_assert_uint_eq(out->len, 6);
        ck_assert_str_eq(out->pdata[0], "1");
        ck_assert_str_eq(out->pdata[1], "\"x,]\\\"y\"");
        ck_assert_str_eq(out->pdata[2], "{\"k\":[2,3],\"s\":\"}\\\\\"}");
        ck_assert_str_eq(out->pdata[3], "[ [] ]");
        ck_assert_str_eq(out->pdata[4], "\"\\\\\"");
        ck_assert_str_eq(out->pdata[5], "true");

        /* Empty, and a callback that stops it. */
        g_ptr_array_set_size(out, 0);
        ck_assert_int_ge(json_scan("{\"a\":[ ]}", 9, take_array, &a, NULL), 0);
        ck_assert_int_eq(json_array_foreach(&a, collect_element, out), 0);
        ck_assert_uint_eq(out->len, 0);
        g_ptr_array_set_size(out, 98);
        ck_assert_int_ge(json_scan("{\"a\":[1,2]}", 11, take_array, &a, NULL), 0);
        ck_assert_int_eq(json_array_foreach(&a, collect_element, out), -ECANCELED);
        ck_assert_uint_eq(out->len, 99);
}
END_TEST

START_TEST(test_random_against_json_glib) {
        g_autoptr(GRand) rand = g_rand_new_with_seed(4242);

        for (int iter = 0; iter < 3000; iter++) {
                g_autoptr(GString) s = g_string_new(NULL);
                g_autoptr(JsonParser) parser = json_parser_new();
                JsonScanError e = {};

                random_value(s, rand, 0);
                ck_assert_msg(json_scan(s->str, s->len, NULL, NULL, &e) == 0, "refused '%s': %s", s->str, e.reason);
                ck_assert_msg(json_parser_load_from_data(parser, s->str, (gssize) s->len, NULL), "json-glib refused '%s'",
                              s->str);

                /* Mutate one byte: we may refuse, but what we accept json-glib accepts too. */
                if (s->len > 0) {
                        g_autoptr(JsonParser) p2 = json_parser_new();
                        size_t at = (size_t) g_rand_int_range(rand, 0, (gint32) s->len);
                        s->str[at] = (char) g_rand_int_range(rand, 1, 256);
                        if (json_scan(s->str, s->len, NULL, NULL, NULL) == 0)
                                ck_assert_msg(json_parser_load_from_data(p2, s->str, (gssize) s->len, NULL),
                                              "we accepted what json-glib refuses: '%s'", s->str);
                }
        }
}
END_TEST

static Suite *json_scan_suite(void) {
        Suite *s = suite_create("json-scan");
        TCase *tc = tcase_create("core");

        tcase_add_test(tc, test_valid);
        tcase_add_test(tc, test_invalid);
        tcase_add_test(tc, test_embedded_nul_refused);
        tcase_add_test(tc, test_every_byte_everywhere);
        tcase_add_test(tc, test_depth_limit);
        tcase_add_test(tc, test_members_reported);
        tcase_add_test(tc, test_no_members_for_arrays);
        tcase_add_test(tc, test_callback_stops_scan);
        tcase_add_test(tc, test_span_helpers);
        tcase_add_test(tc, test_array_foreach);
        tcase_add_test(tc, test_random_against_json_glib);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        SRunner *sr = srunner_create(json_scan_suite());
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
