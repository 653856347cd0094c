/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>

#include "json-scan.h"
#include "json-util.h"
#include "log.h"
#include "models.h"

#define MODELS_TIMEOUT_USEC (10 * USEC_PER_SEC)
/* One provider's list in the merged answer; a relayed answer is bounded by MaxResponseSize=. */
#define MODELS_LIST_MAX (8 * 1024 * 1024)
/* Lists asked for at once: a thousand providers do not mean a thousand connections. */
#define MODELS_PARALLEL 16

struct ModelsCache {
        ProviderSet *set;             /* ref: the lists are by provider index in it */
        unsigned n;
        GBytes **lists;               /* NULL: the provider did not list its models */
        usec_t *fetched;              /* CLOCK_MONOTONIC; USEC_INFINITY: never */
};

typedef struct ModelsQuery ModelsQuery;

/* One GET BaseURL/models, shared by every provider that would get the same answer. */
typedef struct ModelsFetch {
        ModelsQuery *query;
        Provider *provider;           /* whose URL, key and transport it uses */
        const char *authorization;    /* the client's own, passed on: then the list is not kept */
        Upstream *upstream;
        GByteArray *body;
        long status;
        bool too_large;
        GBytes *list;                 /* the body of a 2xx answer */
} ModelsFetch;

struct ModelsQuery {
        Request *request;

        /* the merged list */
        GPtrArray *fetches;           /* ModelsFetch*, in the order they are started */
        ModelsFetch **fetch_of;       /* by provider index; NULL: not asked (or the cache had it) */
        GBytes **cached;              /* by provider index: the cache's list (ref) */
        unsigned next;                /* the next fetch to start */
        unsigned running;
        sd_event_source *deadline;
        bool finished;

        /* one provider's answer, relayed */
        Provider *relay_to;
        Upstream *relay;
        GByteArray *relay_body;
        GPtrArray *relay_headers;     /* name, value, …, NULL */
        bool relay_too_large;
};

/* ---- the cache ------------------------------------------------------------------------------- */

ModelsCache *models_cache_free(ModelsCache *c) {
        if (!c)
                return NULL;
        for (unsigned i = 0; i < c->n; i++)
                if (c->lists[i])
                        g_bytes_unref(c->lists[i]);
        g_free(c->lists);
        g_free(c->fetched);
        provider_set_unref(c->set);
        g_free(c);
        return NULL;
}

/* The worker's cache for set, made (and the old one dropped) when set is the current one; NULL
 * for a request that began before a reload, which neither reads nor fills it. */
static ModelsCache *models_cache_get(Worker *w, ProviderSet *set) {
        ModelsCache *c = w->models_cache;

        if (w->config->models_cache_usec == 0)
                return NULL;
        if (c && c->set == set)
                return c;
        if (set != w->providers)
                return NULL;
        models_cache_free(c);
        c = g_new0(ModelsCache, 1);
        c->set = provider_set_ref(set);
        c->n = provider_set_size(set);
        c->lists = g_new0(GBytes *, c->n);
        c->fetched = g_new(usec_t, c->n);
        for (unsigned i = 0; i < c->n; i++)
                c->fetched[i] = USEC_INFINITY;
        w->models_cache = c;
        return c;
}

/* ---- merging lists ------------------------------------------------------------------------- */

typedef struct ListScan {
        JsonSpan data;
        bool have_data;
} ListScan;

static int list_member(const JsonSpan *key, const JsonSpan *value, void *userdata) {
        ListScan *l = userdata;

        if (json_span_equal(key, "data")) {
                l->data = *value;
                l->have_data = true;
        }
        return 0;
}

typedef struct EntryScan {
        JsonSpan id;
        bool have_id;
        bool have_provider;
} EntryScan;

static int entry_member(const JsonSpan *key, const JsonSpan *value, void *userdata) {
        EntryScan *e = userdata;

        if (json_span_equal(key, "id")) {
                e->id = *value;
                e->have_id = true;
        } else if (json_span_equal(key, "provider"))
                e->have_provider = true;
        return 0;
}

static void append_separator(GString *out) {
        if (out->len > 0 && out->str[out->len - 1] != '[')
                g_string_append_c(out, ',');
}

/* One entry of a list: its bytes, and its id when that is a valid model name. */
typedef bool (*EntryFunc)(const char *entry, size_t size, const char *id, bool has_provider, void *userdata);

