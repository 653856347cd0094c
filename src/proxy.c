/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>

#include "echo.h"
#include "health.h"
#include "json-util.h"
#include "log.h"
#include "proxy.h"
#include "request.h"

/* What MHD asks the reader for at once; it keeps a buffer this size per streaming connection. */
#define STREAM_BLOCK_SIZE (4 * 1024)

static void proxy_start_attempt(Request *r, ProviderConfig *p);

static const char *endpoint_url(const ProviderConfig *p, Endpoint e) {
        switch (e) {
        case ENDPOINT_CHAT:
                return p->chat_url;
        case ENDPOINT_COMPLETIONS:
                return p->completions_url;
        case ENDPOINT_EMBEDDINGS:
                return p->embeddings_url;
        default:
                g_assert_not_reached();
        }
}

static void buf_append(Request *r, const char *data, size_t size) {
        if (r->buf_size + size > r->buf_alloc) {
                r->buf_alloc = MAX(MAX(r->buf_alloc * 2, r->buf_size + size), (size_t) 1024);
                r->buf = g_realloc(r->buf, r->buf_alloc);
        }
        memcpy(r->buf + r->buf_size, data, size);
        r->buf_size += size;
}

static void buf_consume(Request *r, size_t n) {
        g_assert(n <= r->buf_size);
        if (n < r->buf_size)
                memmove(r->buf, r->buf + n, r->buf_size - n);
        r->buf_size -= n;
        if (!r->upstream_done)
                sse_scanner_consumed(&r->sse, n);
}

static void add_upstream_headers(Request *r, struct MHD_Response *resp, bool stream) {
        char **h = r->upstream_headers ? (char **) r->upstream_headers->pdata : NULL;
        bool have_content_type = false, have_cache_control = false;

        for (; h && h[0] && h[1]; h += 2) {
                if (strcaseeq(h[0], "Content-Type"))
                        have_content_type = true;
                else if (strcaseeq(h[0], "Cache-Control"))
                        have_cache_control = true;
                (void) MHD_add_response_header(resp, h[0], h[1]);
        }
        if (!have_content_type)
                (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                                               stream ? "text/event-stream" : "application/json");
        if (stream) {
                if (!have_cache_control)
                        (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
                /* Tell nginx and friends in front of us not to hold frames back either. */
                (void) MHD_add_response_header(resp, "X-Accel-Buffering", "no");
        }
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *out, size_t max) {
        Request *r = cls;
        size_t avail, n;

        if (r->client_gone)
                return MHD_CONTENT_READER_END_WITH_ERROR;

        /* Only whole events go out while the provider is still talking, so that an error event
         * can always follow cleanly. */
        avail = r->upstream_done ? r->buf_size : r->sse.boundary;
        if (avail == 0) {
                if (r->upstream_done)
                        return MHD_CONTENT_READER_END_OF_STREAM;
                request_suspend(r);
                return 0;
        }

        n = MIN(avail, max);
        memcpy(out, r->buf, n);
        buf_consume(r, n);
        r->bytes_out += n;

        /* Drained enough, or every whole event (what is left is part of one, which only more
         * data can complete, however large): let the provider send more. This may append to
         * buf right away. */
        if (r->upstream && upstream_is_paused(r->upstream) &&
            (r->buf_size <= r->manager->config->stream_buffer_size / 2 || r->sse.boundary == 0))
                upstream_resume(r->upstream);
        return (ssize_t) n;
}

/* The whole answer is in buf: MHD takes the buffer over and sends it with the headers. */
static struct MHD_Response *buf_to_response(Request *r) {
        struct MHD_Response *resp;
        size_t size = r->buf_size;

        resp = MHD_create_response_from_buffer_with_free_callback(size, size > 0 ? r->buf : (char *) "",
                                                                 size > 0 ? g_free : NULL);
        if (size > 0)
                r->buf = NULL;
        else
                g_clear_pointer(&r->buf, g_free);
        r->buf_size = r->buf_alloc = 0;
        r->bytes_out = size;
        return resp;
}

void proxy_respond_pending(Request *r) {
        struct MHD_Response *resp;

        r->stream_pending = false;
        if (r->upstream_done)
                /* The whole stream is already here (a fast provider): one buffer, sent with the
                 * headers in one go, rather than chunk by chunk. */
                resp = buf_to_response(r);
        else
                resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, STREAM_BLOCK_SIZE, stream_reader, r, NULL);
        add_upstream_headers(r, resp, true);
        request_respond(r, r->upstream_status, resp);
}

