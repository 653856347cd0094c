/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>

#include "dispatch.h"
#include "json-util.h"
#include "models.h"
#include "proxy.h"
#include "status.h"

typedef enum RouteMethods {
        METHODS_POST = 1 << 0,
        METHODS_GET = 1 << 1,     /* and HEAD */
} RouteMethods;

typedef struct HttpRoute {
        const char *path;
        RouteMethods methods;
        const Handler *handler;
        const char *subpath;      /* what the handler is told follows /v1 */
        bool open;                /* served without a client token */
        bool quiet;               /* not request-log material */
        bool prefix;              /* path is a prefix; the handler is told the rest after "/v1" */
} HttpRoute;

static const HttpRoute routes[] = {
        { "/v1/chat/completions", METHODS_POST, &proxy_handler, "/chat/completions" },
        { "/v1/completions", METHODS_POST, &proxy_handler, "/completions" },
        { "/v1/embeddings", METHODS_POST, &proxy_handler, "/embeddings" },
        { "/v1/models", METHODS_GET, &models_handler, "/models" },
        { "/health", METHODS_GET, &health_handler, NULL, .open = true, .quiet = true },
        { "/metrics", METHODS_GET, &metrics_handler, NULL, .quiet = true },
        /* Tried after every exact path: one model of one provider, and any other endpoint of
         * the OpenAI API, routed by the model its body names (without one: 404). */
        { "/v1/models/", METHODS_GET, &models_handler, NULL, .prefix = true },
        { "/v1/", METHODS_POST, &proxy_any_handler, NULL, .prefix = true },
};

static bool route_allows(const HttpRoute *rt, const char *method) {
        if (rt->methods & METHODS_POST && streq(method, "POST"))
                return true;
        if (rt->methods & METHODS_GET && (streq(method, "GET") || streq(method, "HEAD")))
                return true;
        return false;
}

static const HttpRoute *route_find(const char *url, const char *method) {
        size_t n = strlen(url);

        /* One trailing slash is forgiven: clients build URLs by concatenation. */
        if (n > 1 && url[n - 1] == '/')
                n--;
        for (size_t i = 0; i < ELEMENTSOF(routes); i++)
                if (!routes[i].prefix && strlen(routes[i].path) == n && memcmp(url, routes[i].path, n) == 0)
                        return &routes[i];
        /* A prefix matches only a longer path and its own methods: GET /v1/anything stays a 404. */
        for (size_t i = 0; i < ELEMENTSOF(routes); i++)
                if (routes[i].prefix && n > strlen(routes[i].path) && g_str_has_prefix(url, routes[i].path) &&
                    route_allows(&routes[i], method))
                        return &routes[i];
        return NULL;
}

static const char *route_allow_header(const HttpRoute *rt) {
        return rt->methods & METHODS_POST ? "POST, OPTIONS" : "GET, HEAD, OPTIONS";
}

static bool digest_equal(const char *a, const char *b) {
        size_t n = strlen(a);
        unsigned char d = 0;

        /* Both are hex SHA-256 digests: the same length, compared in full every time. */
        if (n != strlen(b))
                return false;
        for (size_t i = 0; i < n; i++)
                d |= (unsigned char) (a[i] ^ b[i]);
        return d == 0;
}

/* With client tokens configured, the API needs "Authorization: Bearer TOKEN". Every configured
 * token is compared, in constant time, whatever matched before. */
static bool request_authorized(Request *r) {
        GPtrArray *digests = r->worker->config->client_token_digests;
        const char *h, *token;
        g_autofree char *digest = NULL;
        bool ok = false;

        if (!digests)
                return true;
        h = request_header(r, "Authorization");
        if (!h || g_ascii_strncasecmp(h, "Bearer ", 7) != 0)
                return false;
        token = h + 7;
        while (*token == ' ')
                token++;
        digest = config_token_digest(token, strlen(token));
        for (guint i = 0; i < digests->len; i++)
                ok |= digest_equal(digest, digests->pdata[i]);
        return ok;
}

static void respond_unauthorized(Request *r) {
        char *json = json_error_body("authentication_error",
                                     "Missing or invalid bearer token: this router requires 'Authorization: Bearer TOKEN'.",
                                     NULL, "invalid_api_key");

        exchange_add_header(r->exchange, "WWW-Authenticate", "Bearer realm=\"provider-router\"");
        r->record.error_type = "authentication_error";
        r->worker->stats.rejected++;
        request_respond_json(r, 401, json, strlen(json));
}

