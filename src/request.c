/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/epoll.h>

#include "api.h"
#include "json-util.h"
#include "log.h"
#include "models.h"
#include "proxy.h"
#include "request.h"

static Endpoint endpoint_from_request(const char *method, const char *url, bool *ret_method_ok) {
        size_t n = strlen(url);
        Endpoint e;

        /* One trailing slash is forgiven: clients build URLs by concatenation. */
        if (n > 1 && url[n - 1] == '/')
                n--;

#define IS(path) (n == STRLEN(path) && memcmp(url, path, n) == 0)
        if (IS("/v1/chat/completions"))
                e = ENDPOINT_CHAT;
        else if (IS("/v1/completions"))
                e = ENDPOINT_COMPLETIONS;
        else if (IS("/v1/embeddings"))
                e = ENDPOINT_EMBEDDINGS;
        else if (IS("/v1/models"))
                e = ENDPOINT_MODELS;
        else if (IS("/health"))
                e = ENDPOINT_HEALTH;
        else if (IS("/metrics"))
                e = ENDPOINT_METRICS;
        else
                e = ENDPOINT_NOT_FOUND;
#undef IS

        switch (e) {
        case ENDPOINT_CHAT:
        case ENDPOINT_COMPLETIONS:
        case ENDPOINT_EMBEDDINGS:
                *ret_method_ok = streq(method, "POST");
                break;
        case ENDPOINT_MODELS:
        case ENDPOINT_HEALTH:
        case ENDPOINT_METRICS:
                *ret_method_ok = streq(method, "GET") || streq(method, "HEAD");
                break;
        default:
                *ret_method_ok = true;
        }
        return e;
}

static const char *endpoint_allow(Endpoint e) {
        switch (e) {
        case ENDPOINT_CHAT:
        case ENDPOINT_COMPLETIONS:
        case ENDPOINT_EMBEDDINGS:
                return "POST, OPTIONS";
        default:
                return "GET, HEAD, OPTIONS";
        }
}

const char *request_header(Request *r, const char *name) {
        return MHD_lookup_connection_value(r->connection, MHD_HEADER_KIND, name);
}

const char *request_upstream_authorization(Request *r, const ProviderConfig *p) {
        if (p->api_key || r->manager->config->client_token_digests)
                return NULL;
        return request_header(r, MHD_HTTP_HEADER_AUTHORIZATION);
}

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
        GPtrArray *digests = r->manager->config->client_token_digests;
        const char *h, *token;
        g_autofree char *digest = NULL;
        bool ok = false;

        if (!digests)
                return true;
        if (r->endpoint == ENDPOINT_HEALTH || r->endpoint == ENDPOINT_PREFLIGHT)
                return true;
        h = request_header(r, MHD_HTTP_HEADER_AUTHORIZATION);
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

