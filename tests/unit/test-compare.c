/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Comparisons: reading an answer's text, tool calls, finish reason and usage from each API shape,
 * the similarity figure, and the store (ring, pairs, medians). */

#include "compare.h"
#include "log.h"
#include "test-util.h"

static void read_whole(AnswerSummary *s, const char *body) {
        AnswerReader r;

        answer_reader_init(&r, s, false);
        /* In pieces, as a transfer delivers it. */
        for (size_t i = 0, n = strlen(body); i < n; i += 7)
                answer_reader_feed(&r, body + i, MIN((size_t) 7, n - i));
        answer_reader_finish(&r);
        answer_reader_clear(&r);
}

static void read_stream(AnswerSummary *s, const char *body) {
        AnswerReader r;

        answer_reader_init(&r, s, true);
        for (size_t i = 0, n = strlen(body); i < n; i += 5)
                answer_reader_feed(&r, body + i, MIN((size_t) 5, n - i));
        answer_reader_finish(&r);
        answer_reader_clear(&r);
}

START_TEST(test_chat_answer) {
        AnswerSummary s;

        answer_summary_init(&s, "p");
        read_whole(&s, "{\"id\":\"x\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"Hello there\","
                       "\"tool_calls\":[{\"id\":\"c1\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"{}\"}}]},"
                       "\"finish_reason\":\"tool_calls\"}],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}");
        ck_assert_str_eq(s.text->str, "Hello there");
        ck_assert_uint_eq(s.answer_length, 11);
        ck_assert_str_eq(s.finish_reason, "tool_calls");
        ck_assert_uint_eq(s.tool_calls->len, 1);
        ck_assert_str_eq(s.tool_calls->pdata[0], "get_weather");
        ck_assert_uint_eq(s.prompt_tokens, 7);
        ck_assert_uint_eq(s.completion_tokens, 3);
        ck_assert_ptr_null(s.error);
        answer_summary_clear(&s);
}
END_TEST

START_TEST(test_chat_stream) {
        AnswerSummary s;

        answer_summary_init(&s, "p");
        read_stream(&s, ": ping\n\n"
                        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n"
                        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n"
                        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}]}\n\n"
                        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]}}]}\n\n"
                        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{}\"}}]}}]}\n\n"
                        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n"
                        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":5}}\n\n"
                        "data: [DONE]\n\n");
        ck_assert_str_eq(s.text->str, "Hello");
        ck_assert_str_eq(s.finish_reason, "stop");
        ck_assert_uint_eq(s.tool_calls->len, 1);
        ck_assert_str_eq(s.tool_calls->pdata[0], "f");
        ck_assert_uint_eq(s.completion_tokens, 5);
        ck_assert_ptr_null(s.error);
        answer_summary_clear(&s);
}
END_TEST

START_TEST(test_responses_api) {
        AnswerSummary s, t;

        answer_summary_init(&s, "p");
        read_whole(&s, "{\"object\":\"response\",\"status\":\"completed\",\"output\":[{\"type\":\"function_call\",\"name\":\"lookup\"},"
                       "{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi \"},{\"type\":\"output_text\",\"text\":\"you\"}]}],"
                       "\"usage\":{\"input_tokens\":4,\"output_tokens\":2}}");
        ck_assert_str_eq(s.text->str, "Hi you");
        ck_assert_str_eq(s.finish_reason, "completed");
        ck_assert_str_eq(s.tool_calls->pdata[0], "lookup");
        ck_assert_uint_eq(s.prompt_tokens, 4);
        ck_assert_uint_eq(s.completion_tokens, 2);

        answer_summary_init(&t, "q");
        read_stream(&t, "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n"
                        "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\","
                        "\"usage\":{\"input_tokens\":1,\"output_tokens\":9}}}\n\n");
        ck_assert_str_eq(t.text->str, "Hi");
        ck_assert_str_eq(t.finish_reason, "completed");
        ck_assert_uint_eq(t.completion_tokens, 9);
        answer_summary_clear(&s);
        answer_summary_clear(&t);
}
END_TEST

START_TEST(test_errors_and_bounds) {
        AnswerSummary s;
        AnswerReader r;
        g_autofree char *big = g_strnfill(5 * 1024 * 1024, 'x');

        answer_summary_init(&s, "p");
        read_whole(&s, "{\"error\":{\"message\":\"Rate limit\",\"type\":\"rate_limit_error\"}}");
        ck_assert_str_eq(s.error, "Rate limit");
        answer_summary_clear(&s);

        answer_summary_init(&s, "p");
        read_whole(&s, "not json");
        ck_assert_str_eq(s.error, "the answer is not JSON");
        answer_summary_clear(&s);

        /* Past the bound the answer is not kept, and that is said. */
        answer_summary_init(&s, "p");
        answer_reader_init(&r, &s, false);
        answer_reader_feed(&r, big, strlen(big));
        answer_reader_finish(&r);
        answer_reader_clear(&r);
        ck_assert_ptr_nonnull(strstr(s.error, "larger than"));
        answer_summary_clear(&s);

        /* A known answer is kept to the same bound; its whole length is counted. */
        answer_summary_init(&s, "p");
        answer_summary_set_answer(&s, big, "length");
        ck_assert_uint_eq(s.text->len, ANSWER_TEXT_MAX);
        ck_assert_uint_eq(s.answer_length, strlen(big));
        ck_assert_str_eq(s.finish_reason, "length");
        ck_assert_ptr_null(s.error);
        answer_summary_clear(&s);

        /* Tokens per second count from the first byte. */
        answer_summary_init(&s, "p");
        s.ttfb_usec = 100 * USEC_PER_MSEC;
        s.duration_usec = 1100 * USEC_PER_MSEC;
        s.completion_tokens = 50;
        ck_assert(answer_summary_tokens_per_sec(&s) > 49.9 && answer_summary_tokens_per_sec(&s) < 50.1);
        s.completion_tokens = UINT64_MAX;
        ck_assert(answer_summary_tokens_per_sec(&s) == 0);
        answer_summary_clear(&s);
}
END_TEST

