/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <stdlib.h>
#include <time.h>

#include "health.h"

static const char *const health_state_table[_HEALTH_STATE_MAX] = {
        [HEALTH_UNKNOWN] = "unknown",
        [HEALTH_UP] = "up",
        [HEALTH_DOWN] = "down",
        [HEALTH_PROBING] = "probing",
};

const char *health_state_to_string(HealthState s) {
        if (s < 0 || s >= _HEALTH_STATE_MAX)
                return NULL;
        return health_state_table[s];
}

void health_clear(ProviderHealth *h) {
        g_free(h->last_error);
        *h = (ProviderHealth) {};
}

void health_copy(ProviderHealth *dst, const ProviderHealth *src) {
        health_clear(dst);
        *dst = *src;
        dst->last_error = g_strdup(src->last_error);
}

static bool is_down(const ProviderHealth *h) {
        return h->state == HEALTH_DOWN || h->state == HEALTH_PROBING;
}

static HealthChange set_state(ProviderHealth *h, HealthState state) {
        if (h->state == state)
                return HEALTH_UNCHANGED;
        h->state = state;
        return HEALTH_CHANGED;
}

static HealthChange trip(ProviderHealth *h, const HealthPolicy *p, usec_t now) {
        if (is_down(h))
                h->cooldown = MIN(h->cooldown * 2, p->max_cooldown);
        else
                h->cooldown = p->cooldown;
        h->next_probe = now + h->cooldown;
        h->trips++;
        h->state = HEALTH_DOWN;
        return HEALTH_TRIPPED;
}

HealthChange health_record_success(ProviderHealth *h) {
        h->consecutive_failures = 0;
        if (is_down(h))
                return HEALTH_UNCHANGED; /* only the probe decides when traffic returns */
        return set_state(h, HEALTH_UP);
}

HealthChange health_record_failure(ProviderHealth *h, const HealthPolicy *p, const char *why, usec_t now) {
        g_free(h->last_error);
        h->last_error = g_strdup(why);
        h->consecutive_failures++;
        if (is_down(h))
                return HEALTH_UNCHANGED;
        if (p->failure_threshold > 0 && h->consecutive_failures >= p->failure_threshold)
                return trip(h, p, now);
        /* It was tried; the breaker decides when it is down. */
        return set_state(h, HEALTH_UP);
}

HealthChange health_probe_started(ProviderHealth *h) {
        h->probes++;
        return set_state(h, HEALTH_PROBING);
}

HealthChange health_probe_finished(ProviderHealth *h, const HealthPolicy *p, bool ok, const char *why, usec_t now) {
        if (ok) {
                h->consecutive_failures = 0;
                h->cooldown = 0;
                return set_state(h, HEALTH_UP);
        }
        g_free(h->last_error);
        h->last_error = g_strdup(why);
        return trip(h, p, now);
}

void health_set_retry_after(ProviderHealth *h, usec_t until) {
        if (until > h->retry_after_until)
                h->retry_after_until = until;
}

bool health_available(const ProviderHealth *h, usec_t now, bool ignore_retry_after) {
        if (is_down(h))
                return false;
        return ignore_retry_after || h->retry_after_until <= now;
}

usec_t health_retry_in(const ProviderHealth *h, usec_t now) {
        usec_t until = h->retry_after_until;

        if (h->state == HEALTH_DOWN)
                until = MAX(until, h->next_probe);
        else if (h->state == HEALTH_PROBING)
                until = MAX(until, now + HEALTH_PROBE_TIMEOUT_USEC);
        return until > now ? until - now : 0;
}

bool health_about_to_trip(const ProviderHealth *h, const HealthPolicy *p) {
        return p->failure_threshold > 0 && h->consecutive_failures + 1 >= p->failure_threshold;
}

usec_t parse_retry_after(const char *value) {
        char *end = NULL;
        unsigned long long secs;
        struct tm tm = {};
        const char *rest;

        if (isempty(value))
                return USEC_INFINITY;
        if (g_ascii_isdigit(value[0])) {
                errno = 0;
                secs = strtoull(value, &end, 10);
                while (end && *end == ' ')
                        end++;
                if (errno != 0 || !end || *end != 0 || secs > 86400ULL * 365)
                        return USEC_INFINITY;
                return (usec_t) secs * USEC_PER_SEC;
        }
        /* IMF-fixdate, e.g. "Wed, 21 Oct 2015 07:28:00 GMT" */
        rest = strptime(value, "%a, %d %b %Y %H:%M:%S GMT", &tm);
        if (!rest || *rest != 0)
                return USEC_INFINITY;
        time_t when = timegm(&tm), now = time(NULL);
        if (when == (time_t) -1)
                return USEC_INFINITY;
        return when > now ? (usec_t) (when - now) * USEC_PER_SEC : 0;
}
