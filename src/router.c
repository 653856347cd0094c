/* SPDX-License-Identifier: LGPL-2.1-or-later */
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

Router *router_new(const Config *c) {
        Router *r = g_new0(Router, 1);

        r->providers = g_ptr_array_new_with_free_func(provider_config_destroy);
        r->by_name = g_hash_table_new(g_str_hash, g_str_equal);
        r->mappings = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        r->mapping_order = g_ptr_array_new_with_free_func(g_free);
        r->allow_override = c->allow_provider_override;
        r->default_provider = g_strdup(c->default_provider);

        for (guint i = 0; i < c->providers->len; i++) {
                ProviderConfig *p = c->providers->pdata[i];
                g_ptr_array_add(r->providers, provider_config_ref(p));
                g_hash_table_insert(r->by_name, p->name, p);
        }
        for (guint i = 0; i < c->mapping_order->len; i++) {
                const char *model = c->mapping_order->pdata[i];
                (void) router_set_mapping(r, model, g_hash_table_lookup(c->mappings, model));
        }
        return r;
}

Router *router_free(Router *r) {
        if (!r)
                return NULL;
        g_hash_table_unref(r->by_name);
        g_ptr_array_unref(r->providers);
        g_hash_table_unref(r->mappings);
        g_ptr_array_unref(r->mapping_order);
        g_free(r->default_provider);
        g_free(r);
        return NULL;
}

ProviderConfig *router_find(const Router *r, const char *name) {
        if (!name)
                return NULL;
        return g_hash_table_lookup(r->by_name, name);
}

int router_pick(const Router *r, const char *header, const char *model, ProviderConfig **ret,
                RouteReason *ret_reason) {
        ProviderConfig *p;
        const char *mapped;

        g_assert(ret);

        if (r->allow_override && !isempty(header)) {
                p = router_find(r, header);
                if (!p)
                        return -ENOENT;
                *ret = p;
                if (ret_reason)
                        *ret_reason = ROUTE_HEADER;
                return 0;
        }

        if (model && (mapped = g_hash_table_lookup(r->mappings, model)) && (p = router_find(r, mapped))) {
                *ret = p;
                if (ret_reason)
                        *ret_reason = ROUTE_MAPPING;
                return 0;
        }

        p = router_find(r, r->default_provider);
        if (!p) /* validated at load and on every change, so this is our bug */
                return -ENXIO;
        *ret = p;
        if (ret_reason)
                *ret_reason = ROUTE_DEFAULT;
        return 0;
}

int router_set_default(Router *r, const char *name) {
        if (!router_find(r, name))
                return -ENOENT;
        if (streq(r->default_provider, name))
                return 0;
        g_free(r->default_provider);
        r->default_provider = g_strdup(name);
        return 1;
}

int router_set_mapping(Router *r, const char *model, const char *provider) {
        const char *old;

        if (!model_name_is_valid(model))
                return -EINVAL;
        if (!router_find(r, provider))
                return -ENOENT;
        old = g_hash_table_lookup(r->mappings, model);
        if (old && streq(old, provider))
                return 0;
        if (!old)
                g_ptr_array_add(r->mapping_order, g_strdup(model));
        g_hash_table_replace(r->mappings, g_strdup(model), g_strdup(provider));
        return 1;
}

int router_remove_mapping(Router *r, const char *model) {
        if (!model || !g_hash_table_remove(r->mappings, model))
                return -ENOENT;
        for (guint i = 0; i < r->mapping_order->len; i++)
                if (streq(r->mapping_order->pdata[i], model)) {
                        g_ptr_array_remove_index(r->mapping_order, i);
                        break;
                }
        return 1;
}

char *router_provider_list(const Router *r) {
        g_auto(GStrv) names = router_provider_names(r);
        return g_strjoinv(", ", names);
}

char **router_provider_names(const Router *r) {
        char **names = g_new0(char *, r->providers->len + 1);
        for (guint i = 0; i < r->providers->len; i++)
                names[i] = g_strdup(((ProviderConfig *) r->providers->pdata[i])->name);
        return names;
}
