/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>
#include <stdio.h>

#include "log.h"
#include "upstream.h"

struct Upstream {
        CurlSlot slot;
        CurlGlue *glue;
        sd_event *event;
        CurlHandle *handle;
        CURL *easy;                   /* handle->easy */
        bool clean;                   /* ended complete with CURLE_OK: the handle may keep its set-up */
        struct curl_slist *headers;   /* one block, see upstream_headers_new() */
        size_t headers_size;
        const UpstreamOps *ops;
        void *userdata;

        long status;
        bool headers_done;
        bool running;
        bool paused;
        bool stream;
        bool in_callback;
        GPtrArray *response_headers;  /* name, value, name, value, …, NULL; made when needed */
        char *content_type;
        char *retry_after;
        char *request_id;             /* the provider's x-request-id */

        sd_event_source *timer;
        usec_t started;
        usec_t first_byte;
        usec_t last_activity;
        usec_t connect_timeout;
        usec_t first_byte_timeout;
        usec_t total_timeout;
        usec_t idle_timeout;
        UpstreamError timeout_error;  /* set when our timer stopped the transfer */
        CURLcode resume_error;        /* on_data refused what a resume delivered */
        char error_buf[CURL_ERROR_SIZE];
};

bool upstream_error_is_timeout(UpstreamError e) {
        return e == UPSTREAM_ERROR_CONNECT_TIMEOUT || e == UPSTREAM_ERROR_FIRST_BYTE_TIMEOUT ||
               e == UPSTREAM_ERROR_TIMEOUT || e == UPSTREAM_ERROR_IDLE_TIMEOUT;
}

/* A header name and its length, for lists that are searched for every header of every request. */
typedef struct HeaderName {
        const char *name;
        size_t len;
} HeaderName;

#define HEADER_NAME(s) { s, STRLEN(s) }

static bool name_in(const char *name, size_t n, const HeaderName *list, size_t n_list) {
        for (size_t i = 0; i < n_list; i++)
                if (list[i].len == n && g_ascii_strncasecmp(name, list[i].name, n) == 0)
                        return true;
        return false;
}

static bool name_is(const char *name, size_t n, const char *lower) {
        return strlen(lower) == n && g_ascii_strncasecmp(name, lower, n) == 0;
}

/* Hop-by-hop headers and those the router sets itself are not passed on. */
static bool header_is_passed(const char *name, size_t n) {
        static const HeaderName skip[] = {
                HEADER_NAME("connection"), HEADER_NAME("keep-alive"), HEADER_NAME("transfer-encoding"),
                HEADER_NAME("content-length"), HEADER_NAME("te"), HEADER_NAME("trailer"), HEADER_NAME("upgrade"),
                HEADER_NAME("proxy-authenticate"), HEADER_NAME("proxy-connection"), HEADER_NAME("date"),
                HEADER_NAME("server"), HEADER_NAME("x-provider"), HEADER_NAME("x-request-id"),
                HEADER_NAME("content-encoding"), HEADER_NAME("access-control-allow-origin"),
                HEADER_NAME("access-control-expose-headers"), HEADER_NAME("access-control-allow-credentials"),
                HEADER_NAME("alt-svc"),
        };
        return !name_in(name, n, skip, ELEMENTSOF(skip));
}

bool upstream_header_is_forwarded(const char *name, size_t n) {
        static const HeaderName skip[] = {
                /* hop-by-hop */
                HEADER_NAME("connection"), HEADER_NAME("keep-alive"), HEADER_NAME("proxy-connection"),
                HEADER_NAME("te"), HEADER_NAME("trailer"), HEADER_NAME("transfer-encoding"), HEADER_NAME("upgrade"),
                HEADER_NAME("proxy-authorization"), HEADER_NAME("proxy-authenticate"),
                /* libcurl's: the target, the body's framing, the encodings it decodes */
                HEADER_NAME("host"), HEADER_NAME("content-length"), HEADER_NAME("expect"),
                HEADER_NAME("accept-encoding"),
                /* the router's own */
                HEADER_NAME("x-provider"), HEADER_NAME("x-compare"), HEADER_NAME("x-request-id"),
                HEADER_NAME("authorization"),
        };

        /* Most headers are none of these: their lengths rule them out at once. */
        if (n < 2 || n > STRLEN("proxy-authorization"))
                return true;
        return !name_in(name, n, skip, ELEMENTSOF(skip));
}

