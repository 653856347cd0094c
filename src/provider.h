/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "config.h"
#include "curl-glue.h"
#include "health.h"
#include "stats.h"
#include "upstream.h"

/* One provider at runtime: its configuration, its health (circuit breaker and probe), its
 * statistics and its resolved fallbacks — everything a request needs about it, found once.
 * Providers live in a ProviderSet, made from one configuration and replaced as a whole on
 * reload; a request holds a reference to the set it started with, so its providers (and their
 * fallbacks) stay valid until it ends, whatever is reloaded meanwhile. */

typedef struct ProviderSet ProviderSet;
typedef struct Provider Provider;

struct Provider {
        ProviderConfig *config;       /* ref */
        const char *name;             /* config->name */
        ProviderSet *set;             /* the owner */
        unsigned index;               /* configuration order */
        ProviderStats *stats;         /* ref; the same object across reloads that keep the name */
        ProviderHealth health;
        Provider **fallbacks;         /* Fallbacks=, resolved in the same set, NULL-terminated */
        sd_event_source *probe_timer;
        Upstream *probe;
};

/* Told when a provider's health state changes (not for retired sets). */
typedef void (*ProviderStateFunc)(Provider *p, void *userdata);

typedef struct ProviderSetSetup {
        sd_event *event;              /* NULL: no probes (tests) */
        CurlGlue *curl;
        ProviderStateFunc state_changed;
        void *userdata;
} ProviderSetSetup;

/* Builds the providers of c. Those whose name is in previous keep their statistics, and their
 * health too when they still point at the same server. previous may be NULL. */
ProviderSet *provider_set_new(const Config *c, ProviderSet *previous, const ProviderSetSetup *setup);
ProviderSet *provider_set_ref(ProviderSet *s);
ProviderSet *provider_set_unref(ProviderSet *s);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(ProviderSet, provider_set_unref)
/* Replaced by a reload: no more probes or notifications; requests in flight finish on it. */
void provider_set_retire(ProviderSet *s);

Provider *provider_set_find(const ProviderSet *s, const char *name);
unsigned provider_set_size(const ProviderSet *s);
Provider *provider_set_get(const ProviderSet *s, unsigned i);
const HealthPolicy *provider_set_policy(const ProviderSet *s);
/* "a, b, c", for messages. */
char *provider_set_list(const ProviderSet *s);
/* NULL-terminated names in configuration order; free with g_strfreev(). */
char **provider_set_names(const ProviderSet *s);
/* The sum of every provider's statistics into *ret (zeroed first). */
void provider_set_total(const ProviderSet *s, ProviderStats *ret);

#define PROVIDER_SET_FOREACH(p, s) \
        for (unsigned _i = 0; _i < provider_set_size(s); _i++) \
                for (Provider *p = provider_set_get((s), _i); p; p = NULL)

static inline bool provider_is_echo(const Provider *p) {
        return p->config->kind == PROVIDER_KIND_ECHO;
}

/* The provider's URL for an API path ("/chat/completions"): made at load for the usual ones,
 * else here into *ret_buf (freed by the caller). */
const char *provider_url(const Provider *p, const char *suffix, char **ret_buf);

/* The name p knows a client's model by ([ModelAliases]); model itself when it has no alias. */
const char *provider_model_name(const Provider *p, const char *model);

HealthState provider_state(const Provider *p);
/* May a request go to it now: up (or untried), not inside a Retry-After it asked for (unless
 * ignored), and below its MaxConcurrent=. */
bool provider_available(const Provider *p, usec_t now, bool ignore_retry_after);
bool provider_is_full(const Provider *p);
/* Outcomes of requests, which drive the circuit breaker. */
void provider_record_success(Provider *p);
void provider_record_failure(Provider *p, const char *why);
void provider_set_retry_after(Provider *p, usec_t until);