/* The stream's answer is made when MHD next calls the handler: by then a fast provider has often
 * finished too, and the answer goes out whole. */
static void proxy_stream_ready(Request *r) {
        r->stream_pending = true;
        request_wake(r);
}

static void on_sse_event(const char *event, size_t size, void *userdata) {
        Request *r = userdata;
        const char *data;
        size_t n;
        uint64_t p, c;

        /* The usage totals come in the last chunk, when the client asked for them. */
        data = sse_event_data(event, size, &n);
        if (data && n > 0 && data[0] == '{' && inspect_usage(data, n, &p, &c) >= 0) {
                r->prompt_tokens = p;
                r->completion_tokens = c;
        }
}

static void proxy_on_response(Upstream *u, void *userdata) {
        Request *r = userdata;
        long status = upstream_status(u);
        const char *ct = upstream_content_type(u);

        r->streaming = r->info.stream && status >= 200 && status < 300 && ct &&
                       g_ascii_strncasecmp(ct, "text/event-stream", STRLEN("text/event-stream")) == 0;
        if (!r->streaming)
                upstream_mark_first_byte(u); /* any body byte counts */
        r->upstream_status = (unsigned) status;
        if (r->upstream_headers)
                g_ptr_array_unref(r->upstream_headers);
        r->upstream_headers = upstream_steal_headers(u);
}

static size_t proxy_on_data(Upstream *u, const char *data, size_t size, void *userdata) {
        Request *r = userdata;
        const Config *c = r->manager->config;

        if (r->ttfb == USEC_INFINITY)
                r->ttfb = now_usec(CLOCK_MONOTONIC) - r->start;

        if (!r->streaming) {
                if (r->buf_size + size > c->max_response_size) {
                        r->response_too_large = true;
                        return 0; /* aborts the transfer */
                }
                buf_append(r, data, size);
                return size;
        }

        /* Back-pressure: while the client has not taken what is here, the provider waits. A
         * single event larger than the buffer is still taken whole, up to MaxResponseSize. */
        if (r->sse.boundary > 0 && r->buf_size + size > c->stream_buffer_size)
                return CURL_WRITEFUNC_PAUSE;

        buf_append(r, data, size);
        sse_scanner_scan(&r->sse, r->buf, r->buf_size, on_sse_event, r);

        /* Only the event still incomplete counts against the limit: what curl hands over at
         * once (16K at most) may hold many whole events, or end a large one, which may so
         * exceed the limit by that much. */
        if (r->buf_size - r->sse.boundary > c->max_response_size) {
                r->response_too_large = true;
                return 0;
        }

        /* The answer starts with the first event that carries data; keep-alive comments before
         * it do not commit us to this provider, so a silent one can still be failed over. */
        if (r->sse.events == 0)
                return size;

        if (!r->queued && !r->response) {
                upstream_mark_first_byte(u);
                proxy_stream_ready(r);
        } else
                request_wake(r);
        return size;
}

static void proxy_respond_failure(Request *r, UpstreamError error, const char *message) {
        const char *name = r->provider->name;

        if (r->response_too_large) {
                request_set_error(r, ERROR_CLASS_INVALID, "provider_error", "answer larger than MaxResponseSize=");
                request_respond_error(r, MHD_HTTP_BAD_GATEWAY, "provider_error", name,
                                      "Provider '%s' sent an answer larger than %" PRIu64 " bytes.", name,
                                      r->manager->config->max_response_size);
                return;
        }
        if (upstream_error_is_timeout(error)) {
                r->error_class = ERROR_CLASS_TIMEOUT;
                request_respond_error(r, MHD_HTTP_GATEWAY_TIMEOUT, "timeout_error", name,
                                      "Provider '%s' timed out: %s", name, message);
                return;
        }
        r->error_class = ERROR_CLASS_CONNECT;
        request_respond_error(r, MHD_HTTP_BAD_GATEWAY, "connection_error", name,
                              "Provider '%s' is unreachable: %s", name, message);
}

