/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "compare.h"
#include "log.h"

static const char *const comparison_origin_table[_COMPARISON_ORIGIN_MAX] = {
        [COMPARISON_MIRROR] = "mirror",
        [COMPARISON_X_COMPARE] = "x-compare",
        [COMPARISON_COMPARE] = "compare",
};

const char *comparison_origin_to_string(ComparisonOrigin o) {
        if (o < 0 || o >= _COMPARISON_ORIGIN_MAX)
                return NULL;
        return comparison_origin_table[o];
}

Comparison *comparison_free(Comparison *c) {
        if (!c)
                return NULL;
        g_free(c->request_id);
        g_free(c->model);
        answer_summary_clear(&c->primary);
        answer_summary_clear(&c->mirror);
        g_free(c);
        return NULL;
}

static void comparison_destroy(gpointer c) {
        comparison_free(c);
}

/* ---- similarity ------------------------------------------------------------------------- */

static bool is_word_byte(unsigned char c) {
        /* Letters and digits of any script: bytes of multi-byte UTF-8 characters count as
         * letters, which keeps words of other scripts whole. */
        return g_ascii_isalnum(c) || c >= 0x80;
}

/* The text's words and adjacent word pairs, lower-cased, as a set. */
static GHashTable *shingles(const char *s, size_t n) {
        GHashTable *set = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        g_autofree char *prev = NULL;
        size_t i = 0;

        while (i < n) {
                size_t start;
                char *word;

                while (i < n && !is_word_byte((unsigned char) s[i]))
                        i++;
                if (i >= n)
                        break;
                start = i;
                while (i < n && is_word_byte((unsigned char) s[i]))
                        i++;
                word = g_ascii_strdown(s + start, (gssize) (i - start));
                if (prev)
                        g_hash_table_add(set, g_strconcat(prev, " ", word, NULL));
                g_hash_table_add(set, g_strdup(word));
                g_free(prev);
                prev = word;
        }
        return set;
}

double compare_similarity(const char *a, size_t na, const char *b, size_t nb) {
        g_autoptr(GHashTable) sa = shingles(a, na), sb = shingles(b, nb);
        GHashTable *small = g_hash_table_size(sa) <= g_hash_table_size(sb) ? sa : sb;
        GHashTable *large = small == sa ? sb : sa;
        unsigned common = 0, all;
        GHashTableIter it;
        gpointer k;

        g_hash_table_iter_init(&it, small);
        while (g_hash_table_iter_next(&it, &k, NULL))
                if (g_hash_table_contains(large, k))
                        common++;
        all = g_hash_table_size(sa) + g_hash_table_size(sb) - common;
        if (all == 0)
                return 1.0;
        return (double) common / (double) all;
}

/* ---- pairs ------------------------------------------------------------------------------- */

static int compare_double(const void *a, const void *b) {
        double x = *(const double *) a, y = *(const double *) b;
        return x < y ? -1 : x > y;
}

static int compare_int64(const void *a, const void *b) {
        int64_t x = *(const int64_t *) a, y = *(const int64_t *) b;
        return x < y ? -1 : x > y;
}

double compare_pair_similarity_median(const ComparePair *p) {
        double v[COMPARE_WINDOW];

        if (p->n == 0)
                return 0;
        memcpy(v, p->similarity, p->n * sizeof(double));
        qsort(v, p->n, sizeof(double), compare_double);
        return v[p->n / 2];
}

static int64_t median_int64(const int64_t *window, unsigned n) {
        int64_t v[COMPARE_WINDOW];

        if (n == 0)
                return 0;
        memcpy(v, window, n * sizeof(int64_t));
        qsort(v, n, sizeof(int64_t), compare_int64);
        return v[n / 2];
}

int64_t compare_pair_latency_delta_median(const ComparePair *p) {
        return median_int64(p->latency_delta, p->n);
}

int64_t compare_pair_ttfb_delta_median(const ComparePair *p) {
        return median_int64(p->ttfb_delta, p->n);
}

static void compare_pair_free(gpointer v) {
        ComparePair *p = v;
        g_free(p->primary);
        g_free(p->mirror);
        g_free(p);
}

/* ---- the store --------------------------------------------------------------------------- */

struct CompareStore {
        GQueue recent;             /* Comparison*, newest at the head */
        unsigned kept;
        GHashTable *pairs_by_key;  /* "primary\nmirror" → ComparePair* (borrowed) */
        GPtrArray *pairs;          /* ComparePair*, owned */
        uint64_t skipped;
};

CompareStore *compare_store_new(unsigned kept) {
        CompareStore *s = g_new0(CompareStore, 1);

        g_queue_init(&s->recent);
        s->kept = kept;
        s->pairs_by_key = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        s->pairs = g_ptr_array_new_with_free_func(compare_pair_free);
        return s;
}