static bool visit_entry(const char *entry, size_t size, EntryFunc func, void *userdata) {
        g_autofree char *id = NULL;
        EntryScan e = {};

        if (size < 2 || entry[0] != '{')
                return false;
        if (json_scan(entry, size, entry_member, &e, NULL) < 0 || !e.have_id || e.id.type != JSON_VALUE_STRING)
                return false;
        id = json_span_to_string(&e.id);
        if (!id || !model_name_is_valid(id))
                return false;
        return func(entry, size, id, e.have_provider, userdata);
}

typedef struct ListVisit {
        EntryFunc func;
        void *userdata;
        int n;
} ListVisit;

static int list_element(const char *data, size_t size, void *userdata) {
        ListVisit *v = userdata;

        if (visit_entry(data, size, v->func, v->userdata))
                v->n++;
        return 0;
}

/* Calls func for each entry of an OpenAI list with a valid id, in order; returns how many it
 * took (returned true for), or -EINVAL if body is not such a list. */
static int models_list_foreach(const char *body, size_t size, EntryFunc func, void *userdata) {
        ListScan l = {};
        ListVisit v = { .func = func, .userdata = userdata };

        if (json_scan(body, size, list_member, &l, NULL) < 0 || !l.have_data || l.data.type != JSON_VALUE_ARRAY)
                return -EINVAL;
        (void) json_array_foreach(&l.data, list_element, &v);
        return v.n;
}

typedef struct AppendCtx {
        GString *out;
        GHashTable *seen;
        const char *provider;
} AppendCtx;

static bool append_entry(const char *entry, size_t size, const char *id, bool has_provider, void *userdata) {
        AppendCtx *a = userdata;

        if (g_hash_table_contains(a->seen, id))
                return false;
        g_hash_table_add(a->seen, g_strdup(id));

        append_separator(a->out);
        if (has_provider) {
                g_string_append_len(a->out, entry, (gssize) size);
                return true;
        }
        /* Every field as the provider sent it, and who it came from after them. */
        g_string_append_len(a->out, entry, (gssize) size - 1);
        g_string_append(a->out, ",\"provider\":");
        json_append_string(a->out, a->provider);
        g_string_append_c(a->out, '}');
        return true;
}

int models_list_append(GString *out, GHashTable *seen, const char *body, size_t size, const char *provider) {
        AppendCtx a = { out, seen, provider };
        return models_list_foreach(body, size, append_entry, &a);
}

static bool collect_id(const char *entry, size_t size, const char *id, bool has_provider, void *userdata) {
        g_ptr_array_add(userdata, g_strdup(id));
        return true;
}

int models_parse_list(const char *body, size_t size, char ***ret_ids) {
        g_autoptr(GPtrArray) ids = g_ptr_array_new_with_free_func(g_free);
        int r;

        r = models_list_foreach(body, size, collect_id, ids);
        if (r < 0)
                return r;
        g_ptr_array_add(ids, NULL);
        *ret_ids = (char **) g_ptr_array_free(g_steal_pointer(&ids), FALSE);
        return 0;
}

/* An entry the router makes: a configured or mapped name, or the echo provider. */
static void append_router_model(GString *out, GHashTable *seen, const char *id, const char *provider) {
        if (!id || g_hash_table_contains(seen, id))
                return;
        g_hash_table_add(seen, g_strdup(id));
        append_separator(out);
        g_string_append(out, "{\"id\":");
        json_append_string(out, id);
        g_string_append(out, ",\"object\":\"model\",\"created\":0,\"owned_by\":");
        json_append_string(out, provider);
        g_string_append(out, ",\"provider\":");
        json_append_string(out, provider);
        g_string_append_c(out, '}');
}

/* The list of every provider (or of only, an echo provider), the configured names and the
 * mapped ones. */
