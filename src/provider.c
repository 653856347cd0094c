/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "log.h"
#include "provider.h"

struct ProviderSet {
        unsigned n_ref;
        GPtrArray *providers;      /* Provider* (owned), configuration order */
        GHashTable *by_name;       /* name → Provider* (borrowed) */
        HealthPolicy policy;
        ProviderSetSetup setup;
        bool retired;
};

static usec_t set_now(const ProviderSet *s) {
        uint64_t t;

        /* The loop's time of this iteration costs no clock read; tests have no loop. */
        if (s->setup.event && sd_event_now(s->setup.event, CLOCK_MONOTONIC, &t) >= 0)
                return t;
        return now_usec(CLOCK_MONOTONIC);
}

static void provider_free(Provider *p) {
        if (!p)
                return;
        upstream_free(p->probe);
        sd_event_source_disable_unref(p->probe_timer);
        health_clear(&p->health);
        provider_stats_unref(p->stats);
        provider_config_unref(p->config);
        g_free(p->fallbacks);
        g_free(p);
}

static void provider_destroy(gpointer p) {
        provider_free(p);
}

static void provider_notify(Provider *p) {
        ProviderSet *s = p->set;

        if (!s->retired && s->setup.state_changed)
                s->setup.state_changed(p, s->setup.userdata);
}

static int provider_on_probe_timer(sd_event_source *source, uint64_t usec, void *userdata);

static void provider_arm_probe(Provider *p) {
        ProviderSet *s = p->set;
        int r;

        if (!s->setup.event || s->retired)
                return;
        if (!p->probe_timer) {
                r = sd_event_add_time(s->setup.event, &p->probe_timer, CLOCK_MONOTONIC, p->health.next_probe,
                                      USEC_PER_MSEC, provider_on_probe_timer, p);
                if (r < 0) {
                        log_warning_errno(r, "Failed to arm the probe timer for '%s', it stays down until a reload: %m",
                                          p->name);
                        return;
                }
                (void) sd_event_source_set_description(p->probe_timer, "health-probe");
                return;
        }
        (void) sd_event_source_set_time(p->probe_timer, p->health.next_probe);
        (void) sd_event_source_set_enabled(p->probe_timer, SD_EVENT_ONESHOT);
}

static void provider_apply(Provider *p, HealthChange change, const char *why) {
        /* A retired set's provider only finishes the requests it had: nobody watches it. */
        if (change == HEALTH_UNCHANGED || p->set->retired)
                return;
        if (change == HEALTH_TRIPPED) {
                log_notice("Provider '%s' is down after %u failure(s) in a row (%s); probing again in %.0f s.", p->name,
                           p->health.consecutive_failures, why, (double) p->health.cooldown / USEC_PER_SEC);
                provider_arm_probe(p);
        }
        provider_notify(p);
}

static void probe_on_response(Upstream *u, void *userdata) {
}

static size_t probe_on_data(Upstream *u, const char *data, size_t size, void *userdata) {
        return size; /* the answer does not matter, only that there is one */
}

static void probe_on_done(Upstream *u, UpstreamError error, const char *message, void *userdata) {
        Provider *p = userdata;
        long status = upstream_status(u);
        g_autofree char *why = NULL;
        bool ok;

        /* Any HTTP answer below 500 means the server is there and talking. */
        ok = error == UPSTREAM_OK && status >= 100 && status < 500;
        if (ok)
                log_notice("Provider '%s' answered its probe (HTTP %ld) and is up again.", p->name, status);
        else /* message may be curl's error buffer, which goes with the transfer */
                why = error != UPSTREAM_OK ? g_strdup_printf("probe failed: %s", message)
                                           : g_strdup_printf("probe answered HTTP %ld", status);
        p->probe = upstream_free(u);
        provider_apply(p, health_probe_finished(&p->health, &p->set->policy, ok, why, set_now(p->set)), why);
}

static const UpstreamOps probe_ops = {
        .on_response = probe_on_response,
        .on_data = probe_on_data,
        .on_done = probe_on_done,
};

static int provider_on_probe_timer(sd_event_source *source, uint64_t usec, void *userdata) {
        Provider *p = userdata;
        ProviderSet *s = p->set;
        const ProviderConfig *c = p->config;
        int r;

        if (s->retired || c->kind != PROVIDER_KIND_OPENAI || p->health.state != HEALTH_DOWN || p->probe)
                return 0;

        UpstreamRequest req = {
                .url = c->models_url,
                .api_key = c->api_key,
                .connect_timeout = MIN(c->connect_timeout_usec, HEALTH_PROBE_TIMEOUT_USEC),
                .first_byte_timeout = HEALTH_PROBE_TIMEOUT_USEC,
                .total_timeout = HEALTH_PROBE_TIMEOUT_USEC,
                .provider = c,
        };
        provider_apply(p, health_probe_started(&p->health), NULL);
        r = upstream_start(s->setup.curl, s->setup.event, &req, &probe_ops, p, &p->probe);
        if (r < 0) {
                log_warning_errno(r, "Failed to probe provider '%s': %m", p->name);
                provider_apply(p, health_probe_finished(&p->health, &s->policy, false, "probe could not be started",
                                                        set_now(s)),
                               "probe could not be started");
        }
        return 0;
}

/* The same server, reached the same way: its health still says something about it. */
static bool same_server(const ProviderConfig *a, const ProviderConfig *b) {
        return a->kind == b->kind && streq(strempty(a->base_url), strempty(b->base_url));
}

