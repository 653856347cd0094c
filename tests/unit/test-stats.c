/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Statistics: histogram percentiles within 1/16, merging, per-provider counters, error
 * classes, totals and pruning after a reload. */

#include <math.h>

#include "stats.h"
#include "test-util.h"

static int compare_u64(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *) a, y = *(const uint64_t *) b;
        return x < y ? -1 : x > y;
}

/* The true percentile with the histogram's definition of rank: the value at index
 * floor(q * n) of the sorted values. */
static uint64_t exact_percentile(uint64_t *sorted, size_t n, double q) {
        size_t rank = (size_t) (q * (double) n);
        return sorted[MIN(rank, n - 1)];
}

static void assert_within(uint64_t got, uint64_t want, const char *what) {
        double tolerance = (double) want / 16.0;

        /* Below 32 the buckets are exact (one value each). */
        if (want < 32)
                tolerance = 0;
        ck_assert_msg(fabs((double) got - (double) want) <= tolerance, "%s: %" PRIu64 ", expected %" PRIu64 " ± 1/16",
                      what, got, want);
}

static void check_distribution(uint64_t *values, size_t n) {
        static const double qs[] = { 0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999 };
        Histogram *h = g_new0(Histogram, 1);
        uint64_t sum = 0, max = 0;

        for (size_t i = 0; i < n; i++) {
                histogram_record(h, values[i]);
                sum += values[i];
                max = MAX(max, values[i]);
        }
        ck_assert_uint_eq(h->count, n);
        ck_assert_uint_eq(h->sum, sum);
        ck_assert_uint_eq(h->max, max);

        qsort(values, n, sizeof(uint64_t), compare_u64);
        for (size_t i = 0; i < ELEMENTSOF(qs); i++) {
                g_autofree char *what = g_strdup_printf("p%g of %zu values", qs[i] * 100, n);
                uint64_t p = histogram_percentile(h, qs[i]);

                assert_within(p, exact_percentile(values, n, qs[i]), what);
                ck_assert_uint_le(p, max);
        }
        ck_assert_uint_eq(histogram_percentile(h, 1.0), max);
        ck_assert_uint_eq(histogram_percentile(h, 2.0), max);
        assert_within(histogram_percentile(h, -1.0), values[0], "p<0");

        /* Percentiles never decrease with q. */
        for (double q = 0, last = 0; q <= 1.0; q += 0.01) {
                uint64_t p = histogram_percentile(h, q);
                ck_assert_msg(p >= last, "p%g = %" PRIu64 " < %g", q * 100, p, last);
                last = (double) p;
        }
        g_free(h);
}

START_TEST(test_histogram_empty) {
        Histogram h = {};

        ck_assert_uint_eq(histogram_percentile(&h, 0.5), 0);
        ck_assert_uint_eq(histogram_percentile(&h, 0.0), 0);
        ck_assert_uint_eq(histogram_percentile(&h, 1.0), 0);
}
END_TEST

START_TEST(test_histogram_small_values_exact) {
        Histogram h = {};

        for (uint64_t v = 0; v < 32; v++)
                histogram_record(&h, v);
        /* rank = floor(q * 32) */
        ck_assert_uint_eq(histogram_percentile(&h, 0.0), 0);
        ck_assert_uint_eq(histogram_percentile(&h, 0.25), 8);
        ck_assert_uint_eq(histogram_percentile(&h, 0.5), 16);
        ck_assert_uint_eq(histogram_percentile(&h, 0.99), 31);
        ck_assert_uint_eq(histogram_percentile(&h, 1.0), 31);
        ck_assert_uint_eq(h.sum, 31 * 32 / 2);
}
END_TEST

START_TEST(test_histogram_single_value) {
        static const uint64_t values[] = { 1, 17, 100, 1000, 123456, 999999999, UINT64_C(1) << 40,
                                           UINT64_MAX / 3, UINT64_MAX - 1, UINT64_MAX };

        for (size_t i = 0; i < ELEMENTSOF(values); i++) {
                Histogram *h = g_new0(Histogram, 1);

                for (int k = 0; k < 10; k++)
                        histogram_record(h, values[i]);
                assert_within(histogram_percentile(h, 0.5), values[i], "single value p50");
                assert_within(histogram_percentile(h, 0.0), values[i], "single value p0");
                ck_assert_uint_le(histogram_percentile(h, 0.5), values[i]);
                ck_assert_uint_eq(histogram_percentile(h, 1.0), values[i]);
                ck_assert_uint_eq(h->max, values[i]);
                g_free(h);
        }
}
END_TEST

