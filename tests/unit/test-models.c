/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The merged GET /v1/models list: each provider's entries byte for byte, "provider" added where
 * missing, the first of a duplicate id kept. */

#include "models.h"
#include "test-util.h"

static char *merged(const char *const *bodies, const char *const *providers, int *ret_counts) {
        g_autoptr(GString) out = g_string_new("[");
        g_autoptr(GHashTable) seen = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);

        for (size_t i = 0; bodies[i]; i++)
                ret_counts[i] = models_list_append(out, seen, bodies[i], strlen(bodies[i]), providers[i]);
        g_string_append_c(out, ']');
        return g_string_free(g_steal_pointer(&out), FALSE);
}

START_TEST(test_entries_kept_byte_for_byte) {
        static const char *const bodies[] = {
                "{\"object\":\"list\",\"data\":[ {\"id\": \"a\", \"created\": 1e3, \"meta\": {\"x\": [1, \"],{\"]}} ,\n"
                "{\"id\":\"b\",\"provider\":\"theirs\",\"s\":\"a\\\"b, }\"}]}",
                "{\"data\":[{\"id\":\"a\",\"owned_by\":\"dup\"},{\"id\":\"c\"}],\"object\":\"list\"}",
                NULL,
        };
        static const char *const providers[] = { "one", "two \"q\"" };
        int counts[2];
        g_autofree char *out = merged(bodies, providers, counts);

        ck_assert_int_eq(counts[0], 2);
        ck_assert_int_eq(counts[1], 1);
        ck_assert_str_eq(out, "[{\"id\": \"a\", \"created\": 1e3, \"meta\": {\"x\": [1, \"],{\"]},\"provider\":\"one\"},"
                              "{\"id\":\"b\",\"provider\":\"theirs\",\"s\":\"a\\\"b, }\"},"
                              "{\"id\":\"c\",\"provider\":\"two \\\"q\\\"\"}]");
}
END_TEST

START_TEST(test_entries_skipped) {
        static const char *const bodies[] = {
                /* no id, id not a string, not an object, an id no client could send, empty */
                "{\"data\":[{\"name\":\"x\"},{\"id\":42},\"str\",[1],null,{\"id\":\"\"},{\"id\":\"bad\\u0001\"},{},"
                "{\"id\":\"ok\"}]}",
                "{\"data\":[]}",
                "{\"data\":[ ]}",
                NULL,
        };
        static const char *const providers[] = { "p", "q", "r" };
        int counts[3];
        g_autofree char *out = merged(bodies, providers, counts);

        ck_assert_int_eq(counts[0], 1);
        ck_assert_int_eq(counts[1], 0);
        ck_assert_int_eq(counts[2], 0);
        ck_assert_str_eq(out, "[{\"id\":\"ok\",\"provider\":\"p\"}]");
}
END_TEST

START_TEST(test_not_a_list) {
        static const char *const bodies[] = {
                "", "[]", "{}", "{\"data\":{}}", "{\"data\":\"x\"}", "{\"data\":[{\"id\":\"a\"}]", "[{\"data\":[]}]",
                "{\"data\":[{\"id\":\"a\"},]}", "not json",
        };
        g_autoptr(GString) out = g_string_new("[");
        g_autoptr(GHashTable) seen = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);

        for (size_t i = 0; i < ELEMENTSOF(bodies); i++)
                ck_assert_msg(models_list_append(out, seen, bodies[i], strlen(bodies[i]), "p") == -EINVAL, "'%s'",
                              bodies[i]);
        ck_assert_str_eq(out->str, "[");
        ck_assert_uint_eq(g_hash_table_size(seen), 0);
}
END_TEST

START_TEST(test_size_is_honoured) {
        const char body[] = "{\"data\":[{\"id\":\"a\"}]}{\"data\":[{\"id\":\"b\"}]}";
        g_autoptr(GString) out = g_string_new("[");
        g_autoptr(GHashTable) seen = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);

        ck_assert_int_eq(models_list_append(out, seen, body, strlen(body) / 2, "p"), 1);
        ck_assert_str_eq(out->str, "[{\"id\":\"a\",\"provider\":\"p\"}");
}
END_TEST

START_TEST(test_parse_list) {
        const char *body = "{\"data\":[{\"id\":\"a\"},{\"id\":42},{\"id\":\"b\",\"x\":[1,{\"id\":\"inner\"}]},{\"id\":\"a\"}]}";
        g_auto(GStrv) ids = NULL;
        char **none = (char **) 0x1;

        ck_assert_int_eq(models_parse_list(body, strlen(body), &ids), 0);
        ck_assert_uint_eq(g_strv_length(ids), 3);
        ck_assert_str_eq(ids[0], "a");
        ck_assert_str_eq(ids[1], "b");
        ck_assert_str_eq(ids[2], "a");
        ck_assert_int_eq(models_parse_list("[]", 2, &none), -EINVAL);
        ck_assert_ptr_eq(none, (char **) 0x1);
}
END_TEST

static Suite *models_suite(void) {
        Suite *s = suite_create("models");
        TCase *tc = tcase_create("merge");

        tcase_add_test(tc, test_entries_kept_byte_for_byte);
        tcase_add_test(tc, test_entries_skipped);
        tcase_add_test(tc, test_not_a_list);
        tcase_add_test(tc, test_size_is_honoured);
        tcase_add_test(tc, test_parse_list);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        return test_run_suite(models_suite());
}