/* Is name one of the comma-separated tokens of a Connection: value? */
static bool connection_names(const char *value, const char *name, size_t n) {
        for (const char *p = value; *p;) {
                const char *start, *end;

                while (*p == ' ' || *p == '\t' || *p == ',')
                        p++;
                start = p;
                while (*p && *p != ',')
                        p++;
                end = p;
                while (end > start && (end[-1] == ' ' || end[-1] == '\t'))
                        end--;
                if ((size_t) (end - start) == n && g_ascii_strncasecmp(start, name, n) == 0)
                        return true;
        }
        return false;
}

typedef struct HeaderBuild {
        const UpstreamRequest *req;
        /* counted first */
        size_t n_lines;
        size_t n_bytes;
        const char **connection;     /* values of the client's Connection: headers */
        size_t n_connection;
        size_t connection_alloc;
        const char *connection_buf[4];
        /* then written */
        struct curl_slist *nodes;
        size_t n_nodes;
        char *strings, *strings_end;
        bool have_user_agent, have_accept, have_content_type;
} HeaderBuild;

static bool header_count(const char *name, const char *value, void *userdata) {
        HeaderBuild *b = userdata;
        size_t n = strlen(name);

        if (name_is(name, n, "connection")) {
                if (b->n_connection == b->connection_alloc) {
                        b->connection_alloc *= 2;
                        if (b->connection == b->connection_buf)
                                b->connection = g_memdup2(b->connection_buf, sizeof(b->connection_buf));
                        b->connection = g_renew(const char *, b->connection, b->connection_alloc);
                }
                b->connection[b->n_connection++] = value;
                return true;
        }
        if (!upstream_header_is_forwarded(name, n))
                return true;
        b->n_lines++;
        b->n_bytes += n + STRLEN(": ") + strlen(value) + 1;
        return true;
}

static void header_add(HeaderBuild *b, const char *name, size_t n, const char *sep, const char *value) {
        size_t s = strlen(sep), v = strlen(value);
        struct curl_slist *node = &b->nodes[b->n_nodes];
        char *p = b->strings;

        g_assert(b->strings + n + s + v + 1 <= b->strings_end);
        memcpy(p, name, n);
        memcpy(p + n, sep, s);
        memcpy(p + n + s, value, v);
        p[n + s + v] = 0;
        b->strings += n + s + v + 1;

        *node = (struct curl_slist) { .data = p };
        if (b->n_nodes > 0)
                b->nodes[b->n_nodes - 1].next = node;
        b->n_nodes++;
}

static bool header_write(const char *name, const char *value, void *userdata) {
        HeaderBuild *b = userdata;
        size_t n = strlen(name);

        if (!upstream_header_is_forwarded(name, n))
                return true;
        for (size_t i = 0; i < b->n_connection; i++)
                if (connection_names(b->connection[i], name, n))
                        return true;

        if (name_is(name, n, "user-agent"))
                b->have_user_agent = true;
        else if (name_is(name, n, "accept"))
                b->have_accept = true;
        else if (name_is(name, n, "content-type"))
                b->have_content_type = true;
        /* "Name;" is how libcurl is told to send a header with an empty value. */
        header_add(b, name, n, *value ? ": " : ";", value);
        return true;
}

/* The router's own lines, besides the client's: at most this many. */
#define ROUTER_LINES 6
#define ROUTER_USER_AGENT "provider-router/" PACKAGE_VERSION

struct curl_slist *upstream_headers_new(const UpstreamRequest *req, size_t *ret_size) {
        HeaderBuild b = { .req = req, .connection_alloc = ELEMENTSOF(b.connection_buf) };
        size_t size, router_bytes = 0;
        char *block;

