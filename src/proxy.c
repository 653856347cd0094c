/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>

#include "echo.h"
#include "json-util.h"
#include "log.h"
#include "proxy.h"
#include "request.h"

#define STREAM_BLOCK_SIZE (16 * 1024)

static const char *endpoint_suffix(Endpoint e) {
        switch (e) {
        case ENDPOINT_CHAT:
                return "/chat/completions";
        case ENDPOINT_COMPLETIONS:
                return "/completions";
        case ENDPOINT_EMBEDDINGS:
                return "/embeddings";
        default:
                g_assert_not_reached();
        }
}

static void buf_append(Request *r, const char *data, size_t size) {
        if (r->buf_size + size > r->buf_alloc) {
                r->buf_alloc = MAX(MAX(r->buf_alloc * 2, r->buf_size + size), (size_t) 4096);
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

static void add_upstream_headers(Request *r, struct MHD_Response *resp, Upstream *u, bool stream) {
        char **h = upstream_headers(u);
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
        if (avail == 0 && r->upstream && upstream_is_paused(r->upstream)) {
                /* Only part of an event is buffered and the provider is paused: the event can
                 * only complete with more data, however full the buffer is. Without this a
                 * paused event larger than half the buffer is never finished. */
                upstream_resume(r->upstream);
                avail = r->upstream_done ? r->buf_size : r->sse.boundary;
        }
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

        /* Drained enough: let the provider send more. This may append to buf right away. */
        if (r->upstream && upstream_is_paused(r->upstream) &&
            r->buf_size <= r->manager->config->stream_buffer_size / 2)
                upstream_resume(r->upstream);
        return (ssize_t) n;
}

static void proxy_respond_stream(Request *r, Upstream *u) {
        struct MHD_Response *resp;

        resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, STREAM_BLOCK_SIZE, stream_reader, r, NULL);
        add_upstream_headers(r, resp, u, true);
        request_respond(r, (unsigned) upstream_status(u), resp);
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
        if (r->buf_size + size > c->max_response_size) {
                r->response_too_large = true;
                return 0;
        }

        buf_append(r, data, size);
        sse_scanner_scan(&r->sse, r->buf, r->buf_size, on_sse_event, r);
        if (r->sse.boundary == 0)
                return size;

        if (!r->queued && !r->response)
                proxy_respond_stream(r, u);
        else
                request_wake(r);
        return size;
}

static void proxy_fail(Request *r, UpstreamError error, const char *message) {
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

static void proxy_on_done(Upstream *u, UpstreamError error, const char *message, void *userdata) {
        Request *r = userdata;
        long status = upstream_status(u);

        if (!r->streaming) {
                if (error != UPSTREAM_OK || status < 100) {
                        proxy_fail(r, error != UPSTREAM_OK ? error : UPSTREAM_ERROR_OTHER,
                                   message ?: "no valid HTTP answer");
                        r->upstream = upstream_free(u);
                        return;
                }

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

                resp = MHD_create_response_from_buffer_with_free_callback(size, size > 0 ? r->buf : (char *) "",
                                                                         size > 0 ? g_free : NULL);
                if (size > 0)
                        r->buf = NULL;
                else
                        g_clear_pointer(&r->buf, g_free);
                r->buf_size = r->buf_alloc = 0;
                add_upstream_headers(r, resp, u, false);
                r->bytes_out = size;
                request_respond(r, (unsigned) status, resp);
                r->upstream = upstream_free(u);
                return;
        }

        if (!r->queued) {
                /* Not a byte went to the client yet: it can still get a proper error status. */
                if (error != UPSTREAM_OK) {
                        g_clear_pointer(&r->response, MHD_destroy_response);
                        proxy_fail(r, error, message);
                        r->upstream = upstream_free(u);
                        return;
                }
                r->upstream_done = true;
                if (!r->response)
                        proxy_respond_stream(r, u);
                r->upstream = upstream_free(u);
                request_wake(r);
                return;
        }

        if (error != UPSTREAM_OK)
                proxy_end_stream_with_error(r, error, message);
        r->upstream_done = true;
        r->upstream = upstream_free(u);
        request_wake(r);
}

static const UpstreamOps proxy_ops = {
        .on_response = proxy_on_response,
        .on_data = proxy_on_data,
        .on_done = proxy_on_done,
};

static void proxy_start(Request *r) {
        Manager *m = r->manager;
        ProviderConfig *p = r->provider;
        const char *body = r->body ?: "";
        size_t body_size = r->body_size;
        int k;

        /* Pass-through: the client's bytes go out untouched unless the provider needs a model
         * named and the client named none. */
        if (r->endpoint == ENDPOINT_CHAT && !r->info.model && p->default_model) {
                k = inspect_set_model(body, body_size, p->default_model, &r->upstream_body, &r->upstream_body_size);
                if (k >= 0) {
                        body = r->upstream_body;
                        body_size = r->upstream_body_size;
                }
        }

        r->upstream_url = g_strconcat(p->base_url, endpoint_suffix(r->endpoint), NULL);
        UpstreamRequest req = {
                .url = r->upstream_url,
                .post = true,
                .body = body,
                .body_size = body_size,
                .api_key = p->api_key,
                /* A provider with its own key never sees the client's. */
                .authorization = p->api_key ? NULL : request_header(r, MHD_HTTP_HEADER_AUTHORIZATION),
                .request_id = r->request_id,
                .stream = r->info.stream,
                .connect_timeout = p->connect_timeout_usec,
                .first_byte_timeout = p->first_byte_timeout_usec,
                .total_timeout = p->request_timeout_usec,
                .idle_timeout = p->idle_timeout_usec,
        };

        r->attempts++;
        k = upstream_start(m->curl, m->event, &req, &proxy_ops, r, &r->upstream);
        if (k < 0) {
                log_warning_errno(k, "%s: failed to start a transfer to provider '%s': %m", r->request_id, p->name);
                r->error_class = ERROR_CLASS_INTERNAL;
                request_respond_error(r, MHD_HTTP_INTERNAL_SERVER_ERROR, "internal_error", p->name,
                                      "Could not start the request to provider '%s'.", p->name);
        }
}

void proxy_dispatch(Request *r) {
        Manager *m = r->manager;
        g_autofree char *message = NULL;
        ProviderConfig *p = NULL;
        RouteReason reason;
        const char *header;
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

        request_begin_provider(r, p, reason);

        if (p->kind == PROVIDER_KIND_ECHO) {
                echo_respond(r);
                return;
        }
        proxy_start(r);
}
