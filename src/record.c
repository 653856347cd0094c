/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "record.h"

#define RESPONSE_LOG_MAX 4096

void record_init(RequestRecord *r, usec_t start) {
        *r = (RequestRecord) {
                .start = start,
                .ttfb = USEC_INFINITY,
                .router_usec = USEC_INFINITY,
                .provider_ttfb_usec = USEC_INFINITY,
                .prompt_tokens = UINT64_MAX,
                .error_class = ERROR_CLASS_NONE,
        };
}

void record_clear(RequestRecord *r) {
        g_free(r->model);
        g_free(r->provider_request_id);
        g_free(r->upstream_model);
        g_free(r->error_message);
        g_free(r->response_body);
        if (r->tried)
                g_string_free(r->tried, TRUE);
        provider_stats_unref(r->stats);
        provider_stats_unref(r->arm_stats);
        *r = (RequestRecord) {};
}

void record_begin_arm(RequestRecord *r, ProviderStats *arm_stats) {
        g_assert(!r->arm_stats);
        r->arm_stats = provider_stats_ref(arm_stats);
        provider_stats_begin(r->arm_stats, r->stream);
}

void record_begin_provider(RequestRecord *r, const char *provider, ProviderStats *stats) {
        g_assert(!r->stats);
        r->provider = provider;
        r->stats = provider_stats_ref(stats);
        provider_stats_begin(r->stats, r->stream);
}

void record_end_attempt(RequestRecord *r, unsigned status, ErrorClass error_class, usec_t duration) {
        if (!r->stats)
                return;
        provider_stats_end(r->stats, status, error_class, duration, USEC_INFINITY, r->bytes_in, 0, UINT64_MAX, 0);
        r->stats->retries++;
        r->stats = provider_stats_unref(r->stats);
        r->ttfb = USEC_INFINITY;
        r->error_class = ERROR_CLASS_NONE;
        r->error_type = NULL;
        g_clear_pointer(&r->error_message, g_free);
}

void record_set_error(RequestRecord *r, ErrorClass error_class, const char *type, const char *message) {
        r->error_class = error_class;
        r->error_type = type;
        g_free(r->error_message);
        r->error_message = g_strdup(message);
}

void record_keep_response(RequestRecord *r, const char *body, size_t size) {
        g_free(r->response_body);
        r->response_body_size = MIN(size, (size_t) RESPONSE_LOG_MAX);
        r->response_body = g_strndup(body, r->response_body_size);
}

void record_emit(RequestRecord *r, usec_t now, bool log_requests) {
        usec_t duration = now - r->start;
        int level;

        if (r->stats) {
                provider_stats_end(r->stats, r->status, r->error_class, duration, r->ttfb, r->bytes_in, r->bytes_out,
                                   r->prompt_tokens, r->completion_tokens);
                r->stats = provider_stats_unref(r->stats);
        }
        if (r->arm_stats) {
                provider_stats_end(r->arm_stats, r->status, r->error_class, duration, r->ttfb, r->bytes_in, r->bytes_out,
                                   r->prompt_tokens, r->completion_tokens);
                r->arm_stats = provider_stats_unref(r->arm_stats);
        }

        /* Requests that never reached a provider and are not API calls (health checks, metrics,
         * preflights) are not request-log material. */
        if (!r->provider && !r->api)
                return;

        if (r->status >= 500 || r->error_class == ERROR_CLASS_STREAM)
                level = LOG_WARNING;
        else if (log_requests)
                level = LOG_INFO;
        else
                return;

        RequestLogEntry e = {
                .request_id = r->request_id,
                .provider_request_id = r->provider_request_id,
                .upstream_model = r->upstream_model,
                .method = r->method,
                .path = r->path,
                .provider = r->provider,
                .model = r->model,
                .route = r->route,
                .error_type = r->error_type,
                .error_message = r->error_message,
                .response_body = r->response_body,
                .response_body_size = r->response_body_size,
                .status = r->status,
                .stream = r->stream,
                .duration_usec = duration,
                .ttfb_usec = r->ttfb,
                .bytes_in = r->bytes_in,
                .bytes_out = r->bytes_out,
                .prompt_tokens = r->prompt_tokens,
                .completion_tokens = r->completion_tokens,
                .attempts = r->attempts,
                .tried = r->tried ? r->tried->str : NULL,
        };
        log_request(&e, level);
}
