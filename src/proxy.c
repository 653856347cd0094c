/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "compare.h"
#include "echo.h"
#include "inspect.h"
#include "json-util.h"
#include "log.h"
#include "proxy.h"
#include "sse.h"

/* POST /v1/chat/completions and friends: inspect the body, pick a provider, relay its answer —
 * whole, or event by event for a stream — and move to a fallback while nothing has reached the
 * client yet. */

typedef struct Proxy {
        Request *request;
        ChatRequestInfo info;
        const char *url_suffix;      /* "/chat/completions" … appended to the provider's BaseURL */
        char *url_suffix_buf;        /* any other path, escaped */

        /* failover: the routed provider, then its Fallbacks= */
        Provider *routed;
        unsigned n_chain;
        unsigned chain_index;        /* of the current attempt */
        Provider *provider;          /* the current attempt's */
        unsigned retries_left;       /* of the same provider, MaxRetries= */
        usec_t attempt_start;        /* CLOCK_MONOTONIC */
        sd_event_source *retry_timer;
        char *upstream_body;         /* rewritten body, when one was needed */
        size_t upstream_body_size;

        /* the current attempt's answer */
        Upstream *upstream;
        unsigned upstream_status;
        GPtrArray *upstream_headers; /* name, value, …, NULL: passed to the client */
        bool streaming;              /* an SSE answer, relayed event by event */
        bool committed;              /* its first data event went to the client */
        bool complete;               /* it said it was done: [DONE], a finish_reason, … */
        bool too_large;
        char *buf;                   /* whole answer (not streamed), or what is not yet relayed */
        size_t buf_size;
        size_t buf_alloc;            /* counted against the buffer budget */
        BudgetWaiter room;           /* paused until the budget has room for more of it */
        bool no_memory;
        SseScanner sse;
        uint64_t dropped_comments;

        /* comparisons this request takes part in, as the primary */
        GPtrArray *jobs;             /* CompareJob* refs */
        AnswerSummary primary;
        AnswerReader primary_reader;
} Proxy;

static void proxy_start_attempt(Proxy *px, Provider *p);

static Provider *chain_at(const Proxy *px, unsigned i) {
        return i == 0 ? px->routed : px->routed->fallbacks[i - 1];
}

static Budget *proxy_budget(const Proxy *px) {
        return exchange_front_budget(px->request->worker->front);
}

/* Returns -ENOBUFS when the buffer budget has no room now (wait, then offer the data again),
 * -ENOMEM when there is no memory (give up). The provider decides the size: nothing aborts. */
static int buf_append(Proxy *px, const char *data, size_t size) {
        if (px->buf_size + size > px->buf_alloc) {
                Budget *b = proxy_budget(px);
                size_t need = px->buf_size + size, want = MAX(MAX(px->buf_alloc * 2, need), (size_t) 1024);
                char *p;

                want = (size_t) budget_take_growth(b, px->buf_alloc, need, want);
                if (want == 0)
                        return -ENOBUFS;
                p = g_try_realloc(px->buf, want);
                if (!p) {
                        budget_give(b, want - px->buf_alloc);
                        return -ENOMEM;
                }
                px->buf = p;
                px->buf_alloc = want;
        }
        memcpy(px->buf + px->buf_size, data, size);
        px->buf_size += size;
        return 0;
}

static void buf_free(Proxy *px) {
        g_clear_pointer(&px->buf, g_free);
        budget_give(proxy_budget(px), px->buf_alloc);
        px->buf_size = px->buf_alloc = 0;
}

static void proxy_on_room(void *userdata) {
        Proxy *px = userdata;

        if (px->upstream && upstream_is_paused(px->upstream))
                upstream_resume(px->upstream);
}

/* What on_data answers when buf_append() failed. */
static size_t proxy_buffer_failed(Proxy *px, int k) {
        if (k == -ENOBUFS) {
                /* Accepted work is not dropped for lack of room: it waits for some. */
                if (!budget_waiting(&px->room))
                        budget_wait(proxy_budget(px), &px->room, proxy_on_room, px);
                return CURL_WRITEFUNC_PAUSE;
        }
        px->no_memory = true;
        return 0; /* aborts the transfer */
}

/* The first n bytes of buf were relayed or dropped. */
static void buf_consume(Proxy *px, size_t n) {
        g_assert(n <= px->buf_size);
        if (n < px->buf_size)
                memmove(px->buf, px->buf + n, px->buf_size - n);
        px->buf_size -= n;
        sse_scanner_consumed(&px->sse, n);
}

static void add_upstream_headers(Proxy *px, bool stream) {
        Exchange *x = px->request->exchange;
        char **h = px->upstream_headers ? (char **) px->upstream_headers->pdata : NULL;
        bool have_content_type = false, have_cache_control = false;

        for (; h && h[0] && h[1]; h += 2) {
                if (strcaseeq(h[0], "Content-Type"))
                        have_content_type = true;
                else if (strcaseeq(h[0], "Cache-Control"))
                        have_cache_control = true;
                exchange_add_header(x, h[0], h[1]);
        }
        if (!have_content_type)
                exchange_add_header(x, "Content-Type", stream ? "text/event-stream" : "application/json");
        /* X-Request-Id is the router's; the provider's own id, for its support, goes beside it. */
        if (px->request->record.provider_request_id)
                exchange_add_header(x, "X-Provider-Request-Id", px->request->record.provider_request_id);
        if (stream) {
                if (!have_cache_control)
                        exchange_add_header(x, "Cache-Control", "no-cache");
                /* Tell nginx and friends in front of us not to hold frames back either. */
                exchange_add_header(x, "X-Accel-Buffering", "no");
        }
}

