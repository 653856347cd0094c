/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <string.h>

#include "json-util.h"
#include "sse.h"
#include "util.h"

enum {
        STATE_LINE_START,         /* at the start of a line */
        STATE_LINE_START_AFTER_CR,/* at the start of a line that followed a CR: an LF here belongs to it */
        STATE_IN_LINE,            /* inside a non-empty line */
        STATE_EMPTY_AFTER_CR,     /* an empty line ended in CR: an LF here belongs to it */
};

static void event_complete(SseScanner *s, const char *buf, size_t end, SseEventFunc func, void *userdata) {
        const char *data;
        size_t n;

        s->boundary = end;
        if (end > s->event_start) {
                data = sse_event_data(buf + s->event_start, end - s->event_start, &n);
                if (data) {
                        s->events++;
                        if (n == 6 && memcmp(data, "[DONE]", 6) == 0)
                                s->done = true;
                }
                if (func)
                        func(buf + s->event_start, end - s->event_start, userdata);
        }
        s->event_start = end;
}

void sse_scanner_scan(SseScanner *s, const char *buf, size_t size, SseEventFunc func, void *userdata) {
        size_t i = s->scanned;

        while (i < size) {
                char c = buf[i];

                switch (s->state) {
                case STATE_IN_LINE: {
                        /* Fast path: skip to the next line ending. */
                        const char *nl = memchr(buf + i, '\n', size - i);
                        const char *cr = memchr(buf + i, '\r', (nl ? (size_t) (nl - buf) : size) - i);
                        const char *e = cr ?: nl;
                        if (!e) {
                                i = size;
                                continue;
                        }
                        i = (size_t) (e - buf) + 1;
                        s->state = *e == '\r' ? STATE_LINE_START_AFTER_CR : STATE_LINE_START;
                        continue;
                }
                case STATE_LINE_START_AFTER_CR:
                        if (c == '\n') {
                                s->state = STATE_LINE_START;
                                i++;
                                continue;
                        }
                        s->state = STATE_LINE_START;
                        _fallthrough_;
                case STATE_LINE_START:
                        if (c == '\n') {
                                i++;
                                event_complete(s, buf, i, func, userdata);
                                s->state = STATE_LINE_START;
                        } else if (c == '\r') {
                                i++;
                                event_complete(s, buf, i, func, userdata);
                                s->state = STATE_EMPTY_AFTER_CR;
                        } else
                                s->state = STATE_IN_LINE;
                        continue;
                case STATE_EMPTY_AFTER_CR:
                        if (c == '\n') {
                                /* The LF completes the CRLF of the empty line: keep it with the event. */
                                i++;
                                s->boundary = i;
                                s->event_start = i;
                        }
                        s->state = STATE_LINE_START;
                        continue;
                }
        }
        s->scanned = size;
}

void sse_scanner_consumed(SseScanner *s, size_t n) {
        g_assert(n <= s->boundary);
        s->scanned -= n;
        s->event_start -= n;
        s->boundary -= n;
}

/* The end of the line at p: its CR or LF, or end. memchr(), not a byte-by-byte walk: every event
 * of every stream is read here, twice. */
static const char *line_end(const char *p, const char *end) {
        const char *nl = memchr(p, '\n', (size_t) (end - p));
        const char *cr = memchr(p, '\r', (size_t) ((nl ?: end) - p));

        return cr ?: nl ?: end;
}

/* The next "data:" line of an event from *p on: its payload (without the field name and the one
 * optional space). Moves *p past it; false when there is none. */
static bool next_data_line(const char **p, const char *end, const char **ret, size_t *ret_size) {
        while (*p < end) {
                const char *line = *p, *eol = line_end(line, end);

                /* One line ending: CRLF, CR or LF. */
                *p = eol;
                if (*p < end && **p == '\r')
                        (*p)++;
                if (*p < end && **p == '\n')
                        (*p)++;
                if ((size_t) (eol - line) >= 5 && memcmp(line, "data:", 5) == 0) {
                        const char *d = line + 5;
                        if (d < eol && *d == ' ')
                                d++;
                        *ret = d;
                        *ret_size = (size_t) (eol - d);
                        return true;
                }
        }
        return false;
}

const char *sse_event_data(const char *event, size_t size, size_t *ret_size) {
        const char *p = event, *d;

        if (!next_data_line(&p, event + size, &d, ret_size))
                return NULL;
        return d;
}

GString *sse_event_data_joined(const char *event, size_t size) {
        const char *p = event, *d;
        GString *s = NULL;
        size_t n;

        while (next_data_line(&p, event + size, &d, &n)) {
                if (!s)
                        s = g_string_sized_new(n);
                else
                        g_string_append_c(s, '\n');
                g_string_append_len(s, d, (gssize) n);
        }
        return s;
}

char *sse_format_error(const char *type, const char *message, const char *provider, size_t *ret_size) {
        g_autofree char *json = json_error_body(type, message, provider, NULL);
        char *s = g_strconcat("data: ", json, "\n\n", NULL);
        *ret_size = strlen(s);
        return s;
}