static void proxy_end_stream_with_error(Request *r, UpstreamError error, const char *message) {
        g_autofree char *text = NULL, *event = NULL;
        const char *type;
        size_t n;

        type = upstream_error_is_timeout(error) ? "timeout_error" : "connection_error";
        if (r->response_too_large)
                text = g_strdup_printf("Provider '%s' sent an event larger than %" PRIu64 " bytes.",
                                       r->provider->name, r->manager->config->max_response_size);
        else
                text = g_strdup_printf("Provider '%s' failed during the stream: %s", r->provider->name, message);

        /* Whatever half event is buffered is dropped; the client gets whole events, then this. */
        r->buf_size = r->sse.boundary;
        event = sse_format_error(type, text, r->provider->name, &n);
        buf_append(r, event, n);
        request_set_error(r, ERROR_CLASS_STREAM, type, text);
}

/* A complete answer that is not a stream (or a stream the provider refused): relay it. */
static void proxy_respond_buffered(Request *r, Upstream *u) {
        long status = upstream_status(u);
        struct MHD_Response *resp;
        size_t size = r->buf_size;

        if (status >= 200 && status < 300) {
                uint64_t p, c;
                if (r->buf && inspect_usage(r->buf, size, &p, &c) >= 0) {
                        r->prompt_tokens = p;
                        r->completion_tokens = c;
                }
        } else {
                /* The provider's own error, passed through with its body. */
                r->error_class = status >= 500 ? ERROR_CLASS_PROVIDER_5XX : ERROR_CLASS_PROVIDER_4XX;
                r->error_type = "provider_error";
        }
        if (r->manager->config->log_responses && r->buf) {
                r->logged_body_size = MIN(size, (size_t) 4096);
                r->logged_body = g_strndup(r->buf, r->logged_body_size);
        }

        resp = buf_to_response(r);
        add_upstream_headers(r, resp, false);
        request_respond(r, (unsigned) status, resp);
}

/* Is this outcome worth another attempt, and does it count against the provider's health?
 * Any 5xx or 429 moves the request on; only signs that the provider itself is unreachable or
 * overwhelmed — no connection, timeouts, a broken answer, 502/503/504 — count towards marking
 * it down. A 500 is an answer about this request, not about the provider. */
static bool attempt_failed(UpstreamError error, long status, bool *ret_health_failure) {
        if (error != UPSTREAM_OK) {
                *ret_health_failure = error != UPSTREAM_ERROR_ABORTED;
                return error != UPSTREAM_ERROR_ABORTED;
        }
        *ret_health_failure = status == 502 || status == 503 || status == 504;
        return status >= 500 || status == 429;
}

/* Why an attempt failed, in words for the log, /health and the journal. */
static const char *attempt_reason(UpstreamError error, const char *message, long status, char *buf, size_t size) {
        if (error != UPSTREAM_OK)
                return strna(message);
        (void) snprintf(buf, size, "answered HTTP %ld", status);
        return buf;
}

/* The next provider of the chain that may take the request: not down, not at its
 * MaxConcurrent=, and — unless ignore_retry_after — not inside a Retry-After it asked for. */
static ProviderConfig *chain_next_available(Request *r, unsigned from, bool ignore_retry_after, unsigned *ret_index) {
        Manager *m = r->manager;
        usec_t now = now_usec(CLOCK_MONOTONIC);

        for (unsigned i = from; i < r->chain->len; i++) {
                ProviderConfig *p = r->chain->pdata[i];

                if (p->kind == PROVIDER_KIND_OPENAI) {
                        ProviderHealth *h = health_get(m, p->name);
                        if (h->state == HEALTH_DOWN || h->state == HEALTH_PROBING)
                                continue;
                        if (!ignore_retry_after && !health_available(h, now))
                                continue;
                }
                if (p->max_concurrent > 0 && stats_get(m->stats, p->name)->in_flight >= p->max_concurrent)
                        continue;
                *ret_index = i;
                return p;
        }
        return NULL;
}

static int proxy_on_retry_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Request *r = userdata;
        ProviderConfig *p = r->chain->pdata[r->chain_index];

        r->retry_timer = sd_event_source_disable_unref(r->retry_timer);
        proxy_start_attempt(r, p);
        return 0;
}

/* Closes the books on a failed attempt and starts the next one, on the next provider of the
 * chain at once or on the same one after a back-off. Returns false when there is none. */