/* What on_sse_event() looks for in every event of a stream, found in one pass. */
typedef struct EventMarks {
        bool response_done;         /* "response.completed", "response.incomplete" or "response.failed" */
        const char *finish_reason;  /* the first "\"finish_reason\"", or NULL */
        bool usage;                 /* "\"usage\"" */
} EventMarks;

static void event_mark_at(const char *p, const char *end, EventMarks *m) {
        size_t left = (size_t) (end - p);

        if (*p == '"') {
                if (!m->finish_reason && left >= STRLEN("\"finish_reason\"") &&
                    memcmp(p, "\"finish_reason\"", STRLEN("\"finish_reason\"")) == 0)
                        m->finish_reason = p;
                else if (left >= STRLEN("\"usage\"") && memcmp(p, "\"usage\"", STRLEN("\"usage\"")) == 0)
                        m->usage = true;
        } else if (left >= STRLEN("response.") && memcmp(p, "response.", STRLEN("response.")) == 0) {
                const char *t = p + STRLEN("response.");

                left -= STRLEN("response.");
                if ((left >= STRLEN("completed") && memcmp(t, "completed", STRLEN("completed")) == 0) ||
                    (left >= STRLEN("incomplete") && memcmp(t, "incomplete", STRLEN("incomplete")) == 0) ||
                    (left >= STRLEN("failed") && memcmp(t, "failed", STRLEN("failed")) == 0))
                        m->response_done = true;
        }
}

/* One pass instead of a memmem() per word: a candidate is a '"' followed by 'f' or 'u', or an 'r'
 * followed by 'e', and only candidates are compared in full (sixteen positions at a time with
 * SSE2). */
static void event_marks(const char *event, size_t size, EventMarks *ret) {
        const char *p = event, *end = event + size;
        EventMarks m = {};

#ifdef __SSE2__
        const __m128i quote = _mm_set1_epi8('"'), r = _mm_set1_epi8('r');
        const __m128i f = _mm_set1_epi8('f'), u = _mm_set1_epi8('u'), e = _mm_set1_epi8('e');

        while (end - p >= 17) {
                __m128i v = _mm_loadu_si128((const __m128i *) (const void *) p);
                __m128i w = _mm_loadu_si128((const __m128i *) (const void *) (p + 1));
                __m128i c = _mm_or_si128(_mm_and_si128(_mm_cmpeq_epi8(v, quote),
                                                       _mm_or_si128(_mm_cmpeq_epi8(w, f), _mm_cmpeq_epi8(w, u))),
                                         _mm_and_si128(_mm_cmpeq_epi8(v, r), _mm_cmpeq_epi8(w, e)));
                unsigned mask = (unsigned) _mm_movemask_epi8(c);

                while (mask != 0) {
                        event_mark_at(p + __builtin_ctz(mask), end, &m);
                        mask &= mask - 1;
                }
                p += 16;
        }
#endif
        for (; p + 1 < end; p++)
                if ((p[0] == '"' && (p[1] == 'f' || p[1] == 'u')) || (p[0] == 'r' && p[1] == 'e'))
                        event_mark_at(p, end, &m);
        *ret = m;
}

/* Does this event say the answer is complete — [DONE] aside, which the scanner notes? A provider
 * that stops without saying so cut it. An error event is the provider's own last word. */
static bool event_completes(const char *event, size_t size, const EventMarks *m) {
        const char *f, *data;
        size_t n;

        data = sse_event_data(event, size, &n);
        if (data && n > 0 && data[0] == '{') {
                const char *p = data + 1, *end = data + n;
                while (p < end && (*p == ' ' || *p == '\t'))
                        p++;
                if ((size_t) (end - p) >= STRLEN("\"error\"") && memcmp(p, "\"error\"", STRLEN("\"error\"")) == 0)
                        return true;
        }

        if (m->response_done)
                return true;
        f = m->finish_reason;
        if (!f)
                return false;
        f += STRLEN("\"finish_reason\"");
        while (f < event + size && (*f == ' ' || *f == ':' || *f == '\t'))
                f++;
        return f < event + size && *f == '"';
}

static void on_sse_event(const char *event, size_t size, void *userdata) {
        Proxy *px = userdata;
        RequestRecord *rec = &px->request->record;
        EventMarks marks;
        uint64_t p, c;

        event_marks(event, size, &marks);
        if (!px->complete && event_completes(event, size, &marks))
                px->complete = true;
        if (px->jobs)
                answer_reader_event(&px->primary_reader, event, size);

        /* The usage totals come in the last chunk, when the client asked for them. */
        if (marks.usage) {
                g_autoptr(GString) data = sse_event_data_joined(event, size);
                if (data && data->len > 0 && data->str[0] == '{' && inspect_usage(data->str, data->len, &p, &c) >= 0) {
                        rec->prompt_tokens = p;
                        rec->completion_tokens = c;
                }
        }
}