static void respond_preflight(Request *r) {
        const char *origin = r->worker->config->cors_allow_origin;
        const char *want = request_header(r, "Access-Control-Request-Headers");

        if (origin) {
                exchange_add_header(r->exchange, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
                exchange_add_header(r->exchange, "Access-Control-Allow-Headers",
                                    want && strlen(want) < 1024 ? want
                                                                : "Authorization, Content-Type, X-Provider, X-Request-Id");
                exchange_add_header(r->exchange, "Access-Control-Max-Age", "86400");
        }
        exchange_add_header(r->exchange, "Allow", "GET, HEAD, POST, OPTIONS");
        request_respond(r, 204, NULL, 0);
}

static void respond_method_not_allowed(Request *r, const HttpRoute *rt) {
        char *json = json_error_body("invalid_request_error", "Method not allowed for this path.", NULL, NULL);

        exchange_add_header(r->exchange, "Allow", route_allow_header(rt));
        request_respond_json(r, 405, json, strlen(json));
}

static void respond_too_large(Request *r) {
        request_respond_error(r, 413, "invalid_request_error", NULL,
                              "Request body is larger than the limit of %" PRIu64 " bytes.",
                              r->worker->config->max_body_size);
}

void *dispatch_start(Exchange *x, void *userdata) {
        Worker *w = userdata;
        Request *r = request_new(w, x);
        const char *method = exchange_method(x);
        const HttpRoute *rt;

        w->stats.http_requests++;

        if (streq(method, "OPTIONS")) {
                respond_preflight(r);
                return r;
        }

        rt = route_find(exchange_path(x), method);
        r->record.api = !rt || !rt->quiet;
        if (!(rt && rt->open) && !request_authorized(r)) {
                respond_unauthorized(r);
                return r;
        }
        if (!rt) {
                /* Answered once the body is in, like any other. */
                return r;
        }
        if (!route_allows(rt, method)) {
                respond_method_not_allowed(r, rt);
                return r;
        }

        r->handler = rt->handler;
        r->subpath = rt->prefix ? exchange_path(x) + STRLEN("/v1") : rt->subpath;
        exchange_set_body_limit(x, w->config->max_body_size);
        if ((rt->methods & METHODS_POST) && exchange_body_too_large(x))
                /* Refused before a byte of it is read. */
                respond_too_large(r);
        return r;
}

static void dispatch_body_complete(Exchange *x, void *userdata) {
        Request *r = userdata;

        if (exchange_answered(x))
                return;
        if (!r->handler) {
                request_respond_error(r, 404, "invalid_request_error", NULL,
                                      "Unknown path '%s'. This router serves POST /v1/chat/completions, "
                                      "GET /v1/models and GET /health.",
                                      exchange_path(x));
                return;
        }
        if (exchange_body_too_large(x)) {
                if (r->handler == &proxy_handler || r->handler == &proxy_any_handler) {
                        respond_too_large(r);
                        return;
                }
                record_set_error(&r->record, ERROR_CLASS_NONE, "invalid_request_error",
                                 "request body far larger than MaxBodySize=, connection closed");
        }
        r->handler->start(r);
}

static void dispatch_hangup(Exchange *x, void *userdata) {
        Request *r = userdata;

        if (r->handler && r->handler->cancel)
                r->handler->cancel(r);
        if (r->record.error_class == ERROR_CLASS_NONE)
                record_set_error(&r->record, ERROR_CLASS_CLIENT_ABORT, NULL, "client closed the connection");
}

static void dispatch_writable(Exchange *x, void *userdata) {
        Request *r = userdata;

        if (r->handler && r->handler->writable)
                r->handler->writable(r);
}

static void dispatch_done(Exchange *x, bool completed, void *userdata) {
        Request *r = userdata;
        RequestRecord *rec = &r->record;

        if (!exchange_answered(x)) {
                rec->status = 499;
                if (rec->error_class == ERROR_CLASS_NONE)
                        rec->error_class = ERROR_CLASS_CLIENT_ABORT;
        } else if (!completed && rec->error_class == ERROR_CLASS_NONE) {
                /* The client went away while the answer was on its way. */
                rec->error_class = ERROR_CLASS_CLIENT_ABORT;
                if (!rec->error_message)
                        rec->error_message = g_strdup("client closed the connection");
        }
        rec->bytes_out = exchange_bytes_out(x);

        /* The handler sees the record as it is emitted. */
        if (r->handler) {
                if (r->handler->cancel)
                        r->handler->cancel(r);
                if (r->handler->free)
                        r->handler->free(r);
        }
        record_emit(rec, worker_now(r->worker), r->worker->config->log_requests);
        request_free(r);
}

const ExchangeOps dispatch_ops = {
        .body_complete = dispatch_body_complete,
        .hangup = dispatch_hangup,
        .writable = dispatch_writable,
        .done = dispatch_done,
};
