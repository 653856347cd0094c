/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "stats.h"

static const char *const error_class_table[_ERROR_CLASS_MAX] = {
        [ERROR_CLASS_CONNECT] = "connect",
        [ERROR_CLASS_TIMEOUT] = "timeout",
        [ERROR_CLASS_PROVIDER_4XX] = "provider_4xx",
        [ERROR_CLASS_PROVIDER_5XX] = "provider_5xx",
        [ERROR_CLASS_STREAM] = "stream",
        [ERROR_CLASS_INVALID] = "invalid_response",
        [ERROR_CLASS_CLIENT_ABORT] = "client_abort",
        [ERROR_CLASS_OVERLOAD] = "overload",
        [ERROR_CLASS_INTERNAL] = "internal",
};

const char *error_class_to_string(ErrorClass c) {
        if (c < 0 || c >= _ERROR_CLASS_MAX)
                return NULL;
        return error_class_table[c];
}

static unsigned histogram_index(uint64_t v) {
        unsigned e;

        if (v < HISTOGRAM_SUB)
                return (unsigned) v;
        e = 63u - (unsigned) __builtin_clzll(v); /* >= HISTOGRAM_SUB_BITS */
        return (e - HISTOGRAM_SUB_BITS + 1) * HISTOGRAM_SUB +
               (unsigned) ((v >> (e - HISTOGRAM_SUB_BITS)) & (HISTOGRAM_SUB - 1));
}

static uint64_t histogram_value(unsigned idx) {
        unsigned e, sub;
        uint64_t lower, width;

        if (idx < HISTOGRAM_SUB)
                return idx;
        e = idx / HISTOGRAM_SUB + HISTOGRAM_SUB_BITS - 1;
        sub = idx % HISTOGRAM_SUB;
        lower = (uint64_t) (HISTOGRAM_SUB + sub) << (e - HISTOGRAM_SUB_BITS);
        width = (uint64_t) 1 << (e - HISTOGRAM_SUB_BITS);
        return lower + width / 2;
}

void histogram_record(Histogram *h, uint64_t v) {
        h->buckets[histogram_index(v)]++;
        h->count++;
        h->sum += v;
        if (v > h->max)
                h->max = v;
}

uint64_t histogram_percentile(const Histogram *h, double q) {
        uint64_t rank, seen = 0;

        if (h->count == 0)
                return 0;
        if (q <= 0)
                q = 0;
        if (q >= 1)
                return h->max;
        rank = (uint64_t) (q * (double) h->count);
        if (rank >= h->count)
                rank = h->count - 1;
        for (unsigned i = 0; i < HISTOGRAM_BUCKETS; i++) {
                seen += h->buckets[i];
                if (seen > rank)
                        return MIN(histogram_value(i), h->max);
        }
        return h->max;
}

void histogram_merge(Histogram *dst, const Histogram *src) {
        for (unsigned i = 0; i < HISTOGRAM_BUCKETS; i++)
                dst->buckets[i] += src->buckets[i];
        dst->count += src->count;
        dst->sum += src->sum;
        dst->max = MAX(dst->max, src->max);
}

void histogram_reset(Histogram *h) {
        memset(h, 0, sizeof(*h));
}

ProviderStats *provider_stats_new(const char *name) {
        ProviderStats *s = g_new0(ProviderStats, 1);
        s->n_ref = 1;
        s->name = g_strdup(name);
        return s;
}

ProviderStats *provider_stats_ref(ProviderStats *s) {
        if (s)
                s->n_ref++;
        return s;
}

ProviderStats *provider_stats_unref(ProviderStats *s) {
        if (!s)
                return NULL;
        g_assert(s->n_ref > 0);
        if (--s->n_ref == 0) {
                g_free(s->name);
                g_free(s);
        }
        return NULL;
}

void provider_stats_begin(ProviderStats *s, bool stream) {
        s->requests++;
        if (stream)
                s->streams++;
        s->in_flight++;
}

void provider_stats_end(ProviderStats *s, unsigned status, ErrorClass error, usec_t duration, usec_t ttfb,
                        uint64_t bytes_in, uint64_t bytes_out, uint64_t prompt_tokens, uint64_t completion_tokens) {
        g_assert(s->in_flight > 0);
        s->in_flight--;

        if (status >= 200 && status < 300)
                s->status_2xx++;
        else if (status >= 400 && status < 500)
                s->status_4xx++;
        else if (status >= 500)
                s->status_5xx++;

        if (error >= 0 && error < _ERROR_CLASS_MAX) {
                s->errors_by_class[error]++;
                if (error != ERROR_CLASS_CLIENT_ABORT)
                        s->errors++;
        }
        histogram_record(&s->latency, duration);
        if (ttfb != USEC_INFINITY)
                histogram_record(&s->ttfb, ttfb);
        s->bytes_in += bytes_in;
        s->bytes_out += bytes_out;
        if (prompt_tokens != UINT64_MAX) {
                s->prompt_tokens += prompt_tokens;
                s->completion_tokens += completion_tokens;
                /* How fast the answer came once it began. */
                if (completion_tokens > 0 && completion_tokens != UINT64_MAX && ttfb != USEC_INFINITY && duration > ttfb)
                        histogram_record(&s->speed, completion_tokens * 100 * USEC_PER_SEC / (duration - ttfb));
        }
}

void provider_stats_add(ProviderStats *t, const ProviderStats *ps) {
        t->requests += ps->requests;
        t->streams += ps->streams;
        t->errors += ps->errors;
        for (unsigned i = 0; i < _ERROR_CLASS_MAX; i++)
                t->errors_by_class[i] += ps->errors_by_class[i];
        t->status_2xx += ps->status_2xx;
        t->status_4xx += ps->status_4xx;
        t->status_5xx += ps->status_5xx;
        t->retries += ps->retries;
        t->in_flight += ps->in_flight;
        t->bytes_in += ps->bytes_in;
        t->bytes_out += ps->bytes_out;
        t->prompt_tokens += ps->prompt_tokens;
        t->completion_tokens += ps->completion_tokens;
        histogram_merge(&t->latency, &ps->latency);
        histogram_merge(&t->ttfb, &ps->ttfb);
        histogram_merge(&t->speed, &ps->speed);
}

void stats_init(Stats *s) {
        *s = (Stats) { .started_usec = now_usec(CLOCK_REALTIME) };
}
