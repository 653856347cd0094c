/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "config.h"
#include "curl-glue.h"
#include "util.h"

typedef enum UpstreamError {
        UPSTREAM_OK,
        UPSTREAM_ERROR_CONNECT,        /* refused, unreachable, DNS, TLS */
        UPSTREAM_ERROR_CONNECT_TIMEOUT,
        UPSTREAM_ERROR_FIRST_BYTE_TIMEOUT,
        UPSTREAM_ERROR_TIMEOUT,        /* total time for an answer that is not streamed */
        UPSTREAM_ERROR_IDLE_TIMEOUT,   /* a stream went silent */
        UPSTREAM_ERROR_BROKEN,         /* the connection broke after the answer began */
        UPSTREAM_ERROR_ABORTED,        /* our own consumer stopped it */
        UPSTREAM_ERROR_OTHER,
        _UPSTREAM_ERROR_MAX,
} UpstreamError;

bool upstream_error_is_timeout(UpstreamError e);

typedef struct Upstream Upstream;

typedef struct UpstreamOps {
        /* The status line and headers are in; upstream_status() and upstream_header_*() work. */
        void (*on_response)(Upstream *u, void *userdata);
        /* Body bytes. Return size to take them, CURL_WRITEFUNC_PAUSE to have them offered again
         * after upstream_resume(), anything else to abort (on_done then reports ABORTED). */
        size_t (*on_data)(Upstream *u, const char *data, size_t size, void *userdata);
        /* The transfer is over; the Upstream may be freed from here. message is curl's or ours. */
        void (*on_done)(Upstream *u, UpstreamError error, const char *message, void *userdata);
} UpstreamOps;

/* A source of request headers (the client's): calls func for each, in order, until it returns
 * false. */
typedef bool (*UpstreamHeaderFunc)(const char *name, const char *value, void *userdata);
typedef void (*UpstreamHeaderForeach)(const void *source, UpstreamHeaderFunc func, void *userdata);

typedef struct UpstreamRequest {
        const char *url;
        bool post;
        bool head;                  /* HEAD: the answer's head only */
        const char *body;           /* borrowed: must live as long as the transfer */
        size_t body_size;
        const char *api_key;        /* sent as "Authorization: Bearer …" */
        const char *authorization;  /* passed through as is when api_key is NULL */
        const char *request_id;     /* sent as X-Request-Id */
        /* The client's request headers, passed on but for those upstream_header_is_forwarded()
         * refuses; the client's User-Agent, Accept and Content-Type replace the router's. */
        UpstreamHeaderForeach client_headers;
        const void *client;
        bool stream;                /* an answer that may take long: idle timeout after first byte */
        usec_t connect_timeout;
        usec_t first_byte_timeout;  /* until the first body byte */
        usec_t total_timeout;       /* for answers that are not streams */
        usec_t idle_timeout;        /* streams: longest silence after the first byte */
        const ProviderConfig *provider; /* its CAFile=, client certificate and Proxy=; may be NULL */
} UpstreamRequest;

int upstream_start(CurlGlue *glue, sd_event *event, const UpstreamRequest *req, const UpstreamOps *ops,
                   void *userdata, Upstream **ret);
/* May a client's request header with this name reach the provider? Not the hop-by-hop ones (RFC
 * 9110 §7.6.1: Connection, Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding,
 * Upgrade, Proxy-Authorization, Proxy-Authenticate), not Host, Content-Length, Expect or
 * Accept-Encoding (libcurl frames the body and negotiates the encoding it decodes), not the
 * router's own (X-Provider, X-Compare, X-Request-Id) and not Authorization (see
 * UpstreamRequest.authorization). Those the client names in Connection: are dropped as well. */
bool upstream_header_is_forwarded(const char *name, size_t n);
/* The header lines req sends (a curl_slist), every node and string in one block of *ret_size
 * bytes; freed, and wiped, with upstream_headers_free(). */
struct curl_slist *upstream_headers_new(const UpstreamRequest *req, size_t *ret_size);
void upstream_headers_free(struct curl_slist *l, size_t size);

/* A client's API path ("/responses", "/models/llama3:8b"), as it goes after a provider's BaseURL:
 * each segment percent-encoded but for letters, digits and "-._~:@" (the path as libmicrohttpd
 * hands it over is decoded). One trailing '/' is dropped. NULL for a path that does not start
 * with '/', is longer than 2048 bytes, or has an empty, "." or ".." segment, which would reach
 * outside the provider's API. */
char *upstream_escape_path(const char *path);

/* Aborts a running transfer (no callback) and frees. Not from inside on_data/on_response. */
Upstream *upstream_free(Upstream *u);

long upstream_status(Upstream *u);
const char *upstream_content_type(Upstream *u);
const char *upstream_retry_after(Upstream *u);
/* The provider's own x-request-id (printable, at most 200 bytes), or NULL; the caller frees. */
char *upstream_steal_request_id(Upstream *u);
/* Takes over the response headers worth passing to the client: alternating name, value,
 * NULL-terminated, in a GPtrArray; the transfer keeps none. */
GPtrArray *upstream_steal_headers(Upstream *u);
/* For streams the owner says when the answer has really begun (its first data event), which
 * ends the first-byte timeout; other transfers begin with their first body byte. */
void upstream_mark_first_byte(Upstream *u);
bool upstream_is_paused(Upstream *u);
/* CLOCK_MONOTONIC: when the transfer was started, and its first byte (USEC_INFINITY if none). */
usec_t upstream_started(Upstream *u);
usec_t upstream_first_byte(Upstream *u);

typedef enum UpstreamHeadLine {
        UPSTREAM_HEAD_STATUS,   /* "HTTP/1.1 200 OK" */
        UPSTREAM_HEAD_END,      /* the empty line after the fields */
        UPSTREAM_HEAD_FIELD,    /* "Name: value" */
        UPSTREAM_HEAD_OTHER,    /* anything else, ignored */
} UpstreamHeadLine;

/* One line of a provider's answer head as curl hands it over: line ending included, not
 * NUL-terminated. A status line gives its status; a field the length of its name (at the start
 * of buffer) and its value, trimmed. */
UpstreamHeadLine upstream_parse_head_line(const char *buffer, size_t n, long *ret_status, size_t *ret_name_len,
                                          const char **ret_value, size_t *ret_value_len);
void upstream_resume(Upstream *u);
