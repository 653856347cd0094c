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
        g_free(rt->model);
        g_free(rt->arms);
        g_free(rt);
        return NULL;
}

static void route_destroy(gpointer p) {
        route_free(p);
}

static Route *route_new_single(Router *r, const char *model, Provider *p) {
        Route *rt = g_new0(Route, 1);

        rt->model = g_strdup(model);
        rt->arms = g_new0(RouteArm, 1);
        rt->arms[0] = (RouteArm) { .provider = p, .weight = 1 };
        rt->n_arms = 1;
        rt->total_weight = 1;
        rt->seq = r->next_seq++;
        return rt;
}

Router *router_new(const Config *c, ProviderSet *providers) {
        Router *r = g_new0(Router, 1);
        Provider *def;

        r->providers = provider_set_ref(providers);
        r->routes = g_hash_table_new_full(g_str_hash, g_str_equal, NULL, route_destroy);
        r->allow_override = c->allow_provider_override;
        r->max_routes = c->max_routes;

        def = provider_set_find(providers, c->default_provider);
        if (!def) /* validated at load; a set made for tests may lack it */
                def = provider_set_size(providers) > 0 ? provider_set_get(providers, 0) : NULL;
        r->default_route = def ? route_new_single(r, "*", def) : NULL;

        for (guint i = 0; i < c->mapping_order->len; i++) {
                const char *model = c->mapping_order->pdata[i];
                (void) router_set_mapping(r, model, g_hash_table_lookup(c->mappings, model));
        }
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
static Provider *route_pick_arm(const Route *rt, const char *sticky_key, usec_t now) {
        bool any_available = false;
        uint64_t total = 0;

        if (rt->n_arms == 1)
                return rt->arms[0].provider;

        for (unsigned i = 0; i < rt->n_arms; i++)
                if (provider_available(rt->arms[i].provider, now, false)) {
                        any_available = true;
                        total += rt->arms[i].weight;
                }
        if (!any_available)
                total = rt->total_weight;

        if (sticky_key) {
                Provider *best = NULL;
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
                                best = a->provider;
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
                        return a->provider;
                x -= a->weight;
        }
        return rt->arms[rt->n_arms - 1].provider;
}

int router_pick(const Router *r, const char *header, const char *model, const char *sticky_key, usec_t now,
                RoutePick *ret) {
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
                *ret = (RoutePick) { .provider = route_pick_arm(rt, sticky_key, now), .route = rt, .reason = ROUTE_MAPPING };
                return 0;
        }

        if (!r->default_route) /* validated at load and on every change, so this is our bug */
                return -ENXIO;
        *ret = (RoutePick) {
                .provider = route_pick_arm(r->default_route, sticky_key, now),
                .route = r->default_route,
                .reason = ROUTE_DEFAULT,
        };
        return 0;
}

int router_set_default(Router *r, const char *name) {
        Provider *p = router_find(r, name);

        if (!p)
                return -ENOENT;
        if (r->default_route && r->default_route->n_arms == 1 && r->default_route->arms[0].provider == p)
                return 0;
        route_free(r->default_route);
        r->default_route = route_new_single(r, "*", p);
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
        Route *rt = route_new_single(r, model, p);
        if (old)
                rt->seq = old->seq; /* a change keeps its place in listings */
        g_hash_table_replace(r->routes, rt->model, rt);
        router_changed(r, rt->model);
        return 1;
}

int router_remove_mapping(Router *r, const char *model) {
        g_autofree char *name = g_strdup(model);

        if (!model || !g_hash_table_remove(r->routes, model))
                return -ENOENT;
        router_changed(r, name);
        return 1;
}

const char *router_default_name(const Router *r) {
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
