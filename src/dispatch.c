/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <arpa/inet.h>
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
        const char *want = request_header(r, "Access-Control-Request-Headers");
        bool vary;

        /* The origin itself is added with the common headers. */
        if (request_cors_origin(r, &vary)) {
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

/* A client's header value for an error message: valid UTF-8, at most 200 bytes of it. */
static char *text_for_message(const char *s) {
        size_t n = strlen(s);
        g_autofree char *v = g_utf8_make_valid(s, (gssize) MIN(n, (size_t) 200));

        return n > 200 ? g_strconcat(v, "…", NULL) : TAKE_PTR(v);
}

/* Splits "name:port", "1.2.3.4:port" or "[v6]:port" (port optional) into its host part, without
 * brackets or a trailing dot, lower-case. Returns false for anything else. */
static bool host_header_split(const char *h, char *buf, size_t size) {
        const char *end, *port;
        size_t n;

        if (h[0] == '[') {
                end = strchr(h, ']');
                if (!end)
                        return false;
                port = end + 1;
                h++;
        } else {
                end = strchr(h, ':');
                port = end ?: h + strlen(h);
                if (!end)
                        end = port;
        }
        if (*port == ':') {
                port++;
                if (*port == 0 || strspn(port, "0123456789") != strlen(port) || strlen(port) > 5)
                        return false;
        } else if (*port != 0)
                return false;

        n = (size_t) (end - h);
        if (n > 0 && h[n - 1] == '.')
                n--;
        if (n == 0 || n >= size)
                return false;
        for (size_t i = 0; i < n; i++)
                buf[i] = g_ascii_tolower(h[i]);
        buf[n] = 0;
        return true;
}

/* localhost, *.localhost, 127.0.0.0/8, ::1 (and ::ffff:127.x): what only this machine can name. */
static bool host_is_loopback(const char *host) {
        struct in6_addr a6;
        struct in_addr a4;

        if (streq(host, "localhost") || g_str_has_suffix(host, ".localhost"))
                return true;
        if (inet_pton(AF_INET, host, &a4) == 1)
                return (ntohl(a4.s_addr) >> 24) == 127;
        if (inet_pton(AF_INET6, host, &a6) == 1)
                return IN6_IS_ADDR_LOOPBACK(&a6) || (IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127);
        return false;
}

static bool host_is_allowed(const Config *c, const char *host) {
        for (char **h = c->allowed_hosts; h && *h; h++)
                if (streq(*h, "*") || streq(*h, host))
                        return true;
        return false;
}

/* A router that only this machine can reach may still be reached by a web page this machine
 * shows, through a name that an attacker's DNS points at 127.0.0.1 (DNS rebinding): the browser
 * then sends the attacker's name in Host:. So on loopback only loopback names are answered,
 * besides those the operator lists in AllowedHosts=. Returns false once it has answered. */
static bool check_host(Request *r) {
        Worker *w = r->worker;
        const char *host = request_header(r, "Host");
        char buf[256];

        if (!host) {
                /* RFC 9112 §3.2: a server must answer 400 to an HTTP/1.1 request without Host. */
                if (!streq(strempty(exchange_version(r->exchange)), "HTTP/1.0")) {
                        w->stats.rejected++;
                        request_respond_error(r, 400, "invalid_request_error", NULL,
                                              "An HTTP/1.1 request needs a Host header.");
                        return false;
                }
                return true;
        }
        if (!exchange_front_loopback_only(w->front) || host_is_allowed(w->config, "*"))
                return true;
        if (host_header_split(host, buf, sizeof(buf)) && (host_is_loopback(buf) || host_is_allowed(w->config, buf)))
                return true;

        g_autofree char *shown = text_for_message(host);
        w->stats.rejected++;
        request_respond_error(r, 403, "invalid_request_error", NULL,
                              "Host not allowed: '%s' is not a loopback name or address, and this router listens on "
                              "loopback only. To accept it, add it to AllowedHosts= in [Router].", shown);
        return false;
}

typedef struct Framing {
        unsigned content_lengths;
        const char *content_length;   /* the first */
        bool content_lengths_differ;
        unsigned transfer_encodings;
        const char *transfer_encoding;
} Framing;

static bool framing_header(const char *name, const char *value, void *userdata) {
        Framing *f = userdata;

        if (strcaseeq(name, "Content-Length")) {
                if (f->content_lengths++ == 0)
                        f->content_length = value;
                else if (!streq(value, f->content_length))
                        f->content_lengths_differ = true;
        } else if (strcaseeq(name, "Transfer-Encoding")) {
                if (f->transfer_encodings++ == 0)
                        f->transfer_encoding = value;
        }
        return true;
}

static bool refuse_framing(Request *r, unsigned status, const char *message) {
        r->worker->stats.rejected++;
        /* What follows on this connection cannot be told apart from this request's body. */
        exchange_close_after(r->exchange);
        request_respond_error(r, status, "invalid_request_error", NULL, "%s", message);
        return false;
}

/* Request smuggling: where a request ends must not be in doubt, or a proxy in front of us and we
 * would see different requests in the same bytes (RFC 9112 §6.3). libmicrohttpd 0.9.75 serves
 * all of these, so they are refused here, and the connection closed after the answer. Also
 * bytes that would cut what we read short: a NUL in a header (a bearer token read up to it), a
 * "%00" in the path. */
static bool check_framing(Request *r) {
        Exchange *x = r->exchange;
        Framing f = {};

        if (exchange_headers_have_nul(x))
                return refuse_framing(r, 400, "The request contains a NUL byte in a header or in its path.");
        if (strstr(exchange_path(x), "%00"))
                return refuse_framing(r, 400, "The path contains an encoded NUL byte ('%00').");

        exchange_foreach_header(x, framing_header, &f);
        if (f.content_lengths_differ)
                return refuse_framing(r, 400, "The request has Content-Length headers that differ.");
        if (f.transfer_encodings == 0)
                return true;
        if (f.content_lengths > 0)
                return refuse_framing(r, 400, "The request has both Content-Length and Transfer-Encoding.");
        if (f.transfer_encodings > 1 || !strcaseeq(f.transfer_encoding, "chunked")) {
                /* RFC 9112 §6.1: an unknown coding is 501; chunked is the only one we read. */
                g_autofree char *shown = text_for_message(f.transfer_encoding);
                g_autofree char *message = g_strdup_printf("Transfer-Encoding '%s' is not supported: only 'chunked' is.",
                                                           shown);
                return refuse_framing(r, 501, message);
        }
        return true;
}

/* "application/json", in any case, optionally with parameters ("; charset=utf-8"). */
static bool content_type_is_json(const char *ct) {
        static const char json[] = "application/json";

        if (!ct)
                return false;
        ct += strspn(ct, " \t");
        if (g_ascii_strncasecmp(ct, json, STRLEN(json)) != 0)
                return false;
        ct += STRLEN(json);
        ct += strspn(ct, " \t");
        return *ct == 0 || *ct == ';';
}

/* A POST that is not JSON is what a web page may send without asking first (a "simple" CORS
 * request: text/plain, form data): refused, so that no page can use the API behind the
 * browser's back, whatever CORSAllowOrigin= says. */
static bool check_content_type(Request *r) {
        const char *ct = request_header(r, "Content-Type");
        g_autofree char *shown = NULL;

        if (content_type_is_json(ct))
                return true;
        r->worker->stats.rejected++;
        if (!ct) {
                request_respond_error(r, 415, "invalid_request_error", NULL,
                                      "Content-Type must be application/json; this request has none.");
                return false;
        }
        shown = text_for_message(ct);
        request_respond_error(r, 415, "invalid_request_error", NULL, "Content-Type must be application/json, not '%s'.",
                              shown);
        return false;
}

/* MaxBufferedSize= is used up by requests and answers in flight: new work waits its turn at the
 * client, not in our memory. Nothing accepted before is touched. */
static void respond_no_room(Request *r) {
        Budget *b = exchange_front_budget(r->worker->front);

        exchange_add_header(r->exchange, "Retry-After", "1");
        r->worker->stats.rejected++;
        record_set_error(&r->record, ERROR_CLASS_OVERLOAD, "overloaded_error", NULL);
        request_respond_error(r, 503, "overloaded_error", NULL,
                              "The router is busy: requests and answers in flight hold %" PRIu64 " of the %" PRIu64
                              " bytes it may buffer (MaxBufferedSize=). Retry shortly.",
                              budget_used(b), budget_limit(b));
}

void *dispatch_start(Exchange *x, void *userdata) {
        Worker *w = userdata;
        Request *r = request_new(w, x);
        const char *method = exchange_method(x);
        const HttpRoute *rt;

        w->stats.http_requests++;

        if (!check_framing(r) || !check_host(r))
                return r;
        if (streq(method, "OPTIONS")) {
                respond_preflight(r);
                return r;
        }

        rt = route_find(exchange_path(x), method);
        r->record.api = !rt || !rt->quiet;
        /* Open routes are served either way, but show less to a caller without a token. */
        r->authorized = request_authorized(r);
        if (!(rt && rt->open) && !r->authorized) {
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

        if ((rt->methods & METHODS_POST) && !check_content_type(r))
                return r;
        if (!rt->quiet && budget_exhausted(exchange_front_budget(w->front))) {
                respond_no_room(r);
                return r;
        }

        r->handler = rt->handler;
        if (rt->prefix) {
                /* The path as the client wrote it picks the route; what follows /v1 goes to the
                 * handler decoded (it is escaped again for the provider). A bad escape or an
                 * escaped NUL is no path of anyone's. */
                r->subpath = r->subpath_buf = g_uri_unescape_string(exchange_path(x) + STRLEN("/v1"), NULL);
                if (!r->subpath) {
                        request_respond_unknown_path(r);
                        return r;
                }
        } else
                r->subpath = rt->subpath;
        exchange_set_body_limit(x, w->config->max_body_size);
        /* Both refused before a byte of the body is read. */
        if ((rt->methods & METHODS_POST) && exchange_body_too_large(x))
                respond_too_large(r);
        else if (exchange_body_no_room(x))
                respond_no_room(r);
        return r;
}

static void dispatch_body_complete(Exchange *x, void *userdata) {
        Request *r = userdata;

        if (exchange_answered(x))
                return;
        if (!r->handler) {
                request_respond_unknown_path(r);
                return;
        }
        if (exchange_body_no_room(x)) {
                respond_no_room(r);
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

        request_clear_producer(r);
        if (r->handler && r->handler->cancel)
                r->handler->cancel(r);
        if (r->record.error_class == ERROR_CLASS_NONE)
                record_set_error(&r->record, ERROR_CLASS_CLIENT_ABORT, NULL, "client closed the connection");
}

static void dispatch_writable(Exchange *x, void *userdata) {
        Request *r = userdata;

        if (r->producer.writable)
                r->producer.writable(r, r->producer.data);
        else if (r->handler && r->handler->writable)
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
        request_clear_producer(r);
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
