/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "config.h"

typedef enum RouteReason {
        ROUTE_HEADER,   /* X-Provider: NAME */
        ROUTE_MAPPING,  /* [ModelMappings] or SetModelMapping() */
        ROUTE_DEFAULT,
        _ROUTE_REASON_MAX,
} RouteReason;

const char *route_reason_to_string(RouteReason r);

/* The routing table: who serves which request. Replaced as a whole on reload and changed in
 * place by D-Bus calls; a request resolves its provider once, so later changes never touch it. */
typedef struct Router {
        GPtrArray *providers;      /* ProviderConfig* (owned refs), configuration order */
        GHashTable *by_name;       /* name → ProviderConfig* (borrowed from providers) */
        char *default_provider;
        GHashTable *mappings;      /* model → provider name */
        GPtrArray *mapping_order;  /* model names, stable order */
        bool allow_override;
} Router;

Router *router_new(const Config *c);
Router *router_free(Router *r);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Router, router_free)

ProviderConfig *router_find(const Router *r, const char *name);

/* header may be NULL (no X-Provider), model may be NULL (body had none). Returns -ENOENT when
 * the header names an unknown provider. The provider is borrowed: take a ref to keep it. */
int router_pick(const Router *r, const char *header, const char *model, ProviderConfig **ret,
                RouteReason *ret_reason);

int router_set_default(Router *r, const char *name);
int router_set_mapping(Router *r, const char *model, const char *provider);
int router_remove_mapping(Router *r, const char *model);

/* "a, b, c", for error messages. */
char *router_provider_list(const Router *r);
/* NULL-terminated names, configuration order; free with g_strfreev(). */
char **router_provider_names(const Router *r);