static void proxy_on_response(Upstream *u, void *userdata) {
        Proxy *px = userdata;
        long status = upstream_status(u);
        const char *ct = upstream_content_type(u);

        px->streaming = px->info.stream && status >= 200 && status < 300 && ct &&
                        g_ascii_strncasecmp(ct, "text/event-stream", STRLEN("text/event-stream")) == 0;
        if (!px->streaming)
                upstream_mark_first_byte(u); /* any body byte counts */
        px->upstream_status = (unsigned) status;
        if (px->upstream_headers)
                g_ptr_array_unref(px->upstream_headers);
        px->upstream_headers = upstream_steal_headers(u);
        g_free(px->request->record.provider_request_id);
        px->request->record.provider_request_id = upstream_steal_request_id(u);
}

/* The router's part and the provider's, for Server-Timing: until the provider was asked, and the
 * provider's first byte of the attempt that answers. */
static void proxy_note_timing(Proxy *px, Upstream *u) {
        RequestRecord *rec = &px->request->record;
        usec_t started = upstream_started(u), first = upstream_first_byte(u);

        if (first != USEC_INFINITY && first >= started)
                rec->provider_ttfb_usec = first - started;
}

static void proxy_commit_stream(Proxy *px, Upstream *u) {
        px->committed = true;
        upstream_mark_first_byte(u);
        proxy_note_timing(px, u);
        add_upstream_headers(px, true);
        request_stream_begin(px->request, px->upstream_status);
}

/* Relays every whole event now in buf. */
static void proxy_relay_events(Proxy *px) {
        size_t n = px->sse.boundary;

        if (n == 0)
                return;
        exchange_stream_write(px->request->exchange, px->buf, n);
        buf_consume(px, n);
}

static size_t proxy_on_data(Upstream *u, const char *data, size_t size, void *userdata) {
        Proxy *px = userdata;
        Request *r = px->request;
        const Config *c = r->worker->config;
        int k;

        if (r->record.ttfb == USEC_INFINITY)
                r->record.ttfb = worker_now(r->worker) - r->record.start;

        if (!px->streaming) {
                if (px->buf_size + size > c->max_response_size) {
                        px->too_large = true;
                        return 0; /* aborts the transfer */
                }
                k = buf_append(px, data, size);
                return k < 0 ? proxy_buffer_failed(px, k) : size;
        }

        /* Back-pressure: while the client has not taken what is here, the provider waits. */
        if (px->committed && exchange_stream_full(r->exchange))
                return CURL_WRITEFUNC_PAUSE;

        k = buf_append(px, data, size);
        if (k < 0)
                return proxy_buffer_failed(px, k);
        sse_scanner_scan(&px->sse, px->buf, px->buf_size, on_sse_event, px);

        /* Only the event still incomplete counts against the limit: one event may be large. */
        if (px->buf_size - px->sse.boundary > c->max_response_size) {
                px->too_large = true;
                return 0;
        }

        if (!px->committed) {
                /* The answer starts with the first event that carries data; keep-alive comments
                 * before it do not commit us to this provider, so a silent one can still be
                 * failed over. They go out with the first event, up to a buffer's worth; past
                 * that they are dropped, so that no amount of them holds anything up. */
                if (px->sse.events == 0) {
                        if (px->sse.boundary > c->stream_buffer_size) {
                                px->dropped_comments += px->sse.boundary;
                                buf_consume(px, px->sse.boundary);
                        }
                        return size;
                }
                proxy_commit_stream(px, u);
        }
        proxy_relay_events(px);
        return size;
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

static void proxy_respond_failure(Proxy *px, UpstreamError error, const char *message) {
        Request *r = px->request;
        const char *name = px->provider->name;

        if (px->no_memory) {
                exchange_add_header(r->exchange, "Retry-After", "1");
                record_set_error(&r->record, ERROR_CLASS_INTERNAL, "overloaded_error", "no memory for the answer");
                request_respond_error(r, 503, "overloaded_error", name, "The router has no memory for the answer of '%s'.",
                                      name);
                return;
        }
        if (px->too_large) {
                record_set_error(&r->record, ERROR_CLASS_INVALID, "provider_error", "answer larger than MaxResponseSize=");
                request_respond_error(r, 502, "provider_error", name, "Provider '%s' sent an answer larger than %" PRIu64 " bytes.",
                                      name, r->worker->config->max_response_size);
                return;
        }
        if (upstream_error_is_timeout(error)) {
                r->record.error_class = ERROR_CLASS_TIMEOUT;
                request_respond_error(r, 504, "timeout_error", name, "Provider '%s' timed out: %s", name, message);
                return;
        }
        r->record.error_class = ERROR_CLASS_CONNECT;
        request_respond_error(r, 502, "connection_error", name, "Provider '%s' is unreachable: %s", name, message);
}

/* The stream already went out in part: end it with an error event, after the last whole event
 * (what is left of a cut one is dropped). */
static void proxy_end_stream_with_error(Proxy *px, UpstreamError error, const char *message) {
        Request *r = px->request;
        g_autofree char *text = NULL, *event = NULL;
        const char *type;
        size_t n;

        type = upstream_error_is_timeout(error) ? "timeout_error" : "connection_error";
        if (px->too_large)
                text = g_strdup_printf("Provider '%s' sent an event larger than %" PRIu64 " bytes.", px->provider->name,
                                       r->worker->config->max_response_size);
        else
                text = g_strdup_printf("Provider '%s' failed during the stream: %s", px->provider->name, message);
        record_set_error(&r->record, ERROR_CLASS_STREAM, type, text);

        proxy_relay_events(px);
        event = sse_format_error(type, text, px->provider->name, &n);
        exchange_stream_write(r->exchange, event, n);
        exchange_stream_end(r->exchange, false);
}

/* A complete answer that is not a stream (or a stream the provider refused): relay it. */
static void proxy_respond_buffered(Proxy *px) {
        Request *r = px->request;
        unsigned status = px->upstream_status;
        size_t size = px->buf_size;

        if (status >= 200 && status < 300) {
                uint64_t p, c;
                if (px->buf && inspect_usage(px->buf, size, &p, &c) >= 0) {
                        r->record.prompt_tokens = p;
                        r->record.completion_tokens = c;
                }
        } else {
                /* The provider's own error, passed through with its body. */
                r->record.error_class = status >= 500 ? ERROR_CLASS_PROVIDER_5XX : ERROR_CLASS_PROVIDER_4XX;
                r->record.error_type = "provider_error";
        }
        if (r->worker->config->log_responses && px->buf)
                record_keep_response(&r->record, px->buf, size);
        if (px->jobs && px->buf) {
                answer_reader_clear(&px->primary_reader);
                answer_reader_init(&px->primary_reader, &px->primary, false);
                answer_reader_feed(&px->primary_reader, px->buf, size);
                answer_reader_finish(&px->primary_reader);
        }

        add_upstream_headers(px, false);
        /* The exchange holds (and counts) the answer from here on. */
        budget_give(proxy_budget(px), px->buf_alloc);
        px->buf_size = px->buf_alloc = 0;
        request_respond(r, status, TAKE_PTR(px->buf), size);
}

static int proxy_on_retry_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        Proxy *px = userdata;

        px->retry_timer = sd_event_source_disable_unref(px->retry_timer);
        proxy_start_attempt(px, chain_at(px, px->chain_index));
        return 0;
}