        b.connection = b.connection_buf;
        if (req->client_headers)
                req->client_headers(req->client, header_count, &b);

        router_bytes += STRLEN("Expect:") + 1;
        router_bytes += STRLEN("Content-Type: application/json") + 1;
        router_bytes += STRLEN("Accept: text/event-stream") + 1;
        router_bytes += STRLEN("User-Agent: " ROUTER_USER_AGENT) + 1;
        if (req->api_key)
                router_bytes += STRLEN("Authorization: Bearer ") + strlen(req->api_key) + 1;
        else if (req->authorization)
                router_bytes += STRLEN("Authorization: ") + strlen(req->authorization) + 1;
        if (req->request_id)
                router_bytes += STRLEN("X-Request-Id: ") + strlen(req->request_id) + 1;

        /* One block: the nodes first (so the list starts the block), then their strings. */
        size = (b.n_lines + ROUTER_LINES) * sizeof(struct curl_slist) + b.n_bytes + router_bytes;
        block = g_malloc(size);
        b.nodes = (struct curl_slist *) block;
        b.strings = block + (b.n_lines + ROUTER_LINES) * sizeof(struct curl_slist);
        b.strings_end = block + size;

        if (req->client_headers)
                req->client_headers(req->client, header_write, &b);
        if (b.connection != b.connection_buf)
                g_free(b.connection);

        /* Never wait for "100 Continue": it costs a round trip. libcurl asks for it only for
         * bodies of 1 MiB and more, so only those need the header removed. */
        if (req->post && req->body_size >= 1024 * 1024)
                header_add(&b, "Expect", STRLEN("Expect"), ":", "");
        if (req->post && !b.have_content_type)
                header_add(&b, "Content-Type", STRLEN("Content-Type"), ": ", "application/json");
        if (!b.have_accept)
                header_add(&b, "Accept", STRLEN("Accept"), ": ", req->stream ? "text/event-stream" : "application/json");
        if (!b.have_user_agent)
                header_add(&b, "User-Agent", STRLEN("User-Agent"), ": ", ROUTER_USER_AGENT);
        if (req->api_key) {
                header_add(&b, "Authorization", STRLEN("Authorization"), ": Bearer ", req->api_key);
        } else if (req->authorization)
                header_add(&b, "Authorization", STRLEN("Authorization"), ": ", req->authorization);
        if (req->request_id)
                header_add(&b, "X-Request-Id", STRLEN("X-Request-Id"), ": ", req->request_id);

        g_assert(b.n_nodes > 0); /* Accept, if nothing else */
        *ret_size = size;
        return b.nodes;
}

void upstream_headers_free(struct curl_slist *l, size_t size) {
        if (!l)
                return;
        /* Keys and whatever else a client sent (cookies, keys of its own) go with it. */
        explicit_bzero(l, size);
        g_free(l);
}

char *upstream_escape_path(const char *path) {
        g_autoptr(GString) s = NULL;
        size_t n;

        if (!path || path[0] != '/')
                return NULL;
        n = strlen(path);
        if (n > 1 && path[n - 1] == '/')
                n--;
        if (n > 2048)
                return NULL;

        s = g_string_sized_new(n + 16);
        for (size_t i = 0; i < n;) {
                size_t j = i + 1;

                while (j < n && path[j] != '/')
                        j++;
                /* path[i] is '/', the segment is path[i + 1 .. j) */
                if (j == i + 1 || (j == i + 2 && path[i + 1] == '.') ||
                    (j == i + 3 && path[i + 1] == '.' && path[i + 2] == '.'))
                        return NULL;
                g_string_append_c(s, '/');
                for (size_t k = i + 1; k < j; k++) {
                        unsigned char c = (unsigned char) path[k];
                        if (g_ascii_isalnum(c) || strchr("-._~:@", c))
                                g_string_append_c(s, (char) c);
                        else
                                g_string_append_printf(s, "%%%02X", c);
                }
                i = j;
        }
        return g_string_free(g_steal_pointer(&s), FALSE);
}

