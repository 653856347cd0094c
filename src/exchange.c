/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include <microhttpd.h>

#include "exchange.h"
#include "log.h"

/* The buffer MHD keeps with a stream's answer (zeroed, so every byte of it is resident). For
 * HTTP/1.1 clients it goes unused: libmicrohttpd 0.9 has the reader fill its connection's write
 * buffer for each chunk. Only an HTTP/1.0 client's stream is read through it, in pieces this size. */
#define STREAM_BLOCK_SIZE 1024
/* A body announced larger than this is not allocated up front: it grows as it arrives. */
#define BODY_PREALLOC_MAX (64 * 1024)

struct ExchangeFront {
        sd_event *event;
        HttpServer *http;
        ExchangeStartFunc start;
        const ExchangeOps *ops;
        void *userdata;
        uint64_t max_body_size;
        size_t stream_buffer_size;
        Budget *budget;
        GList *exchanges;          /* Exchange* */
        unsigned n_exchanges;
        sd_event_source *hup_sweep;
        bool quiesced;
};

struct Exchange {
        ExchangeFront *front;
        struct MHD_Connection *connection;
        GList *link;               /* in front->exchanges */
        void *userdata;
        const char *method;        /* owned by MHD, valid for the request */
        const char *url;
        const char *version;
        usec_t start;

        /* the request body, bounded */
        char *body;
        size_t body_size;
        size_t body_alloc;
        uint64_t body_limit;
        uint64_t body_received;    /* including what was dropped past the limit */
        bool body_too_large;
        bool body_no_room;         /* the budget had no room for it */
        bool body_complete;
        uint64_t body_counted;     /* against the budget: announced length, or what was allocated */

        /* the answer */
        GString *headers;          /* "name\0value\0" … for the next answer */
        struct MHD_Response *response; /* made, waiting to be queued */
        unsigned status;
        bool queued;
        bool suspended;
        bool client_gone;
        bool peer_shut_write;      /* the client finished sending (it may still be reading) */
        bool hup_off;              /* the watcher was turned off while MHD was writing */
        bool close_after;          /* "Connection: close" on the answer */
        sd_event_source *hup;
        usec_t parked_at;          /* CLOCK_MONOTONIC, when last suspended without a watcher */

        /* a streamed answer */
        bool stream;
        bool stream_ended;
        bool stream_error;
        bool want_writable;
        bool stream_broken;        /* no memory for what was written: end it with an error */
        uint64_t answer_counted;   /* against the budget: the stream's buffer, a whole answer */
        char *buf;
        size_t buf_head;           /* bytes before it went out already */
        size_t buf_size;
        size_t buf_alloc;
        uint64_t bytes_out;
};

static usec_t front_now(const ExchangeFront *f) {
        uint64_t t;

        if (sd_event_now(f->event, CLOCK_MONOTONIC, &t) < 0)
                return now_usec(CLOCK_MONOTONIC);
        return t;
}

/* ---- request ----------------------------------------------------------------------------- */

const char *exchange_method(const Exchange *x) {
        return x->method;
}

const char *exchange_path(const Exchange *x) {
        return x->url;
}

const char *exchange_version(const Exchange *x) {
        return x->version;
}

const char *exchange_header(const Exchange *x, const char *name) {
        return MHD_lookup_connection_value(x->connection, MHD_HEADER_KIND, name);
}

typedef struct HeaderIter {
        bool (*func)(const char *name, const char *value, void *userdata);
        void *userdata;
} HeaderIter;

static enum MHD_Result header_iter(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
        HeaderIter *it = cls;
        return it->func(key, strempty(value), it->userdata) ? MHD_YES : MHD_NO;
}

void exchange_foreach_header(const Exchange *x, bool (*func)(const char *name, const char *value, void *userdata),
                             void *userdata) {
        HeaderIter it = { .func = func, .userdata = userdata };
        (void) MHD_get_connection_values(x->connection, MHD_HEADER_KIND, header_iter, &it);
}

typedef struct HeadFields {
        const char *keys[256];
        const char *values[256];
        size_t n;
        bool too_many;
} HeadFields;