START_TEST(test_histogram_uniform) {
        size_t n = 100000;
        g_autofree uint64_t *v = g_new(uint64_t, n);

        for (size_t i = 0; i < n; i++)
                v[i] = i + 1;
        check_distribution(v, n);
}
END_TEST

START_TEST(test_histogram_bimodal) {
        /* 90 % fast answers at 1 ms, 10 % slow ones at 2 s: p50 fast, p95 slow. */
        size_t n = 1000;
        g_autofree uint64_t *v = g_new(uint64_t, n);
        Histogram h = {};

        for (size_t i = 0; i < n; i++) {
                v[i] = i % 10 == 0 ? 2 * USEC_PER_SEC : USEC_PER_MSEC;
                histogram_record(&h, v[i]);
        }
        assert_within(histogram_percentile(&h, 0.5), USEC_PER_MSEC, "p50");
        assert_within(histogram_percentile(&h, 0.89), USEC_PER_MSEC, "p89");
        assert_within(histogram_percentile(&h, 0.95), 2 * USEC_PER_SEC, "p95");
        assert_within(histogram_percentile(&h, 0.99), 2 * USEC_PER_SEC, "p99");
        check_distribution(v, n);
}
END_TEST

START_TEST(test_histogram_random_distributions) {
        g_autoptr(GRand) rand = g_rand_new_with_seed(4242);

        for (int round = 0; round < 20; round++) {
                size_t n = (size_t) g_rand_int_range(rand, 1, 5000);
                g_autofree uint64_t *v = g_new(uint64_t, n);

                for (size_t i = 0; i < n; i++) {
                        switch (round % 4) {
                        case 0: /* uniform over a wide range */
                                v[i] = (uint64_t) g_rand_int_range(rand, 0, 1 << 30);
                                break;
                        case 1: /* log-uniform: latencies from µs to minutes */
                                v[i] = (uint64_t) exp(g_rand_double_range(rand, 0, log(600.0 * USEC_PER_SEC)));
                                break;
                        case 2: /* exponential around 50 ms */
                                v[i] = (uint64_t) (-log(1.0 - g_rand_double(rand)) * 50000.0);
                                break;
                        default: /* full 64-bit range */
                                v[i] = ((uint64_t) g_rand_int(rand) << 32 | g_rand_int(rand)) >> g_rand_int_range(rand, 0, 64);
                                break;
                        }
                }
                check_distribution(v, n);
        }
}
END_TEST

START_TEST(test_histogram_merge_and_reset) {
        g_autoptr(GRand) rand = g_rand_new_with_seed(99);
        Histogram *a = g_new0(Histogram, 1), *b = g_new0(Histogram, 1), *all = g_new0(Histogram, 1);

        for (int i = 0; i < 3000; i++) {
                uint64_t v = (uint64_t) g_rand_int_range(rand, 0, 10000000);
                histogram_record(i % 3 ? a : b, v);
                histogram_record(all, v);
        }
        histogram_record(b, UINT64_C(1) << 50);
        histogram_record(all, UINT64_C(1) << 50);

        histogram_merge(a, b);
        ck_assert_uint_eq(a->count, all->count);
        ck_assert_uint_eq(a->sum, all->sum);
        ck_assert_uint_eq(a->max, all->max);
        ck_assert_int_eq(memcmp(a->buckets, all->buckets, sizeof(a->buckets)), 0);
        for (double q = 0; q <= 1.0; q += 0.05)
                ck_assert_uint_eq(histogram_percentile(a, q), histogram_percentile(all, q));

        /* Merging an empty histogram changes nothing; merging into an empty one copies. */
        histogram_reset(b);
        ck_assert_uint_eq(b->count, 0);
        ck_assert_uint_eq(b->max, 0);
        ck_assert_uint_eq(histogram_percentile(b, 0.5), 0);
        histogram_merge(a, b);
        ck_assert_uint_eq(a->count, all->count);
        histogram_merge(b, all);
        ck_assert_int_eq(memcmp(b, all, sizeof(*b)), 0);

        g_free(a);
        g_free(b);
        g_free(all);
}
END_TEST

