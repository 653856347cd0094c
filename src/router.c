/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <math.h>
#include <stdlib.h>

#include "router.h"

static const char *const route_reason_table[_ROUTE_REASON_MAX] = {
        [ROUTE_HEADER] = "header",
        [ROUTE_MAPPING] = "mapping",
        [ROUTE_DEFAULT] = "default",
};

const char *route_reason_to_string(RouteReason r) {
        if (r < 0 || r >= _ROUTE_REASON_MAX)
                return NULL;
        return route_reason_table[r];
}

static void router_changed(Router *r, const char *model) {
        if (r->on_change)
                r->on_change(r, model, r->on_change_userdata);
}

void router_set_change_callback(Router *r, RouterChangeFunc func, void *userdata) {
        r->on_change = func;
        r->on_change_userdata = userdata;
}

bool router_is_full(const Router *r) {
        return r->max_routes > 0 && g_hash_table_size(r->routes) >= r->max_routes;
}

static Route *route_free(Route *rt) {
        if (!rt)
                return NULL;
        for (unsigned i = 0; i < rt->n_arms; i++)
                provider_stats_unref(rt->arms[i].stats);
        g_free(rt->model);
        g_free(rt->arms);
        g_free(rt->sticky_header);
        g_free(rt->mirrors);
        g_free(rt);
        return NULL;
}

static void route_destroy(gpointer p) {
        route_free(p);
}

/* An arm's statistics: those of the same (model, provider) arm of carry when it had one. */
static ProviderStats *arm_stats(const Route *carry, const char *model, Provider *p) {
        g_autofree char *name = NULL;

        for (unsigned i = 0; carry && i < carry->n_arms; i++)
                if (streq(carry->arms[i].provider->name, p->name))
                        return provider_stats_ref(carry->arms[i].stats);
        name = g_strconcat(model, "/", p->name, NULL);
        return provider_stats_new(name);
}

static Route *route_new(Router *r, const char *model, Provider *const *providers, const uint32_t *weights, unsigned n,
                        const Route *carry) {
        Route *rt = g_new0(Route, 1);

        g_assert(n > 0);
        rt->router = r;
        rt->model = g_strdup(model);
        rt->arms = g_new0(RouteArm, n);
        rt->n_arms = n;
        for (unsigned i = 0; i < n; i++) {
                rt->arms[i] = (RouteArm) {
                        .provider = providers[i],
                        .weight = weights ? weights[i] : 1,
                        .stats = arm_stats(carry, model, providers[i]),
                };
                rt->total_weight += rt->arms[i].weight;
        }
        /* A change keeps the route's place in listings, and its sticky key and mirrors (routes
         * made anew from the configuration are placed by router_new() instead). */
        rt->seq = carry && carry->router == r ? carry->seq : r->next_seq++;
        if (carry) {
                rt->sticky = carry->sticky;
                rt->sticky_header = g_strdup(carry->sticky_header);
                rt->mirror_percent = carry->mirror_percent;
                if (carry->mirrors) {
                        unsigned k = 0;
                        while (carry->mirrors[k])
                                k++;
                        rt->mirrors = g_memdup2(carry->mirrors, sizeof(Provider *) * (k + 1));
                }
        }
        return rt;
}

static Route *route_new_single(Router *r, const char *model, Provider *p, const Route *carry) {
        return route_new(r, model, &p, NULL, 1, carry);
}

static const Route *router_find_route(const Router *r, const char *model) {
        if (!r || !model)
                return NULL;
        if (streq(model, ROUTE_DEFAULT_MODEL))
                return r->default_route;
        return g_hash_table_lookup(r->routes, model);
}

static void router_replace_route(Router *r, Route *rt) {
        if (streq(rt->model, ROUTE_DEFAULT_MODEL)) {
                route_free(r->default_route);
                r->default_route = rt;
        } else
                g_hash_table_replace(r->routes, rt->model, rt);
}

