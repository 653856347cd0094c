/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* SSE framing: event boundaries in any chunking with any line ending, [DONE], consumed(),
 * sse_event_data() and the error event. */

#include <json-glib/json-glib.h>

#include "sse.h"
#include "test-util.h"
#include "util.h"

typedef enum ConsumeMode {
        CONSUME_NONE,   /* the buffer keeps everything */
        CONSUME_ALL,    /* whole events are handed on after every chunk, as the proxy does */
        CONSUME_HALF,   /* only part of what is whole is handed on */
} ConsumeMode;

/* Plays the proxy: appends chunks to a buffer, scans, hands whole events on. */
typedef struct Feed {
        SseScanner s;
        GByteArray *buf;        /* not yet handed on */
        GString *out;           /* handed on, in order */
        GPtrArray *events;      /* GString*: each event as the callback saw it */
        ConsumeMode mode;
} Feed;

static void feed_init(Feed *f, ConsumeMode mode) {
        *f = (Feed) {
                .buf = g_byte_array_new(),
                .out = g_string_new(NULL),
                .events = g_ptr_array_new_with_free_func(test_string_free),
                .mode = mode,
        };
}

static void feed_done(Feed *f) {
        g_byte_array_unref(f->buf);
        g_string_free(f->out, TRUE);
        g_ptr_array_unref(f->events);
}

static void on_event(const char *event, size_t size, void *userdata) {
        Feed *f = userdata;

        ck_assert_uint_gt(size, 0);
        /* The event lies inside the buffer, before the boundary being set. */
        ck_assert(event >= (const char *) f->buf->data);
        ck_assert(event + size <= (const char *) f->buf->data + f->buf->len);
        g_ptr_array_add(f->events, g_string_new_len(event, (gssize) size));
}

static void feed_consume(Feed *f, size_t n) {
        ck_assert_uint_le(n, f->s.boundary);
        g_string_append_len(f->out, (const char *) f->buf->data, (gssize) n);
        g_byte_array_remove_range(f->buf, 0, (guint) n);
        sse_scanner_consumed(&f->s, n);
}

static void feed_chunk(Feed *f, const char *data, size_t n) {
        size_t before = f->s.boundary;

        g_byte_array_append(f->buf, (const guint8 *) data, (guint) n);
        sse_scanner_scan(&f->s, (const char *) f->buf->data, f->buf->len, on_event, f);
        ck_assert_uint_eq(f->s.scanned, f->buf->len);
        ck_assert_uint_ge(f->s.boundary, before); /* never moves back */
        ck_assert_uint_le(f->s.boundary, f->buf->len);

        if (f->mode == CONSUME_ALL)
                feed_consume(f, f->s.boundary);
        else if (f->mode == CONSUME_HALF)
                feed_consume(f, f->s.boundary / 2);
}

/* The upstream finished: whatever is left goes out too. */
static void feed_finish(Feed *f) {
        g_string_append_len(f->out, (const char *) f->buf->data, (gssize) f->buf->len);
        g_byte_array_set_size(f->buf, 0);
}

/* Chunk sizes: 0 = all at once, 1 = byte by byte, else random sizes up to that. */
static void feed_all(Feed *f, const char *data, size_t n, size_t max_chunk, GRand *rand) {
        size_t i = 0;

        while (i < n) {
                size_t k;

                if (max_chunk == 0)
                        k = n;
                else if (max_chunk == 1 || !rand)
                        k = max_chunk;
                else
                        k = (size_t) g_rand_int_range(rand, 1, (gint32) max_chunk + 1);
                k = MIN(k, n - i);
                feed_chunk(f, data + i, k);
                i += k;
        }
}

/* An independent reading of the byte stream: lines end in CRLF, LF or CR; an empty line ends
 * the event. The event as the scanner reports it ends with the first byte of the empty line's
 * ending; the byte after a CR of a CRLF is handed on with it. */
typedef struct Expected {
        GPtrArray *events;      /* GString* */
        size_t boundary;        /* end of the last whole event, LF of a CRLF included */
        uint64_t data_events;   /* events with a data: line */
        bool done;
} Expected;