static bool proxy_retry(Request *r, Upstream *u, UpstreamError error, const char *message) {
        Manager *m = r->manager;
        const Config *c = m->config;
        ProviderConfig *primary = r->chain->pdata[0], *next;
        ProviderHealth *h = health_get(m, r->provider->name);
        usec_t now = now_usec(CLOCK_MONOTONIC), wait = 0, retry_after = USEC_INFINITY;
        long status = upstream_status(u);
        char buf[32];
        const char *why;
        unsigned index;
        bool health_failure;

        if (r->queued || r->client_gone || m->stopping)
                return false;
        if (!attempt_failed(error, status, &health_failure))
                return false;

        if (status == 429 || status == 503) {
                retry_after = parse_retry_after(upstream_retry_after(u));
                if (retry_after != USEC_INFINITY)
                        health_set_retry_after(h, now + retry_after);
        }
        next = chain_next_available(r, r->chain_index + 1, false, &index);
        if (!next) {
                if (r->retries_left == 0)
                        return false;
                /* No other provider: the same one again, after a back-off that grows with each
                 * attempt and is never shorter than what the provider asked for. */
                unsigned n = r->attempts;
                wait = c->retry_backoff_usec << MIN(n - 1, 10u);
                wait += (usec_t) g_random_int_range(0, (gint32) MAX(wait / 5, (usec_t) 1));
                if (retry_after != USEC_INFINITY)
                        wait = MAX(wait, retry_after);
                if (wait > c->max_retry_wait_usec)
                        return false;
                if (now + wait - r->start > primary->request_timeout_usec)
                        return false;
                if (health_failure && c->failure_threshold > 0 && h->consecutive_failures + 1 >= c->failure_threshold)
                        return false; /* it is about to be marked down: do not hammer it */
                next = r->provider;
                index = r->chain_index;
        }

        /* The failed attempt is counted for its provider, and so is its effect on health. */
        why = attempt_reason(error, message, status, buf, sizeof(buf));
        if (health_failure)
                health_record_failure(h, why);
        provider_stats_end(r->pstats, (unsigned) status,
                           error != UPSTREAM_OK ? (upstream_error_is_timeout(error) ? ERROR_CLASS_TIMEOUT : ERROR_CLASS_CONNECT)
                                                : (status >= 500 ? ERROR_CLASS_PROVIDER_5XX : ERROR_CLASS_PROVIDER_4XX),
                           now - r->attempt_start, USEC_INFINITY, r->body_size, 0, UINT64_MAX, 0);
        r->pstats->retries++;
        r->pstats = provider_stats_unref(r->pstats);

        log_info("%s: provider '%s' failed (%s), trying %s'%s'%s.", r->request_id, r->provider->name, why,
                 next == r->provider ? "again " : "", next->name, wait > 0 ? " after a back-off" : "");

        if (next == r->provider)
                r->retries_left--;
        r->chain_index = index;
        r->upstream = upstream_free(u);

        if (wait == 0) {
                proxy_start_attempt(r, next);
                return true;
        }
        if (sd_event_add_time_relative(m->event, &r->retry_timer, CLOCK_MONOTONIC, wait, USEC_PER_MSEC,
                                       proxy_on_retry_timer, r) < 0) {
                proxy_start_attempt(r, next);
                return true;
        }
        (void) sd_event_source_set_description(r->retry_timer, "retry-backoff");
        /* Counted against the next provider only once it is really tried. */
        provider_config_unref(r->provider);
        r->provider = provider_config_ref(next);
        return true;
}

