/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>
#include <stdlib.h>
#include <time.h>

#include "bus.h"
#include "health.h"
#include "log.h"

#define PROBE_TIMEOUT_USEC (5 * USEC_PER_SEC)

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

static void provider_health_free(gpointer p) {
        ProviderHealth *h = p;

        if (!h)
                return;
        upstream_free(h->probe);
        sd_event_source_disable_unref(h->timer);
        g_free(h->name);
        g_free(h->last_error);
        g_free(h);
}

GHashTable *health_table_new(void) {
        return g_hash_table_new_full(g_str_hash, g_str_equal, NULL, provider_health_free);
}

ProviderHealth *health_get(Manager *m, const char *name) {
        ProviderHealth *h = g_hash_table_lookup(m->health, name);

        if (!h) {
                h = g_new0(ProviderHealth, 1);
                h->manager = m;
                h->name = g_strdup(name);
                g_hash_table_insert(m->health, h->name, h);
        }
        return h;
}

HealthState health_state(Manager *m, const char *name) {
        ProviderConfig *p = router_find(m->router, name);
        ProviderHealth *h;

        if (p && p->kind == PROVIDER_KIND_ECHO)
                return HEALTH_UP; /* it is us */
        h = g_hash_table_lookup(m->health, name);
        return h ? h->state : HEALTH_UNKNOWN;
}

void health_prune(Manager *m, char **names) {
        GHashTableIter it;
        gpointer k;

        g_hash_table_iter_init(&it, m->health);
        while (g_hash_table_iter_next(&it, &k, NULL))
                if (!g_strv_contains((const char *const *) names, k))
                        g_hash_table_iter_remove(&it);
}

static void health_set_state(ProviderHealth *h, HealthState state) {
        if (h->state == state)
                return;
        h->state = state;
        bus_emit_provider_states_changed(h->manager);
}

static int health_on_timer(sd_event_source *s, uint64_t usec, void *userdata);

static void health_arm(ProviderHealth *h, usec_t when) {
        int r;

        if (!h->timer) {
                r = sd_event_add_time(h->manager->event, &h->timer, CLOCK_MONOTONIC, when, USEC_PER_MSEC,
                                      health_on_timer, h);
                if (r < 0) {
                        log_warning_errno(r, "Failed to arm the probe timer for '%s', it stays down until a reload: %m",
                                          h->name);
                        return;
                }
                (void) sd_event_source_set_description(h->timer, "health-probe");
                return;
        }
        (void) sd_event_source_set_time(h->timer, when);
        (void) sd_event_source_set_enabled(h->timer, SD_EVENT_ONESHOT);
}

static void health_trip(ProviderHealth *h, const char *why) {
        const Config *c = h->manager->config;
        usec_t now = now_usec(CLOCK_MONOTONIC);

        if (h->state == HEALTH_DOWN || h->state == HEALTH_PROBING)
                h->cooldown = MIN(h->cooldown * 2, c->max_cooldown_usec);
        else
                h->cooldown = c->cooldown_usec;
        h->next_probe = now + h->cooldown;
        h->trips++;
        log_notice("Provider '%s' is down after %u failure(s) in a row (%s); probing again in %.0f s.", h->name,
                   h->consecutive_failures, why, (double) h->cooldown / USEC_PER_SEC);
        health_set_state(h, HEALTH_DOWN);
        health_arm(h, h->next_probe);
}

void health_record_success(ProviderHealth *h) {
        HealthState old = h->state;

        h->consecutive_failures = 0;
        if (old == HEALTH_DOWN || old == HEALTH_PROBING)
                return; /* only the probe decides when traffic returns */
        health_set_state(h, HEALTH_UP);
}

void health_record_failure(ProviderHealth *h, const char *why) {
        const Config *c = h->manager->config;

        g_free(h->last_error);
        h->last_error = g_strdup(why);
        h->consecutive_failures++;
        if (h->state == HEALTH_DOWN || h->state == HEALTH_PROBING)
                return;
        if (c->failure_threshold > 0 && h->consecutive_failures >= c->failure_threshold)
                health_trip(h, why);
        else if (h->state == HEALTH_UNKNOWN)
                health_set_state(h, HEALTH_UP); /* it was tried; the breaker decides when it is down */
}

void health_set_retry_after(ProviderHealth *h, usec_t until) {
        if (until > h->retry_after_until)
                h->retry_after_until = until;
}

bool health_available(ProviderHealth *h, usec_t now) {
        if (h->state == HEALTH_DOWN || h->state == HEALTH_PROBING)
                return false;
        return h->retry_after_until <= now;
}

usec_t health_retry_in(ProviderHealth *h, usec_t now) {
        usec_t until = h->retry_after_until;

        if (h->state == HEALTH_DOWN)
                until = MAX(until, h->next_probe);
        else if (h->state == HEALTH_PROBING)
                until = MAX(until, now + PROBE_TIMEOUT_USEC);
        return until > now ? until - now : 0;
}

static void probe_on_response(Upstream *u, void *userdata) {
}

static size_t probe_on_data(Upstream *u, const char *data, size_t size, void *userdata) {
        return size; /* the answer does not matter, only that there is one */
}

static void probe_on_done(Upstream *u, UpstreamError error, const char *message, void *userdata) {
        ProviderHealth *h = userdata;
        long status = upstream_status(u);
        g_autofree char *why = NULL;

        /* Any HTTP answer below 500 means the server is there and talking. */
        if (error == UPSTREAM_OK && status >= 100 && status < 500) {
                h->probe = upstream_free(u);
                h->consecutive_failures = 0;
                h->cooldown = 0;
                log_notice("Provider '%s' answered its probe (HTTP %ld) and is up again.", h->name, status);
                health_set_state(h, HEALTH_UP);
                return;
        }
        /* message may be curl's error buffer, which goes with the transfer. */
        why = error != UPSTREAM_OK ? g_strdup_printf("probe failed: %s", message)
                                   : g_strdup_printf("probe answered HTTP %ld", status);
        h->probe = upstream_free(u);
        health_trip(h, why);
}

static const UpstreamOps probe_ops = {
        .on_response = probe_on_response,
        .on_data = probe_on_data,
        .on_done = probe_on_done,
};

static int health_on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        ProviderHealth *h = userdata;
        Manager *m = h->manager;
        ProviderConfig *p = router_find(m->router, h->name);
        int r;

        if (!p || p->kind != PROVIDER_KIND_OPENAI || h->state != HEALTH_DOWN)
                return 0;

        UpstreamRequest req = {
                .url = p->models_url,
                .api_key = p->api_key,
                .connect_timeout = MIN(p->connect_timeout_usec, PROBE_TIMEOUT_USEC),
                .first_byte_timeout = PROBE_TIMEOUT_USEC,
                .total_timeout = PROBE_TIMEOUT_USEC,
        };
        h->probes++;
        health_set_state(h, HEALTH_PROBING);
        r = upstream_start(m->curl, m->event, &req, &probe_ops, h, &h->probe);
        if (r < 0) {
                log_warning_errno(r, "Failed to probe provider '%s': %m", h->name);
                health_trip(h, "probe could not be started");
        }
        return 0;
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