/* A [Route MODEL] group over what the mappings made. */
static void router_apply_route_config(Router *r, const RouteConfig *rc, const Router *previous) {
        const Route *base = router_find_route(r, rc->model);
        g_autofree Provider **providers = NULL;
        unsigned n = 0;
        Route *rt;

        if (rc->providers) {
                n = g_strv_length(rc->providers);
                providers = g_new0(Provider *, n);
                for (unsigned i = 0; i < n; i++)
                        if (!(providers[i] = router_find(r, rc->providers[i])))
                                return; /* validated at load */
                rt = route_new(r, rc->model, providers, rc->weights, n, router_find_route(previous, rc->model));
        } else if (base) {
                providers = g_new0(Provider *, base->n_arms);
                for (unsigned i = 0; i < base->n_arms; i++)
                        providers[i] = base->arms[i].provider;
                rt = route_new(r, rc->model, providers, NULL, base->n_arms, router_find_route(previous, rc->model));
        } else
                return;
        if (base)
                rt->seq = base->seq;

        rt->sticky = rc->sticky;
        g_free(rt->sticky_header);
        rt->sticky_header = g_strdup(rc->sticky_header);
        g_clear_pointer(&rt->mirrors, g_free);
        if (rc->mirrors) {
                unsigned m = g_strv_length(rc->mirrors), k = 0;
                rt->mirrors = g_new0(Provider *, m + 1);
                for (unsigned i = 0; i < m; i++) {
                        Provider *p = router_find(r, rc->mirrors[i]);
                        if (p)
                                rt->mirrors[k++] = p;
                }
        }
        rt->mirror_percent = rc->mirror_percent;
        router_replace_route(r, rt);
}

Router *router_new(const Config *c, ProviderSet *providers, const Router *previous) {
        Router *r = g_new0(Router, 1);
        Provider *def;

        r->providers = provider_set_ref(providers);
        r->routes = g_hash_table_new_full(g_str_hash, g_str_equal, NULL, route_destroy);
        r->allow_override = c->allow_provider_override;
        r->max_routes = c->max_routes;

        def = provider_set_find(providers, c->default_provider);
        if (!def) /* validated at load; a set made for tests may lack it */
                def = provider_set_size(providers) > 0 ? provider_set_get(providers, 0) : NULL;
        r->default_route = def ? route_new_single(r, ROUTE_DEFAULT_MODEL, def, NULL) : NULL;
        if (r->default_route && previous && previous->default_route)
                for (unsigned i = 0; i < previous->default_route->n_arms; i++)
                        if (streq(previous->default_route->arms[i].provider->name, def->name)) {
                                provider_stats_unref(r->default_route->arms[0].stats);
                                r->default_route->arms[0].stats = provider_stats_ref(previous->default_route->arms[i].stats);
                        }

        for (guint i = 0; i < c->mapping_order->len; i++) {
                const char *model = c->mapping_order->pdata[i];
                Provider *p = router_find(r, g_hash_table_lookup(c->mappings, model));
                if (p && model_name_is_valid(model))
                        router_replace_route(r, route_new_single(r, model, p, router_find_route(previous, model)));
        }
        for (guint i = 0; i < c->routes->len; i++)
                router_apply_route_config(r, c->routes->pdata[i], previous);
        return r;
}

Router *router_free(Router *r) {
        if (!r)
                return NULL;
        g_hash_table_unref(r->routes);
        route_free(r->default_route);
        provider_set_unref(r->providers);
        g_free(r);
        return NULL;
}

Provider *router_find(const Router *r, const char *name) {
        return provider_set_find(r->providers, name);
}

/* A stable 64-bit hash of (key, provider name): the same key always scores an arm the same. */
static uint64_t arm_hash(const char *key, const char *name) {
        uint64_t h = 0xcbf29ce484222325ULL;

        for (const char *p = key; *p; p++)
                h = (h ^ (unsigned char) *p) * 0x100000001b3ULL;
        h = (h ^ 0xff) * 0x100000001b3ULL;
        for (const char *p = name; *p; p++)
                h = (h ^ (unsigned char) *p) * 0x100000001b3ULL;
        /* Finish so that similar keys spread over the whole range. */
        h ^= h >> 33;
        h *= 0xff51afd7ed558ccdULL;
        h ^= h >> 33;
        h *= 0xc4ceb9fe1a85ec53ULL;
        h ^= h >> 33;
        return h;
}

/* Picks an arm of a split. With a sticky key: weighted rendezvous hashing, so a key keeps its arm
 * for as long as that arm is available, and when one goes away only its keys move. Without one:
 * drawn by weight. Arms that are not available give their share to the others; when none is,
 * the draw is among all (failover then decides). */
