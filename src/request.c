/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>

#include "json-util.h"
#include "request.h"

static bool request_id_is_valid(const char *id) {
        size_t n;

        if (isempty(id))
                return false;
        n = strlen(id);
        if (n > 64)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!g_ascii_isalnum(id[i]) && !strchr("-_.:", id[i]))
                        return false;
        return true;
}

Request *request_new(Worker *w, Exchange *x) {
        Request *r = g_new0(Request, 1);
        const char *id;

        r->worker = w;
        r->exchange = x;
        r->providers = provider_set_ref(w->providers);
        record_init(&r->record, exchange_start_time(x));
        r->record.method = exchange_method(x);
        r->record.path = exchange_path(x);

        /* A caller's own id is kept, so one id follows a request through several services. */
        id = exchange_header(x, "X-Request-Id");
        if (request_id_is_valid(id))
                g_strlcpy(r->record.request_id, id, sizeof(r->record.request_id));
        else
                worker_next_request_id(w, r->record.request_id, sizeof(r->record.request_id));
        return r;
}

void request_set_producer(Request *r, const RequestProducer *p) {
        request_clear_producer(r);
        r->producer = *p;
}

void request_clear_producer(Request *r) {
        RequestProducer p = r->producer;

        r->producer = (RequestProducer) {};
        if (p.free)
                p.free(p.data);
}

Request *request_free(Request *r) {
        if (!r)
                return NULL;
        request_clear_producer(r);
        record_clear(&r->record);
        g_free(r->subpath_buf);
        provider_set_unref(r->providers);
        g_free(r);
        return NULL;
}

const char *request_header(Request *r, const char *name) {
        return exchange_header(r->exchange, name);
}

/* W3C Server-Timing: what the router itself took (until it asked the provider, or until it
 * answered, when it answered alone) and the answering provider's time to first byte. */
/* "…dur=12.345": microseconds as milliseconds with three decimals, at p; returns the end. */
static char *format_msec(char *p, usec_t usec) {
        char digits[20];
        size_t n = 0;
        uint64_t ms = usec / USEC_PER_MSEC;
        unsigned frac = (unsigned) (usec % USEC_PER_MSEC);

        do
                digits[n++] = (char) ('0' + ms % 10);
        while ((ms /= 10) > 0);
        while (n > 0)
                *p++ = digits[--n];
        *p++ = '.';
        *p++ = (char) ('0' + frac / 100);
        *p++ = (char) ('0' + frac / 10 % 10);
        *p++ = (char) ('0' + frac % 10);
        return p;
}

static void request_add_server_timing(Request *r) {
        const RequestRecord *rec = &r->record;
        usec_t router = rec->router_usec;
        char value[128], *p;

        if (router == USEC_INFINITY) {
                /* Answered alone: all of it is the router's (a real clock: the loop's time
                 * stands still while one event is handled). */
                usec_t now = now_usec(CLOCK_MONOTONIC);
                router = now > rec->start ? now - rec->start : 0;
        }
        /* Milliseconds with three decimals, in integers, without printf: this runs for every
         * answer. At most 2 × 24 digits and the words: value never overflows. */
        p = stpcpy(value, "router;dur=");
        p = format_msec(p, router);
        if (rec->provider_ttfb_usec != USEC_INFINITY) {
                p = stpcpy(p, ", provider;dur=");
                p = format_msec(p, rec->provider_ttfb_usec);
                p = stpcpy(p, ";desc=\"first byte\"");
        }
        *p = 0;
        exchange_add_header(r->exchange, "Server-Timing", value);
}

const char *request_cors_origin(Request *r, bool *ret_vary) {
        const char *allowed = r->worker->config->cors_allow_origin;
        const char *origin, *p;
        size_t n;

        *ret_vary = false;
        /* CORS headers matter to browsers only, and a browser always sends Origin. */
        if (!allowed)
                return NULL;
        origin = exchange_header(r->exchange, "Origin");
        if (streq(allowed, "*"))
                return origin ? "*" : NULL;

        /* A list: the request's own origin is answered when it is one of them. */
        *ret_vary = true;
        if (!origin)
                return NULL;
        n = strlen(origin);
        for (p = allowed; *p;) {
                size_t k = strcspn(p, " \t");
                if (k == n && g_ascii_strncasecmp(p, origin, n) == 0)
                        return origin;
                p += k;
                p += strspn(p, " \t");
        }
        return NULL;
}

static void request_add_common_headers(Request *r) {
        Exchange *x = r->exchange;
        const char *origin;
        bool vary;

        request_add_server_timing(r);
        exchange_add_header(x, "X-Request-Id", r->record.request_id);
        if (r->record.provider)
                exchange_add_header(x, "X-Provider", r->record.provider);
        if (r->record.tried)
                /* Who was tried before the one that answered, in order. */
                exchange_add_header(x, "X-Provider-Tried", r->record.tried->str);
        origin = request_cors_origin(r, &vary);
        if (origin) {
                exchange_add_header(x, "Access-Control-Allow-Origin", origin);
                exchange_add_header(x, "Access-Control-Expose-Headers",
                                    "X-Provider, X-Request-Id, X-Provider-Request-Id, X-Provider-Tried, Server-Timing");
                exchange_add_header(x, "Timing-Allow-Origin", origin);
        }
        if (vary)
                exchange_add_header(x, "Vary", "Origin");
}

void request_respond(Request *r, unsigned status, char *body, size_t size) {
        r->record.status = status;
        r->record.bytes_out = size;
        request_add_common_headers(r);
        exchange_respond(r->exchange, status, body, size);
}

void request_respond_json(Request *r, unsigned status, char *json, size_t size) {
        exchange_add_header(r->exchange, "Content-Type", "application/json");
        request_respond(r, status, json, size);
}

void request_respond_error(Request *r, unsigned status, const char *type, const char *provider,
                           const char *format, ...) {
        g_autofree char *message = NULL;
        char *json;
        va_list ap;

        va_start(ap, format);
        message = g_strdup_vprintf(format, ap);
        va_end(ap);

        if (r->record.error_class == ERROR_CLASS_NONE && status >= 500)
                r->record.error_class = ERROR_CLASS_INTERNAL;
        if (!r->record.error_type)
                r->record.error_type = type;
        if (!r->record.error_message)
                r->record.error_message = g_strdup(message);

        json = json_error_body(type, message, provider, NULL);
        request_respond_json(r, status, json, strlen(json));
}

void request_respond_unknown_path(Request *r) {
        request_respond_error(r, 404, "invalid_request_error", NULL,
                              "Unknown path '%s'. This router serves POST /v1/chat/completions (and other POST "
                              "/v1/… APIs that name a model), GET /v1/models and GET /health.",
                              exchange_path(r->exchange));
}

void request_stream_begin(Request *r, unsigned status) {
        r->record.status = status;
        request_add_common_headers(r);
        exchange_stream_begin(r->exchange, status);
}

void request_begin_provider(Request *r, Provider *p) {
        record_begin_provider(&r->record, p->name, p->stats);
}

const char *request_upstream_authorization(Request *r, const Provider *p, bool routed) {
        if (p->config->api_key || r->worker->config->client_token_digests)
                return NULL;
        switch (p->config->client_authorization) {
        case CLIENT_AUTHORIZATION_ALWAYS:
                break;
        case CLIENT_AUTHORIZATION_ROUTED:
                if (!routed)
                        return NULL;
                break;
        default:
                return NULL;
        }
        return request_header(r, "Authorization");
}