static enum MHD_Result head_field(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
        HeadFields *f = cls;

        if (f->n >= ELEMENTSOF(f->keys)) {
                f->too_many = true;
                return MHD_NO;
        }
        f->keys[f->n] = key;
        f->values[f->n] = strempty(value);
        f->n++;
        return MHD_YES;
}

static enum MHD_Result count_value(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
        (*(size_t *) cls)++;
        return MHD_YES;
}

/* Whether [from, to) holds anything but the whitespace and terminators around a value. */
static bool cut_text_between(const char *from, const char *to) {
        for (const char *p = from; p < to; p++)
                if (*p != 0 && *p != ' ' && *p != '\t' && *p != '\r' && *p != '\n')
                        return true;
        return false;
}

/* libmicrohttpd 0.9.75 ends a header value (and the path) at a NUL byte and reports the length up
 * to it, so MHD_get_connection_values_n() cannot tell. What was cut off stays in its read buffer,
 * which holds the request's head in order: MHD_CONNECTION_INFO_REQUEST_HEADER_SIZE bytes from the
 * method on, each name and value pointing into it. So anything but whitespace between the end of a
 * value and the next name (or the end of the head) was cut off by a NUL. When the head is not laid
 * out like that (another libmicrohttpd), there is no verdict. */
bool exchange_headers_have_nul(const Exchange *x) {
        const union MHD_ConnectionInfo *ci;
        const char *start = x->method, *end;
        HeadFields f = {};
        size_t n_args = 0;

        ci = MHD_get_connection_info(x->connection, MHD_CONNECTION_INFO_REQUEST_HEADER_SIZE);
        if (!ci || !start || ci->header_size == 0)
                return false;
        end = start + ci->header_size;

        (void) MHD_get_connection_values(x->connection, MHD_HEADER_KIND, head_field, &f);
        if (f.too_many)
                return false;
        for (size_t i = 0; i < f.n; i++) {
                const char *from = f.values[i] + strlen(f.values[i]);
                const char *to = i + 1 < f.n ? f.keys[i + 1] : end;

                if (f.keys[i] < start || from > end || to < from || to > end)
                        return false;
                if (cut_text_between(from + 1, to))
                        return true;
        }

        /* The path: with no query its end is followed by the version only. (With a query, '?',
         * '&' and '=' became NULs as well, and "%00" is what is checked.) */
        (void) MHD_get_connection_values(x->connection, MHD_GET_ARGUMENT_KIND, count_value, &n_args);
        if (n_args == 0 && x->url && x->version && x->url > start && x->version < end && x->version > x->url) {
                const char *from = x->url + strlen(x->url);
                if (from < x->version && cut_text_between(from + 1, x->version))
                        return true;
        }
        return false;
}

usec_t exchange_start_time(const Exchange *x) {
        return x->start;
}

usec_t exchange_now(const Exchange *x) {
        return front_now(x->front);
}

const char *exchange_body(const Exchange *x, size_t *ret_size) {
        *ret_size = x->body_size;
        return x->body ?: "";
}

bool exchange_body_too_large(const Exchange *x) {
        return x->body_too_large;
}

bool exchange_body_no_room(const Exchange *x) {
        return x->body_no_room;
}

/* Forgets the body; the rest of it is read and dropped. */
static void exchange_drop_body(Exchange *x) {
        g_clear_pointer(&x->body, g_free);
        x->body_size = x->body_alloc = 0;
        budget_give(x->front->budget, x->body_counted);
        x->body_counted = 0;
}

void exchange_set_body_limit(Exchange *x, uint64_t limit) {
        const char *cl = exchange_header(x, MHD_HTTP_HEADER_CONTENT_LENGTH);
        uint64_t n;
        char *end;

        x->body_limit = limit;
        if (!cl)
                return;
        errno = 0;
        n = g_ascii_strtoull(cl, &end, 10);
        if (errno != 0 || *end != 0)
                return; /* MHD refuses malformed lengths itself */
        if (n > limit) {
                /* Refused before a byte of it is read. */
                x->body_too_large = true;
                return;
        }
        if (n == 0)
                return;
        /* What a client announces is counted before it arrives: 200 clients announcing 8 MiB
         * and sending slowly hold the budget, not 1.6 GB. */
        if (!budget_try_take(x->front->budget, n + 1 - x->body_counted)) {
                x->body_no_room = true;
                return;
        }
        x->body_counted = n + 1; /* and its NUL */
        /* Room for what was announced, up to a bound: a client announcing a large body gets
         * memory only as its bytes really arrive. */
        x->body_alloc = (size_t) MIN(n, (uint64_t) BODY_PREALLOC_MAX) + 1;
        x->body = g_try_malloc(x->body_alloc);
        if (!x->body)
                x->body_alloc = 0;
}

