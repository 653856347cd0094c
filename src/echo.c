/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <json-glib/json-glib.h>

#include "echo.h"
#include "json-scan.h"
#include "json-util.h"
#include "log.h"
#include "request.h"

/* The built-in "echo" provider answers in OpenAI's format with the last user message, so a
 * client can be tried with no backend at all.
 *
 * Whatever the client sends, the answer is bounded: at most ECHO_REPLY_MAX bytes of the message
 * are echoed (then finish_reason is "length"), and a stream — one event per word — is written a
 * few events at a time, as the client reads it, so that no request holds the loop. */

#define ECHO_REPLY_MAX (64 * 1024)
/* Events written per turn of the loop, at most; the stream's buffer usually fills first. */
#define ECHO_EVENTS_PER_SLICE 256

/* ---- reading the request ----------------------------------------------------------------- */

typedef struct Members {
        const char *names[3];
        JsonSpan values[3];
} Members;

static int members_collect(const JsonSpan *key, const JsonSpan *value, void *userdata) {
        Members *m = userdata;

        for (size_t i = 0; i < ELEMENTSOF(m->names) && m->names[i]; i++)
                if (json_span_equal(key, m->names[i]))
                        m->values[i] = *value;
        return 0;
}

/* The members named, of the object at data (missing ones have size 0). */
static bool object_members(const char *data, size_t size, Members *m) {
        return size > 0 && data[0] == '{' && json_scan(data, size, members_collect, m, NULL) >= 0;
}

static void append_string(GString *s, const JsonSpan *v) {
        g_autofree char *text = NULL;

        if (v->type != JSON_VALUE_STRING || v->size < 2)
                return;
        if (!v->escaped) {
                g_string_append_len(s, v->data + 1, (gssize) v->size - 2);
                return;
        }
        text = json_span_to_string(v); /* NULL when it holds U+0000: nothing to echo */
        if (text)
                g_string_append(s, text);
}

static int append_part(const char *data, size_t size, void *userdata) {
        Members m = { .names = { "text" } };

        /* {"type":"text","text":"…"} */
        if (object_members(data, size, &m))
                append_string(userdata, &m.values[0]);
        return 0;
}

static uint64_t count_words(const char *s, size_t n) {
        uint64_t words = 0;
        bool prev_space = true;

        /* A word starts where a byte that is not space follows one that is; no branches, so
         * that 8 MB take a few milliseconds. */
        for (size_t i = 0; i < n; i++) {
                bool space = g_ascii_isspace(s[i]);
                words += prev_space & !space;
                prev_space = space;
        }
        return words;
}

typedef struct EchoInput {
        GString *reply;            /* the last user message */
        JsonSpan reply_span;       /* ... or where it is, when it is one plain string */
        uint64_t prompt_words;
        bool include_usage;
} EchoInput;

/* One of the messages; the request passed json_scan() already (inspect_chat_request()). */
static int read_message(const char *data, size_t size, void *userdata) {
        EchoInput *in = userdata;
        Members m = { .names = { "role", "content" } };
        g_autoptr(GString) text = NULL;
        const JsonSpan *content = &m.values[1];
        bool user;

        if (!object_members(data, size, &m))
                return 0;
        user = json_span_equal(&m.values[0], "user");
        if (content->type == JSON_VALUE_STRING && !content->escaped && content->size >= 2) {
                /* The common case needs no copy: counted in place, copied (bounded) at the end. */
                in->prompt_words += count_words(content->data + 1, content->size - 2);
                if (user) {
                        g_string_truncate(in->reply, 0);
                        in->reply_span = *content;
                }
                return 0;
        }
        text = g_string_new(NULL);
        if (content->type == JSON_VALUE_STRING)
                append_string(text, content);
        else if (content->type == JSON_VALUE_ARRAY)
                (void) json_array_foreach(content, append_part, text);
        in->prompt_words += count_words(text->str, text->len);
        if (user) {
                g_string_free(in->reply, TRUE);
                in->reply = TAKE_PTR(text);
                in->reply_span = (JsonSpan) {};
        }
        return 0;
}