/* Deadlines are seconds long: a coarse accuracy lets sd-event wake once for many of them. */
#define UPSTREAM_TIMER_ACCURACY (50 * USEC_PER_MSEC)

static usec_t upstream_deadline(Upstream *u) {
        if (u->first_byte == USEC_INFINITY) {
                usec_t d = u->started + u->first_byte_timeout;
                if (!u->stream && u->total_timeout > 0)
                        d = MIN(d, u->started + u->total_timeout);
                return d;
        }
        if (u->stream)
                return u->idle_timeout > 0 ? u->last_activity + u->idle_timeout : USEC_INFINITY;
        return u->total_timeout > 0 ? u->started + u->total_timeout : USEC_INFINITY;
}

static void upstream_finish(Upstream *u, UpstreamError error, const char *message) {
        u->running = false;
        (void) sd_event_source_set_enabled(u->timer, SD_EVENT_OFF);
        u->ops->on_done(u, error, message, u->userdata);
}

static int upstream_on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Upstream *u = userdata;
        usec_t now = now_usec(CLOCK_MONOTONIC), deadline;
        char message[128];

        if (u->resume_error != CURLE_OK) {
                curl_glue_remove(u->glue, u->easy);
                upstream_finish(u, u->resume_error == CURLE_WRITE_ERROR ? UPSTREAM_ERROR_ABORTED : UPSTREAM_ERROR_OTHER,
                                curl_easy_strerror(u->resume_error));
                return 0;
        }
        if (u->paused) {
                /* The client is slow, not the provider: silence while paused is ours. */
                u->last_activity = now;
        }
        deadline = upstream_deadline(u);
        if (now < deadline) {
                (void) sd_event_source_set_time(s, deadline);
                (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
                return 0;
        }

        if (u->first_byte == USEC_INFINITY) {
                if (!u->stream && u->total_timeout > 0 && u->total_timeout <= u->first_byte_timeout) {
                        u->timeout_error = UPSTREAM_ERROR_TIMEOUT;
                        (void) snprintf(message, sizeof(message), "no answer within %.1f s",
                                        (double) u->total_timeout / USEC_PER_SEC);
                } else {
                        u->timeout_error = UPSTREAM_ERROR_FIRST_BYTE_TIMEOUT;
                        (void) snprintf(message, sizeof(message), "no answer within %.1f s",
                                        (double) u->first_byte_timeout / USEC_PER_SEC);
                }
        } else if (u->stream) {
                u->timeout_error = UPSTREAM_ERROR_IDLE_TIMEOUT;
                (void) snprintf(message, sizeof(message), "stream silent for %.1f s",
                                (double) u->idle_timeout / USEC_PER_SEC);
        } else {
                u->timeout_error = UPSTREAM_ERROR_TIMEOUT;
                (void) snprintf(message, sizeof(message), "answer not complete within %.1f s",
                                (double) u->total_timeout / USEC_PER_SEC);
        }

        curl_glue_remove(u->glue, u->easy);
        upstream_finish(u, u->timeout_error, message);
        return 0;
}