static bool reference_first_data(const char *e, size_t n, const char **ret, size_t *ret_size) {
        size_t i = 0;

        while (i < n) {
                size_t j = i;
                while (j < n && e[j] != '\r' && e[j] != '\n')
                        j++;
                if (j - i >= 5 && strncmp(e + i, "data:", 5) == 0) {
                        size_t k = i + 5;
                        if (k < j && e[k] == ' ')
                                k++;
                        *ret = e + k;
                        *ret_size = j - k;
                        return true;
                }
                i = j;
                if (i < n && e[i] == '\r' && i + 1 < n && e[i + 1] == '\n')
                        i += 2;
                else if (i < n)
                        i++;
        }
        return false;
}

static void reference(const char *in, size_t n, Expected *ret) {
        size_t pos = 0, start = 0;

        *ret = (Expected) { .events = g_ptr_array_new_with_free_func(test_string_free) };
        while (pos < n) {
                size_t e = pos, term;

                while (e < n && in[e] != '\r' && in[e] != '\n')
                        e++;
                if (e == n)
                        break; /* an unfinished line */
                term = in[e] == '\r' && e + 1 < n && in[e + 1] == '\n' ? 2 : 1;
                if (e == pos) {
                        const char *d;
                        size_t dn;

                        g_ptr_array_add(ret->events, g_string_new_len(in + start, (gssize) (e + 1 - start)));
                        if (reference_first_data(in + start, e + 1 - start, &d, &dn)) {
                                ret->data_events++;
                                if (dn == 6 && memcmp(d, "[DONE]", 6) == 0)
                                        ret->done = true;
                        }
                        start = e + term;
                }
                pos = e + term;
        }
        ret->boundary = start;
}

static void expected_done(Expected *e) {
        g_ptr_array_unref(e->events);
}

static void assert_events_equal(const GPtrArray *got, const GPtrArray *want, const char *what) {
        ck_assert_msg(got->len == want->len, "%s: %u events, expected %u", what, got->len, want->len);
        for (guint i = 0; i < got->len; i++) {
                const GString *a = got->pdata[i], *b = want->pdata[i];
                g_autofree char *ea = g_strescape(a->str, NULL), *eb = g_strescape(b->str, NULL);
                ck_assert_msg(a->len == b->len && memcmp(a->str, b->str, a->len) == 0, "%s: event %u is '%s', expected '%s'",
                              what, i, ea, eb);
        }
}

/* Runs one input through every way of feeding it and checks all against the reference. */
static void check_stream(const char *in, size_t n, GRand *rand) {
        static const size_t chunkings[] = { 0, 1, 2, 3, 7, 64 };
        g_autofree char *escaped = g_strescape(in, NULL);
        Expected want;

        reference(in, n, &want);
        for (size_t c = 0; c < ELEMENTSOF(chunkings); c++)
                for (ConsumeMode mode = CONSUME_NONE; mode <= CONSUME_HALF; mode++) {
                        g_autofree char *what = g_strdup_printf("'%s' in chunks of %zu, mode %d", escaped,
                                                                chunkings[c], (int) mode);
                        Feed f;

                        feed_init(&f, mode);
                        feed_all(&f, in, n, chunkings[c], rand);
                        assert_events_equal(f.events, want.events, what);
                        ck_assert_msg(f.s.events == want.data_events, "%s: %" PRIu64 " data events, expected %" PRIu64,
                                      what, f.s.events, want.data_events);
                        ck_assert_msg(f.s.done == want.done, "%s: done=%d", what, f.s.done);
                        ck_assert_msg(f.out->len + f.s.boundary == want.boundary, "%s: boundary %zu+%zu, expected %zu",
                                      what, f.out->len, f.s.boundary, want.boundary);
                        feed_finish(&f);
                        ck_assert_msg(f.out->len == n && memcmp(f.out->str, in, n) == 0, "%s: bytes lost or changed", what);
                        feed_done(&f);
                }
        expected_done(&want);
}

/* Feeds the input in two pieces split at every byte and compares with feeding it whole. */
static void check_every_split(const char *in) {
        size_t n = strlen(in);
        Feed whole;

        feed_init(&whole, CONSUME_NONE);
        feed_chunk(&whole, in, n);
        for (size_t i = 0; i <= n; i++)
                for (ConsumeMode mode = CONSUME_NONE; mode <= CONSUME_HALF; mode++) {
                        g_autofree char *what = g_strdup_printf("split at %zu, mode %d", i, (int) mode);
                        Feed f;

                        feed_init(&f, mode);
                        feed_chunk(&f, in, i);
                        feed_chunk(&f, in + i, n - i);
                        assert_events_equal(f.events, whole.events, what);
                        ck_assert_uint_eq(f.s.events, whole.s.events);
                        ck_assert_int_eq(f.s.done, whole.s.done);
                        ck_assert_uint_eq(f.out->len + f.s.boundary, whole.s.boundary);
                        feed_done(&f);
                }
        feed_done(&whole);
}