static void models_respond_merged(ModelsQuery *q, Provider *only) {
        Request *r = q->request;
        g_autoptr(GString) out = g_string_sized_new(4096);
        g_autoptr(GHashTable) seen = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        g_autofree const Route **routes = NULL;
        unsigned n_routes;
        size_t size;

        g_string_append(out, "{\"object\":\"list\",\"data\":[");
        PROVIDER_SET_FOREACH(p, r->providers) {
                const ProviderConfig *pc = p->config;
                ModelsFetch *f = q->fetch_of ? q->fetch_of[p->index] : NULL;
                GBytes *list = f ? f->list : q->cached ? q->cached[p->index] : NULL;

                if (only && p != only)
                        continue;
                if (list) {
                        const char *data = g_bytes_get_data(list, &size);
                        if (models_list_append(out, seen, data, size, p->name) < 0)
                                log_debug("Provider '%s' listed its models in a shape other than OpenAI's, ignoring.",
                                          p->name);
                }
                if (provider_is_echo(p))
                        append_router_model(out, seen, p->name, p->name);
                append_router_model(out, seen, pc->default_model, p->name);
                for (char **m = pc->models; m && *m; m++)
                        append_router_model(out, seen, *m, p->name);
        }
        /* Mapped names are models a client can ask for, whatever the providers list. */
        routes = router_routes(r->worker->router, &n_routes);
        for (unsigned i = 0; i < n_routes; i++) {
                const Route *rt = routes[i];
                for (unsigned j = 0; j < rt->n_arms; j++) {
                        const char *provider = rt->arms[j].provider->name;
                        if (!only || streq(provider, only->name)) {
                                append_router_model(out, seen, rt->model, provider);
                                break;
                        }
                }
        }
        g_string_append(out, "]}");

        size = out->len;
        request_respond_json(r, 200, g_string_free(g_steal_pointer(&out), FALSE), size);
}

/* ---- asking every provider ------------------------------------------------------------------- */

static void models_fetch_free(ModelsFetch *f) {
        if (!f)
                return;
        upstream_free(f->upstream);
        if (f->body)
                g_byte_array_unref(f->body);
        if (f->list)
                g_bytes_unref(f->list);
        g_free(f);
}

static void models_fetch_destroy(gpointer f) {
        models_fetch_free(f);
}

static void models_finish(ModelsQuery *q) {
        Request *r = q->request;
        Worker *w = r->worker;
        ModelsCache *c;
        usec_t now = worker_now(w);

        if (q->finished)
                return;
        q->finished = true;
        q->deadline = sd_event_source_disable_unref(q->deadline);
        /* Past the deadline: what has not answered is left out, as if it had failed. */
        for (guint i = 0; i < q->fetches->len; i++) {
                ModelsFetch *f = q->fetches->pdata[i];
                f->upstream = upstream_free(f->upstream);
        }

        /* Kept for the next requests, unless asked with the client's own credential: another
         * client must not see what that one may. A failure is kept too, so that a provider that
         * does not answer does not hold up every list for its timeout. */
        c = models_cache_get(w, r->providers);
        if (c)
                PROVIDER_SET_FOREACH(p, r->providers) {
                        ModelsFetch *f = q->fetch_of[p->index];
                        if (!f || f->authorization)
                                continue;
                        if (c->lists[p->index])
                                g_bytes_unref(c->lists[p->index]);
                        c->lists[p->index] = f->list ? g_bytes_ref(f->list) : NULL;
                        c->fetched[p->index] = now;
                }

        models_respond_merged(q, NULL);
}

static void models_start_fetches(ModelsQuery *q);

static void models_on_response(Upstream *u, void *userdata) {
        ModelsFetch *f = userdata;
        f->status = upstream_status(u);
}

static size_t models_on_data(Upstream *u, const char *data, size_t size, void *userdata) {
        ModelsFetch *f = userdata;

        if (f->body->len + size > MODELS_LIST_MAX) {
                f->too_large = true;
                return 0;
        }
        g_byte_array_append(f->body, (const guint8 *) data, (guint) size);
        return size;
}

static void models_on_done(Upstream *u, UpstreamError error, const char *message, void *userdata) {
        ModelsFetch *f = userdata;
        ModelsQuery *q = f->query;

        if (error == UPSTREAM_OK && f->status >= 200 && f->status < 300)
                f->list = g_byte_array_free_to_bytes(g_steal_pointer(&f->body));
        else
                log_debug("Provider '%s' did not list its models: %s", f->provider->name,
                          f->too_large ? "the list is too large"
                                       : error != UPSTREAM_OK ? strna(message) : "error status");
        f->upstream = upstream_free(u);
        g_assert(q->running > 0);
        q->running--;
        models_start_fetches(q);
}

static const UpstreamOps models_ops = {
        .on_response = models_on_response,
        .on_data = models_on_data,
        .on_done = models_on_done,
};