/* The next provider of the chain that may take the request: not down, not at its
 * MaxConcurrent=, and — unless ignore_retry_after — not inside a Retry-After it asked for. */
static Provider *chain_next_available(Proxy *px, unsigned from, bool ignore_retry_after, unsigned *ret_index) {
        usec_t now = worker_now(px->request->worker);

        for (unsigned i = from; i < px->n_chain; i++) {
                Provider *p = chain_at(px, i);
                if (!provider_available(p, now, ignore_retry_after))
                        continue;
                *ret_index = i;
                return p;
        }
        return NULL;
}

/* Closes the books on a failed attempt and starts the next one, on the next provider of the
 * chain at once or on the same one after a back-off. Returns false when there is none. */
static bool proxy_retry(Proxy *px, Upstream *u, UpstreamError error, const char *message) {
        Request *r = px->request;
        Worker *w = r->worker;
        const Config *c = w->config;
        Provider *cur = px->provider, *next;
        usec_t now = worker_now(w), wait = 0, retry_after = USEC_INFINITY;
        long status = upstream_status(u);
        char buf[32];
        const char *why;
        unsigned index;
        bool health_failure;

        if (exchange_answered(r->exchange) || exchange_client_gone(r->exchange) || w->stopping)
                return false;
        if (!attempt_failed(error, status, &health_failure))
                return false;

        if (status == 429 || status == 503) {
                retry_after = parse_retry_after(upstream_retry_after(u));
                if (retry_after != USEC_INFINITY)
                        provider_set_retry_after(cur, now + retry_after);
        }
        next = chain_next_available(px, px->chain_index + 1, false, &index);
        if (!next) {
                if (px->retries_left == 0)
                        return false;
                /* No other provider: the same one again, after a back-off that grows with each
                 * attempt and is never shorter than what the provider asked for. */
                unsigned n = r->record.attempts;
                wait = c->retry_backoff_usec << MIN(n - 1, 10u);
                wait += (usec_t) g_random_int_range(0, (gint32) MAX(wait / 5, (usec_t) 1));
                if (retry_after != USEC_INFINITY)
                        wait = MAX(wait, retry_after);
                if (wait > c->max_retry_wait_usec)
                        return false;
                if (now + wait - r->record.start > px->routed->config->request_timeout_usec)
                        return false;
                if (health_failure && health_about_to_trip(&cur->health, provider_set_policy(r->providers)))
                        return false; /* it is about to be marked down: do not hammer it */
                next = cur;
                index = px->chain_index;
        }

        /* The failed attempt is counted for its provider, and so is its effect on health. */
        why = attempt_reason(error, message, status, buf, sizeof(buf));
        if (health_failure)
                provider_record_failure(cur, why);
        record_end_attempt(&r->record, (unsigned) status,
                           error != UPSTREAM_OK ? (upstream_error_is_timeout(error) ? ERROR_CLASS_TIMEOUT : ERROR_CLASS_CONNECT)
                                                : (status >= 500 ? ERROR_CLASS_PROVIDER_5XX : ERROR_CLASS_PROVIDER_4XX),
                           now - px->attempt_start);

        log_info("%s: provider '%s' failed (%s), trying %s'%s'%s.", r->record.request_id, cur->name, why,
                 next == cur ? "again " : "", next->name, wait > 0 ? " after a back-off" : "");

        if (next == cur)
                px->retries_left--;
        px->chain_index = index;
        px->upstream = upstream_free(u);

        if (wait == 0) {
                proxy_start_attempt(px, next);
                return true;
        }
        if (sd_event_add_time_relative(w->event, &px->retry_timer, CLOCK_MONOTONIC, wait, USEC_PER_MSEC,
                                       proxy_on_retry_timer, px) < 0) {
                proxy_start_attempt(px, next);
                return true;
        }
        (void) sd_event_source_set_description(px->retry_timer, "retry-backoff");
        /* Counted against the next provider only once it is really tried. */
        px->provider = next;
        r->record.provider = next->name;
        return true;
}