static int echo_read_request(const char *body, size_t body_size, EchoInput *ret) {
        Members top = { .names = { "messages", "stream_options" } };
        Members opts = { .names = { "include_usage" } };
        EchoInput in = { .reply = g_string_new(NULL) };

        if (!object_members(body, body_size, &top) || top.values[0].type != JSON_VALUE_ARRAY ||
            top.values[0].size == 0) {
                g_string_free(in.reply, TRUE);
                return -EINVAL;
        }
        (void) json_array_foreach(&top.values[0], read_message, &in);
        if (in.reply_span.size >= 2)
                /* One byte more than is echoed, so that a cut is seen. */
                g_string_append_len(in.reply, in.reply_span.data + 1,
                                    (gssize) MIN(in.reply_span.size - 2, (size_t) ECHO_REPLY_MAX + 4));
        if (top.values[1].type == JSON_VALUE_OBJECT && object_members(top.values[1].data, top.values[1].size, &opts))
                in.include_usage = opts.values[0].type == JSON_VALUE_TRUE && opts.values[0].size > 0;
        *ret = in;
        return 0;
}

/* ---- writing the answer ------------------------------------------------------------------ */

static void add_usage(JsonBuilder *b, uint64_t prompt, uint64_t completion) {
        json_builder_set_member_name(b, "usage");
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "prompt_tokens");
        json_builder_add_int_value(b, (gint64) prompt);
        json_builder_set_member_name(b, "completion_tokens");
        json_builder_add_int_value(b, (gint64) completion);
        json_builder_set_member_name(b, "total_tokens");
        json_builder_add_int_value(b, (gint64) (prompt + completion));
        json_builder_end_object(b);
}

typedef struct Echo {
        Request *request;
        char *reply;               /* at most ECHO_REPLY_MAX bytes */
        size_t pos;                /* of the next word to stream */
        char *id;
        char *model;
        gint64 created;
        uint64_t prompt_tokens;
        uint64_t completion_tokens;
        bool include_usage;
        bool truncated;            /* finish_reason "length" */
        enum { ECHO_ROLE, ECHO_WORDS, ECHO_FINISH, ECHO_USAGE, ECHO_DONE, ECHO_END } step;
        sd_event_source *more;     /* a slice ended before the buffer was full */
        GString *logged;           /* the stream's first bytes, for LogResponses=true */
} Echo;

/* As much of a streamed answer as the log keeps. */
#define ECHO_LOGGED_MAX 4096

static void echo_free(void *data) {
        Echo *e = data;

        if (!e)
                return;
        sd_event_source_disable_unref(e->more);
        if (e->logged)
                g_string_free(e->logged, TRUE);
        g_free(e->reply);
        g_free(e->id);
        g_free(e->model);
        g_free(e);
}

static void begin_chunk(JsonBuilder *b, const Echo *e, const char *object) {
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "id");
        json_builder_add_string_value(b, e->id);
        json_builder_set_member_name(b, "object");
        json_builder_add_string_value(b, object);
        json_builder_set_member_name(b, "created");
        json_builder_add_int_value(b, e->created);
        json_builder_set_member_name(b, "model");
        json_builder_add_string_value(b, e->model);
}

static void append_event(GString *out, JsonBuilder *b) {
        g_autofree char *json = json_builder_to_string(b, NULL);
        g_string_append(out, "data: ");
        g_string_append(out, json);
        g_string_append(out, "\n\n");
}

