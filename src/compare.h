/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "answer.h"

/* Comparisons: one request's answer from its provider (the primary) and from another (a mirror,
 * a provider named in X-Compare, or one of a one-shot Compare), recorded together: kept in a
 * bounded ring of recent ones, added up per (primary, mirror) pair, and written to the journal
 * with a fixed MESSAGE_ID. */

#define COMPARISON_MESSAGE_ID "3f0a1c9e6b2d4e8f9a7c5b1d2e4f6a80"

typedef enum ComparisonOrigin {
        COMPARISON_MIRROR,       /* Mirror= of the route */
        COMPARISON_X_COMPARE,    /* the client's X-Compare header */
        COMPARISON_COMPARE,      /* a one-shot Compare over D-Bus */
        _COMPARISON_ORIGIN_MAX,
} ComparisonOrigin;

const char *comparison_origin_to_string(ComparisonOrigin o);

typedef struct Comparison {
        char *request_id;
        usec_t time_realtime;
        char *model;
        ComparisonOrigin origin;
        AnswerSummary primary;
        AnswerSummary mirror;
        double similarity;       /* see compare_similarity() */
} Comparison;

Comparison *comparison_free(Comparison *c);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Comparison, comparison_free)

/* How alike two answers' texts are, from 0 (nothing in common) to 1 (the same words in the same
 * order): the Jaccard index of their sets of words and of word pairs (adjacent words), words
 * being runs of letters and digits, compared without case. Two empty texts are alike (1). */
double compare_similarity(const char *a, size_t na, const char *b, size_t nb);

/* Per (primary, mirror) pair: counts, and medians over the last COMPARE_WINDOW comparisons. */
#define COMPARE_WINDOW 1024

typedef struct ComparePair {
        char *primary;
        char *mirror;
        uint64_t count;
        uint64_t primary_errors;
        uint64_t mirror_errors;
        unsigned n;                       /* entries in the windows, <= COMPARE_WINDOW */
        unsigned next;
        double similarity[COMPARE_WINDOW];
        int64_t latency_delta[COMPARE_WINDOW];   /* mirror − primary, µs */
        int64_t ttfb_delta[COMPARE_WINDOW];
} ComparePair;

double compare_pair_similarity_median(const ComparePair *p);
int64_t compare_pair_latency_delta_median(const ComparePair *p);
int64_t compare_pair_ttfb_delta_median(const ComparePair *p);

typedef struct CompareStore CompareStore;

CompareStore *compare_store_new(unsigned kept);
CompareStore *compare_store_free(CompareStore *s);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CompareStore, compare_store_free)
void compare_store_set_kept(CompareStore *s, unsigned kept);

/* Records c (taken): similarity computed, the pair's figures updated, the journal entry written,
 * kept in the ring. */
void compare_store_add(CompareStore *s, Comparison *c);
/* The most recent ones first, at most max (0: all kept); the array is freed by the caller, the
 * comparisons stay the store's. */
const Comparison **compare_store_recent(const CompareStore *s, unsigned max, unsigned *ret_n);
/* Pairs in the order they first appeared; the array stays the store's. */
const GPtrArray *compare_store_pairs(const CompareStore *s);

/* Mirrors skipped because MirrorMaxConcurrent= transfers were running. */
void compare_store_count_skipped(CompareStore *s);
uint64_t compare_store_skipped(const CompareStore *s);

/* One comparison in the making: the answer of the request's own provider (the primary) and of
 * one other arrive separately, in either order; when both are in, the comparison is added to the
 * store. Reference counted: the request and the mirror each hold one. */
typedef struct CompareJob CompareJob;

CompareJob *compare_job_new(CompareStore *store, const char *request_id, const char *model, ComparisonOrigin origin);
CompareJob *compare_job_ref(CompareJob *j);
CompareJob *compare_job_unref(CompareJob *j);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CompareJob, compare_job_unref)
/* Each side's summary is copied. */
void compare_job_primary_done(CompareJob *j, const AnswerSummary *s);
void compare_job_mirror_done(CompareJob *j, const AnswerSummary *s);