static void proxy_on_done(Upstream *u, UpstreamError error, const char *message, void *userdata) {
        Request *r = userdata;
        long status = upstream_status(u);
        ProviderHealth *h = health_get(r->manager, r->provider->name);

        if (error == UPSTREAM_OK && status < 100)
                error = UPSTREAM_ERROR_OTHER;

        if (!r->queued) {
                /* Nothing reached the client yet: another provider may still serve it. */
                g_clear_pointer(&r->response, MHD_destroy_response);
                r->stream_pending = false;
                if (proxy_retry(r, u, error, message))
                        return;

                bool health_failure = false;
                char buf[32];
                if (r->response_too_large)
                        ; /* a large answer is an answer: the provider is fine */
                else if (attempt_failed(error, status, &health_failure) && health_failure)
                        health_record_failure(h, attempt_reason(error, message, status, buf, sizeof(buf)));
                else if (error == UPSTREAM_OK)
                        health_record_success(h);

                if (error != UPSTREAM_OK)
                        proxy_respond_failure(r, error, message);
                else if (r->streaming) {
                        /* Complete before its answer was made: it goes out whole. */
                        r->upstream_done = true;
                        proxy_stream_ready(r);
                } else
                        proxy_respond_buffered(r, u);
                r->upstream = upstream_free(u);
                return;
        }

        /* Bytes went out: this provider serves the request, come what may. */
        if (error != UPSTREAM_OK) {
                health_record_failure(h, message);
                proxy_end_stream_with_error(r, error, message);
        } else
                health_record_success(h);
        r->upstream_done = true;
        r->upstream = upstream_free(u);
        request_wake(r);
}

static const UpstreamOps proxy_ops = {
        .on_response = proxy_on_response,
        .on_data = proxy_on_data,
        .on_done = proxy_on_done,
};

static void proxy_start_attempt(Request *r, ProviderConfig *p) {
        Manager *m = r->manager;
        const char *body = r->body ?: "";
        size_t body_size = r->body_size;
        int k;

        /* Who was tried, in order; kept only once there is more than one name to tell. */
        r->attempts++;
        if (r->tried || r->attempts > 1) {
                if (!r->tried)
                        r->tried = g_string_new(r->provider->name);
                g_string_append_printf(r->tried, ", %s", p->name);
        }

        /* Fresh state for this attempt; the previous one left nothing the client saw. */
        if (r->pstats)
                r->pstats = provider_stats_unref(r->pstats);
        g_clear_pointer(&r->provider, provider_config_unref);
        request_begin_provider(r, p, r->reason);
        r->attempt_start = now_usec(CLOCK_MONOTONIC);
        r->streaming = r->upstream_done = r->response_too_large = r->stream_pending = false;
        r->buf_size = 0;
        r->sse = (SseScanner) {};
        r->ttfb = USEC_INFINITY;
        r->error_class = ERROR_CLASS_NONE;
        r->error_type = NULL;
        g_clear_pointer(&r->error_message, g_free);
        g_clear_pointer(&r->upstream_body, g_free);

        if (p->kind == PROVIDER_KIND_ECHO) {
                echo_respond(r);
                return;
        }

        /* Pass-through: the client's bytes go out untouched unless the provider needs a model
         * named and the client named none. */
        if (r->endpoint == ENDPOINT_CHAT && !r->info.model && p->default_model) {
                k = inspect_set_model(body, body_size, p->default_model, &r->upstream_body, &r->upstream_body_size);
                if (k >= 0) {
                        body = r->upstream_body;
                        body_size = r->upstream_body_size;
                }
        }

        UpstreamRequest req = {
                .url = endpoint_url(p, r->endpoint),
                .post = true,
                .body = body,
                .body_size = body_size,
                .api_key = p->api_key,
                .authorization = request_upstream_authorization(r, p),
                .request_id = r->request_id,
                .stream = r->info.stream,
                .connect_timeout = p->connect_timeout_usec,
                .first_byte_timeout = p->first_byte_timeout_usec,
                .total_timeout = p->request_timeout_usec,
                .idle_timeout = p->idle_timeout_usec,
        };

        k = upstream_start(m->curl, m->event, &req, &proxy_ops, r, &r->upstream);
        if (k < 0) {
                log_warning_errno(k, "%s: failed to start a transfer to provider '%s': %m", r->request_id, p->name);
                r->error_class = ERROR_CLASS_INTERNAL;
                request_respond_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal_error", p->name,
                                      "Could not start the request to provider '%s'.", p->name);
        }
}

