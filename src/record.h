/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "log.h"
#include "stats.h"

/* Everything worth knowing about one request, filled in by whoever handles it and emitted once
 * when it ends: to its provider's statistics and to the request log. */
typedef struct RequestRecord {
        char request_id[72];
        char *provider_request_id;   /* the provider's own x-request-id, if it sent one */
        const char *method;          /* borrowed from the exchange; valid until emitted */
        const char *path;
        usec_t start;                /* CLOCK_MONOTONIC */
        bool api;                    /* an API request: logged even when no provider was reached */

        char *model;                 /* as the client named it */
        char *upstream_model;        /* as the provider was asked for it, when renamed ([ModelAliases], DefaultModel=) */
        bool stream;
        const char *provider;        /* who serves it; borrowed from the request's provider set */
        const char *route;           /* "header", "mapping", "default" */
        ProviderStats *stats;        /* ref, while the provider counts it in flight */
        ProviderStats *arm_stats;    /* ref: the (model, provider) arm of a route it was routed by */

        unsigned status;             /* 0 until an answer is given */
        usec_t ttfb;                 /* relative to start; USEC_INFINITY if none */
        uint64_t bytes_in;           /* request bytes sent to the provider */
        uint64_t bytes_out;
        uint64_t prompt_tokens;      /* UINT64_MAX if unknown */
        uint64_t completion_tokens;
        ErrorClass error_class;
        const char *error_type;      /* static */
        char *error_message;
        unsigned attempts;
        GString *tried;              /* "a, b": set once more than one provider was tried or skipped */
        usec_t router_usec;          /* Server-Timing: the router's own time before the provider was asked */
        usec_t provider_ttfb_usec;   /* Server-Timing: the answering provider's time to first byte; USEC_INFINITY if none */
        char *response_body;         /* LogResponses=true */
        size_t response_body_size;
} RequestRecord;

void record_init(RequestRecord *r, usec_t start);
void record_clear(RequestRecord *r);

/* Counts the request (or a new attempt of it) against a provider from now on. */
void record_begin_provider(RequestRecord *r, const char *provider, ProviderStats *stats);
/* Counts the request for the route's arm it was routed to, as well (once, whatever serves it). */
void record_begin_arm(RequestRecord *r, ProviderStats *arm_stats);
/* A failed attempt, counted for its provider; the next attempt starts afresh. */
void record_end_attempt(RequestRecord *r, unsigned status, ErrorClass error_class, usec_t duration);
void record_set_error(RequestRecord *r, ErrorClass error_class, const char *type, const char *message);
/* Keeps the first bytes of the answer for the log (LogResponses=true). */
void record_keep_response(RequestRecord *r, const char *body, size_t size);

/* The request is over: counted for its provider and logged (when log_requests is false only
 * failures are). */
void record_emit(RequestRecord *r, usec_t now, bool log_requests);