START_TEST(test_error_class_strings) {
        g_autoptr(GHashTable) seen = g_hash_table_new(g_str_hash, g_str_equal);

        for (int c = 0; c < _ERROR_CLASS_MAX; c++) {
                const char *s = error_class_to_string((ErrorClass) c);
                ck_assert_ptr_nonnull(s);
                ck_assert(!g_hash_table_contains(seen, s));
                g_hash_table_add(seen, (gpointer) s);
        }
        ck_assert_str_eq(error_class_to_string(ERROR_CLASS_CLIENT_ABORT), "client_abort");
        ck_assert_str_eq(error_class_to_string(ERROR_CLASS_TIMEOUT), "timeout");
        ck_assert_ptr_null(error_class_to_string(ERROR_CLASS_NONE));
        ck_assert_ptr_null(error_class_to_string(_ERROR_CLASS_MAX));
}
END_TEST

/* One finished request: begin then end. */
static void request(ProviderStats *ps, bool stream, unsigned status, ErrorClass error, usec_t duration, usec_t ttfb) {
        provider_stats_begin(ps, stream);
        provider_stats_end(ps, status, error, duration, ttfb, 100, 1000, UINT64_MAX, UINT64_MAX);
}

START_TEST(test_provider_counters) {
        g_autoptr(ProviderStats) ps = provider_stats_new("p");

        ck_assert_ptr_eq(provider_stats_ref(ps), ps);
        ck_assert_ptr_null(provider_stats_unref(ps));
        ck_assert_str_eq(ps->name, "p");
        ck_assert_uint_eq(ps->requests, 0);

        provider_stats_begin(ps, false);
        provider_stats_begin(ps, true);
        ck_assert_uint_eq(ps->requests, 2);
        ck_assert_uint_eq(ps->streams, 1);
        ck_assert_uint_eq(ps->in_flight, 2);

        provider_stats_end(ps, 200, ERROR_CLASS_NONE, 5000, 1000, 300, 4000, 10, 20);
        ck_assert_uint_eq(ps->in_flight, 1);
        provider_stats_end(ps, 200, ERROR_CLASS_NONE, 7000, USEC_INFINITY, 200, 6000, UINT64_MAX, UINT64_MAX);
        ck_assert_uint_eq(ps->in_flight, 0);

        ck_assert_uint_eq(ps->status_2xx, 2);
        ck_assert_uint_eq(ps->errors, 0);
        ck_assert_uint_eq(ps->bytes_in, 500);
        ck_assert_uint_eq(ps->bytes_out, 10000);
        ck_assert_uint_eq(ps->prompt_tokens, 10);      /* UINT64_MAX = unknown, not added */
        ck_assert_uint_eq(ps->completion_tokens, 20);
        ck_assert_uint_eq(ps->latency.count, 2);
        ck_assert_uint_eq(ps->latency.sum, 12000);
        ck_assert_uint_eq(ps->ttfb.count, 1);          /* no first byte: not recorded */
        ck_assert_uint_eq(ps->ttfb.max, 1000);
}
END_TEST

START_TEST(test_error_classes) {
        g_autoptr(ProviderStats) ps = provider_stats_new("p");

        request(ps, false, 200, ERROR_CLASS_NONE, 1, 1);
        request(ps, false, 502, ERROR_CLASS_CONNECT, 1, USEC_INFINITY);
        request(ps, false, 504, ERROR_CLASS_TIMEOUT, 1, USEC_INFINITY);
        request(ps, false, 429, ERROR_CLASS_PROVIDER_4XX, 1, 1);
        request(ps, false, 500, ERROR_CLASS_PROVIDER_5XX, 1, 1);
        request(ps, true, 200, ERROR_CLASS_STREAM, 1, 1);
        request(ps, false, 502, ERROR_CLASS_INVALID, 1, 1);
        request(ps, true, 200, ERROR_CLASS_CLIENT_ABORT, 1, 1);
        request(ps, false, 499, ERROR_CLASS_CLIENT_ABORT, 1, USEC_INFINITY);
        request(ps, false, 503, ERROR_CLASS_OVERLOAD, 1, USEC_INFINITY);
        request(ps, false, 500, ERROR_CLASS_INTERNAL, 1, USEC_INFINITY);

        ck_assert_uint_eq(ps->requests, 11);
        ck_assert_uint_eq(ps->streams, 2);
        ck_assert_uint_eq(ps->in_flight, 0);
        /* Every class counted; client aborts are not the provider's errors. */
        ck_assert_uint_eq(ps->errors, 8);
        for (int c = 0; c < _ERROR_CLASS_MAX; c++)
                ck_assert_uint_eq(ps->errors_by_class[c], c == ERROR_CLASS_CLIENT_ABORT ? 2 : 1);
        ck_assert_uint_eq(ps->status_2xx, 3);
        ck_assert_uint_eq(ps->status_4xx, 2);
        ck_assert_uint_eq(ps->status_5xx, 6);
        ck_assert_uint_eq(ps->latency.count, 11);
        ck_assert_uint_eq(ps->ttfb.count, 6);
}
END_TEST