/* No provider of the chain can take the request now: say why, and when to come back. */
static void proxy_respond_unavailable(Request *r) {
        Manager *m = r->manager;
        ProviderConfig *p = r->chain->pdata[0];
        ProviderStats *s = stats_get(m->stats, p->name);
        ProviderHealth *h = health_get(m, p->name);
        usec_t now = now_usec(CLOCK_MONOTONIC), wait;
        struct MHD_Response *resp;
        char retry_after[32];
        char *json;
        unsigned status;

        r->provider = provider_config_ref(p);
        if (p->max_concurrent > 0 && s->in_flight >= p->max_concurrent && health_available(h, now)) {
                g_autofree char *msg = g_strdup_printf(
                        "Provider '%s' is busy: %u requests are running, MaxConcurrent=%u. Retry shortly.", p->name,
                        s->in_flight, p->max_concurrent);
                status = MHD_HTTP_TOO_MANY_REQUESTS;
                wait = USEC_PER_SEC;
                json = json_error_body("rate_limit_error", msg, p->name, NULL);
                request_set_error(r, ERROR_CLASS_OVERLOAD, "rate_limit_error", msg);
        } else {
                g_autofree char *msg = NULL;
                wait = MAX(health_retry_in(h, now), USEC_PER_SEC);
                msg = g_strdup_printf("Provider '%s' is down (%s); it is probed again within %.0f s.", p->name,
                                      strna(h->last_error), (double) wait / USEC_PER_SEC);
                status = MHD_HTTP_SERVICE_UNAVAILABLE;
                json = json_error_body("provider_unavailable", msg, p->name, NULL);
                request_set_error(r, ERROR_CLASS_OVERLOAD, "provider_unavailable", msg);
        }

        (void) snprintf(retry_after, sizeof(retry_after), "%" PRIu64, (wait + USEC_PER_SEC - 1) / USEC_PER_SEC);
        resp = MHD_create_response_from_buffer_with_free_callback(strlen(json), json, g_free);
        (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
        (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, retry_after);
        r->bytes_out = strlen(json);
        m->stats->rejected++;
        request_respond(r, status, resp);
}

void proxy_cancel(Request *r) {
        r->upstream = upstream_free(r->upstream);
        r->retry_timer = sd_event_source_disable_unref(r->retry_timer);
}

void proxy_dispatch(Request *r) {
        Manager *m = r->manager;
        g_autofree char *message = NULL;
        ProviderConfig *p = NULL, *first;
        RouteReason reason;
        const char *header;
        unsigned index;
        int k;

        k = inspect_chat_request(r->body, r->body_size, &r->info, &message);
        if (k < 0) {
                m->stats->rejected++;
                request_respond_error(r, MHD_HTTP_BAD_REQUEST, "invalid_request_error", NULL, "%s", message);
                return;
        }

        header = request_header(r, "X-Provider");
        k = router_pick(m->router, header, r->info.model, &p, &reason);
        if (k == -ENOENT) {
                g_autofree char *known = router_provider_list(m->router);
                m->stats->rejected++;
                request_respond_error(r, MHD_HTTP_BAD_REQUEST, "invalid_request_error", NULL,
                                      "Unknown provider '%s' in the X-Provider header. Known providers: %s.",
                                      header, known);
                return;
        }
        if (k < 0) {
                m->stats->rejected++;
                request_respond_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal_error", NULL,
                                      "No provider is available for this request.");
                return;
        }
        r->reason = reason;

        if (p->kind == PROVIDER_KIND_ECHO) {
                request_begin_provider(r, p, reason);
                echo_respond(r);
                return;
        }

        /* The chain a request may walk: the routed provider, then its fallbacks in order. */
        r->chain = g_ptr_array_new_with_free_func(provider_config_destroy);
        g_ptr_array_add(r->chain, provider_config_ref(p));
        for (char **f = p->fallbacks; f && *f; f++) {
                ProviderConfig *fb = router_find(m->router, *f);
                if (fb && fb != p)
                        g_ptr_array_add(r->chain, provider_config_ref(fb));
        }
        r->retries_left = p->max_retries;

        first = chain_next_available(r, 0, false, &index);
        if (!first)
                /* Everyone asked for a pause: the routed provider gets the request anyway and
                 * answers for itself, rather than the router refusing on its behalf. */
                first = chain_next_available(r, 0, true, &index);
        if (!first) {
                proxy_respond_unavailable(r);
                return;
        }
        r->chain_index = index;
        if (index > 0) {
                /* The routed provider is down or full: start with a fallback, and say so. */
                r->tried = g_string_new(p->name);
                g_string_append_printf(r->tried, " (%s)", health_state_to_string(health_state(m, p->name)));
        }
        proxy_start_attempt(r, first);
}