static void upstream_done(CURL *easy, CURLcode code, void *userdata) {
        Upstream *u = userdata;
        UpstreamError e;
        const char *message;

        /* What a resume delivered was refused and dropped: the transfer did not succeed, even
         * if it ended before our timer could say so. */
        if (code == CURLE_OK && u->resume_error != CURLE_OK)
                code = u->resume_error;
        message = u->error_buf[0] ? u->error_buf : curl_easy_strerror(code);
        u->clean = code == CURLE_OK;

        switch (code) {
        case CURLE_OK:
                e = UPSTREAM_OK;
                message = NULL;
                break;
        case CURLE_COULDNT_CONNECT:
        case CURLE_COULDNT_RESOLVE_HOST:
        case CURLE_COULDNT_RESOLVE_PROXY:
        case CURLE_SSL_CONNECT_ERROR:
        case CURLE_PEER_FAILED_VERIFICATION:
        case CURLE_SSL_CACERT_BADFILE:
                e = UPSTREAM_ERROR_CONNECT;
                break;
        case CURLE_OPERATION_TIMEDOUT:
                e = u->status == 0 ? UPSTREAM_ERROR_CONNECT_TIMEOUT : UPSTREAM_ERROR_TIMEOUT;
                break;
        case CURLE_WRITE_ERROR:
                e = UPSTREAM_ERROR_ABORTED;
                break;
        case CURLE_GOT_NOTHING:
        case CURLE_SEND_ERROR:
        case CURLE_RECV_ERROR:
        case CURLE_PARTIAL_FILE:
        case CURLE_HTTP2:
        case CURLE_HTTP2_STREAM:
        case CURLE_WEIRD_SERVER_REPLY:
        case CURLE_BAD_CONTENT_ENCODING:
                /* Before any header arrived the provider never answered: that is a failed
                 * connection to the client, who saw nothing. */
                e = u->status == 0 ? UPSTREAM_ERROR_CONNECT : UPSTREAM_ERROR_BROKEN;
                break;
        default:
                e = u->status == 0 ? UPSTREAM_ERROR_CONNECT : UPSTREAM_ERROR_OTHER;
                break;
        }
        upstream_finish(u, e, message);
}

UpstreamHeadLine upstream_parse_head_line(const char *buffer, size_t n, long *ret_status, size_t *ret_name_len,
                                          const char **ret_value, size_t *ret_value_len) {
        const char *colon, *value, *end;

        if (n >= 5 && memcmp(buffer, "HTTP/", 5) == 0) {
                const char *p = memchr(buffer, ' ', n);
                long status = 0;

                /* Not strtol(): the line is not NUL-terminated, and digits may run to its end. */
                if (p)
                        for (p++; p < buffer + n && *p == ' '; p++)
                                ;
                for (; p && p < buffer + n && g_ascii_isdigit(*p) && status < 100000; p++)
                        status = status * 10 + (*p - '0');
                *ret_status = status;
                return UPSTREAM_HEAD_STATUS;
        }

        if (n > 0 && n <= 2 && (buffer[0] == '\r' || buffer[0] == '\n'))
                return UPSTREAM_HEAD_END;

        colon = memchr(buffer, ':', n);
        if (!colon)
                return UPSTREAM_HEAD_OTHER;
        value = colon + 1;
        end = buffer + n;
        while (value < end && (*value == ' ' || *value == '\t'))
                value++;
        while (end > value && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' '))
                end--;
        *ret_name_len = (size_t) (colon - buffer);
        *ret_value = value;
        *ret_value_len = (size_t) (end - value);
        return UPSTREAM_HEAD_FIELD;
}

/* The provider's request id goes to the client and the journal: printable, and short enough. */
#define PROVIDER_REQUEST_ID_MAX 200

static bool request_id_is_sane(const char *value, size_t n) {
        if (n == 0 || n > PROVIDER_REQUEST_ID_MAX)
                return false;
        for (size_t i = 0; i < n; i++)
                if ((unsigned char) value[i] < 0x20 || (unsigned char) value[i] >= 0x7f)
                        return false;
        return true;
}

static GPtrArray *upstream_response_headers(Upstream *u) {
        if (!u->response_headers)
                u->response_headers = g_ptr_array_new_with_free_func(g_free);
        return u->response_headers;
}