/* Grows the body's buffer to hold need bytes, counted against the budget; false when there is
 * no room or no memory. */
static bool exchange_body_grow(Exchange *x, size_t need) {
        Budget *b = x->front->budget;
        size_t want;
        char *p;

        if (need <= x->body_counted)
                /* The client is sending the body it announced, whose length the budget holds
                 * already: room for all of it now, rather than copying it again at every doubling
                 * (a 1 MB body was copied four times over). Only the first BODY_PREALLOC_MAX bytes
                 * come before the client has shown it really sends. */
                want = (size_t) x->body_counted;
        else {
                want = MAX((size_t) MIN((uint64_t) MAX(x->body_alloc * 2, need), x->body_limit + 1), need);
                x->body_counted = budget_take_growth(b, x->body_counted, need, want) ?: x->body_counted;
                if (x->body_counted < need)
                        return false;
                want = (size_t) x->body_counted;
        }
        p = g_try_realloc(x->body, want);
        if (!p)
                return false;
        x->body = p;
        x->body_alloc = want;
        return true;
}

static void exchange_body_append(Exchange *x, const char *data, size_t size) {
        if (x->body_too_large || x->body_no_room)
                return;
        if (x->body_size + size > x->body_limit) {
                x->body_too_large = true;
                exchange_drop_body(x);
                return;
        }
        if (x->body_size + size + 1 > x->body_alloc && !exchange_body_grow(x, x->body_size + size + 1)) {
                log_debug("No room for the body of %s '%s' (%" PRIu64 " bytes buffered of MaxBufferedSize=%" PRIu64 ")",
                          x->method, x->url, budget_used(x->front->budget), budget_limit(x->front->budget));
                x->body_no_room = true;
                exchange_drop_body(x);
                return;
        }
        memcpy(x->body + x->body_size, data, size);
        x->body_size += size;
        x->body[x->body_size] = 0;
}

/* ---- parking and hang-ups ---------------------------------------------------------------- */

static void exchange_wake(Exchange *x) {
        if (!x->suspended)
                return;
        x->suspended = false;
        MHD_resume_connection(x->connection);
        http_server_wake(x->front->http);
}

static void exchange_client_left(Exchange *x) {
        if (x->client_gone)
                return;
        log_debug("Client of %s '%s' closed the connection.", x->method, x->url);
        x->client_gone = true;
        x->hup = sd_event_source_disable_unref(x->hup);
        x->front->ops->hangup(x, x->userdata);
        /* MHD closes it when it next looks at it. */
        exchange_wake(x);
}

/* The client sent FIN. That is either a client that left, or one that only finished sending
 * (shutdown(SHUT_WR), as 'nc -N' does) and waits for its answer: they look the same until
 * something is written. So something harmless is written, and a client that left answers it
 * with a reset, which is noticed at once: before the answer began, an interim "100 Continue"
 * (HTTP/1.1 clients must skip unexpected 1xx answers); in a stream, whose next event may be long
 * in coming, an SSE comment between two whole events (every event-stream reader skips it). A
 * whole answer being written needs nothing: its own bytes do the same. */
static void exchange_on_peer_shut_write(Exchange *x, int fd) {
        static const char interim[] = "HTTP/1.1 100 Continue\r\n\r\n";
        static const char comment[] = ":\n\n";

        x->peer_shut_write = true;
        /* From now on only a reset or an error is news. */
        (void) sd_event_source_set_io_events(x->hup, 0);
        if (!x->queued && streq(strempty(x->version), MHD_HTTP_VERSION_1_1))
                (void) send(fd, interim, STRLEN(interim), MSG_NOSIGNAL | MSG_DONTWAIT);
        else if (x->queued && x->stream && !x->stream_ended)
                exchange_stream_write(x, comment, STRLEN(comment));
}