static void proxy_on_done(Upstream *u, UpstreamError error, const char *message, void *userdata) {
        Proxy *px = userdata;
        Request *r = px->request;
        Provider *p = px->provider;
        long status = upstream_status(u);
        char buf[64];

        if (error == UPSTREAM_OK && status < 100)
                error = UPSTREAM_ERROR_OTHER;
        /* A stream that ended without saying it was complete was cut: an error, however cleanly
         * the connection ended. */
        if (error == UPSTREAM_OK && px->streaming && !px->complete && !px->sse.done) {
                error = UPSTREAM_ERROR_BROKEN;
                message = px->sse.events == 0 ? "the stream ended without any event"
                                              : "the stream ended before the answer was complete";
        }

        if (!px->committed) {
                /* Nothing reached the client yet: another provider may still serve it. */
                if (proxy_retry(px, u, error, message))
                        return;

                bool health_failure = false;
                if (px->too_large)
                        ; /* a large answer is an answer: the provider is fine */
                else if (attempt_failed(error, status, &health_failure) && health_failure)
                        provider_record_failure(p, attempt_reason(error, message, status, buf, sizeof(buf)));
                else if (error == UPSTREAM_OK)
                        provider_record_success(p);

                proxy_note_timing(px, u);
                if (error != UPSTREAM_OK)
                        proxy_respond_failure(px, error, message);
                else
                        proxy_respond_buffered(px);
                px->upstream = upstream_free(u);
                return;
        }

        /* Bytes went out: this provider serves the request, come what may. */
        if (error != UPSTREAM_OK) {
                if (!px->too_large)
                        provider_record_failure(p, message);
                proxy_end_stream_with_error(px, error, message);
        } else {
                provider_record_success(p);
                proxy_relay_events(px);
                exchange_stream_end(r->exchange, false);
        }
        px->upstream = upstream_free(u);
}

static const UpstreamOps proxy_ops = {
        .on_response = proxy_on_response,
        .on_data = proxy_on_data,
        .on_done = proxy_on_done,
};

/* What the client sent reaches the provider (upstream.c drops what must not). */
static void foreach_client_header(const void *x, UpstreamHeaderFunc func, void *userdata) {
        exchange_foreach_header(x, func, userdata);
}

/* The body as provider p is to get it: the client's bytes untouched, unless p knows the model by
 * another name ([ModelAliases]) or needs one named where the client named none (DefaultModel=),
 * which changes that member and no other byte. Returns the model p is asked for when renamed. */
static const char *proxy_body_for(Proxy *px, Provider *p, const char **body, size_t *size, char **ret_owned,
                                  size_t *ret_owned_size) {
        const ProviderConfig *pc = p->config;
        const char *name = NULL;
        int k = -ENOENT;

        if (px->info.model) {
                name = provider_model_name(p, px->info.model);
                if (name != px->info.model)
                        k = inspect_replace_model(*body, *size, name, ret_owned, ret_owned_size);
        } else if (pc->default_model && streq(px->url_suffix, "/chat/completions")) {
                name = pc->default_model;
                k = inspect_set_model(*body, *size, name, ret_owned, ret_owned_size);
        }
        if (k < 0)
                return NULL;
        *body = *ret_owned;
        *size = *ret_owned_size;
        return name;
}

