/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <json-glib/json-glib.h>

#include "json-util.h"
#include "log.h"
#include "models.h"
#include "request.h"

#define MODELS_TIMEOUT_USEC (10 * USEC_PER_SEC)
#define MODELS_MAX_SIZE (4 * 1024 * 1024)

typedef struct ModelsFetch {
        ModelsQuery *query;
        ProviderConfig *provider;
        Upstream *upstream;
        GByteArray *body;
        long status;
        bool ok;
} ModelsFetch;

struct ModelsQuery {
        Request *request;
        GPtrArray *fetches;        /* ModelsFetch* */
        ProviderConfig *only;      /* X-Provider */
        unsigned pending;
};

static void models_fetch_free(ModelsFetch *f) {
        if (!f)
                return;
        upstream_free(f->upstream);
        provider_config_unref(f->provider);
        if (f->body)
                g_byte_array_unref(f->body);
        g_free(f);
}

static void models_fetch_destroy(gpointer f) {
        models_fetch_free(f);
}

ModelsQuery *models_query_free(ModelsQuery *q) {
        if (!q)
                return NULL;
        g_ptr_array_unref(q->fetches);
        provider_config_unref(q->only);
        g_free(q);
        return NULL;
}

static void add_model(JsonBuilder *b, GHashTable *seen, const char *id, const char *provider) {
        if (!id || g_hash_table_contains(seen, id))
                return;
        g_hash_table_add(seen, g_strdup(id));
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "id");
        json_builder_add_string_value(b, id);
        json_builder_set_member_name(b, "object");
        json_builder_add_string_value(b, "model");
        json_builder_set_member_name(b, "created");
        json_builder_add_int_value(b, 0);
        json_builder_set_member_name(b, "owned_by");
        json_builder_add_string_value(b, provider);
        json_builder_set_member_name(b, "provider");
        json_builder_add_string_value(b, provider);
        json_builder_end_object(b);
}

int models_parse_list(const char *body, size_t size, char ***ret_ids) {
        g_autoptr(JsonParser) parser = json_parser_new_immutable();
        g_autoptr(GPtrArray) ids = NULL;
        JsonNode *root, *data;
        JsonArray *a;

        if (!json_parser_load_from_data(parser, body, (gssize) size, NULL))
                return -EINVAL;
        root = json_parser_get_root(parser);
        if (!root || !JSON_NODE_HOLDS_OBJECT(root))
                return -EINVAL;
        data = json_object_get_member(json_node_get_object(root), "data");
        if (!data || !JSON_NODE_HOLDS_ARRAY(data))
                return -EINVAL;
        a = json_node_get_array(data);
        ids = g_ptr_array_new_with_free_func(g_free);
        for (guint i = 0; i < json_array_get_length(a); i++) {
                JsonNode *e = json_array_get_element(a, i);
                JsonNode *id;
                if (!JSON_NODE_HOLDS_OBJECT(e))
                        continue;
                id = json_object_get_member(json_node_get_object(e), "id");
                if (id && JSON_NODE_HOLDS_VALUE(id) && json_node_get_value_type(id) == G_TYPE_STRING &&
                    model_name_is_valid(json_node_get_string(id)))
                        g_ptr_array_add(ids, g_strdup(json_node_get_string(id)));
        }
        g_ptr_array_add(ids, NULL);
        *ret_ids = (char **) g_ptr_array_free(g_steal_pointer(&ids), FALSE);
        return 0;
}

static void add_listed_models(JsonBuilder *b, GHashTable *seen, ModelsFetch *f) {
        g_auto(GStrv) ids = NULL;

        if (!f->ok || !f->body)
                return;
        if (models_parse_list((const char *) f->body->data, f->body->len, &ids) < 0)
                return;
        for (char **id = ids; *id; id++)
                add_model(b, seen, *id, f->provider->name);
}

static ModelsFetch *find_fetch(ModelsQuery *q, ProviderConfig *p) {
        for (guint i = 0; i < q->fetches->len; i++) {
                ModelsFetch *f = q->fetches->pdata[i];
                if (f->provider == p)
                        return f;
        }
        return NULL;
}