static void request_respond_unauthorized(Request *r) {
        struct MHD_Response *resp;
        char *json = json_error_body("authentication_error",
                                     "Missing or invalid bearer token: this router requires 'Authorization: Bearer TOKEN'.",
                                     NULL, "invalid_api_key");

        resp = MHD_create_response_from_buffer_with_free_callback(strlen(json), json, g_free);
        (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
        (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer realm=\"provider-router\"");
        r->error_type = "authentication_error";
        r->bytes_out = strlen(json);
        r->manager->stats->rejected++;
        request_respond(r, MHD_HTTP_UNAUTHORIZED, resp);
}

static Request *request_new(Manager *m, struct MHD_Connection *c, const char *method, const char *url) {
        Request *r = g_new0(Request, 1);
        const char *id;

        r->manager = m;
        r->connection = c;
        r->method = method;
        r->url = url;
        r->start = now_usec(CLOCK_MONOTONIC);
        r->ttfb = USEC_INFINITY;
        r->error_class = ERROR_CLASS_NONE;
        r->prompt_tokens = UINT64_MAX;
        r->reason = _ROUTE_REASON_MAX;

        /* A caller's own id is kept, so one id follows a request through several services. */
        id = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Request-Id");
        if (request_id_is_valid(id))
                g_strlcpy(r->request_id, id, sizeof(r->request_id));
        else
                manager_next_request_id(m, r->request_id, sizeof(r->request_id));

        manager_request_added(m, r);
        return r;
}

static void request_log_and_count(Request *r, enum MHD_RequestTerminationCode toe) {
        Manager *m = r->manager;
        usec_t duration = now_usec(CLOCK_MONOTONIC) - r->start;
        unsigned status = r->queued ? r->status : 499;
        int level;

        if (!r->queued && r->error_class == ERROR_CLASS_NONE)
                r->error_class = ERROR_CLASS_CLIENT_ABORT;
        if (r->queued && toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && r->error_class == ERROR_CLASS_NONE) {
                /* The client went away while the answer was on its way. */
                r->error_class = ERROR_CLASS_CLIENT_ABORT;
                if (!r->error_message)
                        r->error_message = g_strdup("client closed the connection");
        }

        if (r->pstats) {
                provider_stats_end(r->pstats, status, r->error_class, duration, r->ttfb,
                                   r->upstream_body ? r->upstream_body_size : r->body_size, r->bytes_out,
                                   r->prompt_tokens, r->completion_tokens);
        }

        /* Requests that never reached a provider (health checks, 404s) are not request-log material,
         * except client errors on the API, which an operator wants to see. */
        if (!r->provider && (r->endpoint == ENDPOINT_HEALTH || r->endpoint == ENDPOINT_METRICS ||
                             r->endpoint == ENDPOINT_PREFLIGHT))
                return;

        if (status >= 500 || r->error_class == ERROR_CLASS_STREAM)
                level = LOG_WARNING;
        else if (m->config->log_requests)
                level = LOG_INFO;
        else
                return;

        RequestLogEntry e = {
                .request_id = r->request_id,
                .method = r->method,
                .path = r->url,
                .provider = r->provider ? r->provider->name : NULL,
                .model = r->info.model,
                .route = route_reason_to_string(r->reason),
                .error_type = r->error_type,
                .error_message = r->error_message,
                .response_body = r->logged_body,
                .response_body_size = r->logged_body_size,
                .status = status,
                .stream = r->info.stream,
                .duration_usec = duration,
                .ttfb_usec = r->ttfb,
                .bytes_in = r->body_size,
                .bytes_out = r->bytes_out,
                .prompt_tokens = r->prompt_tokens,
                .completion_tokens = r->completion_tokens,
                .attempts = r->attempts,
                .tried = r->tried ? r->tried->str : NULL,
        };
        log_request(&e, level);
}

static Request *request_free(Request *r) {
        if (!r)
                return NULL;
        proxy_cancel(r);
        if (r->models)
                r->models = models_query_free(r->models);
        if (r->response)
                MHD_destroy_response(r->response);
        sd_event_source_disable_unref(r->hup);
        manager_request_removed(r->manager, r);
        chat_request_info_clear(&r->info);
        provider_config_unref(r->provider);
        provider_stats_unref(r->pstats);
        g_free(r->body);
        g_free(r->upstream_body);
        g_free(r->buf);
        g_free(r->error_message);
        g_free(r->logged_body);
        if (r->chain)
                g_ptr_array_unref(r->chain);
        if (r->upstream_headers)
                g_ptr_array_unref(r->upstream_headers);
        if (r->tried)
                g_string_free(r->tried, TRUE);
        g_free(r);
        return NULL;
}

void request_begin_provider(Request *r, ProviderConfig *p, RouteReason reason) {
        g_assert(!r->pstats);
        r->provider = provider_config_ref(p);
        r->reason = reason;
        r->pstats = provider_stats_ref(stats_get(r->manager->stats, p->name));
        provider_stats_begin(r->pstats, r->info.stream);
}

void request_set_error(Request *r, ErrorClass error_class, const char *type, const char *message) {
        r->error_class = error_class;
        r->error_type = type;
        g_free(r->error_message);
        r->error_message = g_strdup(message);
}

static void request_add_common_headers(Request *r, struct MHD_Response *resp) {
        const char *origin = r->manager->config->cors_allow_origin;

        (void) MHD_add_response_header(resp, "X-Request-Id", r->request_id);
        if (r->provider)
                (void) MHD_add_response_header(resp, "X-Provider", r->provider->name);
        if (r->tried)
                /* Who was tried before the one that answered, in order. */
                (void) MHD_add_response_header(resp, "X-Provider-Tried", r->tried->str);
        /* CORS headers matter to browsers only, and a browser always sends Origin. */
        if (origin && request_header(r, MHD_HTTP_HEADER_ORIGIN)) {
                (void) MHD_add_response_header(resp, "Access-Control-Allow-Origin", origin);
                (void) MHD_add_response_header(resp, "Access-Control-Expose-Headers", "X-Provider, X-Request-Id");
        }
        if (r->manager->stopping)
                (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
}

static enum MHD_Result request_queue(Request *r) {
        enum MHD_Result ret;

        g_assert(r->response);
        request_add_common_headers(r, r->response);
        ret = MHD_queue_response(r->connection, r->status, r->response);
        MHD_destroy_response(r->response);
        r->response = NULL;
        r->queued = true;
        return ret;
}

void request_wake(Request *r) {
        if (!r->suspended)
                return;
        r->suspended = false;
        MHD_resume_connection(r->connection);
        http_server_wake(r->manager->http);
}

void request_respond(Request *r, unsigned status, struct MHD_Response *response) {
        g_assert(!r->queued);
        if (r->response)
                MHD_destroy_response(r->response);
        r->response = response;
        r->status = status;
        /* Inside the access handler the caller queues it on return; otherwise MHD calls the
         * handler again once resumed. */
        request_wake(r);
}

void request_respond_json(Request *r, unsigned status, char *json, size_t size) {
        struct MHD_Response *resp;

        resp = MHD_create_response_from_buffer_with_free_callback(size, json, g_free);
        (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
        r->bytes_out = size;
        request_respond(r, status, resp);
}

void request_respond_error(Request *r, unsigned status, const char *type, const char *provider,
                           const char *format, ...) {
        g_autofree char *message = NULL;
        char *json;
        va_list ap;

        va_start(ap, format);
        message = g_strdup_vprintf(format, ap);
        va_end(ap);

        if (r->error_class == ERROR_CLASS_NONE && status >= 500)
                r->error_class = ERROR_CLASS_INTERNAL;
        if (!r->error_type)
                r->error_type = type;
        if (!r->error_message)
                r->error_message = g_strdup(message);

        json = json_error_body(type, message, provider, NULL);
        request_respond_json(r, status, json, strlen(json));
}

static void request_respond_preflight(Request *r) {
        struct MHD_Response *resp = MHD_create_response_from_buffer(0, (void *) "", MHD_RESPMEM_PERSISTENT);
        const char *origin = r->manager->config->cors_allow_origin;
        const char *want = request_header(r, "Access-Control-Request-Headers");

        if (origin) {
                (void) MHD_add_response_header(resp, "Access-Control-Allow-Methods", "GET, POST, OPTIONS");
                (void) MHD_add_response_header(resp, "Access-Control-Allow-Headers",
                                               want && strlen(want) < 1024 ? want
                                                    : "Authorization, Content-Type, X-Provider, X-Request-Id");
                (void) MHD_add_response_header(resp, "Access-Control-Max-Age", "86400");
        }
        (void) MHD_add_response_header(resp, "Allow", "GET, HEAD, POST, OPTIONS");
        request_respond(r, MHD_HTTP_NO_CONTENT, resp);
}

static int request_on_hup(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Request *r = userdata;

        (void) sd_event_source_set_enabled(s, SD_EVENT_OFF);
        if (r->queued && !r->suspended)
                return 0; /* MHD is writing to it and will see for itself */

        /* The client hung up while we waited for the provider: stop the provider's work now
         * rather than when it answers. */
        log_debug("%s: client closed the connection, aborting the upstream transfer", r->request_id);
        r->client_gone = true;
        proxy_cancel(r);
        if (r->models)
                r->models = models_query_free(r->models);
        if (r->error_class == ERROR_CLASS_NONE)
                request_set_error(r, ERROR_CLASS_CLIENT_ABORT, NULL, "client closed the connection");
        request_wake(r);
        return 0;
}

static void request_on_client_hangup_setup(Request *r) {
        const union MHD_ConnectionInfo *ci;
        int r_;

        if (r->hup)
                return;
        ci = MHD_get_connection_info(r->connection, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (!ci)
                return;
        r_ = sd_event_add_io(r->manager->event, &r->hup, ci->connect_fd, EPOLLRDHUP, request_on_hup, r);
        if (r_ < 0) {
                log_debug_errno(r_, "Failed to watch client connection, ignoring: %m");
                return;
        }
        (void) sd_event_source_set_description(r->hup, "client-hup");
}

/* Watching every parked connection for a hang-up costs two epoll_ctl() calls per request, for
 * requests that mostly finish within milliseconds. So only those still parked after
 * HUP_WATCH_DELAY get a watcher: a sweep, armed while anything is parked, attaches them. */
#define HUP_WATCH_DELAY (250 * USEC_PER_MSEC)

static int request_on_hup_sweep(sd_event_source *s, uint64_t usec, void *userdata) {
        Manager *m = userdata;
        bool pending = false;

        for (GList *l = m->requests; l; l = l->next) {
                Request *r = l->data;
                if (!r->suspended || r->hup)
                        continue;
                if (usec >= r->parked_at + HUP_WATCH_DELAY)
                        request_on_client_hangup_setup(r);
                else
                        pending = true;
        }
        if (pending) {
                (void) sd_event_source_set_time(s, usec + HUP_WATCH_DELAY);
                (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        }
        return 0;
}

static void request_arm_hup_sweep(Request *r) {
        Manager *m = r->manager;
        int enabled = SD_EVENT_OFF, k;

        if (m->hup_sweep) {
                (void) sd_event_source_get_enabled(m->hup_sweep, &enabled);
                if (enabled != SD_EVENT_OFF)
                        return;
                (void) sd_event_source_set_time(m->hup_sweep, r->parked_at + HUP_WATCH_DELAY);
                (void) sd_event_source_set_enabled(m->hup_sweep, SD_EVENT_ONESHOT);
                return;
        }
        k = sd_event_add_time(m->event, &m->hup_sweep, CLOCK_MONOTONIC, r->parked_at + HUP_WATCH_DELAY,
                              50 * USEC_PER_MSEC, request_on_hup_sweep, m);
        if (k < 0) {
                /* Without the sweep, watch this one right away. */
                request_on_client_hangup_setup(r);
                return;
        }
        (void) sd_event_source_set_description(m->hup_sweep, "client-hup-sweep");
}

void request_suspend(Request *r) {
        if (r->suspended)
                return;
        r->suspended = true;
        MHD_suspend_connection(r->connection);
        if (!r->hup) {
                r->parked_at = now_usec(CLOCK_MONOTONIC);
                request_arm_hup_sweep(r);
        }
}

static void request_body_append(Request *r, const char *data, size_t size) {
        uint64_t max = r->manager->config->max_body_size;

        if (r->body_too_large)
                return;
        if (r->body_size + size > max) {
                r->body_too_large = true;
                g_clear_pointer(&r->body, g_free);
                return;
        }
        if (r->body_size + size + 1 > r->body_alloc) {
                size_t want = MAX(r->body_alloc * 2, r->body_size + size + 1);
                r->body_alloc = MIN(want, (size_t) max + 1);
                r->body = g_realloc(r->body, r->body_alloc);
        }
        memcpy(r->body + r->body_size, data, size);
        r->body_size += size;
        r->body[r->body_size] = 0;
}

static bool request_check_content_length(Request *r) {
        const char *cl = request_header(r, MHD_HTTP_HEADER_CONTENT_LENGTH);
        uint64_t n;
        char *end;

        if (!cl)
                return true;
        errno = 0;
        n = g_ascii_strtoull(cl, &end, 10);
        if (errno != 0 || *end != 0)
                return true; /* MHD rejects malformed lengths itself */
        if (n > r->manager->config->max_body_size)
                return false;
        /* Allocate once: the whole body will come. */
        if (n > 0) {
                r->body_alloc = (size_t) n + 1;
                r->body = g_malloc(r->body_alloc);
        }
        return true;
}

static void request_dispatch(Request *r) {
        switch (r->endpoint) {
        case ENDPOINT_CHAT:
        case ENDPOINT_COMPLETIONS:
        case ENDPOINT_EMBEDDINGS:
                if (r->body_too_large) {
                        request_respond_error(r, MHD_HTTP_CONTENT_TOO_LARGE, "invalid_request_error", NULL,
                                              "Request body is larger than the limit of %" PRIu64 " bytes.",
                                              r->manager->config->max_body_size);
                        return;
                }
                proxy_dispatch(r);
                return;
        case ENDPOINT_MODELS:
                models_dispatch(r);
                return;
        case ENDPOINT_HEALTH:
                api_health(r);
                return;
        case ENDPOINT_METRICS:
                api_metrics(r);
                return;
        case ENDPOINT_PREFLIGHT:
                request_respond_preflight(r);
                return;
        case ENDPOINT_METHOD_NOT_ALLOWED: {
                struct MHD_Response *resp;
                bool method_ok;
                /* r->endpoint is ENDPOINT_METHOD_NOT_ALLOWED here: ask the path what it allows. */
                Endpoint e = endpoint_from_request(r->method, r->url, &method_ok);
                char *json = json_error_body("invalid_request_error", "Method not allowed for this path.", NULL, NULL);
                resp = MHD_create_response_from_buffer_with_free_callback(strlen(json), json, g_free);
                (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
                (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, endpoint_allow(e));
                request_respond(r, MHD_HTTP_METHOD_NOT_ALLOWED, resp);
                return;
        }
        case ENDPOINT_NOT_FOUND:
        default:
                request_respond_error(r, MHD_HTTP_NOT_FOUND, "invalid_request_error", NULL,
                                      "Unknown path '%s'. This router serves POST /v1/chat/completions, "
                                      "GET /v1/models and GET /health.", r->url);
                return;
        }
}

enum MHD_Result request_access_handler(void *cls, struct MHD_Connection *connection, const char *url,
                                       const char *method, const char *version, const char *upload_data,
                                       size_t *upload_data_size, void **con_cls) {
        Manager *m = cls;
        Request *r = *con_cls;

        if (!r) {
                bool method_ok = true;

                r = request_new(m, connection, method, url);
                *con_cls = r;
                m->stats->http_requests++;

                if (streq(method, "OPTIONS"))
                        r->endpoint = ENDPOINT_PREFLIGHT;
                else
                        r->endpoint = endpoint_from_request(method, url, &method_ok);

                if (!request_authorized(r)) {
                        r->dispatched = true;
                        request_respond_unauthorized(r);
                } else if (!method_ok) {
                        Endpoint e = r->endpoint;
                        r->endpoint = ENDPOINT_METHOD_NOT_ALLOWED;
                        request_dispatch(r);
                        r->endpoint = e;
                } else if ((r->endpoint == ENDPOINT_CHAT || r->endpoint == ENDPOINT_COMPLETIONS ||
                            r->endpoint == ENDPOINT_EMBEDDINGS) && !request_check_content_length(r)) {
                        /* Refuse before reading a byte of it. */
                        r->body_too_large = true;
                        r->dispatched = true;
                        request_dispatch(r);
                }
                if (r->response)
                        return request_queue(r);
                return MHD_YES;
        }

        if (r->client_gone)
                return MHD_NO;

        if (*upload_data_size > 0) {
                r->body_received += *upload_data_size;
                request_body_append(r, upload_data, *upload_data_size);
                *upload_data_size = 0;
                /* Past the limit the rest is read and dropped, and the 413 goes out at the end:
                 * libmicrohttpd 0.9 refuses a response queued while the upload is still coming
                 * (MHD_queue_response() fails and the client sees a reset, not a 413). Dropping
                 * is bounded too: a client that keeps sending far past the limit is cut off. */
                if (r->body_too_large && r->body_received > 4 * r->manager->config->max_body_size + 1024 * 1024) {
                        request_set_error(r, ERROR_CLASS_NONE, "invalid_request_error",
                                          "request body far larger than MaxBodySize=, connection closed");
                        return MHD_NO;
                }
                return MHD_YES;
        }

        if (!r->dispatched) {
                r->dispatched = true;
                request_dispatch(r);
        }

        if (!r->response && r->stream_pending)
                proxy_respond_pending(r);
        if (r->response)
                return request_queue(r);
        if (r->queued)
                return MHD_YES;

        /* Waiting for a provider: park the connection until the answer is ready. */
        request_suspend(r);
        return MHD_YES;
}

void request_completed(void *cls, struct MHD_Connection *connection, void **con_cls,
                       enum MHD_RequestTerminationCode toe) {
        Request *r = *con_cls;

        if (!r)
                return;
        *con_cls = NULL;
        proxy_cancel(r);
        request_log_and_count(r, toe);
        request_free(r);
}