CompareStore *compare_store_free(CompareStore *s) {
        if (!s)
                return NULL;
        g_queue_clear_full(&s->recent, comparison_destroy);
        g_hash_table_unref(s->pairs_by_key);
        g_ptr_array_unref(s->pairs);
        g_free(s);
        return NULL;
}

void compare_store_set_kept(CompareStore *s, unsigned kept) {
        s->kept = kept;
        while (g_queue_get_length(&s->recent) > s->kept)
                comparison_free(g_queue_pop_tail(&s->recent));
}

static ComparePair *compare_store_pair(CompareStore *s, const char *primary, const char *mirror) {
        g_autofree char *key = g_strconcat(strempty(primary), "\n", strempty(mirror), NULL);
        ComparePair *p = g_hash_table_lookup(s->pairs_by_key, key);

        if (p)
                return p;
        p = g_new0(ComparePair, 1);
        p->primary = g_strdup(primary);
        p->mirror = g_strdup(mirror);
        g_ptr_array_add(s->pairs, p);
        g_hash_table_insert(s->pairs_by_key, TAKE_PTR(key), p);
        return p;
}

static int64_t delta(usec_t mirror, usec_t primary) {
        if (mirror == USEC_INFINITY || primary == USEC_INFINITY)
                return 0;
        return (int64_t) mirror - (int64_t) primary;
}

static void compare_pair_add(ComparePair *p, const Comparison *c) {
        p->count++;
        if (c->primary.error)
                p->primary_errors++;
        if (c->mirror.error)
                p->mirror_errors++;
        p->similarity[p->next] = c->similarity;
        p->latency_delta[p->next] = delta(c->mirror.duration_usec, c->primary.duration_usec);
        p->ttfb_delta[p->next] = delta(c->mirror.ttfb_usec, c->primary.ttfb_usec);
        p->next = (p->next + 1) % COMPARE_WINDOW;
        if (p->n < COMPARE_WINDOW)
                p->n++;
}

static char *field_u64(const char *name, uint64_t v) {
        return g_strdup_printf("%s=%" PRIu64, name, v);
}

static void add_side_fields(GPtrArray *f, const char *prefix, const AnswerSummary *a) {
        g_ptr_array_add(f, g_strdup_printf("%s_PROVIDER=%s", prefix, strempty(a->provider)));
        g_ptr_array_add(f, g_strdup_printf("%s_STATUS=%u", prefix, a->status));
        if (a->ttfb_usec != USEC_INFINITY)
                g_ptr_array_add(f, g_strdup_printf("%s_TTFB_USEC=%" PRIu64, prefix, a->ttfb_usec));
        g_ptr_array_add(f, g_strdup_printf("%s_DURATION_USEC=%" PRIu64, prefix, a->duration_usec));
        if (a->prompt_tokens != UINT64_MAX)
                g_ptr_array_add(f, g_strdup_printf("%s_PROMPT_TOKENS=%" PRIu64, prefix, a->prompt_tokens));
        if (a->completion_tokens != UINT64_MAX)
                g_ptr_array_add(f, g_strdup_printf("%s_COMPLETION_TOKENS=%" PRIu64, prefix, a->completion_tokens));
        g_ptr_array_add(f, g_strdup_printf("%s_TOKENS_PER_SEC=%.1f", prefix, answer_summary_tokens_per_sec(a)));
        if (a->finish_reason)
                g_ptr_array_add(f, g_strdup_printf("%s_FINISH_REASON=%s", prefix, a->finish_reason));
        if (a->tool_calls->len > 0) {
                GString *names = g_string_new(NULL);
                for (guint i = 0; i < a->tool_calls->len; i++)
                        g_string_append_printf(names, "%s%s", i > 0 ? "," : "", (char *) a->tool_calls->pdata[i]);
                g_ptr_array_add(f, g_strdup_printf("%s_TOOL_CALLS=%s", prefix, names->str));
                g_string_free(names, TRUE);
        }
        g_ptr_array_add(f, g_strdup_printf("%s_ANSWER_LENGTH=%" PRIu64, prefix, a->answer_length));
        if (a->error)
                g_ptr_array_add(f, g_strdup_printf("%s_ERROR=%s", prefix, a->error));
}