/* Starts fetches while fewer than MODELS_PARALLEL run; answers once all are done. */
static void models_start_fetches(ModelsQuery *q) {
        Worker *w = q->request->worker;

        while (q->running < MODELS_PARALLEL && q->next < q->fetches->len) {
                ModelsFetch *f = q->fetches->pdata[q->next++];
                const ProviderConfig *pc = f->provider->config;
                int k;

                UpstreamRequest req = {
                        .url = pc->models_url,
                        .api_key = pc->api_key,
                        .authorization = f->authorization,
                        .request_id = q->request->record.request_id,
                        .connect_timeout = MIN(pc->connect_timeout_usec, MODELS_TIMEOUT_USEC),
                        .first_byte_timeout = MIN(pc->request_timeout_usec, MODELS_TIMEOUT_USEC),
                        .total_timeout = MIN(pc->request_timeout_usec, MODELS_TIMEOUT_USEC),
                        .provider = pc,
                };
                f->body = g_byte_array_new();
                k = upstream_start(w->curl, w->event, &req, &models_ops, f, &f->upstream);
                if (k < 0) {
                        log_debug_errno(k, "Failed to ask provider '%s' for its models: %m", f->provider->name);
                        continue;
                }
                q->running++;
        }
        if (q->running == 0 && q->next == q->fetches->len)
                models_finish(q);
}

static int models_on_deadline(sd_event_source *s, uint64_t usec, void *userdata) {
        ModelsQuery *q = userdata;

        log_debug("%s: not every provider listed its models in time, answering with those that did.",
                  q->request->record.request_id);
        models_finish(q);
        return 0;
}

/* Everything that can change a provider's answer to GET /models: where, as whom, over what. */
static char *fetch_key(const Provider *p, const char *authorization) {
        const ProviderConfig *c = p->config;

        return g_strdup_printf("%s\n%s\n%s\n%s\n%s\n%p\n%s\n%p\n%d\n%s", c->models_url, strempty(c->api_key),
                               strempty(authorization), strempty(c->ca_file), strempty(c->client_cert_file),
                               (void *) c->client_cert_blob, strempty(c->client_key_file), (void *) c->client_key_blob,
                               c->proxy_set, strempty(c->proxy));
}

static void fetch_key_free(gpointer key) {
        /* It holds keys. */
        explicit_bzero(key, strlen(key));
        g_free(key);
}

static void models_fan_out(ModelsQuery *q) {
        Request *r = q->request;
        Worker *w = r->worker;
        unsigned n = provider_set_size(r->providers);
        usec_t now = worker_now(w), ttl = w->config->models_cache_usec;
        ModelsCache *c = models_cache_get(w, r->providers);
        g_autoptr(GHashTable) by_key = g_hash_table_new_full(g_str_hash, g_str_equal, fetch_key_free, NULL);
        int k;

        q->fetches = g_ptr_array_new_with_free_func(models_fetch_destroy);
        q->fetch_of = g_new0(ModelsFetch *, n);
        q->cached = g_new0(GBytes *, n);

        PROVIDER_SET_FOREACH(p, r->providers) {
                const char *authorization;
                char *key;
                ModelsFetch *f;

                if (p->config->kind != PROVIDER_KIND_OPENAI)
                        continue;
                authorization = request_upstream_authorization(r, p, false);
                if (c && !authorization && c->fetched[p->index] != USEC_INFINITY && now < c->fetched[p->index] + ttl) {
                        if (c->lists[p->index])
                                q->cached[p->index] = g_bytes_ref(c->lists[p->index]);
                        continue;
                }

                key = fetch_key(p, authorization);
                f = g_hash_table_lookup(by_key, key);
                if (f)
                        fetch_key_free(key);
                else {
                        f = g_new0(ModelsFetch, 1);
                        f->query = q;
                        f->provider = p;
                        f->authorization = authorization;
                        g_ptr_array_add(q->fetches, f);
                        g_hash_table_insert(by_key, key, f);
                }
                q->fetch_of[p->index] = f;
        }

        if (q->fetches->len == 0) {
                models_finish(q);
                return;
        }
        k = sd_event_add_time_relative(w->event, &q->deadline, CLOCK_MONOTONIC, MODELS_TIMEOUT_USEC + USEC_PER_SEC,
                                       50 * USEC_PER_MSEC, models_on_deadline, q);
        if (k >= 0)
                (void) sd_event_source_set_description(q->deadline, "models-deadline");
        models_start_fetches(q);
}

/* ---- relaying one provider's answer ---------------------------------------------------------- */

static void foreach_client_header(const void *x, UpstreamHeaderFunc func, void *userdata) {
        exchange_foreach_header(x, func, userdata);
}