static void append_delta_chunk(GString *out, const Echo *e, const char *role, const char *content,
                               const char *finish_reason) {
        g_autoptr(JsonBuilder) b = json_builder_new_immutable();

        begin_chunk(b, e, "chat.completion.chunk");
        json_builder_set_member_name(b, "choices");
        json_builder_begin_array(b);
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "index");
        json_builder_add_int_value(b, 0);
        json_builder_set_member_name(b, "delta");
        json_builder_begin_object(b);
        if (role) {
                json_builder_set_member_name(b, "role");
                json_builder_add_string_value(b, role);
        }
        if (content) {
                json_builder_set_member_name(b, "content");
                json_builder_add_string_value(b, content);
        }
        json_builder_end_object(b);
        json_builder_set_member_name(b, "finish_reason");
        if (finish_reason)
                json_builder_add_string_value(b, finish_reason);
        else
                json_builder_add_null_value(b);
        json_builder_end_object(b);
        json_builder_end_array(b);
        json_builder_end_object(b);
        append_event(out, b);
}

/* The next event of the stream, or false at its end. */
static bool echo_next_event(Echo *e, GString *out) {
        switch (e->step) {
        case ECHO_ROLE:
                append_delta_chunk(out, e, "assistant", "", NULL);
                e->step = e->reply[0] ? ECHO_WORDS : ECHO_FINISH;
                return true;
        case ECHO_WORDS: {
                /* One chunk per word, spaces kept, as a model would stream it. */
                const char *q0 = e->reply + e->pos, *q = q0;
                while (*q && g_ascii_isspace(*q))
                        q++;
                while (*q && !g_ascii_isspace(*q))
                        q++;
                g_autofree char *piece = g_strndup(q0, (gsize) (q - q0));
                append_delta_chunk(out, e, NULL, piece, NULL);
                e->pos = (size_t) (q - e->reply);
                if (!*q)
                        e->step = ECHO_FINISH;
                return true;
        }
        case ECHO_FINISH:
                append_delta_chunk(out, e, NULL, NULL, e->truncated ? "length" : "stop");
                e->step = e->include_usage ? ECHO_USAGE : ECHO_DONE;
                return true;
        case ECHO_USAGE: {
                g_autoptr(JsonBuilder) b = json_builder_new_immutable();
                begin_chunk(b, e, "chat.completion.chunk");
                json_builder_set_member_name(b, "choices");
                json_builder_begin_array(b);
                json_builder_end_array(b);
                add_usage(b, e->prompt_tokens, e->completion_tokens);
                json_builder_end_object(b);
                append_event(out, b);
                e->step = ECHO_DONE;
                return true;
        }
        case ECHO_DONE:
                g_string_append(out, "data: [DONE]\n\n");
                e->step = ECHO_END;
                return true;
        default:
                return false;
        }
}

static int echo_on_more(sd_event_source *s, void *userdata);

/* Writes events until the stream's buffer is full (writable() brings us back) or a slice's worth
 * is written (the loop brings us back), and ends the stream after the last. */
static void echo_fill(Request *r, void *data) {
        Echo *e = data;
        Exchange *x = r->exchange;
        g_autoptr(GString) out = g_string_new(NULL);
        unsigned n = 0;

        while (!exchange_stream_full(x) && n < ECHO_EVENTS_PER_SLICE && echo_next_event(e, out)) {
                exchange_stream_write(x, out->str, out->len);
                if (e->logged && e->logged->len < ECHO_LOGGED_MAX)
                        g_string_append_len(e->logged, out->str, (gssize) out->len);
                g_string_truncate(out, 0);
                n++;
        }
        if (e->step == ECHO_END) {
                if (e->logged)
                        record_keep_response(&r->record, e->logged->str, e->logged->len);
                exchange_stream_end(x, false);
                request_clear_producer(r); /* frees e */
                return;
        }
        if (n < ECHO_EVENTS_PER_SLICE)
                return; /* full: writable() follows */

        if (!e->more) {
                int k = sd_event_add_defer(r->worker->event, &e->more, echo_on_more, e);
                if (k < 0) {
                        log_warning_errno(k, "%s: cannot go on with the echo stream: %m", r->record.request_id);
                        record_set_error(&r->record, ERROR_CLASS_INTERNAL, "internal_error", "echo stream stopped");
                        exchange_stream_end(x, true);
                        request_clear_producer(r);
                        return;
                }
                (void) sd_event_source_set_description(e->more, "echo-stream");
        }
        (void) sd_event_source_set_enabled(e->more, SD_EVENT_ONESHOT);
}

