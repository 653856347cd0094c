/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <microhttpd.h>

#include "inspect.h"
#include "manager.h"
#include "sse.h"
#include "stats.h"
#include "upstream.h"

typedef enum Endpoint {
        ENDPOINT_CHAT,          /* POST /v1/chat/completions */
        ENDPOINT_COMPLETIONS,   /* POST /v1/completions */
        ENDPOINT_EMBEDDINGS,    /* POST /v1/embeddings */
        ENDPOINT_MODELS,        /* GET /v1/models */
        ENDPOINT_HEALTH,        /* GET /health */
        ENDPOINT_METRICS,       /* GET /metrics */
        ENDPOINT_PREFLIGHT,     /* OPTIONS * */
        ENDPOINT_NOT_FOUND,
        ENDPOINT_METHOD_NOT_ALLOWED,
        _ENDPOINT_MAX,
} Endpoint;

typedef struct ModelsQuery ModelsQuery;

/* One HTTP request from a client, from its headers to the last byte of its answer. */
struct Request {
        Manager *manager;
        struct MHD_Connection *connection;
        GList *link;                   /* in manager->requests */
        Endpoint endpoint;
        const char *method;            /* owned by MHD, valid for the request */
        const char *url;
        char request_id[72];
        usec_t start;                  /* CLOCK_MONOTONIC */

        /* body, bounded by MaxBodySize */
        char *body;
        size_t body_size;
        size_t body_alloc;
        bool body_too_large;
        uint64_t body_received;        /* including what was dropped past the limit */
        bool dispatched;

        /* routing */
        ChatRequestInfo info;
        ProviderConfig *provider;      /* ref; the one serving the current attempt */
        ProviderStats *pstats;         /* ref; set while counted in flight */
        RouteReason reason;

        /* failover: the routed provider, then its Fallbacks= */
        GPtrArray *chain;              /* ProviderConfig* refs */
        unsigned chain_index;          /* of the current attempt */
        unsigned retries_left;         /* of the same provider, MaxRetries= */
        usec_t attempt_start;          /* CLOCK_MONOTONIC */
        sd_event_source *retry_timer;
        GString *tried;                /* "a, b": set once more than one provider was tried or skipped */
        char *upstream_body;           /* rewritten body, when one was needed */
        size_t upstream_body_size;

        /* the answer */
        struct MHD_Response *response; /* ready, waiting to be queued */
        unsigned status;
        bool queued;
        bool suspended;
        bool client_gone;
        sd_event_source *hup;
        usec_t parked_at;              /* CLOCK_MONOTONIC, when last suspended without a watcher */

        /* relaying */
        Upstream *upstream;
        bool streaming;                /* relaying an SSE answer event by event */
        bool stream_pending;           /* the stream's answer is to be made at the next handler call */
        unsigned upstream_status;
        GPtrArray *upstream_headers;   /* name, value, …, NULL: passed to the client */
        bool upstream_done;            /* nothing more will be appended to buf */
        bool response_too_large;
        char *buf;                     /* answer bytes not yet handed to MHD */
        size_t buf_size;
        size_t buf_alloc;
        SseScanner sse;

        /* accounting, for stats and the log */
        usec_t ttfb;                   /* relative to start; USEC_INFINITY if none */
        uint64_t bytes_out;
        ErrorClass error_class;
        const char *error_type;
        char *error_message;
        uint64_t prompt_tokens;
        uint64_t completion_tokens;
        unsigned attempts;
        char *logged_body;             /* LogResponses=true */
        size_t logged_body_size;

        ModelsQuery *models;
};

enum MHD_Result request_access_handler(void *cls, struct MHD_Connection *connection, const char *url,
                                       const char *method, const char *version, const char *upload_data,
                                       size_t *upload_data_size, void **con_cls);
void request_completed(void *cls, struct MHD_Connection *connection, void **con_cls,
                       enum MHD_RequestTerminationCode toe);

/* Hands the answer to MHD now if we are inside its handler, else wakes the connection so that
 * MHD asks for it. Takes ownership of response. */
void request_respond(Request *r, unsigned status, struct MHD_Response *response);
/* An error in the plan's shape; provider may be NULL. */
void request_respond_error(Request *r, unsigned status, const char *type, const char *provider,
                           const char *format, ...) _printf_(5, 6);
void request_respond_json(Request *r, unsigned status, char *json, size_t size);
void request_set_error(Request *r, ErrorClass error_class, const char *type, const char *message);
void request_wake(Request *r);
/* Parks the connection until request_wake(); watches for the client hanging up meanwhile. */
void request_suspend(Request *r);

const char *request_header(Request *r, const char *name);

/* The client's Authorization header to pass to provider p, or NULL: a provider with its own key
 * never sees the client's, nor does any provider when the header carried one of the router's
 * own client tokens. */
const char *request_upstream_authorization(Request *r, const ProviderConfig *p);

/* Counts the request against its provider; called once a provider is chosen. */
void request_begin_provider(Request *r, ProviderConfig *p, RouteReason reason);