static void relay_on_response(Upstream *u, void *userdata) {
        ModelsQuery *q = userdata;
        RequestRecord *rec = &q->request->record;

        if (q->relay_headers)
                g_ptr_array_unref(q->relay_headers);
        q->relay_headers = upstream_steal_headers(u);
        g_free(rec->provider_request_id);
        rec->provider_request_id = upstream_steal_request_id(u);
}

static size_t relay_on_data(Upstream *u, const char *data, size_t size, void *userdata) {
        ModelsQuery *q = userdata;

        if (q->relay_body->len + size > q->request->worker->config->max_response_size) {
                q->relay_too_large = true;
                return 0;
        }
        g_byte_array_append(q->relay_body, (const guint8 *) data, (guint) size);
        return size;
}

static void relay_on_done(Upstream *u, UpstreamError error, const char *message, void *userdata) {
        ModelsQuery *q = userdata;
        Request *r = q->request;
        const char *name = q->relay_to->name;
        long status = upstream_status(u);
        size_t size;

        if (q->relay_too_large) {
                record_set_error(&r->record, ERROR_CLASS_INVALID, "provider_error", "answer larger than MaxResponseSize=");
                request_respond_error(r, 502, "provider_error", name, "Provider '%s' sent an answer larger than %" PRIu64 " bytes.",
                                      name, r->worker->config->max_response_size);
        } else if (error != UPSTREAM_OK || status < 100) {
                bool timeout = upstream_error_is_timeout(error);
                r->record.error_class = timeout ? ERROR_CLASS_TIMEOUT : ERROR_CLASS_CONNECT;
                request_respond_error(r, timeout ? 504 : 502, timeout ? "timeout_error" : "connection_error", name,
                                      timeout ? "Provider '%s' timed out: %s" : "Provider '%s' is unreachable: %s", name,
                                      strna(message));
        } else {
                /* As the provider sent it: status, body, headers; X-Request-Id is the router's. */
                for (char **h = q->relay_headers ? (char **) q->relay_headers->pdata : NULL; h && h[0] && h[1]; h += 2)
                        exchange_add_header(r->exchange, h[0], h[1]);
                if (r->record.provider_request_id)
                        exchange_add_header(r->exchange, "X-Provider-Request-Id", r->record.provider_request_id);
                if (status >= 400) {
                        r->record.error_class = status >= 500 ? ERROR_CLASS_PROVIDER_5XX : ERROR_CLASS_PROVIDER_4XX;
                        r->record.error_type = "provider_error";
                }
                size = q->relay_body->len;
                request_respond(r, (unsigned) status, (char *) g_byte_array_free(g_steal_pointer(&q->relay_body), FALSE),
                                size);
        }
        q->relay = upstream_free(u);
}

static const UpstreamOps relay_ops = {
        .on_response = relay_on_response,
        .on_data = relay_on_data,
        .on_done = relay_on_done,
};

static void models_relay(ModelsQuery *q, Provider *p, const char *url) {
        Request *r = q->request;
        Worker *w = r->worker;
        const ProviderConfig *pc = p->config;
        int k;

        UpstreamRequest req = {
                .url = url,
                .head = streq(exchange_method(r->exchange), "HEAD"),
                .api_key = pc->api_key,
                .authorization = request_upstream_authorization(r, p, true),
                .request_id = r->record.request_id,
                .client_headers = foreach_client_header,
                .client = r->exchange,
                .connect_timeout = MIN(pc->connect_timeout_usec, MODELS_TIMEOUT_USEC),
                .first_byte_timeout = MIN(pc->request_timeout_usec, MODELS_TIMEOUT_USEC),
                .total_timeout = MIN(pc->request_timeout_usec, MODELS_TIMEOUT_USEC),
                .provider = pc,
        };

        q->relay_to = p;
        q->relay_body = g_byte_array_new();
        r->record.provider = p->name;
        k = upstream_start(w->curl, w->event, &req, &relay_ops, q, &q->relay);
        if (k < 0) {
                log_warning_errno(k, "%s: failed to start a transfer to provider '%s': %m", r->record.request_id, p->name);
                request_respond_error(r, 500, "internal_error", p->name, "Could not start the request to provider '%s'.",
                                      p->name);
        }
}

/* ---- the handler ----------------------------------------------------------------------------- */