static int echo_on_more(sd_event_source *s, void *userdata) {
        Echo *e = userdata;

        echo_fill(e->request, e);
        return 0;
}

static char *echo_build_whole(const Echo *e) {
        g_autoptr(JsonBuilder) b = json_builder_new_immutable();

        begin_chunk(b, e, "chat.completion");
        json_builder_set_member_name(b, "choices");
        json_builder_begin_array(b);
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "index");
        json_builder_add_int_value(b, 0);
        json_builder_set_member_name(b, "message");
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "role");
        json_builder_add_string_value(b, "assistant");
        json_builder_set_member_name(b, "content");
        json_builder_add_string_value(b, e->reply);
        json_builder_end_object(b);
        json_builder_set_member_name(b, "finish_reason");
        json_builder_add_string_value(b, e->truncated ? "length" : "stop");
        json_builder_end_object(b);
        json_builder_end_array(b);
        add_usage(b, e->prompt_tokens, e->completion_tokens);
        json_builder_end_object(b);
        return json_builder_to_string(b, NULL);
}

/* At most ECHO_REPLY_MAX bytes, cut at a character boundary; true if it was cut. */
static bool echo_cut_reply(GString *reply) {
        const char *cut;

        if (reply->len <= ECHO_REPLY_MAX)
                return false;
        cut = g_utf8_find_prev_char(reply->str, reply->str + ECHO_REPLY_MAX + 1);
        g_string_truncate(reply, cut ? (gsize) (cut - reply->str) : 0);
        return true;
}

void echo_respond(Request *r, Provider *p, const ChatRequestInfo *info, AnswerSummary *answer) {
        Echo *e;
        EchoInput in;
        const char *body;
        size_t body_size;

        if (!streq(strempty(r->subpath), "/chat/completions")) {
                request_respond_error(r, 400, "invalid_request_error", p->name,
                                      "Provider '%s' answers chat completions only.", p->name);
                return;
        }
        body = exchange_body(r->exchange, &body_size);
        if (echo_read_request(body, body_size, &in) < 0) {
                request_respond_error(r, 400, "invalid_request_error", p->name, "'messages' must be an array of messages.");
                return;
        }

        e = g_new0(Echo, 1);
        e->request = r;
        e->prompt_tokens = in.prompt_words;
        e->include_usage = in.include_usage;
        e->truncated = echo_cut_reply(in.reply);
        e->completion_tokens = count_words(in.reply->str, in.reply->len);
        e->reply = g_string_free(in.reply, FALSE);
        if (answer)
                answer_summary_set_answer(answer, e->reply, e->truncated ? "length" : "stop");
        e->model = g_strdup(info->model ?: (p->config->default_model ?: "echo"));
        e->id = g_strconcat("chatcmpl-", r->record.request_id, NULL);
        e->created = g_get_real_time() / G_USEC_PER_SEC;

        r->record.ttfb = worker_now(r->worker) - r->record.start;
        r->record.prompt_tokens = e->prompt_tokens;
        r->record.completion_tokens = e->completion_tokens;

        if (!info->stream) {
                char *data = echo_build_whole(e);
                size_t size = strlen(data);

                echo_free(e);
                exchange_add_header(r->exchange, "Content-Type", "application/json");
                if (r->worker->config->log_responses)
                        record_keep_response(&r->record, data, size);
                request_respond(r, 200, data, size);
                return;
        }

        exchange_add_header(r->exchange, "Content-Type", "text/event-stream");
        exchange_add_header(r->exchange, "Cache-Control", "no-cache");
        exchange_add_header(r->exchange, "X-Accel-Buffering", "no");
        if (r->worker->config->log_responses)
                e->logged = g_string_new(NULL);
        request_stream_begin(r, 200);
        request_set_producer(r, &(RequestProducer) { .writable = echo_fill, .free = echo_free, .data = e });
        echo_fill(r, e);
}