START_TEST(test_total) {
        g_autoptr(ProviderStats) a = provider_stats_new("a"), b = provider_stats_new("b"), c = provider_stats_new("c");
        ProviderStats *t = g_new0(ProviderStats, 1);

        for (int i = 0; i < 10; i++)
                request(a, false, 200, ERROR_CLASS_NONE, 1000 + (usec_t) i, 100);
        for (int i = 0; i < 5; i++)
                request(b, true, 502, ERROR_CLASS_CONNECT, 50000, USEC_INFINITY);
        request(c, false, 499, ERROR_CLASS_CLIENT_ABORT, 7, USEC_INFINITY);
        provider_stats_begin(c, true); /* still in flight */
        provider_stats_begin(a, false);

        provider_stats_add(t, a);
        provider_stats_add(t, b);
        provider_stats_add(t, c);
        ck_assert_uint_eq(t->requests, 18);
        ck_assert_uint_eq(t->streams, 6);
        ck_assert_uint_eq(t->errors, 5);
        ck_assert_uint_eq(t->errors_by_class[ERROR_CLASS_CONNECT], 5);
        ck_assert_uint_eq(t->errors_by_class[ERROR_CLASS_CLIENT_ABORT], 1);
        ck_assert_uint_eq(t->status_2xx, 10);
        ck_assert_uint_eq(t->status_4xx, 1);
        ck_assert_uint_eq(t->status_5xx, 5);
        ck_assert_uint_eq(t->in_flight, 2);
        ck_assert_uint_eq(t->bytes_in, 1600);
        ck_assert_uint_eq(t->bytes_out, 16000);
        ck_assert_uint_eq(t->latency.count, 16);
        ck_assert_uint_eq(t->latency.max, 50000);
        ck_assert_uint_eq(t->ttfb.count, 10);
        assert_within(histogram_percentile(&t->latency, 0.5), 1005, "total p50");
        assert_within(histogram_percentile(&t->latency, 0.99), 50000, "total p99");

        /* A total over some providers. */
        memset(t, 0, sizeof(*t));
        provider_stats_add(t, a);
        provider_stats_add(t, b);
        ck_assert_uint_eq(t->requests, 16);
        ck_assert_uint_eq(t->in_flight, 1);
        ck_assert_uint_eq(t->errors_by_class[ERROR_CLASS_CLIENT_ABORT], 0);
        ck_assert_uint_eq(t->latency.count, 15);

        /* The total does not change the providers. */
        ck_assert_uint_eq(a->requests, 11);
        ck_assert_uint_eq(b->requests, 5);
        g_free(t);
}
END_TEST

START_TEST(test_stats_new) {
        Stats s;
        usec_t now;

        stats_init(&s);
        now = now_usec(CLOCK_REALTIME);
        ck_assert_uint_le(s.started_usec, now);
        ck_assert_uint_gt(s.started_usec, now - 60 * USEC_PER_SEC);
        ck_assert_uint_eq(s.rejected, 0);
        ck_assert_uint_eq(s.http_requests, 0);
        ck_assert_ptr_null(provider_stats_unref(NULL));
        ck_assert_ptr_null(provider_stats_ref(NULL));
}
END_TEST

static Suite *stats_suite(void) {
        Suite *s = suite_create("stats");
        TCase *tc;

        tc = tcase_create("histogram");
        tcase_set_timeout(tc, 120);
        tcase_add_test(tc, test_histogram_empty);
        tcase_add_test(tc, test_histogram_small_values_exact);
        tcase_add_test(tc, test_histogram_single_value);
        tcase_add_test(tc, test_histogram_uniform);
        tcase_add_test(tc, test_histogram_bimodal);
        tcase_add_test(tc, test_histogram_random_distributions);
        tcase_add_test(tc, test_histogram_merge_and_reset);
        suite_add_tcase(s, tc);

        tc = tcase_create("providers");
        tcase_add_test(tc, test_error_class_strings);
        tcase_add_test(tc, test_provider_counters);
        tcase_add_test(tc, test_error_classes);
        tcase_add_test(tc, test_total);
        tcase_add_test(tc, test_stats_new);
        suite_add_tcase(s, tc);

        return s;
}

int main(void) {
        return test_run_suite(stats_suite());
}