static size_t upstream_header_cb(char *buffer, size_t size, size_t nitems, void *userdata) {
        Upstream *u = userdata;
        size_t n = size * nitems, name_len, value_len;
        const char *value;
        long status;

        switch (upstream_parse_head_line(buffer, n, &status, &name_len, &value, &value_len)) {
        case UPSTREAM_HEAD_STATUS:
                /* A new status line: an interim 1xx answer may have come before. */
                u->status = status;
                if (u->response_headers && u->response_headers->len > 0)
                        g_ptr_array_set_size(u->response_headers, 0);
                g_clear_pointer(&u->content_type, g_free);
                g_clear_pointer(&u->retry_after, g_free);
                g_clear_pointer(&u->request_id, g_free);
                return n;
        case UPSTREAM_HEAD_END:
                if (u->status >= 200 && !u->headers_done) {
                        u->headers_done = true;
                        g_ptr_array_add(upstream_response_headers(u), NULL);
                        u->ops->on_response(u, u->userdata);
                }
                return n;
        case UPSTREAM_HEAD_OTHER:
                return n;
        case UPSTREAM_HEAD_FIELD:
                break;
        }

        if (name_len == STRLEN("content-type") && g_ascii_strncasecmp(buffer, "content-type", name_len) == 0) {
                g_free(u->content_type);
                u->content_type = g_strndup(value, value_len);
        } else if (name_len == STRLEN("retry-after") && g_ascii_strncasecmp(buffer, "retry-after", name_len) == 0) {
                g_free(u->retry_after);
                u->retry_after = g_strndup(value, value_len);
        } else if (name_is(buffer, name_len, "x-request-id") && request_id_is_sane(value, value_len)) {
                g_free(u->request_id);
                u->request_id = g_strndup(value, value_len);
        }

        if (header_is_passed(buffer, name_len)) {
                GPtrArray *h = upstream_response_headers(u);

                g_ptr_array_add(h, g_strndup(buffer, name_len));
                g_ptr_array_add(h, g_strndup(value, value_len));
        }
        return n;
}

static size_t upstream_write_cb(char *ptr, size_t size, size_t nmemb, void *userdata) {
        Upstream *u = userdata;
        size_t n = size * nmemb, r;
        usec_t now;

        if (n == 0)
                return 0;

        /* The first byte's time is measured (Server-Timing, the log); for the idle timeout
         * (seconds, 50 ms accuracy) the loop's time will do, which costs no clock read per
         * chunk of a stream. */
        if (u->first_byte == USEC_INFINITY && !u->stream)
                u->first_byte = now = now_usec(CLOCK_MONOTONIC);
        else if (sd_event_now(u->event, CLOCK_MONOTONIC, &now) < 0)
                now = now_usec(CLOCK_MONOTONIC);
        u->last_activity = MAX(now, u->last_activity);

        r = u->ops->on_data(u, ptr, n, u->userdata);
        if (r == CURL_WRITEFUNC_PAUSE)
                u->paused = true;
        return r;
}

/* Does the environment name a proxy for libcurl (or hosts to reach without one)? These are the
 * variables libcurl reads for http:// and https:// URLs. Read once: the environment of a running
 * daemon does not change, and libcurl would otherwise look them up for every transfer. Once per
 * process, whichever loop asks first. */
static bool environment_names_proxy(void) {
        static gsize answer = 0; /* 1: none named, 2: some */

        if (g_once_init_enter(&answer)) {
                static const char *const names[] = {
                        "http_proxy", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY",
                };
                bool found = false;

                for (size_t i = 0; i < ELEMENTSOF(names); i++)
                        if (getenv(names[i]))
                                found = true;
                g_once_init_leave(&answer, found ? 2 : 1);
        }
        return answer == 2;
}