static RouteArm *route_pick_arm(const Route *rt, const char *sticky_key, usec_t now) {
        bool any_available = false;
        uint64_t total = 0;

        if (rt->n_arms == 1)
                return &rt->arms[0];

        for (unsigned i = 0; i < rt->n_arms; i++)
                if (provider_available(rt->arms[i].provider, now, false)) {
                        any_available = true;
                        total += rt->arms[i].weight;
                }
        if (!any_available)
                total = rt->total_weight;

        if (sticky_key) {
                RouteArm *best = NULL;
                double best_score = -1;

                for (unsigned i = 0; i < rt->n_arms; i++) {
                        const RouteArm *a = &rt->arms[i];
                        double u, score;

                        if (any_available && !provider_available(a->provider, now, false))
                                continue;
                        /* u in (0, 1); the arm with the highest weight / -ln(u) wins. */
                        u = ((double) (arm_hash(sticky_key, a->provider->name) >> 11) + 0.5) / 9007199254740992.0;
                        score = (double) a->weight / -log(u);
                        if (score > best_score) {
                                best_score = score;
                                best = (RouteArm *) a;
                        }
                }
                return best;
        }

        uint64_t x = ((uint64_t) g_random_int() << 32 | g_random_int()) % total;
        for (unsigned i = 0; i < rt->n_arms; i++) {
                const RouteArm *a = &rt->arms[i];
                if (any_available && !provider_available(a->provider, now, false))
                        continue;
                if (x < a->weight)
                        return (RouteArm *) a;
                x -= a->weight;
        }
        return &rt->arms[rt->n_arms - 1];
}

int router_pick(const Router *r, const char *header, const char *model, StickyKeyFunc sticky, void *userdata,
                usec_t now, RoutePick *ret) {
        const Route *rt;
        Provider *p;

        g_assert(ret);

        if (r->allow_override && !isempty(header)) {
                p = router_find(r, header);
                if (!p)
                        return -ENOENT;
                *ret = (RoutePick) { .provider = p, .reason = ROUTE_HEADER };
                return 0;
        }

        if (model && (rt = g_hash_table_lookup(r->routes, model))) {
                RouteArm *a = route_pick_arm(rt, rt->n_arms > 1 && sticky ? sticky(rt, userdata) : NULL, now);
                *ret = (RoutePick) { .provider = a->provider, .arm = a, .route = rt, .reason = ROUTE_MAPPING };
                return 0;
        }

        if (!r->default_route) /* validated at load and on every change, so this is our bug */
                return -ENXIO;
        rt = r->default_route;
        RouteArm *a = route_pick_arm(rt, rt->n_arms > 1 && sticky ? sticky(rt, userdata) : NULL, now);
        *ret = (RoutePick) { .provider = a->provider, .arm = a, .route = r->default_route, .reason = ROUTE_DEFAULT };
        return 0;
}

int router_set_default(Router *r, const char *name) {
        Provider *p = router_find(r, name);

        if (!p)
                return -ENOENT;
        if (r->default_route && r->default_route->n_arms == 1 && r->default_route->arms[0].provider == p)
                return 0;
        router_replace_route(r, route_new_single(r, ROUTE_DEFAULT_MODEL, p, r->default_route));
        router_changed(r, NULL);
        return 1;
}

int router_set_mapping(Router *r, const char *model, const char *provider) {
        Route *old;
        Provider *p;

        if (!model_name_is_valid(model))
                return -EINVAL;
        p = router_find(r, provider);
        if (!p)
                return -ENOENT;
        old = g_hash_table_lookup(r->routes, model);
        if (old && old->n_arms == 1 && old->arms[0].provider == p)
                return 0;
        if (!old && router_is_full(r))
                return -ENOSPC;
        router_replace_route(r, route_new_single(r, model, p, old));
        router_changed(r, model);
        return 1;
}