static void provider_take_over(Provider *p, Provider *old) {
        /* Statistics follow the name; requests still in flight on the old object count into
         * the same totals. */
        provider_stats_unref(p->stats);
        p->stats = provider_stats_ref(old->stats);

        if (!same_server(p->config, old->config))
                return; /* a new server: its health is unknown */
        health_copy(&p->health, &old->health);
        if (p->health.state == HEALTH_PROBING) {
                /* The old object's probe is cancelled with it: probe again at once. */
                p->health.state = HEALTH_DOWN;
                p->health.next_probe = 0;
        }
        if (p->health.state == HEALTH_DOWN)
                provider_arm_probe(p);
}

ProviderSet *provider_set_new(const Config *c, ProviderSet *previous, const ProviderSetSetup *setup) {
        ProviderSet *s = g_new0(ProviderSet, 1);

        s->n_ref = 1;
        s->providers = g_ptr_array_new_full(c->providers->len, provider_destroy);
        s->by_name = g_hash_table_new(g_str_hash, g_str_equal);
        s->policy = (HealthPolicy) {
                .failure_threshold = c->failure_threshold,
                .cooldown = c->cooldown_usec,
                .max_cooldown = c->max_cooldown_usec,
        };
        if (setup)
                s->setup = *setup;

        for (guint i = 0; i < c->providers->len; i++) {
                ProviderConfig *pc = c->providers->pdata[i];
                Provider *p = g_new0(Provider, 1);

                p->config = provider_config_ref(pc);
                p->name = pc->name;
                p->set = s;
                p->index = i;
                p->stats = provider_stats_new(pc->name);
                g_ptr_array_add(s->providers, p);
                g_hash_table_insert(s->by_name, (char *) p->name, p);
        }

        PROVIDER_SET_FOREACH(p, s) {
                unsigned n = p->config->fallbacks ? g_strv_length(p->config->fallbacks) : 0, k = 0;

                p->fallbacks = g_new0(Provider *, n + 1);
                for (unsigned j = 0; j < n; j++) {
                        Provider *f = provider_set_find(s, p->config->fallbacks[j]);
                        /* Validated at load: a fallback exists and is not the provider itself. */
                        if (f && f != p)
                                p->fallbacks[k++] = f;
                }
                if (previous) {
                        Provider *old = provider_set_find(previous, p->name);
                        if (old)
                                provider_take_over(p, old);
                }
        }
        return s;
}

ProviderSet *provider_set_ref(ProviderSet *s) {
        if (s)
                s->n_ref++;
        return s;
}

ProviderSet *provider_set_unref(ProviderSet *s) {
        if (!s)
                return NULL;
        g_assert(s->n_ref > 0);
        if (--s->n_ref > 0)
                return NULL;
        g_hash_table_unref(s->by_name);
        g_ptr_array_unref(s->providers);
        g_free(s);
        return NULL;
}

void provider_set_retire(ProviderSet *s) {
        s->retired = true;
        PROVIDER_SET_FOREACH(p, s) {
                p->probe = upstream_free(p->probe);
                p->probe_timer = sd_event_source_disable_unref(p->probe_timer);
        }
}

Provider *provider_set_find(const ProviderSet *s, const char *name) {
        if (!name)
                return NULL;
        return g_hash_table_lookup(s->by_name, name);
}

unsigned provider_set_size(const ProviderSet *s) {
        return s->providers->len;
}

Provider *provider_set_get(const ProviderSet *s, unsigned i) {
        g_assert(i < s->providers->len);
        return s->providers->pdata[i];
}

const HealthPolicy *provider_set_policy(const ProviderSet *s) {
        return &s->policy;
}

char *provider_set_list(const ProviderSet *s) {
        g_auto(GStrv) names = provider_set_names(s);
        return g_strjoinv(", ", names);
}

char **provider_set_names(const ProviderSet *s) {
        char **names = g_new0(char *, s->providers->len + 1);

        PROVIDER_SET_FOREACH(p, s)
                names[_i] = g_strdup(p->name);
        return names;
}

void provider_set_total(const ProviderSet *s, ProviderStats *ret) {
        memset(ret, 0, sizeof(*ret));
        PROVIDER_SET_FOREACH(p, s)
                provider_stats_add(ret, p->stats);
}

const char *provider_url(const Provider *p, const char *suffix, char **ret_buf) {
        const ProviderConfig *c = p->config;

        if (streq(suffix, "/chat/completions"))
                return c->chat_url;
        if (streq(suffix, "/completions"))
                return c->completions_url;
        if (streq(suffix, "/embeddings"))
                return c->embeddings_url;
        if (streq(suffix, "/models"))
                return c->models_url;
        *ret_buf = g_strconcat(strempty(c->base_url), suffix, NULL);
        return *ret_buf;
}

const char *provider_model_name(const Provider *p, const char *model) {
        const char *alias;

        if (!model || !p->config->aliases)
                return model;
        alias = g_hash_table_lookup(p->config->aliases, model);
        return alias ?: model;
}

HealthState provider_state(const Provider *p) {
        if (provider_is_echo(p))
                return HEALTH_UP; /* it is us */
        return p->health.state;
}

bool provider_is_full(const Provider *p) {
        return p->config->max_concurrent > 0 && p->stats->in_flight >= p->config->max_concurrent;
}

bool provider_available(const Provider *p, usec_t now, bool ignore_retry_after) {
        if (!provider_is_echo(p) && !health_available(&p->health, now, ignore_retry_after))
                return false;
        return !provider_is_full(p);
}

void provider_record_success(Provider *p) {
        if (provider_is_echo(p))
                return;
        provider_apply(p, health_record_success(&p->health), NULL);
}

void provider_record_failure(Provider *p, const char *why) {
        if (provider_is_echo(p))
                return;
        provider_apply(p, health_record_failure(&p->health, &p->set->policy, why, set_now(p->set)), why);
}

void provider_set_retry_after(Provider *p, usec_t until) {
        health_set_retry_after(&p->health, until);
}