/* How this provider is reached: whom to trust, what certificate to show, through which proxy. */
static void upstream_apply_provider(CURL *e, const ProviderConfig *pc) {
        if (!pc || !pc->proxy_set) {
                /* Proxy= unset means libcurl's environment; when that names none, saying so spares
                 * libcurl five getenv() calls per transfer. */
                if (!environment_names_proxy()) {
                        curl_easy_setopt(e, CURLOPT_PROXY, "");
                        curl_easy_setopt(e, CURLOPT_NOPROXY, "");
                }
        }
        if (!pc)
                return;
        if (pc->ca_file) {
                /* Instead of the system store, not besides it. */
                curl_easy_setopt(e, CURLOPT_CAINFO, pc->ca_file);
                curl_easy_setopt(e, CURLOPT_CAPATH, NULL);
        }
        if (pc->client_cert_blob) {
                struct curl_blob b = { pc->client_cert_blob, pc->client_cert_blob_size, CURL_BLOB_COPY };
                curl_easy_setopt(e, CURLOPT_SSLCERT_BLOB, &b);
        } else if (pc->client_cert_file)
                curl_easy_setopt(e, CURLOPT_SSLCERT, pc->client_cert_file);
        if (pc->client_key_blob) {
                struct curl_blob b = { pc->client_key_blob, pc->client_key_blob_size, CURL_BLOB_COPY };
                curl_easy_setopt(e, CURLOPT_SSLKEY_BLOB, &b);
        } else if (pc->client_key_file)
                curl_easy_setopt(e, CURLOPT_SSLKEY, pc->client_key_file);
        /* Unset leaves libcurl to the environment (https_proxy, no_proxy…); empty means none. */
        if (pc->proxy_set)
                curl_easy_setopt(e, CURLOPT_PROXY, pc->proxy ?: "");
}

/* The options that are the same for every transfer to this provider. */
static void upstream_setup_handle(CURL *e, const ProviderConfig *pc) {
        curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
        curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
        /* Through an egress proxy's tunnel, its "200 Connection established" and headers are not
         * the provider's answer: without this they would reach the header callback first. */
        curl_easy_setopt(e, CURLOPT_SUPPRESS_CONNECT_HEADERS, 1L);
        curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, upstream_header_cb);
        curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, upstream_write_cb);
        curl_easy_setopt(e, CURLOPT_TCP_NODELAY, 1L);
        /* Answers are a few kilobytes and streams' events far smaller: an 8K receive buffer per
         * transfer (curl's default is 16K) keeps thousands of them cheap; a large answer just
         * takes more reads. */
        curl_easy_setopt(e, CURLOPT_BUFFERSIZE, 8192L);
        curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
        /* libcurl offers every encoding it can decode and decodes: the router reads usage, SSE
         * boundaries and sizes from the plain bytes, and relays them plain (never the
         * provider's Content-Encoding or Content-Length, see header_is_passed()). */
        curl_easy_setopt(e, CURLOPT_ACCEPT_ENCODING, "");
        upstream_apply_provider(e, pc);
}

int upstream_start(CurlGlue *glue, sd_event *event, const UpstreamRequest *req, const UpstreamOps *ops,
                   void *userdata, Upstream **ret) {
        Upstream *u;
        CURL *e;
        int r;

        u = g_new0(Upstream, 1);
        u->glue = glue;
        u->event = event;
        u->ops = ops;
        u->userdata = userdata;
        u->stream = req->stream;
        u->first_byte = USEC_INFINITY;
        u->started = now_usec(CLOCK_MONOTONIC);
        u->last_activity = u->started;
        u->connect_timeout = req->connect_timeout;
        u->first_byte_timeout = req->first_byte_timeout;
        u->total_timeout = req->total_timeout;
        u->idle_timeout = req->idle_timeout;
        u->slot = (CurlSlot) { .done = upstream_done, .userdata = u };

        /* A handle this provider's transfers used before keeps the options that never change
         * for it; a fresh one gets them here. */
        u->handle = curl_glue_acquire(glue, req->provider);
        if (!u->handle) {
                upstream_free(u);
                return -ENOMEM;
        }
        e = u->easy = u->handle->easy;
        if (!u->handle->key) {
                upstream_setup_handle(e, req->provider);
                if (req->provider) {
                        u->handle->key = provider_config_ref((ProviderConfig *) req->provider);
                        u->handle->key_unref = provider_config_destroy;
                }
        }

        /* And what is this transfer's own. */
        r = curl_glue_set_url(u->handle, req->url);
        if (r < 0) {
                upstream_free(u);
                return r;
        }
        curl_easy_setopt(e, CURLOPT_ERRORBUFFER, u->error_buf);
        curl_easy_setopt(e, CURLOPT_HEADERDATA, u);
        curl_easy_setopt(e, CURLOPT_WRITEDATA, u);
        curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long) (req->connect_timeout / USEC_PER_MSEC));
        if (req->post) {
                curl_easy_setopt(e, CURLOPT_POST, 1L);
                curl_easy_setopt(e, CURLOPT_POSTFIELDS, req->body);
                curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) req->body_size);
        } else {
                curl_easy_setopt(e, CURLOPT_HTTPGET, 1L);
                if (req->head)
                        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
        }
        u->headers = upstream_headers_new(req, &u->headers_size);
        curl_easy_setopt(e, CURLOPT_HTTPHEADER, u->headers);

        r = sd_event_add_time(event, &u->timer, CLOCK_MONOTONIC, upstream_deadline(u), UPSTREAM_TIMER_ACCURACY,
                              upstream_on_timer, u);
        if (r < 0) {
                upstream_free(u);
                return r;
        }
        (void) sd_event_source_set_description(u->timer, "upstream-timer");

        r = curl_glue_add(glue, e, &u->slot);
        if (r < 0) {
                upstream_free(u);
                return r;
        }
        u->running = true;
        *ret = u;
        return 0;
}

