/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <json-glib/json-glib.h>

#include "json-util.h"
#include "log.h"
#include "models.h"

#define MODELS_TIMEOUT_USEC (10 * USEC_PER_SEC)
#define MODELS_MAX_SIZE (4 * 1024 * 1024)

typedef struct ModelsQuery ModelsQuery;

typedef struct ModelsFetch {
        ModelsQuery *query;
        Provider *provider;
        Upstream *upstream;
        GByteArray *body;
        long status;
        bool ok;
} ModelsFetch;

struct ModelsQuery {
        Request *request;
        GPtrArray *fetches;        /* ModelsFetch* */
        Provider *only;            /* X-Provider */
        unsigned pending;
};

static void models_fetch_free(ModelsFetch *f) {
        if (!f)
                return;
        upstream_free(f->upstream);
        if (f->body)
                g_byte_array_unref(f->body);
        g_free(f);
}

static void models_fetch_destroy(gpointer f) {
        models_fetch_free(f);
}

static ModelsQuery *models_query_free(ModelsQuery *q) {
        if (!q)
                return NULL;
        g_ptr_array_unref(q->fetches);
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

static ModelsFetch *find_fetch(ModelsQuery *q, Provider *p) {
        for (guint i = 0; i < q->fetches->len; i++) {
                ModelsFetch *f = q->fetches->pdata[i];
                if (f->provider == p)
                        return f;
        }
        return NULL;
}

static void models_finish(ModelsQuery *q) {
        Request *r = q->request;
        Router *router = r->worker->router;
        g_autoptr(JsonBuilder) b = json_builder_new_immutable();
        g_autoptr(GHashTable) seen = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        g_autofree const Route **routes = NULL;
        unsigned n_routes;
        size_t size;
        char *json;

        if (q->only && q->only->config->kind == PROVIDER_KIND_OPENAI) {
                ModelsFetch *f = find_fetch(q, q->only);
                if (!f || !f->ok) {
                        r->record.error_class = ERROR_CLASS_CONNECT;
                        request_respond_error(r, 502, "connection_error", q->only->name,
                                              "Provider '%s' did not list its models.", q->only->name);
                        return;
                }
        }

        json_builder_begin_object(b);
        json_builder_set_member_name(b, "object");
        json_builder_add_string_value(b, "list");
        json_builder_set_member_name(b, "data");
        json_builder_begin_array(b);

        PROVIDER_SET_FOREACH(p, r->providers) {
                const ProviderConfig *pc = p->config;
                ModelsFetch *f;

                if (q->only && p != q->only)
                        continue;
                f = find_fetch(q, p);
                if (f)
                        add_listed_models(b, seen, f);
                if (pc->kind == PROVIDER_KIND_ECHO)
                        add_model(b, seen, p->name, p->name);
                add_model(b, seen, pc->default_model, p->name);
                for (char **m = pc->models; m && *m; m++)
                        add_model(b, seen, *m, p->name);
        }
        /* Mapped names are models a client can ask for, whatever the providers list. */
        routes = router_routes(router, &n_routes);
        for (unsigned i = 0; i < n_routes; i++) {
                const Route *rt = routes[i];
                for (unsigned j = 0; j < rt->n_arms; j++) {
                        const char *provider = rt->arms[j].provider->name;
                        if (!q->only || streq(provider, q->only->name)) {
                                add_model(b, seen, rt->model, provider);
                                break;
                        }
                }
        }

        json_builder_end_array(b);
        json_builder_end_object(b);
        json = json_builder_to_string(b, &size);
        request_respond_json(r, 200, json, size);
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

static void models_start(Request *r) {
        Worker *w = r->worker;
        ModelsQuery *q;
        const char *header = request_header(r, "X-Provider");

        q = g_new0(ModelsQuery, 1);
        q->request = r;
        q->fetches = g_ptr_array_new_with_free_func(models_fetch_destroy);
        r->data = q;

        if (w->router->allow_override && !isempty(header)) {
                Provider *p = provider_set_find(r->providers, header);
                if (!p) {
                        g_autofree char *known = provider_set_list(r->providers);
                        request_respond_error(r, 400, "invalid_request_error", NULL,
                                              "Unknown provider '%s' in the X-Provider header. Known providers: %s.",
                                              header, known);
                        return;
                }
                q->only = p;
                r->record.provider = p->name;
        }

        PROVIDER_SET_FOREACH(p, r->providers) {
                const ProviderConfig *pc = p->config;
                ModelsFetch *f;
                int k;

                if (pc->kind != PROVIDER_KIND_OPENAI || (q->only && p != q->only))
                        continue;

                f = g_new0(ModelsFetch, 1);
                f->query = q;
                f->provider = p;
                f->body = g_byte_array_new();
                g_ptr_array_add(q->fetches, f);

                UpstreamRequest req = {
                        .url = pc->models_url,
                        .api_key = pc->api_key,
                        .authorization = request_upstream_authorization(r, p, p == q->only),
                        .request_id = r->record.request_id,
                        .connect_timeout = MIN(pc->connect_timeout_usec, MODELS_TIMEOUT_USEC),
                        .first_byte_timeout = MODELS_TIMEOUT_USEC,
                        .total_timeout = MODELS_TIMEOUT_USEC,
                };
                k = upstream_start(w->curl, w->event, &req, &models_ops, f, &f->upstream);
                if (k < 0) {
                        log_debug_errno(k, "Failed to ask provider '%s' for its models: %m", p->name);
                        continue;
                }
                q->pending++;
        }

        if (q->pending == 0)
                models_finish(q);
}

static void models_cancel(Request *r) {
        ModelsQuery *q = r->data;

        /* Transfers still running stop with their fetches. */
        for (guint i = 0; q && i < q->fetches->len; i++) {
                ModelsFetch *f = q->fetches->pdata[i];
                f->upstream = upstream_free(f->upstream);
        }
}

static void models_free(Request *r) {
        r->data = models_query_free(r->data);
}

const Handler models_handler = {
        .name = "models",
        .start = models_start,
        .cancel = models_cancel,
        .free = models_free,
};
