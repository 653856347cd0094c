/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The runtime provider set: fallbacks resolved once, statistics and health carried over a
 * reload by name (health only while the address stays), the circuit breaker, availability. */

#include "provider.h"
#include "test-util.h"

static Config *config_from_file(const char *text) {
        g_autofree char *dir = test_tmpdir_new();
        g_autofree char *path = test_write_file(dir, "provider-router.conf", 0644, text);
        g_autoptr(GPtrArray) errors = NULL;
        g_autofree char *joined = NULL;
        ConfigSources src = { .path = path, .path_required = true };
        Config *c = NULL;
        int r;

        r = config_load(&src, &c, &errors, NULL);
        joined = test_messages_join(errors);
        ck_assert_msg(r == 0, "config_load() failed (%d):%s", r, joined);
        test_rm_rf(dir);
        return c;
}

#define TWO_PROVIDERS(b_url)                                                       \
        "[Router]\nDefaultProvider=a\nFailureThreshold=2\nCooldownSec=30\n"        \
        "[Provider a]\nBaseURL=http://127.0.0.1:1/v1\nFallbacks=b;echo\n"          \
        "[Provider b]\nBaseURL=" b_url "\n"                                        \
        "[Provider echo]\nKind=echo\n"

START_TEST(test_set_basics) {
        g_autoptr(Config) c = config_from_file(TWO_PROVIDERS("http://127.0.0.1:2/v1"));
        g_autoptr(ProviderSet) s = provider_set_new(c, NULL, NULL);
        g_auto(GStrv) names = provider_set_names(s);
        g_autofree char *list = provider_set_list(s);
        Provider *a = provider_set_find(s, "a"), *b = provider_set_find(s, "b"), *e = provider_set_find(s, "echo");

        ck_assert_uint_eq(provider_set_size(s), 3);
        ck_assert_str_eq(list, "a, b, echo");
        ck_assert_str_eq(names[2], "echo");
        ck_assert_ptr_nonnull(a);
        ck_assert_ptr_eq(provider_set_get(s, 1), b);
        ck_assert_ptr_null(provider_set_find(s, "nope"));
        ck_assert_ptr_null(provider_set_find(s, NULL));
        ck_assert_ptr_eq(a->set, s);

        /* Fallbacks are resolved once, in order, to the providers of the same set. */
        ck_assert_ptr_eq(a->fallbacks[0], b);
        ck_assert_ptr_eq(a->fallbacks[1], e);
        ck_assert_ptr_null(a->fallbacks[2]);
        ck_assert_ptr_null(b->fallbacks[0]);

        ck_assert_int_eq(provider_state(a), HEALTH_UNKNOWN);
        ck_assert_int_eq(provider_state(e), HEALTH_UP); /* it is us */
        ck_assert_str_eq(provider_url(a, "/chat/completions", NULL), "http://127.0.0.1:1/v1/chat/completions");
        {
                g_autofree char *buf = NULL;
                ck_assert_str_eq(provider_url(a, "/responses", &buf), "http://127.0.0.1:1/v1/responses");
        }
}
END_TEST

START_TEST(test_breaker) {
        g_autoptr(Config) c = config_from_file(TWO_PROVIDERS("http://127.0.0.1:2/v1"));
        g_autoptr(ProviderSet) s = provider_set_new(c, NULL, NULL);
        Provider *a = provider_set_find(s, "a");
        usec_t now = now_usec(CLOCK_MONOTONIC);

        ck_assert(provider_available(a, now, false));
        provider_record_failure(a, "refused");
        ck_assert_int_eq(provider_state(a), HEALTH_UP);
        ck_assert(provider_available(a, now, false));
        provider_record_failure(a, "refused again");
        ck_assert_int_eq(provider_state(a), HEALTH_DOWN);
        ck_assert_str_eq(a->health.last_error, "refused again");
        ck_assert(!provider_available(a, now, false));
        ck_assert(!provider_available(a, now, true));
        /* Only the probe brings it back. */
        provider_record_success(a);
        ck_assert_int_eq(provider_state(a), HEALTH_DOWN);

        /* A Retry-After keeps traffic away without marking it down. */
        Provider *b = provider_set_find(s, "b");
        provider_set_retry_after(b, now + 10 * USEC_PER_SEC);
        ck_assert(!provider_available(b, now, false));
        ck_assert(provider_available(b, now, true));
        ck_assert(provider_available(b, now + 11 * USEC_PER_SEC, false));
}
END_TEST

