/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "util.h"

/* A circuit breaker per provider, as plain data: FailureThreshold= failures in a row (refused
 * connections, timeouts, 502/503/504, broken answers) mark a provider down; no traffic goes to it
 * for a cool-down, then one probe decides: an answer brings traffic back, a failure doubles the
 * cool-down up to MaxCooldownSec=. A Retry-After from the provider keeps traffic away until that
 * time without marking it down. This file only keeps the state and says what changed; the
 * provider object (provider.c) arms the timer and sends the probe. */

typedef enum HealthState {
        HEALTH_UNKNOWN,   /* not tried yet */
        HEALTH_UP,
        HEALTH_DOWN,      /* cooling down */
        HEALTH_PROBING,   /* a probe is on its way */
        _HEALTH_STATE_MAX,
} HealthState;

const char *health_state_to_string(HealthState s);

typedef struct HealthPolicy {
        unsigned failure_threshold;   /* 0 = never mark down */
        usec_t cooldown;
        usec_t max_cooldown;
} HealthPolicy;

typedef struct ProviderHealth {
        HealthState state;
        unsigned consecutive_failures;
        usec_t cooldown;            /* the current one; doubles after a failed probe */
        usec_t next_probe;          /* CLOCK_MONOTONIC */
        usec_t retry_after_until;   /* CLOCK_MONOTONIC; 0 if none */
        char *last_error;
        uint64_t probes;
        uint64_t trips;             /* times marked down */
} ProviderHealth;

void health_clear(ProviderHealth *h);
void health_copy(ProviderHealth *dst, const ProviderHealth *src);

/* What a recorded outcome did to the state. */
typedef enum HealthChange {
        HEALTH_UNCHANGED,
        HEALTH_CHANGED,     /* the state changed, not to down */
        HEALTH_TRIPPED,     /* now down: probe at next_probe */
} HealthChange;

HealthChange health_record_success(ProviderHealth *h);
HealthChange health_record_failure(ProviderHealth *h, const HealthPolicy *p, const char *why, usec_t now);
/* The probe is sent now. */
HealthChange health_probe_started(ProviderHealth *h);
/* The probe's outcome: ok brings traffic back, else the cool-down doubles. */
HealthChange health_probe_finished(ProviderHealth *h, const HealthPolicy *p, bool ok, const char *why, usec_t now);
void health_set_retry_after(ProviderHealth *h, usec_t until);

/* May a request go to it now? Not while down, probing or (unless ignored) inside a Retry-After. */
bool health_available(const ProviderHealth *h, usec_t now, bool ignore_retry_after);
/* When it may be tried again, relative to now, for a Retry-After of our own. */
usec_t health_retry_in(const ProviderHealth *h, usec_t now);
/* Would one more failure mark it down? */
bool health_about_to_trip(const ProviderHealth *h, const HealthPolicy *p);

/* Retry-After: delta-seconds or an HTTP date; returns the delay in µs or USEC_INFINITY. */
usec_t parse_retry_after(const char *value);

#define HEALTH_PROBE_TIMEOUT_USEC (5 * USEC_PER_SEC)
