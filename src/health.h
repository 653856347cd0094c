/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "manager.h"
#include "upstream.h"

/* A circuit breaker per provider. FailureThreshold= failures in a row (refused connections,
 * timeouts, 5xx, broken answers) mark a provider down; no traffic goes to it for a cool-down,
 * then one probe (GET BaseURL/models) decides: an answer brings traffic back, a failure doubles
 * the cool-down up to MaxCooldownSec=. A Retry-After from the provider keeps traffic away until
 * that time without marking it down. */

typedef enum HealthState {
        HEALTH_UNKNOWN,   /* not tried yet */
        HEALTH_UP,
        HEALTH_DOWN,      /* cooling down */
        HEALTH_PROBING,   /* a probe is on its way */
        _HEALTH_STATE_MAX,
} HealthState;

const char *health_state_to_string(HealthState s);

typedef struct ProviderHealth {
        Manager *manager;
        char *name;
        HealthState state;
        unsigned consecutive_failures;
        usec_t cooldown;            /* the current one; doubles after a failed probe */
        usec_t next_probe;          /* CLOCK_MONOTONIC */
        usec_t retry_after_until;   /* CLOCK_MONOTONIC; 0 if none */
        char *last_error;
        sd_event_source *timer;
        Upstream *probe;
        uint64_t probes;
        uint64_t trips;             /* times marked down */
} ProviderHealth;

/* name → ProviderHealth*, kept in Manager; created on first use. */
GHashTable *health_table_new(void);
ProviderHealth *health_get(Manager *m, const char *name);
void health_prune(Manager *m, char **names);

HealthState health_state(Manager *m, const char *name);
void health_record_success(ProviderHealth *h);
void health_record_failure(ProviderHealth *h, const char *why);
void health_set_retry_after(ProviderHealth *h, usec_t until);

/* May a request go to it now? Not while down, probing or inside a Retry-After. */
bool health_available(ProviderHealth *h, usec_t now);
/* When it may be tried again, relative to now, for a Retry-After of our own. */
usec_t health_retry_in(ProviderHealth *h, usec_t now);

/* Retry-After: delta-seconds or an HTTP date; returns the delay in µs or USEC_INFINITY. */
usec_t parse_retry_after(const char *value);
