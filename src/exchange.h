/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "budget.h"
#include "http-server.h"
#include "util.h"

/* One client request and its answer, over the HTTP front end: the request's head and body (bounded),
 * parking the connection while the answer is being made, noticing a client that hangs up, and
 * sending the answer whole or as a stream. It knows nothing about routing or providers: whoever
 * handles the request is told through the callbacks it set, and answers through the functions
 * below. libmicrohttpd stays behind this file. */

typedef struct Exchange Exchange;
typedef struct ExchangeFront ExchangeFront;

typedef struct ExchangeOps {
        /* The whole request is in (or the body was too large, see exchange_body_too_large()). */
        void (*body_complete)(Exchange *x, void *userdata);
        /* The client went away before the answer ended: stop working for it. No answer can be
         * sent any more; done() follows. */
        void (*hangup)(Exchange *x, void *userdata);
        /* A stream's buffer drained after exchange_stream_full() said it was full. */
        void (*writable)(Exchange *x, void *userdata);
        /* The exchange is over: the answer went out whole (completed) or the connection ended
         * first. x is freed right after. */
        void (*done)(Exchange *x, bool completed, void *userdata);
} ExchangeOps;

/* A new request: its head is in. Returns what the callbacks get as userdata for this exchange
 * (never NULL); may set the body limit, and may answer at once (then the body is not read). */
typedef void *(*ExchangeStartFunc)(Exchange *x, void *userdata);

typedef struct ExchangeFrontSetup {
        HttpServerSettings http;      /* handler, completed and userdata are set here */
        uint64_t max_body_size;       /* default limit for a request body */
        size_t stream_buffer_size;    /* a stream is full past this many buffered bytes */
        uint64_t max_buffered_size;   /* the budget for every body, stream buffer and whole answer */
        ExchangeStartFunc start;
        const ExchangeOps *ops;
        void *userdata;               /* for start */
} ExchangeFrontSetup;

int exchange_front_new(sd_event *event, const ExchangeFrontSetup *setup, ExchangeFront **ret);
ExchangeFront *exchange_front_free(ExchangeFront *f);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(ExchangeFront, exchange_front_free)
/* Stop accepting connections; those open finish. */
void exchange_front_quiesce(ExchangeFront *f);
/* Hands what the handlers wrote since to libmicrohttpd now (see http_server_flush()). */
void exchange_front_flush(ExchangeFront *f);
unsigned exchange_front_count(const ExchangeFront *f);
bool exchange_front_socket_activated(const ExchangeFront *f);
/* Only this machine can connect (see http_server_loopback_only()). */
bool exchange_front_loopback_only(const ExchangeFront *f);
char *exchange_front_describe(const ExchangeFront *f);
void exchange_front_set_limits(ExchangeFront *f, uint64_t max_body_size, size_t stream_buffer_size,
                               uint64_t max_buffered_size);
/* The budget the front counts request bodies, stream buffers and whole answers against; handlers
 * count what they buffer themselves against it too. */
Budget *exchange_front_budget(const ExchangeFront *f);

/* Sets the body's limit; an announced body is counted against the budget from now on (see
 * exchange_body_no_room()). */
void exchange_set_body_limit(Exchange *x, uint64_t limit);

const char *exchange_method(const Exchange *x);
const char *exchange_path(const Exchange *x);
/* "HTTP/1.1" */
const char *exchange_version(const Exchange *x);
const char *exchange_header(const Exchange *x, const char *name);
/* Calls func for each request header, in order; stops when it returns false. */
void exchange_foreach_header(const Exchange *x, bool (*func)(const char *name, const char *value, void *userdata),
                             void *userdata);
/* A NUL byte in a header's value or in the path, which cut it short (the strings above end at
 * it). */
bool exchange_headers_have_nul(const Exchange *x);
/* CLOCK_MONOTONIC, when the head was in. */
usec_t exchange_start_time(const Exchange *x);
/* The loop's current time, without a clock read. */
usec_t exchange_now(const Exchange *x);

const char *exchange_body(const Exchange *x, size_t *ret_size);
bool exchange_body_too_large(const Exchange *x);
/* The body did not fit into the budget: refused when announced, dropped when it grew. */
bool exchange_body_no_room(const Exchange *x);

/* The connection is closed after the answer (the request's framing cannot be trusted). */
void exchange_close_after(Exchange *x);
/* Adds a header to the next answer (copied). */
void exchange_add_header(Exchange *x, const char *name, const char *value);
/* Answers whole; takes body (freed with g_free; NULL with size 0 for none). */
void exchange_respond(Exchange *x, unsigned status, char *body, size_t size);
/* Answers with a stream of unknown length: the status and headers, then what is written. A
 * stream is server-sent events, written whole events at a time: between two writes the exchange
 * may send an SSE comment of its own (":\n\n", to tell a client that half-closed its side from
 * one that left). */
void exchange_stream_begin(Exchange *x, unsigned status);
void exchange_stream_write(Exchange *x, const char *data, size_t size);
/* True when the stream holds more than its buffer size: stop producing until writable(). */
bool exchange_stream_full(Exchange *x);
/* Nothing more will be written; what is buffered still goes out. With error, the connection is
 * closed after it instead of ending the stream cleanly. */
void exchange_stream_end(Exchange *x, bool error);

/* An answer was given (it may not all have gone out yet). */
bool exchange_answered(const Exchange *x);
/* Bytes of the answer's body handed to the connection so far. */
uint64_t exchange_bytes_out(const Exchange *x);
/* The answer is a stream whose first bytes may have reached the client. */
bool exchange_streaming(const Exchange *x);
bool exchange_client_gone(const Exchange *x);