static void respond_unknown_provider(Request *r, const char *header) {
        g_autofree char *known = provider_set_list(r->providers);

        r->worker->stats.rejected++;
        request_respond_error(r, 400, "invalid_request_error", NULL,
                              "Unknown provider '%s' in the X-Provider header. Known providers: %s.", header, known);
}

/* GET /v1/models/{id}: the answer of the provider the id routes to. */
static void models_start_one(ModelsQuery *q) {
        Request *r = q->request;
        Worker *w = r->worker;
        const char *header = request_header(r, "X-Provider");
        g_autofree char *id = NULL, *path = NULL, *url_buf = NULL;
        RoutePick pick;
        size_t n;
        int k;

        id = g_strdup(r->subpath + STRLEN("/models/"));
        n = strlen(id);
        if (n > 0 && id[n - 1] == '/')
                id[n - 1] = 0;
        path = upstream_escape_path(r->subpath);
        if (!model_name_is_valid(id) || !path) {
                w->stats.rejected++;
                request_respond_unknown_path(r);
                return;
        }
        r->record.model = g_strdup(id);

        k = router_pick(w->router, header, id, NULL, NULL, worker_now(w), &pick);
        if (k == -ENOENT) {
                respond_unknown_provider(r, header);
                return;
        }
        if (k < 0) {
                request_respond_error(r, 500, "internal_error", NULL, "No provider is available for this request.");
                return;
        }
        r->record.route = route_reason_to_string(pick.reason);
        if (pick.provider->set != r->providers) {
                provider_set_unref(r->providers);
                r->providers = provider_set_ref(pick.provider->set);
        }

        if (provider_is_echo(pick.provider)) {
                /* It serves any model. */
                g_autoptr(GString) out = g_string_new("{\"id\":");
                json_append_string(out, id);
                g_string_append(out, ",\"object\":\"model\",\"created\":0,\"owned_by\":");
                json_append_string(out, pick.provider->name);
                g_string_append_c(out, '}');
                r->record.provider = pick.provider->name;
                n = out->len;
                request_respond_json(r, 200, g_string_free(g_steal_pointer(&out), FALSE), n);
                return;
        }
        models_relay(q, pick.provider, provider_url(pick.provider, path, &url_buf));
}

static void models_start(Request *r) {
        Worker *w = r->worker;
        ModelsQuery *q;
        const char *header = request_header(r, "X-Provider");

        q = g_new0(ModelsQuery, 1);
        q->request = r;
        r->data = q;

        if (r->subpath && g_str_has_prefix(r->subpath, "/models/")) {
                models_start_one(q);
                return;
        }

        if (w->router->allow_override && !isempty(header)) {
                Provider *p = provider_set_find(r->providers, header);
                if (!p) {
                        respond_unknown_provider(r, header);
                        return;
                }
                r->record.provider = p->name;
                r->record.route = route_reason_to_string(ROUTE_HEADER);
                if (provider_is_echo(p))
                        models_respond_merged(q, p);
                else
                        models_relay(q, p, p->config->models_url);
                return;
        }

        if (streq(exchange_method(r->exchange), "HEAD")) {
                /* The headers of the merged list, without asking every provider for it. */
                request_respond_json(r, 200, NULL, 0);
                return;
        }
        models_fan_out(q);
}

static void models_cancel(Request *r) {
        ModelsQuery *q = r->data;

        if (!q)
                return;
        /* Transfers still running stop with their fetches. */
        for (guint i = 0; q->fetches && i < q->fetches->len; i++) {
                ModelsFetch *f = q->fetches->pdata[i];
                f->upstream = upstream_free(f->upstream);
        }
        q->relay = upstream_free(q->relay);
        q->deadline = sd_event_source_disable_unref(q->deadline);
}

static void models_free(Request *r) {
        ModelsQuery *q = r->data;
        unsigned n = provider_set_size(r->providers);

        if (!q)
                return;
        models_cancel(r);
        if (q->fetches)
                g_ptr_array_unref(q->fetches);
        g_free(q->fetch_of);
        for (unsigned i = 0; q->cached && i < n; i++)
                if (q->cached[i])
                        g_bytes_unref(q->cached[i]);
        g_free(q->cached);
        if (q->relay_body)
                g_byte_array_unref(q->relay_body);
        if (q->relay_headers)
                g_ptr_array_unref(q->relay_headers);
        g_free(q);
        r->data = NULL;
}

const Handler models_handler = {
        .name = "models",
        .start = models_start,
        .cancel = models_cancel,
        .free = models_free,
};