static void proxy_start_attempt(Proxy *px, Provider *p) {
        Request *r = px->request;
        Worker *w = r->worker;
        RequestRecord *rec = &r->record;
        const ProviderConfig *pc = p->config;
        size_t body_size;
        const char *body = exchange_body(r->exchange, &body_size);
        g_autofree char *url = NULL;
        int k;

        /* Who was tried, in order; kept only once there is more than one name to tell. */
        rec->attempts++;
        if (rec->tried || rec->attempts > 1) {
                if (!rec->tried)
                        rec->tried = g_string_new(rec->provider);
                g_string_append_printf(rec->tried, ", %s", p->name);
        }

        /* Fresh state for this attempt; the previous one left nothing the client saw. */
        px->provider = p;
        if (rec->stats)
                rec->stats = provider_stats_unref(rec->stats);
        request_begin_provider(r, p);
        px->attempt_start = worker_now(w);
        px->streaming = px->committed = px->complete = px->too_large = false;
        px->buf_size = 0;
        px->sse = (SseScanner) {};
        rec->ttfb = USEC_INFINITY;
        rec->error_class = ERROR_CLASS_NONE;
        rec->error_type = NULL;
        g_clear_pointer(&rec->error_message, g_free);
        g_clear_pointer(&rec->provider_request_id, g_free);
        g_clear_pointer(&px->upstream_body, g_free);

        if (provider_is_echo(p)) {
                echo_respond(r, p, &px->info, px->jobs ? &px->primary : NULL);
                return;
        }

        /* Pass-through, but for the model's name where the provider needs another. */
        const char *renamed = proxy_body_for(px, p, &body, &body_size, &px->upstream_body, &px->upstream_body_size);
        g_free(rec->upstream_model);
        rec->upstream_model = g_strdup(renamed);
        rec->bytes_in = body_size;

        UpstreamRequest req = {
                .url = provider_url(p, px->url_suffix, &url),
                .post = true,
                .body = body,
                .body_size = body_size,
                .api_key = pc->api_key,
                .authorization = request_upstream_authorization(r, p, p == px->routed),
                .request_id = rec->request_id,
                .client_headers = foreach_client_header,
                .client = r->exchange,
                .stream = px->info.stream,
                .connect_timeout = pc->connect_timeout_usec,
                .first_byte_timeout = pc->first_byte_timeout_usec,
                .total_timeout = pc->request_timeout_usec,
                .idle_timeout = pc->idle_timeout_usec,
                .provider = pc,
        };

        k = upstream_start(w->curl, w->event, &req, &proxy_ops, px, &px->upstream);
        if (k >= 0 && rec->router_usec == USEC_INFINITY) {
                /* Reading, checking and routing the request: the router's own time. */
                usec_t started = upstream_started(px->upstream);
                rec->router_usec = started > rec->start ? started - rec->start : 0;
        }
        if (k < 0) {
                log_warning_errno(k, "%s: failed to start a transfer to provider '%s': %m", rec->request_id, p->name);
                rec->error_class = ERROR_CLASS_INTERNAL;
                request_respond_error(r, 500, "internal_error", p->name, "Could not start the request to provider '%s'.",
                                      p->name);
        }
}

/* No provider of the chain can take the request now: say why, and when to come back. */
static void proxy_respond_unavailable(Proxy *px) {
        Request *r = px->request;
        Provider *p = px->routed;
        usec_t now = worker_now(r->worker), wait;
        char retry_after[32];
        g_autofree char *msg = NULL;
        const char *type;
        unsigned status;
        char *json;

        r->record.provider = p->name;
        if (provider_is_full(p) && health_available(&p->health, now, false)) {
                msg = g_strdup_printf("Provider '%s' is busy: %u requests are running, MaxConcurrent=%u. Retry shortly.",
                                      p->name, p->stats->in_flight, p->config->max_concurrent);
                status = 429;
                wait = USEC_PER_SEC;
                type = "rate_limit_error";
        } else {
                wait = MAX(health_retry_in(&p->health, now), USEC_PER_SEC);
                msg = g_strdup_printf("Provider '%s' is down (%s); it is probed again within %.0f s.", p->name,
                                      strna(p->health.last_error), (double) wait / USEC_PER_SEC);
                status = 503;
                type = "provider_unavailable";
        }
        record_set_error(&r->record, ERROR_CLASS_OVERLOAD, type, msg);

        (void) snprintf(retry_after, sizeof(retry_after), "%" PRIu64, (wait + USEC_PER_SEC - 1) / USEC_PER_SEC);
        json = json_error_body(type, msg, p->name, NULL);
        exchange_add_header(r->exchange, "Retry-After", retry_after);
        r->worker->stats.rejected++;
        request_respond_json(r, status, json, strlen(json));
}

static void proxy_cancel(Request *r) {
        Proxy *px = r->data;

        if (!px)
                return;
        px->upstream = upstream_free(px->upstream);
        px->retry_timer = sd_event_source_disable_unref(px->retry_timer);
        budget_unwait(proxy_budget(px), &px->room);
}

/* The request is over: what the primary answered goes to each of its comparisons. */
static void proxy_finish_comparisons(Proxy *px) {
        Request *r = px->request;
        const RequestRecord *rec = &r->record;
        AnswerSummary *s = &px->primary;

        if (!px->jobs)
                return;
        g_free(s->provider);
        s->provider = g_strdup(rec->provider);
        s->status = rec->status;
        s->ttfb_usec = rec->ttfb;
        s->duration_usec = worker_now(r->worker) - rec->start;
        if (rec->prompt_tokens != UINT64_MAX) {
                s->prompt_tokens = rec->prompt_tokens;
                s->completion_tokens = rec->completion_tokens;
        }
        if (rec->error_message)
                answer_summary_set_error(s, "%s", rec->error_message);
        else if (rec->status < 200 || rec->status >= 300)
                answer_summary_set_error(s, "answered HTTP %u", rec->status);
        for (guint i = 0; i < px->jobs->len; i++)
                compare_job_primary_done(px->jobs->pdata[i], s);
}