static int exchange_on_hup(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        Exchange *x = userdata;

        if (revents & (EPOLLHUP | EPOLLERR)) {
                if (x->queued && !x->suspended) {
                        /* MHD is writing to it and will see for itself. */
                        (void) sd_event_source_set_enabled(s, SD_EVENT_OFF);
                        x->hup_off = true;
                        return 0;
                }
                exchange_client_left(x);
                return 0;
        }
        if ((revents & EPOLLRDHUP) && !x->peer_shut_write)
                exchange_on_peer_shut_write(x, fd);
        return 0;
}

static void exchange_watch_hangup(Exchange *x) {
        const union MHD_ConnectionInfo *ci;
        int r;

        if (x->hup)
                return;
        ci = MHD_get_connection_info(x->connection, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (!ci)
                return;
        r = sd_event_add_io(x->front->event, &x->hup, ci->connect_fd, x->peer_shut_write ? 0 : EPOLLRDHUP,
                            exchange_on_hup, x);
        if (r < 0) {
                log_debug_errno(r, "Failed to watch a client connection, ignoring: %m");
                return;
        }
        (void) sd_event_source_set_description(x->hup, "client-hup");
}

/* Watching every parked connection for a hang-up costs two epoll_ctl() calls per request, for
 * requests that mostly finish within milliseconds. So only those still parked after
 * HUP_WATCH_DELAY get a watcher: a sweep, armed while anything is parked, attaches them. */
#define HUP_WATCH_DELAY (250 * USEC_PER_MSEC)

static int front_on_hup_sweep(sd_event_source *s, uint64_t usec, void *userdata) {
        ExchangeFront *f = userdata;
        usec_t now = front_now(f), next = USEC_INFINITY;

        /* Against the loop's time, not the time the sweep was due: a stream whose events come
         * in step with the sweep (every 500 ms) re-parks just after each due time, and would
         * never be watched. The next sweep is due when the next parked one has waited enough. */
        for (GList *l = f->exchanges; l; l = l->next) {
                Exchange *x = l->data;
                if (!x->suspended || x->hup)
                        continue;
                if (now >= x->parked_at + HUP_WATCH_DELAY)
                        exchange_watch_hangup(x);
                else
                        next = MIN(next, x->parked_at + HUP_WATCH_DELAY);
        }
        if (next != USEC_INFINITY) {
                (void) sd_event_source_set_time(s, next);
                (void) sd_event_source_set_enabled(s, SD_EVENT_ONESHOT);
        }
        return 0;
}

static void front_arm_hup_sweep(ExchangeFront *f, usec_t parked_at) {
        int enabled = SD_EVENT_OFF;

        (void) sd_event_source_get_enabled(f->hup_sweep, &enabled);
        if (enabled != SD_EVENT_OFF)
                return;
        (void) sd_event_source_set_time(f->hup_sweep, parked_at + HUP_WATCH_DELAY);
        (void) sd_event_source_set_enabled(f->hup_sweep, SD_EVENT_ONESHOT);
}

static void exchange_suspend(Exchange *x) {
        if (x->suspended)
                return;
        x->suspended = true;
        MHD_suspend_connection(x->connection);
        if (x->hup_off) {
                x->hup_off = false;
                (void) sd_event_source_set_enabled(x->hup, SD_EVENT_ON);
        }
        if (!x->hup) {
                x->parked_at = front_now(x->front);
                front_arm_hup_sweep(x->front, x->parked_at);
        }
}

/* ---- answers ----------------------------------------------------------------------------- */

void exchange_close_after(Exchange *x) {
        x->close_after = true;
}

void exchange_add_header(Exchange *x, const char *name, const char *value) {
        if (!x->headers)
                x->headers = g_string_sized_new(256);
        g_string_append_len(x->headers, name, (gssize) strlen(name) + 1);
        g_string_append_len(x->headers, value, (gssize) strlen(value) + 1);
}

static void exchange_apply_headers(Exchange *x, struct MHD_Response *resp) {
        if (x->headers) {
                const char *p = x->headers->str, *end = p + x->headers->len;
                while (p < end) {
                        const char *name = p, *value = p + strlen(p) + 1;
                        (void) MHD_add_response_header(resp, name, value);
                        p = value + strlen(value) + 1;
                }
                g_string_free(g_steal_pointer(&x->headers), TRUE);
        }
        if (x->front->quiesced || x->close_after)
                (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
}

static void exchange_set_response(Exchange *x, unsigned status, struct MHD_Response *resp) {
        g_assert(!x->queued);
        if (x->response)
                MHD_destroy_response(x->response);
        exchange_apply_headers(x, resp);
        x->response = resp;
        x->status = status;
        /* Inside the access handler the answer is queued on return; otherwise MHD calls the
         * handler again once resumed. */
        exchange_wake(x);
}

void exchange_respond(Exchange *x, unsigned status, char *body, size_t size) {
        struct MHD_Response *resp;

        if (x->client_gone) {
                g_free(body);
                return;
        }
        resp = MHD_create_response_from_buffer_with_free_callback(size, size > 0 ? body : (char *) "",
                                                                 size > 0 ? g_free : NULL);
        if (size == 0)
                g_free(body);
        /* Held until it went out, whatever the budget says: it is accepted work. */
        budget_take(x->front->budget, size);
        x->answer_counted += size;
        x->bytes_out = size;
        exchange_set_response(x, status, resp);
}

static ssize_t exchange_stream_reader(void *cls, uint64_t pos, char *out, size_t max) {
        Exchange *x = cls;
        size_t avail, n;

        if (x->client_gone)
                return MHD_CONTENT_READER_END_WITH_ERROR;

        avail = x->buf_size - x->buf_head;
        if (avail == 0) {
                if (x->stream_broken)
                        return MHD_CONTENT_READER_END_WITH_ERROR;
                if (x->stream_ended)
                        return x->stream_error ? MHD_CONTENT_READER_END_WITH_ERROR : MHD_CONTENT_READER_END_OF_STREAM;
                exchange_suspend(x);
                return 0;
        }

        n = MIN(avail, max);
        memcpy(out, x->buf + x->buf_head, n);
        x->buf_head += n;
        x->bytes_out += n;
        if (x->buf_head == x->buf_size)
                x->buf_head = x->buf_size = 0;

        /* Drained enough: the producer may go on. This may write to buf right away. */
        if (x->want_writable && x->buf_size - x->buf_head <= x->front->stream_buffer_size / 2) {
                x->want_writable = false;
                x->front->ops->writable(x, x->userdata);
        }
        return (ssize_t) n;
}

/* The stream's answer is made when MHD next calls the handler: by then a fast producer has often
 * finished too, and the answer goes out whole, in one buffer with the headers. */
static void exchange_make_stream_response(Exchange *x) {
        struct MHD_Response *resp;

        if (x->stream_ended && !x->stream_error && !x->stream_broken) {
                size_t size = x->buf_size - x->buf_head;
                if (x->buf_head > 0)
                        memmove(x->buf, x->buf + x->buf_head, size);
                resp = MHD_create_response_from_buffer_with_free_callback(size, size > 0 ? x->buf : (char *) "",
                                                                         size > 0 ? g_free : NULL);
                if (size > 0)
                        x->buf = NULL;
                else
                        g_clear_pointer(&x->buf, g_free);
                x->buf_head = x->buf_size = x->buf_alloc = 0;
                x->bytes_out += size;
        } else
                resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, STREAM_BLOCK_SIZE, exchange_stream_reader,
                                                         x, NULL);
        exchange_apply_headers(x, resp);
        x->response = resp;
}

void exchange_stream_begin(Exchange *x, unsigned status) {
        g_assert(!x->queued && !x->response && !x->stream);
        x->stream = true;
        x->status = status;
        exchange_wake(x);
}

void exchange_stream_write(Exchange *x, const char *data, size_t size) {
        g_assert(x->stream && !x->stream_ended);

        if (x->client_gone || x->stream_broken || size == 0)
                return;
        if (x->buf_size + size > x->buf_alloc) {
                if (x->buf_head > 0) {
                        /* What went out makes room at the front. */
                        memmove(x->buf, x->buf + x->buf_head, x->buf_size - x->buf_head);
                        x->buf_size -= x->buf_head;
                        x->buf_head = 0;
                }
                if (x->buf_size + size > x->buf_alloc) {
                        size_t want = MAX(MAX(x->buf_alloc * 2, x->buf_size + size), (size_t) 1024);
                        char *p = g_try_realloc(x->buf, want);

                        if (!p) {
                                /* What went out so far stays good; the stream ends with an error. */
                                log_warning("No memory for %zu bytes of the answer to %s '%s', ending it", want,
                                            x->method, x->url);
                                x->stream_broken = true;
                                exchange_wake(x);
                                return;
                        }
                        /* Accepted work: counted whatever the budget says. A stream's buffer is
                         * bounded by back-pressure (StreamBufferSize= and one event). */
                        budget_take(x->front->budget, want - x->buf_alloc);
                        x->answer_counted += want - x->buf_alloc;
                        x->buf = p;
                        x->buf_alloc = want;
                }
        }
        memcpy(x->buf + x->buf_size, data, size);
        x->buf_size += size;
        exchange_wake(x);
}

bool exchange_stream_full(Exchange *x) {
        if (x->buf_size - x->buf_head <= x->front->stream_buffer_size && !x->stream_broken)
                return false;
        x->want_writable = true;
        return true;
}

void exchange_stream_end(Exchange *x, bool error) {
        g_assert(x->stream);
        x->stream_ended = true;
        x->stream_error = error;
        exchange_wake(x);
}

bool exchange_answered(const Exchange *x) {
        return x->queued || x->response || x->stream;
}

uint64_t exchange_bytes_out(const Exchange *x) {
        return x->bytes_out;
}

bool exchange_streaming(const Exchange *x) {
        return x->stream && x->queued;
}

bool exchange_client_gone(const Exchange *x) {
        return x->client_gone;
}

/* ---- libmicrohttpd's callbacks ----------------------------------------------------------- */

static Exchange *exchange_new(ExchangeFront *f, struct MHD_Connection *c, const char *method, const char *url,
                              const char *version) {
        Exchange *x = g_new0(Exchange, 1);

        x->front = f;
        x->connection = c;
        x->method = method;
        x->url = url;
        x->version = version;
        x->start = front_now(f);
        x->body_limit = f->max_body_size;
        f->exchanges = g_list_prepend(f->exchanges, x);
        x->link = f->exchanges;
        f->n_exchanges++;
        return x;
}

static void exchange_free(Exchange *x) {
        ExchangeFront *f = x->front;

        if (x->response)
                MHD_destroy_response(x->response);
        sd_event_source_disable_unref(x->hup);
        f->exchanges = g_list_delete_link(f->exchanges, x->link);
        g_assert(f->n_exchanges > 0);
        f->n_exchanges--;
        if (x->headers)
                g_string_free(x->headers, TRUE);
        budget_give(f->budget, x->body_counted + x->answer_counted);
        g_free(x->body);
        g_free(x->buf);
        g_free(x);
}

static enum MHD_Result exchange_queue(Exchange *x) {
        enum MHD_Result ret;

        ret = MHD_queue_response(x->connection, x->status, x->response);
        MHD_destroy_response(x->response);
        x->response = NULL;
        x->queued = true;
        return ret;
}

static enum MHD_Result front_on_request(void *cls, struct MHD_Connection *connection, const char *url,
                                        const char *method, const char *version, const char *upload_data,
                                        size_t *upload_data_size, void **con_cls) {
        ExchangeFront *f = cls;
        Exchange *x = *con_cls;

        if (!x) {
                x = exchange_new(f, connection, method, url, version);
                *con_cls = x;
                x->userdata = f->start(x, f->userdata);
                if (x->response)
                        return exchange_queue(x);
                return MHD_YES;
        }

        if (x->client_gone)
                return MHD_NO;

        if (*upload_data_size > 0) {
                x->body_received += *upload_data_size;
                exchange_body_append(x, upload_data, *upload_data_size);
                *upload_data_size = 0;
                /* Past the limit the rest is read and dropped, and the 413 goes out at the end:
                 * libmicrohttpd 0.9 refuses a response queued while the upload is still coming
                 * (MHD_queue_response() fails and the client sees a reset, not a 413). Dropping
                 * is bounded too: a client that keeps sending far past the limit is cut off. */
                if ((x->body_too_large || x->body_no_room) && x->body_received > 4 * x->body_limit + 1024 * 1024)
                        return MHD_NO;
                return MHD_YES;
        }

        if (!x->body_complete) {
                x->body_complete = true;
                f->ops->body_complete(x, x->userdata);
                if (x->client_gone)
                        return MHD_NO;
        }

        if (!x->response && x->stream && !x->queued)
                exchange_make_stream_response(x);
        if (x->response)
                return exchange_queue(x);
        if (x->queued)
                return MHD_YES;

        /* The answer is being made: park the connection until it is ready. */
        exchange_suspend(x);
        return MHD_YES;
}

static void front_on_completed(void *cls, struct MHD_Connection *connection, void **con_cls,
                               enum MHD_RequestTerminationCode toe) {
        ExchangeFront *f = cls;
        Exchange *x = *con_cls;

        if (!x)
                return;
        *con_cls = NULL;
        f->ops->done(x, x->queued && !x->client_gone && toe == MHD_REQUEST_TERMINATED_COMPLETED_OK, x->userdata);
        exchange_free(x);
}

/* ---- the front ---------------------------------------------------------------------------- */

int exchange_front_new(sd_event *event, const ExchangeFrontSetup *setup, ExchangeFront **ret) {
        g_autoptr(ExchangeFront) f = g_new0(ExchangeFront, 1);
        HttpServerSettings hs = setup->http;
        int r;

        g_assert(setup->start && setup->ops);

        f->event = sd_event_ref(event);
        f->start = setup->start;
        f->ops = setup->ops;
        f->userdata = setup->userdata;
        f->max_body_size = setup->max_body_size;
        f->stream_buffer_size = setup->stream_buffer_size;

        r = budget_new(event, setup->max_buffered_size, &f->budget);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the buffer budget: %m");

        r = sd_event_add_time(event, &f->hup_sweep, CLOCK_MONOTONIC, USEC_INFINITY, 50 * USEC_PER_MSEC,
                              front_on_hup_sweep, f);
        if (r < 0)
                return log_error_errno(r, "Failed to set up the hang-up sweep: %m");
        (void) sd_event_source_set_enabled(f->hup_sweep, SD_EVENT_OFF);
        (void) sd_event_source_set_description(f->hup_sweep, "client-hup-sweep");

        hs.handler = front_on_request;
        hs.completed = front_on_completed;
        hs.userdata = f;
        r = http_server_new(event, &hs, &f->http);
        if (r < 0)
                return r;

        *ret = TAKE_PTR(f);
        return 0;
}

ExchangeFront *exchange_front_free(ExchangeFront *f) {
        if (!f)
                return NULL;
        /* Stopping MHD completes every exchange still open. */
        http_server_free(f->http);
        budget_free(f->budget);
        sd_event_source_disable_unref(f->hup_sweep);
        sd_event_unref(f->event);
        g_free(f);
        return NULL;
}

void exchange_front_flush(ExchangeFront *f) {
        http_server_flush(f->http);
}

void exchange_front_quiesce(ExchangeFront *f) {
        f->quiesced = true;
        http_server_quiesce(f->http);
}

unsigned exchange_front_count(const ExchangeFront *f) {
        return f->n_exchanges;
}

bool exchange_front_socket_activated(const ExchangeFront *f) {
        return http_server_socket_activated(f->http);
}

bool exchange_front_loopback_only(const ExchangeFront *f) {
        return http_server_loopback_only(f->http);
}

char *exchange_front_describe(const ExchangeFront *f) {
        return http_server_describe(f->http);
}

void exchange_front_set_limits(ExchangeFront *f, uint64_t max_body_size, size_t stream_buffer_size,
                               uint64_t max_buffered_size) {
        f->max_body_size = max_body_size;
        f->stream_buffer_size = stream_buffer_size;
        budget_set_limit(f->budget, max_buffered_size);
}

Budget *exchange_front_budget(const ExchangeFront *f) {
        return f->budget;
}