START_TEST(test_reload_carries_over) {
        g_autoptr(Config) c1 = config_from_file(TWO_PROVIDERS("http://127.0.0.1:2/v1"));
        g_autoptr(Config) c2 = config_from_file(TWO_PROVIDERS("http://127.0.0.1:3/v1"));
        g_autoptr(Config) c3 = config_from_file("[Router]\nDefaultProvider=a\n[Provider a]\nBaseURL=http://127.0.0.1:1/v1\n");
        g_autoptr(ProviderSet) s1 = provider_set_new(c1, NULL, NULL), s2 = NULL, s3 = NULL, s4 = NULL;
        Provider *a1 = provider_set_find(s1, "a"), *b1 = provider_set_find(s1, "b");
        g_autoptr(ProviderStats) held = provider_stats_ref(b1->stats);

        provider_stats_begin(a1->stats, false);
        provider_stats_end(a1->stats, 200, ERROR_CLASS_NONE, 1, 1, 0, 0, UINT64_MAX, 0);
        provider_record_failure(a1, "x");
        provider_record_failure(a1, "y");
        provider_record_failure(b1, "z");
        provider_stats_begin(b1->stats, true); /* in flight across the reload */

        /* Same names: statistics follow; health follows while the address stays (a), and starts
         * afresh at a new address (b). */
        s2 = provider_set_new(c2, s1, NULL);
        provider_set_retire(s1);
        Provider *a2 = provider_set_find(s2, "a"), *b2 = provider_set_find(s2, "b");
        ck_assert_ptr_eq(a2->stats, a1->stats);
        ck_assert_uint_eq(a2->stats->requests, 1);
        ck_assert_int_eq(provider_state(a2), HEALTH_DOWN);
        ck_assert_uint_eq(a2->health.consecutive_failures, 2);
        ck_assert_ptr_eq(b2->stats, b1->stats);
        ck_assert_uint_eq(b2->stats->in_flight, 1);
        ck_assert_int_eq(provider_state(b2), HEALTH_UNKNOWN);
        ck_assert_uint_eq(b2->health.consecutive_failures, 0);

        /* The old set's providers still work for the requests holding them, without touching
         * the new ones. */
        provider_record_failure(b1, "late");
        ck_assert_int_eq(provider_state(b2), HEALTH_UNKNOWN);
        provider_stats_end(held, 200, ERROR_CLASS_NONE, 1, 1, 0, 0, UINT64_MAX, 0);
        ck_assert_uint_eq(b2->stats->in_flight, 0);

        /* Removed: gone from the set; added back later: fresh statistics and health. */
        s3 = provider_set_new(c3, s2, NULL);
        provider_set_retire(s2);
        ck_assert_ptr_null(provider_set_find(s3, "b"));
        ck_assert_ptr_nonnull(provider_set_find(s3, "a"));
        s4 = provider_set_new(c2, s3, NULL);
        provider_set_retire(s3);
        ck_assert_uint_eq(provider_set_find(s4, "b")->stats->requests, 0);
        ck_assert_int_eq(provider_state(provider_set_find(s4, "b")), HEALTH_UNKNOWN);
        ck_assert_int_eq(provider_state(provider_set_find(s4, "a")), HEALTH_DOWN);
}
END_TEST

START_TEST(test_total) {
        g_autoptr(Config) c = config_from_file(TWO_PROVIDERS("http://127.0.0.1:2/v1"));
        g_autoptr(ProviderSet) s = provider_set_new(c, NULL, NULL);
        g_autofree ProviderStats *t = g_new0(ProviderStats, 1);

        PROVIDER_SET_FOREACH(p, s) {
                provider_stats_begin(p->stats, false);
                provider_stats_end(p->stats, 200, ERROR_CLASS_NONE, 10, 1, 5, 7, UINT64_MAX, 0);
        }
        provider_set_total(s, t);
        ck_assert_uint_eq(t->requests, 3);
        ck_assert_uint_eq(t->bytes_in, 15);
        ck_assert_uint_eq(t->latency.count, 3);
}
END_TEST

static Suite *provider_suite(void) {
        Suite *s = suite_create("provider");
        TCase *tc = tcase_create("set");

        tcase_add_test(tc, test_set_basics);
        tcase_add_test(tc, test_breaker);
        tcase_add_test(tc, test_reload_carries_over);
        tcase_add_test(tc, test_total);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        return test_run_suite(provider_suite());
}