#define SIM(a, b) compare_similarity((a), strlen(a), (b), strlen(b))

START_TEST(test_similarity) {
        ck_assert(SIM("", "") == 1.0);
        ck_assert(SIM("The cat sat.", "the CAT   sat") == 1.0);
        ck_assert(SIM("alpha beta", "gamma delta") == 0.0);
        ck_assert(SIM("", "something") == 0.0);
        /* a b c vs a b d: {a,b,c,ab,bc} vs {a,b,d,ab,bd}: 3 common of 7. */
        ck_assert(SIM("a b c", "a b d") > 3.0 / 7 - 1e-9 && SIM("a b c", "a b d") < 3.0 / 7 + 1e-9);
        /* The same words in another order are less alike than in the same order. */
        ck_assert(SIM("one two three four", "four three two one") < 1.0);
        ck_assert(SIM("one two three four", "four three two one") > 0.0);
        ck_assert(SIM("Ärger aus Köln", "ärger aus köln") < 1.0); /* only ASCII letters fold */
        ck_assert(SIM("Grüße aus Köln", "Grüße aus Köln") == 1.0);
}
END_TEST

static Comparison *comparison(const char *id, const char *primary, const char *mirror, const char *pt, const char *mt,
                              usec_t pd, usec_t md, bool mirror_error) {
        Comparison *c = g_new0(Comparison, 1);

        c->request_id = g_strdup(id);
        c->model = g_strdup("m");
        answer_summary_init(&c->primary, primary);
        answer_summary_init(&c->mirror, mirror);
        g_string_append(c->primary.text, pt);
        g_string_append(c->mirror.text, mt);
        c->primary.duration_usec = pd;
        c->mirror.duration_usec = md;
        c->primary.ttfb_usec = pd / 2;
        c->mirror.ttfb_usec = md / 2;
        if (mirror_error)
                answer_summary_set_error(&c->mirror, "boom");
        return c;
}

START_TEST(test_store) {
        g_autoptr(CompareStore) s = compare_store_new(3);
        g_autofree const Comparison **recent = NULL;
        const ComparePair *p;
        unsigned n;

        log_set_max_level(LOG_WARNING); /* the entries themselves are not under test here */
        compare_store_add(s, comparison("r1", "a", "b", "x y", "x y", 1000, 3000, false));
        compare_store_add(s, comparison("r2", "a", "b", "x y", "z", 1000, 2000, false));
        compare_store_add(s, comparison("r3", "a", "b", "x y", "x y", 2000, 1000, true));
        compare_store_add(s, comparison("r4", "a", "c", "x", "x", 1000, 1000, false));

        recent = compare_store_recent(s, 0, &n);
        ck_assert_uint_eq(n, 3); /* the ring keeps three */
        ck_assert_str_eq(recent[0]->request_id, "r4");
        ck_assert_str_eq(recent[2]->request_id, "r2");
        ck_assert(recent[0]->similarity == 1.0);
        g_clear_pointer(&recent, g_free);
        recent = compare_store_recent(s, 1, &n);
        ck_assert_uint_eq(n, 1);

        ck_assert_uint_eq(compare_store_pairs(s)->len, 2);
        p = compare_store_pairs(s)->pdata[0];
        ck_assert_str_eq(p->primary, "a");
        ck_assert_str_eq(p->mirror, "b");
        ck_assert_uint_eq(p->count, 3);
        ck_assert_uint_eq(p->mirror_errors, 1);
        ck_assert_uint_eq(p->primary_errors, 0);
        ck_assert(compare_pair_similarity_median(p) == 1.0);        /* 1, 0, 1 */
        ck_assert_int_eq(compare_pair_latency_delta_median(p), 1000); /* 2000, 1000, -1000 */
        ck_assert_int_eq(compare_pair_ttfb_delta_median(p), 500);

        compare_store_count_skipped(s);
        ck_assert_uint_eq(compare_store_skipped(s), 1);
        compare_store_set_kept(s, 1);
        g_clear_pointer(&recent, g_free);
        recent = compare_store_recent(s, 0, &n);
        ck_assert_uint_eq(n, 1);
        ck_assert_str_eq(comparison_origin_to_string(COMPARISON_X_COMPARE), "x-compare");
}
END_TEST

static Suite *compare_suite(void) {
        Suite *s = suite_create("compare");
        TCase *tc = tcase_create("answer");

        tcase_add_test(tc, test_chat_answer);
        tcase_add_test(tc, test_chat_stream);
        tcase_add_test(tc, test_responses_api);
        tcase_add_test(tc, test_errors_and_bounds);
        suite_add_tcase(s, tc);
        tc = tcase_create("comparisons");
        tcase_add_test(tc, test_similarity);
        tcase_add_test(tc, test_store);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        return test_run_suite(compare_suite());
}
