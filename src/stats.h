/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "util.h"

/* A log-linear histogram: exact below 16, then 16 sub-buckets per power of two, so any
 * percentile is within 1/16 (6%) of the true value. Recording is O(1) with no allocation. */
#define HISTOGRAM_SUB_BITS 4
#define HISTOGRAM_SUB (1u << HISTOGRAM_SUB_BITS)
#define HISTOGRAM_BUCKETS ((64 - HISTOGRAM_SUB_BITS + 1) * HISTOGRAM_SUB)

typedef struct Histogram {
        uint64_t count;
        uint64_t sum;
        uint64_t max;
        uint64_t buckets[HISTOGRAM_BUCKETS];
} Histogram;

void histogram_record(Histogram *h, uint64_t value);
uint64_t histogram_percentile(const Histogram *h, double q);
void histogram_merge(Histogram *dst, const Histogram *src);
void histogram_reset(Histogram *h);

typedef enum ErrorClass {
        ERROR_CLASS_NONE = -1,
        ERROR_CLASS_CONNECT,        /* could not reach the provider: 502 */
        ERROR_CLASS_TIMEOUT,        /* provider too slow: 504 */
        ERROR_CLASS_PROVIDER_4XX,   /* provider answered 4xx, passed through */
        ERROR_CLASS_PROVIDER_5XX,   /* provider answered 5xx, passed through */
        ERROR_CLASS_STREAM,         /* provider failed after the answer had started */
        ERROR_CLASS_INVALID,        /* provider answered something unusable */
        ERROR_CLASS_CLIENT_ABORT,   /* the client went away first */
        ERROR_CLASS_OVERLOAD,       /* refused here: too many transfers to the provider */
        ERROR_CLASS_INTERNAL,
        _ERROR_CLASS_MAX,
} ErrorClass;

const char *error_class_to_string(ErrorClass c);

typedef struct ProviderStats {
        unsigned n_ref;
        char *name;
        uint64_t requests;
        uint64_t streams;
        uint64_t errors;           /* sum of errors_by_class except client aborts */
        uint64_t errors_by_class[_ERROR_CLASS_MAX];
        uint64_t status_2xx, status_4xx, status_5xx;
        uint64_t retries;          /* attempts moved to another provider */
        uint32_t in_flight;
        uint64_t bytes_in;         /* request bytes sent to the provider */
        uint64_t bytes_out;        /* response bytes relayed to clients */
        uint64_t prompt_tokens;
        uint64_t completion_tokens;
        Histogram latency;         /* whole request, µs */
        Histogram ttfb;            /* until the first byte of the answer, µs */
        Histogram speed;           /* completion tokens per second after the first byte, × 100 */
} ProviderStats;

ProviderStats *provider_stats_new(const char *name);
ProviderStats *provider_stats_ref(ProviderStats *s);
ProviderStats *provider_stats_unref(ProviderStats *s);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(ProviderStats, provider_stats_unref)

void provider_stats_begin(ProviderStats *s, bool stream);
void provider_stats_end(ProviderStats *s, unsigned status, ErrorClass error, usec_t duration, usec_t ttfb,
                        uint64_t bytes_in, uint64_t bytes_out, uint64_t prompt_tokens, uint64_t completion_tokens);

/* Adds the counters and histograms of s into total. */
void provider_stats_add(ProviderStats *total, const ProviderStats *s);

/* What is counted per loop rather than per provider. */
typedef struct Stats {
        usec_t started_usec;       /* CLOCK_REALTIME */
        uint64_t rejected;         /* requests refused before a provider was chosen */
        uint64_t http_requests;    /* every HTTP request, any route */
} Stats;

void stats_init(Stats *s);