static void check_events(const char *in, const char *const *events, size_t boundary, uint64_t data_events, bool done) {
        g_autoptr(GPtrArray) want = g_ptr_array_new_with_free_func(test_string_free);
        Feed f;

        for (const char *const *e = events; *e; e++)
                g_ptr_array_add(want, g_string_new(*e));

        feed_init(&f, CONSUME_NONE);
        feed_chunk(&f, in, strlen(in));
        assert_events_equal(f.events, want, "whole");
        ck_assert_uint_eq(f.s.boundary, boundary);
        ck_assert_uint_eq(f.s.events, data_events);
        ck_assert_int_eq(f.s.done, done);
        feed_done(&f);

        check_every_split(in);
        check_stream(in, strlen(in), NULL);
}

START_TEST(test_lf) {
        const char *in = "data: a\n\ndata: b\n\n";
        check_events(in, (const char *const[]) { "data: a\n\n", "data: b\n\n", NULL }, strlen(in), 2, false);
}
END_TEST

START_TEST(test_crlf) {
        const char *in = "data: a\r\n\r\ndata: b\r\n\r\n";
        /* The LF of the final CRLF is handed on with the event, but the event is whole at the CR. */
        check_events(in, (const char *const[]) { "data: a\r\n\r", "data: b\r\n\r", NULL }, strlen(in), 2, false);
}
END_TEST

START_TEST(test_cr) {
        const char *in = "data: a\r\rdata: b\r\r";
        check_events(in, (const char *const[]) { "data: a\r\r", "data: b\r\r", NULL }, strlen(in), 2, false);
}
END_TEST

START_TEST(test_mixed_line_endings) {
        const char *in = "data: a\n\r\n"     /* LF line, CRLF empty line */
                         "data: b\r\n\n"     /* CRLF line, LF empty line */
                         "data: c\r\r\n"     /* CR line, CRLF empty line */
                         "data: d\r\n\r";    /* CRLF line, CR empty line */
        check_events(in,
                     (const char *const[]) { "data: a\n\r", "data: b\r\n\n", "data: c\r\r", "data: d\r\n\r", NULL },
                     strlen(in), 4, false);
}
END_TEST

START_TEST(test_crlf_is_one_line_ending) {
        /* "\r\n" after a line is one ending, not a line and an empty line. */
        const char *in = "data: a\r\ndata: b\r\n";
        check_events(in, (const char *const[]) { NULL }, 0, 0, false);
}
END_TEST

START_TEST(test_multi_line_event) {
        const char *in = "event: message\nid: 7\nretry: 100\ndata: {\"a\":1}\ndata: more\n\n";
        check_events(in, (const char *const[]) { in, NULL }, strlen(in), 1, false);
}
END_TEST

START_TEST(test_incomplete_event_held_back) {
        const char *in = "data: a\n\ndata: partial\n";
        check_events(in, (const char *const[]) { "data: a\n\n", NULL }, 9, 1, false);
        check_events("data: no end", (const char *const[]) { NULL }, 0, 0, false);
        check_events("", (const char *const[]) { NULL }, 0, 0, false);
}
END_TEST

START_TEST(test_comments_and_blank_lines) {
        const char *in = ": keep-alive\n\n\ndata: x\n\n";
        /* A comment-only event is handed on but has no data; a stray empty line is passed on too. */
        check_events(in, (const char *const[]) { ": keep-alive\n\n", "\n", "data: x\n\n", NULL }, strlen(in), 1, false);
}
END_TEST

START_TEST(test_done) {
        check_events("data: {\"x\":1}\n\ndata: [DONE]\n\n",
                     (const char *const[]) { "data: {\"x\":1}\n\n", "data: [DONE]\n\n", NULL }, 29, 2, true);
        check_events("data:[DONE]\r\n\r\n", (const char *const[]) { "data:[DONE]\r\n\r", NULL }, 15, 1, true);
        check_events("data: [DONE]\r\r", (const char *const[]) { "data: [DONE]\r\r", NULL }, 14, 1, true);
        check_events("data: [DONE] \n\n", (const char *const[]) { "data: [DONE] \n\n", NULL }, 15, 1, false);
        check_events("data: [DONE]x\n\n", (const char *const[]) { "data: [DONE]x\n\n", NULL }, 15, 1, false);
        check_events("data: {\"t\":\"[DONE]\"}\n\n", (const char *const[]) { "data: {\"t\":\"[DONE]\"}\n\n", NULL }, 22, 1,
                     false);
        check_events(": [DONE]\n\n", (const char *const[]) { ": [DONE]\n\n", NULL }, 10, 0, false);
        /* Not yet whole: not done yet. */
        check_events("data: [DONE]\n", (const char *const[]) { NULL }, 0, 0, false);
}
END_TEST

