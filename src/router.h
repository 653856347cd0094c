/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "provider.h"

typedef enum RouteReason {
        ROUTE_HEADER,   /* X-Provider: NAME */
        ROUTE_MAPPING,  /* [ModelMappings], [Route MODEL] or set over D-Bus */
        ROUTE_DEFAULT,
        _ROUTE_REASON_MAX,
} RouteReason;

const char *route_reason_to_string(RouteReason r);

typedef struct RouteArm {
        Provider *provider;        /* borrowed from the router's provider set */
        uint32_t weight;           /* >= 1 */
        ProviderStats *stats;      /* this (model, provider) arm's; kept while both stay */
} RouteArm;

/* Who serves a model: one provider, or several by weight (an A/B split), how a conversation
 * sticks to one arm, and who else is asked for comparison. */
typedef struct Router Router;

typedef struct Route {
        const Router *router;      /* the table it belongs to */
        char *model;               /* "*" for the default route */
        RouteArm *arms;
        unsigned n_arms;
        uint64_t total_weight;
        uint64_t seq;              /* creation order, for stable listings */
        StickyKind sticky;
        char *sticky_header;
        Provider **mirrors;        /* NULL-terminated; NULL if none */
        unsigned mirror_percent;
} Route;

/* A route changed: model, or NULL for the default route. */
typedef void (*RouterChangeFunc)(Router *r, const char *model, void *userdata);

/* The routing table: who serves which request. Made from the configuration over one provider
 * set, replaced as a whole on reload, changed in place by D-Bus calls; a request resolves its
 * provider once, so later changes never touch it. */
struct Router {
        ProviderSet *providers;    /* ref */
        Route *default_route;
        GHashTable *routes;        /* model → Route* (owned) */
        uint64_t next_seq;
        bool allow_override;
        unsigned max_routes;       /* MaxRoutes=; 0 = no bound */
        RouterChangeFunc on_change;
        void *on_change_userdata;
};

/* previous may be NULL; arms that exist in both keep their statistics. */
Router *router_new(const Config *c, ProviderSet *providers, const Router *previous);
Router *router_free(Router *r);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Router, router_free)

Provider *router_find(const Router *r, const char *name);

typedef struct RoutePick {
        Provider *provider;        /* borrowed */
        const RouteArm *arm;       /* of route; NULL for X-Provider */
        const Route *route;        /* the route it came from; NULL for X-Provider */
        RouteReason reason;
} RoutePick;

/* The key that keeps a request on one arm of rt (its body's "user", a header's value, the client's
 * token — as rt->sticky says), or NULL: the arm is then drawn by weight. */
typedef const char *(*StickyKeyFunc)(const Route *rt, void *userdata);

/* header may be NULL (no X-Provider), model may be NULL (body had none), sticky may be NULL (no
 * stickiness). Arms that are not available now give their share to the others. Returns -ENOENT
 * when the header names an unknown provider. */
int router_pick(const Router *r, const char *header, const char *model, StickyKeyFunc sticky, void *userdata,
                usec_t now, RoutePick *ret);

int router_set_default(Router *r, const char *name);
/* One provider for a model; returns 1 if changed, 0 if it was so already, -ENOSPC when the
 * model has no route yet and MaxRoutes= routes are set. */
int router_set_mapping(Router *r, const char *model, const char *provider);
int router_remove_mapping(Router *r, const char *model);
/* Several providers by weight for a model ("*": the default route). One arm is a mapping.
 * Returns 1 if changed, 0 if the same, -ENOENT naming an unknown provider (*ret_unknown),
 * -EINVAL for a bad model, weight or a provider named twice. */
int router_set_split(Router *r, const char *model, const char *const *providers, const uint32_t *weights, unsigned n,
                     const char **ret_unknown);
/* Sticky key and mirrors of a model's route are set by the configuration. */
/* A new route would be refused (MaxRoutes=). */
bool router_is_full(const Router *r);
/* Tells func of every change made from now on (one at a time; NULL to stop). */
void router_set_change_callback(Router *r, RouterChangeFunc func, void *userdata);

/* A route's providers as text: "name" for one, "a:80 b:20" for a split; NULL for no route. */
char *route_to_string(const Route *rt);
/* The configuration's own route of model ("*": the default route) as text, as above. */
char *router_config_route_string(const Config *c, const char *model);
/* Sets a route from such text ("*": the default route). As router_set_split(). */
int router_set_route_string(Router *r, const char *model, const char *value);

/* Read access for listings and the saved state. */
const char *router_default_name(const Router *r);
/* The single provider a model is mapped to, or NULL (none, or a split). */
const char *router_mapping(const Router *r, const char *model);
const Route *router_get_route(const Router *r, const char *model);
unsigned router_n_routes(const Router *r);
/* Routes in creation order; free the array (not the routes) with g_free(). */
const Route **router_routes(const Router *r, unsigned *ret_n);

/* "a, b, c", for error messages. */
char *router_provider_list(const Router *r);
/* NULL-terminated names, configuration order; free with g_strfreev(). */
char **router_provider_names(const Router *r);