static void proxy_free(Request *r) {
        Proxy *px = r->data;

        if (!px)
                return;
        proxy_cancel(r);
        proxy_finish_comparisons(px);
        if (px->jobs)
                g_ptr_array_unref(px->jobs);
        answer_reader_clear(&px->primary_reader);
        answer_summary_clear(&px->primary);
        chat_request_info_clear(&px->info);
        g_free(px->url_suffix_buf);
        g_free(px->upstream_body);
        buf_free(px);
        if (px->upstream_headers)
                g_ptr_array_unref(px->upstream_headers);
        g_free(px);
        r->data = NULL;
}

static void proxy_writable(Request *r) {
        Proxy *px = r->data;

        if (px && px->upstream && upstream_is_paused(px->upstream))
                upstream_resume(px->upstream);
}

static void proxy_on_mirror_done(Mirror *m, const AnswerSummary *summary, void *userdata) {
        compare_job_mirror_done(userdata, summary);
}

static void compare_job_destroy(gpointer j) {
        compare_job_unref(j);
}

/* Sends the request to p too, in the background, and records the two answers as one comparison.
 * The client's own request was started first and is never held up: a mirror that cannot start
 * now (MirrorMaxConcurrent=, its provider full or down) is skipped and counted. */
static void proxy_start_comparison(Proxy *px, Provider *p, ComparisonOrigin origin) {
        Request *r = px->request;
        Worker *w = r->worker;
        g_autoptr(CompareJob) job = NULL;
        size_t body_size;
        const char *body = exchange_body(r->exchange, &body_size);
        int k;

        if (provider_is_echo(p) || !provider_available(p, worker_now(w), false)) {
                compare_store_count_skipped(w->comparisons);
                return;
        }
        g_autofree char *owned = NULL;
        size_t owned_size;
        (void) proxy_body_for(px, p, &body, &body_size, &owned, &owned_size);
        job = compare_job_new(w->comparisons, r->record.request_id, px->info.model, origin);
        MirrorRequest req = {
                .provider = p,
                .suffix = px->url_suffix,
                .body = body,
                .body_size = body_size,
                .stream = px->info.stream,
                .request_id = r->record.request_id,
        };
        k = mirror_pool_start(w->mirrors, &req, true, proxy_on_mirror_done, job, compare_job_destroy, NULL);
        if (k < 0) {
                if (k != -EBUSY)
                        log_debug_errno(k, "%s: could not mirror to '%s', skipping: %m", r->record.request_id, p->name);
                compare_store_count_skipped(w->comparisons);
                return;
        }
        compare_job_ref(job); /* the mirror's reference is the one handed over */
        if (!px->jobs) {
                px->jobs = g_ptr_array_new_with_free_func(compare_job_destroy);
                answer_summary_init(&px->primary, NULL);
                answer_reader_init(&px->primary_reader, &px->primary, px->info.stream);
        }
        g_ptr_array_add(px->jobs, TAKE_PTR(job));
}

/* After the request's own first attempt: the route's mirrors (a sample of MirrorPercent=) and
 * the providers the client named in X-Compare. */
static void proxy_start_comparisons(Proxy *px, const Route *route, GPtrArray *x_compare) {
        if (exchange_client_gone(px->request->exchange))
                return;
        if (route && route->mirrors && route->mirror_percent > 0 &&
            (route->mirror_percent >= 100 || (unsigned) g_random_int_range(0, 100) < route->mirror_percent))
                for (Provider **m = route->mirrors; *m; m++)
                        /* A split may route to its own mirror: nothing to compare then. */
                        if (*m != px->routed)
                                proxy_start_comparison(px, *m, COMPARISON_MIRROR);
        for (guint i = 0; x_compare && i < x_compare->len; i++)
                proxy_start_comparison(px, x_compare->pdata[i], COMPARISON_X_COMPARE);
}

/* The providers named in X-Compare, checked before anything starts. */
#define X_COMPARE_MAX 8

static int proxy_parse_x_compare(Proxy *px, const char *header, GPtrArray **ret) {
        Request *r = px->request;
        g_auto(GStrv) names = g_strsplit(header, ",", -1);
        g_autoptr(GPtrArray) list = g_ptr_array_new();

        for (char **n = names; *n; n++) {
                Provider *p;
                g_strstrip(*n);
                if (isempty(*n))
                        continue;
                p = provider_set_find(r->providers, *n);
                if (!p) {
                        g_autofree char *known = provider_set_list(r->providers);
                        request_respond_error(r, 400, "invalid_request_error", NULL,
                                              "Unknown provider '%s' in the X-Compare header. Known providers: %s.", *n, known);
                        return -ENOENT;
                }
                if (list->len >= X_COMPARE_MAX) {
                        request_respond_error(r, 400, "invalid_request_error", NULL,
                                              "The X-Compare header names more than %d providers.", X_COMPARE_MAX);
                        return -E2BIG;
                }
                g_ptr_array_add(list, p);
        }
        *ret = TAKE_PTR(list);
        return 0;
}