START_TEST(test_no_callback) {
        const char *in = "data: a\n\ndata: [DONE]\n\n";
        SseScanner s = {};

        sse_scanner_scan(&s, in, strlen(in), NULL, NULL);
        ck_assert_uint_eq(s.events, 2);
        ck_assert(s.done);
        ck_assert_uint_eq(s.boundary, strlen(in));
}
END_TEST

START_TEST(test_consumed_bookkeeping) {
        Feed f;
        const GString *e;

        feed_init(&f, CONSUME_NONE);
        feed_chunk(&f, "data: a\n\ndata: b", 16);
        ck_assert_uint_eq(f.s.boundary, 9);
        ck_assert_uint_eq(f.s.scanned, 16);
        ck_assert_uint_eq(f.events->len, 1);

        feed_consume(&f, 0);
        ck_assert_uint_eq(f.s.boundary, 9);

        feed_consume(&f, 4); /* part of a whole event */
        ck_assert_uint_eq(f.s.boundary, 5);
        ck_assert_uint_eq(f.s.scanned, 12);
        ck_assert_uint_eq(f.s.event_start, 5);

        feed_consume(&f, 5);
        ck_assert_uint_eq(f.s.boundary, 0);
        ck_assert_uint_eq(f.s.scanned, 7);
        ck_assert_uint_eq(f.s.event_start, 0);
        ck_assert_uint_eq(f.buf->len, 7);

        /* The next event is found relative to the shortened buffer. */
        feed_chunk(&f, "\n\n", 2);
        ck_assert_uint_eq(f.events->len, 2);
        e = f.events->pdata[1];
        ck_assert_str_eq(e->str, "data: b\n\n");
        ck_assert_uint_eq(f.s.boundary, 9);
        ck_assert_uint_eq(f.s.scanned, 9);
        ck_assert_uint_eq(f.s.events, 2);
        feed_consume(&f, 9);
        ck_assert_uint_eq(f.s.boundary, 0);
        ck_assert_uint_eq(f.s.scanned, 0);
        ck_assert_str_eq(f.out->str, "data: a\n\ndata: b\n\n");
        feed_done(&f);
}
END_TEST

START_TEST(test_consumed_between_cr_and_lf) {
        Feed f;

        feed_init(&f, CONSUME_ALL);
        /* The event is whole at the CR of the empty line, and goes out at once... */
        feed_chunk(&f, "data: a\r\n\r", 10);
        ck_assert_uint_eq(f.events->len, 1);
        ck_assert_str_eq(f.out->str, "data: a\r\n\r");
        ck_assert_uint_eq(f.s.boundary, 0);
        /* ...and the LF that completes the CRLF follows without starting an event. */
        feed_chunk(&f, "\n", 1);
        ck_assert_uint_eq(f.events->len, 1);
        ck_assert_str_eq(f.out->str, "data: a\r\n\r\n");
        ck_assert_uint_eq(f.buf->len, 0);
        feed_chunk(&f, "data: b\r\n\r\n", 11);
        ck_assert_uint_eq(f.events->len, 2);
        ck_assert_str_eq(((GString *) f.events->pdata[1])->str, "data: b\r\n\r");
        ck_assert_str_eq(f.out->str, "data: a\r\n\r\ndata: b\r\n\r\n");
        ck_assert_uint_eq(f.s.events, 2);
        feed_done(&f);
}
END_TEST

static const char *const random_lines[] = {
        "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}",
        "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"a\\\"\"}}]}}]}",
        "data:[DONE]",
        "data: [DONE]",
        "data:",
        "data",
        ": keep-alive",
        ":",
        "event: message",
        "id: 42",
        "retry: 1000",
        "data: multi",
        "x",
};

static const char *const random_endings[] = { "\n", "\r\n", "\r" };