int router_set_split(Router *r, const char *model, const char *const *providers, const uint32_t *weights, unsigned n,
                     const char **ret_unknown) {
        g_autofree Provider **ps = NULL;
        const Route *old;
        bool same;

        if (!streq(strempty(model), ROUTE_DEFAULT_MODEL) && !model_name_is_valid(model))
                return -EINVAL;
        if (n == 0)
                return -EINVAL;
        ps = g_new0(Provider *, n);
        for (unsigned i = 0; i < n; i++) {
                if (!(ps[i] = router_find(r, providers[i]))) {
                        if (ret_unknown)
                                *ret_unknown = providers[i];
                        return -ENOENT;
                }
                if (weights[i] < 1)
                        return -EINVAL;
                for (unsigned j = 0; j < i; j++)
                        if (ps[j] == ps[i])
                                return -EINVAL;
        }

        old = router_find_route(r, model);
        same = old && old->n_arms == n;
        for (unsigned i = 0; same && i < n; i++)
                same = old->arms[i].provider == ps[i] && old->arms[i].weight == weights[i];
        if (same)
                return 0;
        if (!old && router_is_full(r))
                return -ENOSPC;
        router_replace_route(r, route_new(r, model, ps, weights, n, old));
        router_changed(r, streq(model, ROUTE_DEFAULT_MODEL) ? NULL : model);
        return 1;
}

int router_remove_mapping(Router *r, const char *model) {
        g_autofree char *name = g_strdup(model);

        if (!model || !g_hash_table_remove(r->routes, model))
                return -ENOENT;
        router_changed(r, name);
        return 1;
}

char *route_to_string(const Route *rt) {
        GString *s;

        if (!rt)
                return NULL;
        if (rt->n_arms == 1)
                return g_strdup(rt->arms[0].provider->name);
        s = g_string_new(NULL);
        for (unsigned i = 0; i < rt->n_arms; i++)
                g_string_append_printf(s, "%s%s:%u", i > 0 ? " " : "", rt->arms[i].provider->name, rt->arms[i].weight);
        return g_string_free(s, FALSE);
}

char *router_config_route_string(const Config *c, const char *model) {
        const RouteConfig *rc = config_find_route(c, model);
        const char *p;

        if (rc && rc->providers) {
                GString *s;
                if (!rc->providers[1])
                        return g_strdup(rc->providers[0]);
                s = g_string_new(NULL);
                for (unsigned i = 0; rc->providers[i]; i++)
                        g_string_append_printf(s, "%s%s:%u", i > 0 ? " " : "", rc->providers[i], rc->weights[i]);
                return g_string_free(s, FALSE);
        }
        p = streq(model, ROUTE_DEFAULT_MODEL) ? c->default_provider : g_hash_table_lookup(c->mappings, model);
        return g_strdup(p);
}

int router_set_route_string(Router *r, const char *model, const char *value) {
        g_auto(GStrv) names = NULL;
        g_autofree uint32_t *weights = NULL;
        int k;

        k = config_parse_arms(value, &names, &weights);
        if (k < 0)
                return -EINVAL;
        return router_set_split(r, model, (const char *const *) names, weights, g_strv_length(names), NULL);
}

const char *router_default_name(const Router *r) {
        /* A split default route: its first arm is the one named. */
        return r->default_route ? r->default_route->arms[0].provider->name : NULL;
}

const char *router_mapping(const Router *r, const char *model) {
        const Route *rt = model ? g_hash_table_lookup(r->routes, model) : NULL;

        if (!rt || rt->n_arms != 1)
                return NULL;
        return rt->arms[0].provider->name;
}

const Route *router_get_route(const Router *r, const char *model) {
        return model ? g_hash_table_lookup(r->routes, model) : NULL;
}

unsigned router_n_routes(const Router *r) {
        return g_hash_table_size(r->routes);
}

static int route_compare(const void *a, const void *b) {
        const Route *x = *(const Route *const *) a, *y = *(const Route *const *) b;
        return x->seq < y->seq ? -1 : x->seq > y->seq;
}

const Route **router_routes(const Router *r, unsigned *ret_n) {
        unsigned n = g_hash_table_size(r->routes), i = 0;
        const Route **list = g_new(const Route *, n + 1);
        GHashTableIter it;
        gpointer v;

        g_hash_table_iter_init(&it, r->routes);
        while (g_hash_table_iter_next(&it, NULL, &v))
                list[i++] = v;
        list[n] = NULL;
        qsort(list, n, sizeof(*list), route_compare);
        *ret_n = n;
        return list;
}

char *router_provider_list(const Router *r) {
        return provider_set_list(r->providers);
}

char **router_provider_names(const Router *r) {
        return provider_set_names(r->providers);
}