static const char *proxy_sticky_key(const Route *rt, void *userdata) {
        Proxy *px = userdata;
        const char *h;

        switch (rt->sticky) {
        case STICKY_USER:
                return px->info.user;
        case STICKY_HEADER:
                h = request_header(px->request, rt->sticky_header);
                return isempty(h) ? NULL : h;
        case STICKY_TOKEN:
                h = request_header(px->request, "Authorization");
                return isempty(h) ? NULL : h;
        default:
                return NULL;
        }
}

static void proxy_start_common(Request *r, bool any) {
        Worker *w = r->worker;
        Proxy *px = g_new0(Proxy, 1);
        g_autofree char *message = NULL;
        RoutePick pick;
        Provider *first;
        const char *header;
        size_t body_size;
        const char *body = exchange_body(r->exchange, &body_size);
        unsigned index;
        int k;

        px->request = r;
        px->url_suffix = r->subpath;
        r->data = px;

        k = inspect_chat_request(body, body_size, &px->info, &message);
        if (any) {
                /* A path the router does not know is an API call when its body names a model;
                 * anything else is not for a provider to see. */
                if (k >= 0 && px->info.model)
                        px->url_suffix = px->url_suffix_buf = upstream_escape_path(r->subpath);
                if (!px->url_suffix_buf) {
                        w->stats.rejected++;
                        request_respond_unknown_path(r);
                        return;
                }
        }
        if (k < 0) {
                w->stats.rejected++;
                request_respond_error(r, 400, "invalid_request_error", NULL, "%s", message);
                return;
        }
        r->record.model = g_strdup(px->info.model);
        r->record.stream = px->info.stream;

        header = request_header(r, "X-Provider");
        k = router_pick(w->router, header, px->info.model, proxy_sticky_key, px, worker_now(w), &pick);
        if (k == -ENOENT) {
                g_autofree char *known = router_provider_list(w->router);
                w->stats.rejected++;
                request_respond_error(r, 400, "invalid_request_error", NULL,
                                      "Unknown provider '%s' in the X-Provider header. Known providers: %s.", header, known);
                return;
        }
        if (k < 0) {
                w->stats.rejected++;
                request_respond_error(r, 500, "internal_error", NULL, "No provider is available for this request.");
                return;
        }
        r->record.route = route_reason_to_string(pick.reason);
        if (pick.arm)
                /* Per route and arm too (the arm it was routed to, whoever ends up serving). */
                record_begin_arm(&r->record, pick.arm->stats);

        /* A reload may have come between the request's head and its body: the request keeps the
         * set its provider belongs to alive. */
        if (pick.provider->set != r->providers) {
                provider_set_unref(r->providers);
                r->providers = provider_set_ref(pick.provider->set);
        }

        g_autoptr(GPtrArray) compare = NULL;
        const char *xc = request_header(r, "X-Compare");
        if (w->router->allow_override && !isempty(xc) && proxy_parse_x_compare(px, xc, &compare) < 0) {
                w->stats.rejected++;
                return;
        }

        /* The chain a request may walk: the routed provider, then its fallbacks in order. */
        px->routed = pick.provider;
        px->n_chain = 1;
        while (px->routed->fallbacks[px->n_chain - 1])
                px->n_chain++;
        px->retries_left = px->routed->config->max_retries;

        if (provider_is_echo(px->routed)) {
                px->provider = px->routed;
                r->record.attempts = 1;
                request_begin_provider(r, px->routed);
                /* Its answer is produced at once: the comparisons start first, to be given it. */
                proxy_start_comparisons(px, pick.route, compare);
                echo_respond(r, px->routed, &px->info, px->jobs ? &px->primary : NULL);
                return;
        }

        first = chain_next_available(px, 0, false, &index);
        if (!first)
                /* Everyone asked for a pause: the routed provider gets the request anyway and
                 * answers for itself, rather than the router refusing on its behalf. */
                first = chain_next_available(px, 0, true, &index);
        if (!first) {
                proxy_respond_unavailable(px);
                return;
        }
        px->chain_index = index;
        if (index > 0) {
                /* The routed provider is down or full: start with a fallback, and say so. */
                r->record.tried = g_string_new(px->routed->name);
                g_string_append_printf(r->record.tried, " (%s)", health_state_to_string(provider_state(px->routed)));
        }
        proxy_start_attempt(px, first);
        proxy_start_comparisons(px, pick.route, compare);
}

static void proxy_start(Request *r) {
        proxy_start_common(r, false);
}

static void proxy_start_any(Request *r) {
        proxy_start_common(r, true);
}

const Handler proxy_handler = {
        .name = "proxy",
        .start = proxy_start,
        .cancel = proxy_cancel,
        .writable = proxy_writable,
        .free = proxy_free,
};

const Handler proxy_any_handler = {
        .name = "proxy",
        .start = proxy_start_any,
        .cancel = proxy_cancel,
        .writable = proxy_writable,
        .free = proxy_free,
};