static GString *random_stream(GRand *rand) {
        GString *s = g_string_new(NULL);
        int n_events = g_rand_int_range(rand, 0, 8);

        for (int e = 0; e < n_events; e++) {
                int n_lines = g_rand_int_range(rand, 0, 4);
                for (int l = 0; l < n_lines; l++) {
                        g_string_append(s, random_lines[g_rand_int_range(rand, 0, ELEMENTSOF(random_lines))]);
                        g_string_append(s, random_endings[g_rand_int_range(rand, 0, ELEMENTSOF(random_endings))]);
                }
                g_string_append(s, random_endings[g_rand_int_range(rand, 0, ELEMENTSOF(random_endings))]);
        }
        if (g_rand_boolean(rand)) /* an unfinished event at the end */
                g_string_append(s, random_lines[g_rand_int_range(rand, 0, ELEMENTSOF(random_lines))]);
        if (g_rand_boolean(rand))
                g_string_append(s, random_endings[g_rand_int_range(rand, 0, ELEMENTSOF(random_endings))]);
        return s;
}

START_TEST(test_random_streams_any_chunking) {
        g_autoptr(GRand) rand = g_rand_new_with_seed(20240917);

        for (int i = 0; i < 400; i++) {
                g_autoptr(GString) s = random_stream(rand);
                check_stream(s->str, s->len, rand);
        }
}
END_TEST

START_TEST(test_random_streams_every_split) {
        g_autoptr(GRand) rand = g_rand_new_with_seed(7);

        for (int i = 0; i < 40; i++) {
                g_autoptr(GString) s = random_stream(rand);
                check_every_split(s->str);
        }
}
END_TEST

static void assert_data(const char *event, const char *expected) {
        size_t n = 12345;
        const char *d = sse_event_data(event, strlen(event), &n);
        g_autofree char *escaped = g_strescape(event, NULL);

        if (!expected) {
                ck_assert_msg(!d, "'%s' has data", escaped);
                ck_assert_uint_eq(n, 12345);
                return;
        }
        ck_assert_msg(d, "'%s' has no data", escaped);
        ck_assert_msg(n == strlen(expected) && memcmp(d, expected, n) == 0, "'%s': data '%.*s', expected '%s'", escaped,
                      (int) n, d, expected);
}

START_TEST(test_event_data) {
        assert_data("data: hello\n\n", "hello");
        assert_data("data:hello\n\n", "hello");
        assert_data("data:  two spaces\n\n", " two spaces");
        assert_data("data:\n\n", "");
        assert_data("data: \n\n", "");
        assert_data("data: x", "x");
        assert_data("data: crlf\r\n\r", "crlf");
        assert_data("data: cr\r\r", "cr");
        assert_data("event: e\ndata: second line\n\n", "second line");
        assert_data("event: e\r\ndata: after crlf\r\n\r", "after crlf");
        assert_data("id: 1\rdata: after cr\r\r", "after cr");
        assert_data(": comment\ndata: z\n\n", "z");
        assert_data("data: first\ndata: second\n\n", "first");
        assert_data("data: {\"a\":\"b: c\"}\n\n", "{\"a\":\"b: c\"}");

        assert_data(": data: in a comment\n\n", NULL);
        assert_data("id: 1\n\n", NULL);
        assert_data(" data: leading space\n\n", NULL);
        assert_data("datax: y\n\n", NULL);
        assert_data("event: data:\n\n", NULL);
        assert_data("dat", NULL);
        assert_data("\n", NULL);
        assert_data("", NULL);
}
END_TEST

START_TEST(test_event_data_size_is_honoured) {
        const char buf[] = "data: abcdef\n\n";
        size_t n;
        const char *d;

        d = sse_event_data(buf, 8, &n); /* "data: ab" */
        ck_assert_ptr_eq(d, buf + 6);
        ck_assert_uint_eq(n, 2);
        ck_assert_ptr_null(sse_event_data(buf, 4, &n));
}
END_TEST