Upstream *upstream_free(Upstream *u) {
        if (!u)
                return NULL;
        if (u->running)
                curl_glue_remove(u->glue, u->easy);
        /* Before the header list goes: the handle forgets it on release. */
        curl_glue_release(u->glue, u->handle, u->clean);
        upstream_headers_free(u->headers, u->headers_size);
        sd_event_source_disable_unref(u->timer);
        if (u->response_headers)
                g_ptr_array_unref(u->response_headers);
        g_free(u->content_type);
        g_free(u->retry_after);
        g_free(u->request_id);
        g_free(u);
        return NULL;
}

GPtrArray *upstream_steal_headers(Upstream *u) {
        GPtrArray *h = TAKE_PTR(u->response_headers);

        /* The transfer keeps none; a new head starts a new array. NULL-terminated, as ever. */
        if (!h) {
                h = g_ptr_array_new_with_free_func(g_free);
                g_ptr_array_add(h, NULL);
        } else if (!u->headers_done)
                g_ptr_array_add(h, NULL);
        return h;
}

long upstream_status(Upstream *u) {
        return u->status;
}

const char *upstream_content_type(Upstream *u) {
        return u->content_type;
}

const char *upstream_retry_after(Upstream *u) {
        return u->retry_after;
}

char *upstream_steal_request_id(Upstream *u) {
        return TAKE_PTR(u->request_id);
}

void upstream_mark_first_byte(Upstream *u) {
        if (u->first_byte != USEC_INFINITY)
                return;
        u->first_byte = now_usec(CLOCK_MONOTONIC);
        /* From now on the stream's idle timeout applies, which may end sooner than the
         * first-byte deadline the timer is armed for. */
        if (u->running)
                (void) sd_event_source_set_time(u->timer, upstream_deadline(u));
}

usec_t upstream_started(Upstream *u) {
        return u->started;
}

usec_t upstream_first_byte(Upstream *u) {
        return u->first_byte;
}

bool upstream_is_paused(Upstream *u) {
        return u->paused;
}

void upstream_resume(Upstream *u) {
        CURLcode code;

        if (!u->paused || !u->running)
                return;
        u->paused = false;
        u->last_activity = now_usec(CLOCK_MONOTONIC);
        /* May deliver held-back data to on_data right away. When on_data refuses it, curl drops
         * it and returns the error but keeps the transfer going, as if nothing had been lost:
         * end the transfer from the loop instead (our caller may still be using it). */
        code = curl_easy_pause(u->easy, CURLPAUSE_CONT);
        if (code != CURLE_OK && u->running && u->resume_error == CURLE_OK) {
                u->resume_error = code;
                (void) sd_event_source_set_time(u->timer, 0);
                (void) sd_event_source_set_enabled(u->timer, SD_EVENT_ONESHOT);
        }
}