static void comparison_log(const Comparison *c) {
        g_autoptr(GPtrArray) f = g_ptr_array_new_with_free_func(g_free);
        g_autofree char *message = NULL;

        message = g_strdup_printf("Comparison %s, model '%s': '%s' %u in %.1f ms vs '%s' %u in %.1f ms, similarity %.2f.",
                                  c->request_id, strempty(c->model), strempty(c->primary.provider), c->primary.status,
                                  (double) c->primary.duration_usec / USEC_PER_MSEC, strempty(c->mirror.provider),
                                  c->mirror.status, (double) c->mirror.duration_usec / USEC_PER_MSEC, c->similarity);
        /* Both providers under PROVIDER=, so that journalctl MESSAGE_ID=… PROVIDER=NAME finds every
         * comparison a provider took part in. */
        g_ptr_array_add(f, g_strdup_printf("PROVIDER=%s", strempty(c->primary.provider)));
        g_ptr_array_add(f, g_strdup_printf("PROVIDER=%s", strempty(c->mirror.provider)));
        g_ptr_array_add(f, g_strdup_printf("REQUEST_ID=%s", c->request_id));
        g_ptr_array_add(f, g_strdup_printf("MODEL=%s", strempty(c->model)));
        g_ptr_array_add(f, g_strdup_printf("ORIGIN=%s", comparison_origin_to_string(c->origin)));
        g_ptr_array_add(f, g_strdup_printf("SIMILARITY=%.4f", c->similarity));
        g_ptr_array_add(f, field_u64("TIME_REALTIME_USEC", c->time_realtime));
        add_side_fields(f, "PRIMARY", &c->primary);
        add_side_fields(f, "MIRROR", &c->mirror);
        log_structured(LOG_INFO, COMPARISON_MESSAGE_ID, message, (const char *const *) f->pdata, f->len);
}

void compare_store_add(CompareStore *s, Comparison *c) {
        c->similarity = compare_similarity(c->primary.text->str, c->primary.text->len, c->mirror.text->str,
                                           c->mirror.text->len);
        compare_pair_add(compare_store_pair(s, c->primary.provider, c->mirror.provider), c);
        comparison_log(c);

        if (s->kept == 0) {
                comparison_free(c);
                return;
        }
        g_queue_push_head(&s->recent, c);
        while (g_queue_get_length(&s->recent) > s->kept)
                comparison_free(g_queue_pop_tail(&s->recent));
}

const Comparison **compare_store_recent(const CompareStore *s, unsigned max, unsigned *ret_n) {
        unsigned n = g_queue_get_length((GQueue *) &s->recent), i = 0;
        const Comparison **list;

        if (max > 0 && max < n)
                n = max;
        list = g_new0(const Comparison *, n + 1);
        for (GList *l = s->recent.head; l && i < n; l = l->next)
                list[i++] = l->data;
        *ret_n = n;
        return list;
}

const GPtrArray *compare_store_pairs(const CompareStore *s) {
        return s->pairs;
}

void compare_store_count_skipped(CompareStore *s) {
        s->skipped++;
}

uint64_t compare_store_skipped(const CompareStore *s) {
        return s->skipped;
}

struct CompareJob {
        unsigned n_ref;
        CompareStore *store;
        Comparison *comparison;
        bool have_primary;
        bool have_mirror;
};

CompareJob *compare_job_new(CompareStore *store, const char *request_id, const char *model, ComparisonOrigin origin) {
        CompareJob *j = g_new0(CompareJob, 1);

        j->n_ref = 1;
        j->store = store;
        j->comparison = g_new0(Comparison, 1);
        j->comparison->request_id = g_strdup(request_id);
        j->comparison->model = g_strdup(model);
        j->comparison->origin = origin;
        j->comparison->time_realtime = now_usec(CLOCK_REALTIME);
        answer_summary_init(&j->comparison->primary, NULL);
        answer_summary_init(&j->comparison->mirror, NULL);
        return j;
}

CompareJob *compare_job_ref(CompareJob *j) {
        if (j)
                j->n_ref++;
        return j;
}

CompareJob *compare_job_unref(CompareJob *j) {
        if (!j)
                return NULL;
        g_assert(j->n_ref > 0);
        if (--j->n_ref > 0)
                return NULL;
        /* A side that never came (the daemon stopping): nothing is recorded. */
        comparison_free(j->comparison);
        g_free(j);
        return NULL;
}

static void compare_job_check(CompareJob *j) {
        if (!j->have_primary || !j->have_mirror || !j->comparison)
                return;
        compare_store_add(j->store, TAKE_PTR(j->comparison));
}

void compare_job_primary_done(CompareJob *j, const AnswerSummary *s) {
        if (j->have_primary || !j->comparison)
                return;
        answer_summary_clear(&j->comparison->primary);
        answer_summary_copy(&j->comparison->primary, s);
        j->have_primary = true;
        compare_job_check(j);
}

void compare_job_mirror_done(CompareJob *j, const AnswerSummary *s) {
        if (j->have_mirror || !j->comparison)
                return;
        answer_summary_clear(&j->comparison->mirror);
        answer_summary_copy(&j->comparison->mirror, s);
        j->have_mirror = true;
        compare_job_check(j);
}