static void check_error_event(const char *type, const char *message, const char *provider) {
        g_autoptr(JsonParser) parser = json_parser_new();
        g_autoptr(GError) error = NULL;
        g_autofree char *ev = NULL;
        JsonObject *o;
        const char *d;
        size_t n = 0, dn;
        Feed f;

        ev = sse_format_error(type, message, provider, &n);
        ck_assert_ptr_nonnull(ev);
        ck_assert_uint_eq(n, strlen(ev));
        ck_assert(g_str_has_prefix(ev, "data: "));
        ck_assert(g_str_has_suffix(ev, "\n\n"));
        /* One line of data and the empty line: nothing in the message can end it early. */
        ck_assert_ptr_eq(strchr(ev, '\n'), ev + n - 2);
        ck_assert_ptr_null(strchr(ev, '\r'));

        feed_init(&f, CONSUME_NONE);
        feed_chunk(&f, ev, n);
        ck_assert_uint_eq(f.events->len, 1);
        ck_assert_uint_eq(f.s.events, 1);
        ck_assert_uint_eq(f.s.boundary, n);
        ck_assert(!f.s.done);
        feed_done(&f);

        d = sse_event_data(ev, n, &dn);
        ck_assert_ptr_nonnull(d);
        ck_assert_msg(json_parser_load_from_data(parser, d, (gssize) dn, &error), "not JSON: %s", ev);
        ck_assert(JSON_NODE_HOLDS_OBJECT(json_parser_get_root(parser)));
        o = json_node_get_object(json_parser_get_root(parser));
        ck_assert_uint_eq(json_object_get_size(o), 1);
        o = json_object_get_object_member(o, "error");
        ck_assert_ptr_nonnull(o);
        ck_assert_str_eq(json_object_get_string_member(o, "message"), message);
        ck_assert_str_eq(json_object_get_string_member(o, "type"), type);
        if (provider)
                ck_assert_str_eq(json_object_get_string_member(o, "provider"), provider);
        else
                ck_assert(!json_object_has_member(o, "provider"));
}

START_TEST(test_format_error) {
        check_error_event("connection_error", "Provider 'p' failed during the stream: Connection reset", "p");
        check_error_event("timeout_error", "line one\n\nline two\r\rdata: [DONE]\r\n\r\n", "qwen-proxy");
        check_error_event("provider_error", "quotes \" and \\ backslash, tab\t, ünïcode ✓, nul-free", NULL);
        check_error_event("connection_error", "", "echo");
}
END_TEST

START_TEST(test_format_error_after_whole_events) {
        /* What the client sees when a provider dies mid-stream: the whole events, then the
         * error event, with the half event dropped. */
        const char *in = "data: {\"a\":1}\r\n\r\ndata: {\"half";
        g_autofree char *ev = NULL;
        g_autoptr(GString) client = g_string_new(NULL);
        size_t n;
        Feed f;

        feed_init(&f, CONSUME_NONE);
        feed_chunk(&f, in, strlen(in));
        ck_assert_uint_eq(f.s.boundary, 17);
        g_string_append_len(client, in, (gssize) f.s.boundary);
        feed_done(&f);

        ev = sse_format_error("connection_error", "gone", "p", &n);
        g_string_append_len(client, ev, (gssize) n);

        feed_init(&f, CONSUME_NONE);
        feed_chunk(&f, client->str, client->len);
        ck_assert_uint_eq(f.events->len, 2);
        ck_assert_str_eq(((GString *) f.events->pdata[1])->str, ev);
        ck_assert_uint_eq(f.s.boundary, client->len);
        ck_assert_uint_eq(f.s.events, 2);
        feed_done(&f);
}
END_TEST

static Suite *sse_suite(void) {
        Suite *s = suite_create("sse");
        TCase *tc;

        tc = tcase_create("scanner");
        tcase_set_timeout(tc, 120);
        tcase_add_test(tc, test_lf);
        tcase_add_test(tc, test_crlf);
        tcase_add_test(tc, test_cr);
        tcase_add_test(tc, test_mixed_line_endings);
        tcase_add_test(tc, test_crlf_is_one_line_ending);
        tcase_add_test(tc, test_multi_line_event);
        tcase_add_test(tc, test_incomplete_event_held_back);
        tcase_add_test(tc, test_comments_and_blank_lines);
        tcase_add_test(tc, test_done);
        tcase_add_test(tc, test_no_callback);
        tcase_add_test(tc, test_consumed_bookkeeping);
        tcase_add_test(tc, test_consumed_between_cr_and_lf);
        tcase_add_test(tc, test_random_streams_any_chunking);
        tcase_add_test(tc, test_random_streams_every_split);
        suite_add_tcase(s, tc);

        tc = tcase_create("event");
        tcase_add_test(tc, test_event_data);
        tcase_add_test(tc, test_event_data_size_is_honoured);
        tcase_add_test(tc, test_format_error);
        tcase_add_test(tc, test_format_error_after_whole_events);
        suite_add_tcase(s, tc);

        return s;
}

int main(void) {
        return test_run_suite(sse_suite());
}
