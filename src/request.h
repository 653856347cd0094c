/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "exchange.h"
#include "record.h"
#include "worker.h"

/* One client request as the handlers see it: its exchange (the HTTP side), its record (what is
 * logged and counted), the provider set it started with, and the handler answering it. */
typedef struct Request Request;

/* What answers a kind of request (proxy, models, health, metrics). Handlers use the exchange and
 * the record; the exchange never calls them but through the dispatcher. */
typedef struct Handler {
        const char *name;
        /* The whole request is in: answer it, now or later. */
        void (*start)(Request *r);
        /* The client went away: stop all work for it (optional). */
        void (*cancel)(Request *r);
        /* A stream's buffer drained (optional). */
        void (*writable)(Request *r);
        /* The request is over: free r->data (optional). */
        void (*free)(Request *r);
} Handler;

/* Something other than the handler that writes a streamed answer bit by bit, as the client
 * reads it (the echo provider, answering for the proxy): told when the stream has room again,
 * freed with the request or when the client leaves. */
typedef struct RequestProducer {
        void (*writable)(Request *r, void *data);
        void (*free)(void *data);
        void *data;
} RequestProducer;

struct Request {
        Worker *worker;
        Exchange *exchange;
        const Handler *handler;
        void *data;                   /* the handler's own state */
        RequestProducer producer;     /* set: it, not the handler, hears writable() */
        bool authorized;              /* passed the client token check (or none is configured) */
        ProviderSet *providers;       /* ref: providers stay valid until the request ends */
        RequestRecord record;
        const char *subpath;          /* the part of the path after the route's prefix, percent-decoded */
        char *subpath_buf;
};

Request *request_new(Worker *w, Exchange *x);
Request *request_free(Request *r);

const char *request_header(Request *r, const char *name);

/* Answers whole, with the router's own headers added; takes body (g_free). */
void request_respond(Request *r, unsigned status, char *body, size_t size);
/* A JSON answer; takes json. */
void request_respond_json(Request *r, unsigned status, char *json, size_t size);
/* An error in the plan's shape; provider may be NULL. Fills the record's error too. */
void request_respond_error(Request *r, unsigned status, const char *type, const char *provider,
                           const char *format, ...) _printf_(5, 6);
/* The Access-Control-Allow-Origin value for this request under CORSAllowOrigin=, or NULL for
 * none; *ret_vary says the answer depends on the request's Origin. */
const char *request_cors_origin(Request *r, bool *ret_vary);
/* 404: a path no route serves, or none a provider may see. */
void request_respond_unknown_path(Request *r);
/* Begins a streamed answer, with the router's own headers added. */
void request_stream_begin(Request *r, unsigned status);

/* The client's Authorization header to pass to provider p, or NULL. routed: p is the provider the
 * request was routed to (X-Provider, mapping, default, a split's arm), not a fallback nor one
 * asked on the side (the merged /v1/models). A provider with its own key never sees the
 * client's, nor does any provider when the header carried one of the router's own client
 * tokens; otherwise the provider's ClientAuthorization= decides. */
const char *request_upstream_authorization(Request *r, const Provider *p, bool routed);

/* Hands the rest of a streamed answer to a producer (see RequestProducer). */
void request_set_producer(Request *r, const RequestProducer *p);
void request_clear_producer(Request *r);

/* Counts the request against a provider from now on. */
void request_begin_provider(Request *r, Provider *p);
