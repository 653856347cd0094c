/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* A provider's event stream, fed to the SSE scanner as the proxy does: in pieces of any size,
 * with the whole events before the boundary handed on (consumed) at any point. Whatever the
 * chunking, the events found must be exactly those of one scan of the whole stream. The first
 * input byte seeds the chunking. */
#include <assert.h>
#include <stdint.h>
#include <string.h>

#include "sse.h"
#include "util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

typedef struct Events {
        GArray *spans;       /* (offset, size) pairs, absolute in the stream */
        const char *buf;     /* the scanner's buffer now */
        size_t consumed;     /* stream bytes removed from its front so far */
} Events;

static void on_event(const char *event, size_t size, void *userdata) {
        Events *e = userdata;
        size_t span[2] = { e->consumed + (size_t) (event - e->buf), size };
        const char *d;
        size_t n;

        assert(size > 0);
        d = sse_event_data(event, size, &n);
        if (d)
                assert(d >= event && d + n <= event + size);
        g_array_append_vals(e->spans, span, 2);
}

static uint32_t next(uint32_t *state) {
        *state = *state * 1103515245u + 12345u;
        return *state >> 16;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        g_autoptr(GArray) want = g_array_new(FALSE, FALSE, sizeof(size_t));
        g_autoptr(GArray) got = g_array_new(FALSE, FALSE, sizeof(size_t));
        g_autofree char *buf = NULL;
        SseScanner one = {}, s = {};
        uint32_t state;
        size_t fed = 0, buf_size = 0;

        if (size < 1)
                return 0;
        state = data[0];
        data++, size--;

        /* The reference: everything at once, nothing consumed. */
        Events ref = { want, (const char *) data, 0 };
        sse_scanner_scan(&one, (const char *) data, size, on_event, &ref);
        assert(one.boundary <= size && one.scanned == size);

        Events inc = { got, NULL, 0 };
        buf = g_malloc(size + 1);
        while (fed < size) {
                size_t piece = 1 + next(&state) % (next(&state) % 4 == 0 ? 4096 : 32);

                piece = MIN(piece, size - fed);
                memcpy(buf + buf_size, data + fed, piece);
                buf_size += piece;
                fed += piece;
                inc.buf = buf;
                sse_scanner_scan(&s, buf, buf_size, on_event, &inc);
                assert(s.scanned == buf_size);
                assert(s.event_start <= buf_size && s.boundary <= buf_size);

                /* The client takes some or all of the whole events. */
                if (s.boundary > 0 && next(&state) % 2) {
                        size_t n = next(&state) % 3 == 0 ? s.boundary : 1 + next(&state) % s.boundary;
                        memmove(buf, buf + n, buf_size - n);
                        buf_size -= n;
                        inc.consumed += n;
                        sse_scanner_consumed(&s, n);
                }
        }

        assert(s.events == one.events);
        assert(s.done == one.done);
        assert(inc.consumed + s.boundary == one.boundary);
        assert(got->len == want->len);
        if (got->len > 0)
                assert(memcmp(got->data, want->data, got->len * sizeof(size_t)) == 0);
        return 0;
}