static void models_finish(ModelsQuery *q) {
        Request *r = q->request;
        Router *router = r->manager->router;
        g_autoptr(JsonBuilder) b = json_builder_new_immutable();
        g_autoptr(GHashTable) seen = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        size_t size;
        char *json;

        if (q->only && q->only->kind == PROVIDER_KIND_OPENAI) {
                ModelsFetch *f = find_fetch(q, q->only);
                if (!f || !f->ok) {
                        r->error_class = ERROR_CLASS_CONNECT;
                        request_respond_error(r, MHD_HTTP_BAD_GATEWAY, "connection_error", q->only->name,
                                              "Provider '%s' did not list its models.", q->only->name);
                        r->models = models_query_free(q);
                        return;
                }
        }

        json_builder_begin_object(b);
        json_builder_set_member_name(b, "object");
        json_builder_add_string_value(b, "list");
        json_builder_set_member_name(b, "data");
        json_builder_begin_array(b);

        for (guint i = 0; i < router->providers->len; i++) {
                ProviderConfig *p = router->providers->pdata[i];
                ModelsFetch *f;

                if (q->only && p != q->only)
                        continue;
                f = find_fetch(q, p);
                if (f)
                        add_listed_models(b, seen, f);
                if (p->kind == PROVIDER_KIND_ECHO)
                        add_model(b, seen, p->name, p->name);
                add_model(b, seen, p->default_model, p->name);
                for (char **m = p->models; m && *m; m++)
                        add_model(b, seen, *m, p->name);
        }
        /* Mapped names are models a client can ask for, whatever the providers list. */
        for (guint i = 0; i < router->mapping_order->len; i++) {
                const char *model = router->mapping_order->pdata[i];
                const char *provider = g_hash_table_lookup(router->mappings, model);
                if (!q->only || streq(provider, q->only->name))
                        add_model(b, seen, model, provider);
        }

        json_builder_end_array(b);
        json_builder_end_object(b);
        json = json_builder_to_string(b, &size);
        request_respond_json(r, MHD_HTTP_OK, json, size);
        r->models = models_query_free(q);
}

static void models_on_response(Upstream *u, void *userdata) {
        ModelsFetch *f = userdata;
        f->status = upstream_status(u);
}

static size_t models_on_data(Upstream *u, const char *data, size_t size, void *userdata) {
        ModelsFetch *f = userdata;

        if (f->body->len + size > MODELS_MAX_SIZE)
                return 0;
        g_byte_array_append(f->body, (const guint8 *) data, (guint) size);
        return size;
}

static void models_on_done(Upstream *u, UpstreamError error, const char *message, void *userdata) {
        ModelsFetch *f = userdata;
        ModelsQuery *q = f->query;

        f->ok = error == UPSTREAM_OK && f->status >= 200 && f->status < 300;
        if (!f->ok)
                log_debug("Provider '%s' did not list its models: %s", f->provider->name,
                          error != UPSTREAM_OK ? message : "error status");
        f->upstream = upstream_free(u);
        g_assert(q->pending > 0);
        if (--q->pending == 0)
                models_finish(q);
}

static const UpstreamOps models_ops = {
        .on_response = models_on_response,
        .on_data = models_on_data,
        .on_done = models_on_done,
};

void models_dispatch(Request *r) {
        Manager *m = r->manager;
        ModelsQuery *q;
        const char *header = request_header(r, "X-Provider");

        q = g_new0(ModelsQuery, 1);
        q->request = r;
        q->fetches = g_ptr_array_new_with_free_func(models_fetch_destroy);
        r->models = q;

        if (m->router->allow_override && !isempty(header)) {
                ProviderConfig *p = router_find(m->router, header);
                if (!p) {
                        g_autofree char *known = router_provider_list(m->router);
                        r->models = models_query_free(q);
                        request_respond_error(r, MHD_HTTP_BAD_REQUEST, "invalid_request_error", NULL,
                                              "Unknown provider '%s' in the X-Provider header. Known providers: %s.",
                                              header, known);
                        return;
                }
                q->only = provider_config_ref(p);
                r->provider = provider_config_ref(p);
        }

        for (guint i = 0; i < m->router->providers->len; i++) {
                ProviderConfig *p = m->router->providers->pdata[i];
                ModelsFetch *f;
                int k;

                if (p->kind != PROVIDER_KIND_OPENAI || (q->only && p != q->only))
                        continue;

                f = g_new0(ModelsFetch, 1);
                f->query = q;
                f->provider = provider_config_ref(p);
                        f->body = g_byte_array_new();
                g_ptr_array_add(q->fetches, f);

                UpstreamRequest req = {
                        .url = p->models_url,
                        .api_key = p->api_key,
                        .authorization = request_upstream_authorization(r, p),
                        .request_id = r->request_id,
                        .connect_timeout = MIN(p->connect_timeout_usec, MODELS_TIMEOUT_USEC),
                        .first_byte_timeout = MODELS_TIMEOUT_USEC,
                        .total_timeout = MODELS_TIMEOUT_USEC,
                };
                k = upstream_start(m->curl, m->event, &req, &models_ops, f, &f->upstream);
                if (k < 0) {
                        log_debug_errno(k, "Failed to ask provider '%s' for its models: %m", p->name);
                        continue;
                }
                q->pending++;
        }

        if (q->pending == 0)
                models_finish(q);
}
