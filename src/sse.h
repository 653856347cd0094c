/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util.h"

/* Finds event boundaries in a server-sent event stream as it arrives, in any chunking, with any
 * of the three line endings the format allows. The router forwards whole events only, so that
 * when a provider fails mid-stream it can end the client's stream with an error event that is
 * not glued onto half an event. */
typedef struct SseScanner {
        size_t scanned;      /* bytes of the buffer looked at so far */
        size_t event_start;  /* where the event being read began */
        size_t boundary;     /* end of the last complete event: everything before is whole */
        uint64_t events;     /* complete events seen */
        bool done;           /* a "data: [DONE]" event was seen */
        unsigned char state;
} SseScanner;

typedef void (*SseEventFunc)(const char *event, size_t size, void *userdata);

/* Looks at buf[s->scanned..size) (the buffer holds everything not yet consumed) and calls
 * func, which may be NULL, for each event completed by the new bytes. */
void sse_scanner_scan(SseScanner *s, const char *buf, size_t size, SseEventFunc func, void *userdata);

/* The first n bytes of the buffer (n <= boundary) were handed on and removed. */
void sse_scanner_consumed(SseScanner *s, size_t n);

/* Returns the payload of the first "data:" line of an event (without the field name and the one
 * optional space), or NULL. */
const char *sse_event_data(const char *event, size_t size, size_t *ret_size);

/* The payload of every "data:" line of an event, joined with "\n" as the format says; NULL if it
 * has none. */
GString *sse_event_data_joined(const char *event, size_t size);

/* "data: {"error":{...}}\n\n" — how the router ends a stream that failed midway. */
char *sse_format_error(const char *type, const char *message, const char *provider, size_t *ret_size);
