/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * mock-provider: a loopback OpenAI-compatible server for the integration tests and benchmarks.
 *
 * libmicrohttpd with one thread per connection, so that a delay or a hang is a plain sleep in
 * that connection's thread and never holds up the others. Each chat request may carry a top-level
 * "mock" object (the router forwards bodies byte-for-byte) that picks the behaviour:
 *
 *   status, body        answer with this status and body (a JSON value, or a string sent raw)
 *   delay_ms            wait before the headers
 *   hang                never answer; return once the client hangs up (counted in hangs_aborted)
 *   frames              number of content frames of a stream (default: one per word)
 *   frame_delay_ms      pause before each content frame
 *   drop_after          close the connection after N content frames, without the last chunk
 *   garbage             200 with a body that is not JSON
 *   size                pad the answer's content to about N bytes
 *   tool_calls          answer with a tool call (streamed as tool-call deltas); also the
 *                       default when the request offers "tools" (tool_choice not "none")
 *   retry_after         add a Retry-After header
 *   content_type        override the Content-Type of the answer
 *
 * GET /_mock/stats returns counters and the last request seen; POST /_mock/reset zeroes them.
 * The output is deterministic (fixed id and created), so a test can compare bytes.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <glib.h>
#include <json-glib/json-glib.h>
#include <microhttpd.h>

#define MOCK_CREATED 1700000000
#define MAX_BODY_SIZE (64u * 1024u * 1024u)
#define MAX_LAST_BODY (1024u * 1024u)
#define MAX_SIZE (1024ull * 1024ull * 1024ull)
#define MAX_FRAMES 1000000
#define MAX_DELAY_MS (10 * 60 * 1000)
#define HANG_MAX_MS (10 * 60 * 1000)
#define POLL_STEP_MS 50

static const char *arg_name = "mock";
static char *arg_host = NULL;
static int arg_port = 0;
static char *arg_port_file = NULL;
static char **arg_models = NULL;
static gboolean arg_quiet = FALSE;

static volatile gint stopping = 0;

typedef struct Stats {
        GMutex lock;
        uint64_t requests;
        uint64_t chat;
        uint64_t models;
        uint64_t streams_started;
        uint64_t streams_completed;
        uint64_t streams_aborted;
        uint64_t streams_dropped;
        uint64_t hangs;
        uint64_t hangs_aborted;
        uint64_t errors_sent;
        int64_t in_flight;
        char *last_request; /* JSON text */
} Stats;

static Stats stats;

typedef enum StreamStep {
        STEP_ROLE,
        STEP_CONTENT,
        STEP_FINISH,
        STEP_USAGE,
        STEP_DONE,
        STEP_END,
} StreamStep;

/* One request, from its first header to the completion callback. */
typedef struct Ctx {
        char *path;
        GString *body;
        bool too_large;
        bool mock_path;
        bool in_flight;
        int fd;

        /* what was asked */
        char *model;
        char *text;                /* "NAME: <last user message>" */
        bool stream;
        bool include_usage;
        unsigned frames;
        unsigned frame_delay_ms;
        long drop_after;           /* -1: never */
        uint64_t size;
        bool tool_calls;
        char *content_type;
        char *retry_after;

        /* a stream being written */
        bool stream_started;
        bool stream_finished;
        bool stream_dropped;
        bool client_gone;
        StreamStep step;
        unsigned frame;            /* content frames written */
        GString *pending;
        size_t pending_off;
} Ctx;

static bool streq0(const char *a, const char *b) {
        return a && b && strcmp(a, b) == 0;
}

static void ctx_free(Ctx *c) {
        if (!c)
                return;
        g_free(c->path);
        if (c->body)
                g_string_free(c->body, TRUE);
        g_free(c->model);
        g_free(c->text);
        g_free(c->content_type);
        g_free(c->retry_after);
        if (c->pending)
                g_string_free(c->pending, TRUE);
        g_free(c);
}

G_DEFINE_AUTOPTR_CLEANUP_FUNC(Ctx, ctx_free)

#define STAT_INC(field)                          \
        do {                                     \
                g_mutex_lock(&stats.lock);       \
                stats.field++;                   \
                g_mutex_unlock(&stats.lock);     \
        } while (0)

/* Waits ms milliseconds, or less if the client hangs up or we are stopping. Returns false if
 * the client went away. */
static bool sleep_watching(int fd, unsigned ms) {
        gint64 end = g_get_monotonic_time() + (gint64) ms * 1000;

        for (unsigned i = 0; i <= ms / POLL_STEP_MS + 1; i++) {
                gint64 left = end - g_get_monotonic_time();
                struct pollfd p = { .fd = fd, .events = POLLRDHUP };
                int k;

                if (left <= 0 || g_atomic_int_get(&stopping))
                        return true;
                k = poll(&p, fd >= 0 ? 1 : 0, (int) MIN(left / 1000 + 1, POLL_STEP_MS));
                if (k > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)))
                        return false;
                if (k > 0) {
                        /* Readable but not closed (a pipelined request): do not spin. */
                        struct timespec ts = { 0, POLL_STEP_MS * 1000000L };
                        nanosleep(&ts, NULL);
                }
        }
        return true;
}

static char *node_to_string(JsonNode *n) {
        g_autoptr(JsonGenerator) g = json_generator_new();
        json_generator_set_root(g, n);
        return json_generator_to_data(g, NULL);
}

static char *builder_to_string(JsonBuilder *b) {
        g_autoptr(JsonNode) n = json_builder_get_root(b);
        return node_to_string(n);
}

static char *error_json(const char *type, const char *message) {
        g_autoptr(JsonBuilder) b = json_builder_new();
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "error");
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "message");
        json_builder_add_string_value(b, message);
        json_builder_set_member_name(b, "type");
        json_builder_add_string_value(b, type);
        json_builder_set_member_name(b, "provider");
        json_builder_add_string_value(b, arg_name);
        json_builder_end_object(b);
        json_builder_end_object(b);
        return builder_to_string(b);
}

static enum MHD_Result respond(struct MHD_Connection *conn, Ctx *c, unsigned status, const char *content_type,
                               char *body) {
        struct MHD_Response *resp;
        enum MHD_Result ret;
        size_t n = strlen(body);

        resp = MHD_create_response_from_buffer_with_free_callback(n, body, g_free);
        if (!resp) {
                g_free(body);
                return MHD_NO;
        }
        (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                                       c && c->content_type ? c->content_type : content_type);
        (void) MHD_add_response_header(resp, "X-Mock-Name", arg_name);
        if (c && c->retry_after)
                (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, c->retry_after);
        ret = MHD_queue_response(conn, status, resp);
        MHD_destroy_response(resp);
        return ret;
}

static enum MHD_Result respond_error(struct MHD_Connection *conn, unsigned status, const char *type,
                                     const char *message) {
        STAT_INC(errors_sent);
        return respond(conn, NULL, status, "application/json", error_json(type, message));
}

static enum MHD_Result add_header_member(void *cls, enum MHD_ValueKind kind, const char *key, const char *value) {
        JsonBuilder *b = cls;
        g_autofree char *lower = g_ascii_strdown(key, -1);

        json_builder_set_member_name(b, lower);
        json_builder_add_string_value(b, value ?: "");
        return MHD_YES;
}

static void record_last_request(struct MHD_Connection *conn, const char *method, Ctx *c) {
        g_autoptr(JsonBuilder) b = json_builder_new();
        char *text;

        json_builder_begin_object(b);
        json_builder_set_member_name(b, "method");
        json_builder_add_string_value(b, method);
        json_builder_set_member_name(b, "path");
        json_builder_add_string_value(b, c->path);
        json_builder_set_member_name(b, "headers");
        json_builder_begin_object(b);
        (void) MHD_get_connection_values(conn, MHD_HEADER_KIND, add_header_member, b);
        json_builder_end_object(b);
        json_builder_set_member_name(b, "body");
        if (c->body && g_utf8_validate(c->body->str, (gssize) MIN(c->body->len, MAX_LAST_BODY), NULL))
                json_builder_add_string_value(b, c->body->len <= MAX_LAST_BODY ? c->body->str : "(too large)");
        else
                json_builder_add_string_value(b, c->body ? "(not UTF-8)" : "");
        json_builder_set_member_name(b, "body_size");
        json_builder_add_int_value(b, c->body ? (gint64) c->body->len : 0);
        json_builder_end_object(b);
        text = builder_to_string(b);

        g_mutex_lock(&stats.lock);
        g_free(stats.last_request);
        stats.last_request = text;
        g_mutex_unlock(&stats.lock);
}

static enum MHD_Result handle_stats(struct MHD_Connection *conn) {
        g_autoptr(JsonBuilder) b = json_builder_new();
        g_autoptr(JsonParser) p = json_parser_new();

        g_mutex_lock(&stats.lock);
        json_builder_begin_object(b);
#define MEMBER(x)                                                 \
        json_builder_set_member_name(b, #x);                      \
        json_builder_add_int_value(b, (gint64) stats.x)
        MEMBER(requests);
        MEMBER(chat);
        MEMBER(models);
        MEMBER(streams_started);
        MEMBER(streams_completed);
        MEMBER(streams_aborted);
        MEMBER(streams_dropped);
        MEMBER(hangs);
        MEMBER(hangs_aborted);
        MEMBER(errors_sent);
        MEMBER(in_flight);
#undef MEMBER
        json_builder_set_member_name(b, "name");
        json_builder_add_string_value(b, arg_name);
        json_builder_set_member_name(b, "last_request");
        if (stats.last_request && json_parser_load_from_data(p, stats.last_request, -1, NULL))
                json_builder_add_value(b, json_node_copy(json_parser_get_root(p)));
        else
                json_builder_add_null_value(b);
        json_builder_end_object(b);
        g_mutex_unlock(&stats.lock);

        return respond(conn, NULL, MHD_HTTP_OK, "application/json", builder_to_string(b));
}

static enum MHD_Result handle_reset(struct MHD_Connection *conn) {
        g_mutex_lock(&stats.lock);
        /* in_flight is a level, not a counter: requests still running keep counting. */
        stats.requests = stats.chat = stats.models = 0;
        stats.streams_started = stats.streams_completed = stats.streams_aborted = stats.streams_dropped = 0;
        stats.hangs = stats.hangs_aborted = stats.errors_sent = 0;
        g_clear_pointer(&stats.last_request, g_free);
        g_mutex_unlock(&stats.lock);
        return respond(conn, NULL, MHD_HTTP_OK, "application/json", g_strdup("{\"reset\":true}"));
}

static enum MHD_Result handle_models(struct MHD_Connection *conn) {
        g_autoptr(JsonBuilder) b = json_builder_new();
        g_autofree char *fallback = g_strconcat(arg_name, "-model", NULL);
        char *defaults[] = { fallback, NULL };

        STAT_INC(models);
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "object");
        json_builder_add_string_value(b, "list");
        json_builder_set_member_name(b, "data");
        json_builder_begin_array(b);
        for (char **m = arg_models && arg_models[0] ? arg_models : defaults; *m; m++) {
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "id");
                json_builder_add_string_value(b, *m);
                json_builder_set_member_name(b, "object");
                json_builder_add_string_value(b, "model");
                json_builder_set_member_name(b, "created");
                json_builder_add_int_value(b, MOCK_CREATED);
                json_builder_set_member_name(b, "owned_by");
                json_builder_add_string_value(b, arg_name);
                json_builder_end_object(b);
        }
        json_builder_end_array(b);
        json_builder_end_object(b);
        return respond(conn, NULL, MHD_HTTP_OK, "application/json", builder_to_string(b));
}

static char *last_user_message(JsonObject *o) {
        JsonArray *messages;
        guint n;

        if (!json_object_has_member(o, "messages") ||
            !JSON_NODE_HOLDS_ARRAY(json_object_get_member(o, "messages")))
                return g_strdup("");
        messages = json_object_get_array_member(o, "messages");
        n = json_array_get_length(messages);
        for (guint i = n; i > 0; i--) {
                JsonNode *mn = json_array_get_element(messages, i - 1);
                JsonObject *m;
                JsonNode *content;

                if (!JSON_NODE_HOLDS_OBJECT(mn))
                        continue;
                m = json_node_get_object(mn);
                if (g_strcmp0(json_object_get_string_member_with_default(m, "role", ""), "user") != 0)
                        continue;
                content = json_object_get_member(m, "content");
                if (!content)
                        return g_strdup("");
                if (JSON_NODE_HOLDS_VALUE(content) && json_node_get_value_type(content) == G_TYPE_STRING)
                        return g_strdup(json_node_get_string(content));
                if (JSON_NODE_HOLDS_ARRAY(content)) {
                        /* Content parts: the text ones, joined. */
                        JsonArray *parts = json_node_get_array(content);
                        GString *s = g_string_new(NULL);
                        for (guint j = 0; j < json_array_get_length(parts); j++) {
                                JsonNode *pn = json_array_get_element(parts, j);
                                if (!JSON_NODE_HOLDS_OBJECT(pn))
                                        continue;
                                g_string_append(s, json_object_get_string_member_with_default(
                                                           json_node_get_object(pn), "text", ""));
                        }
                        return g_string_free(s, FALSE);
                }
                return g_strdup("");
        }
        return g_strdup("");
}

static int64_t member_int(JsonObject *o, const char *name, int64_t def, int64_t min, int64_t max) {
        JsonNode *n = json_object_get_member(o, name);
        int64_t v;

        if (!n || !JSON_NODE_HOLDS_VALUE(n))
                return def;
        if (json_node_get_value_type(n) == G_TYPE_BOOLEAN)
                v = json_node_get_boolean(n) ? 1 : 0;
        else if (json_node_get_value_type(n) == G_TYPE_INT64 || json_node_get_value_type(n) == G_TYPE_DOUBLE)
                v = json_node_get_int(n);
        else
                return def;
        return CLAMP(v, min, max);
}

static unsigned count_words(const char *s) {
        unsigned n = 0;
        bool in_word = false;

        for (; *s; s++) {
                bool space = g_ascii_isspace(*s);
                if (!space && !in_word)
                        n++;
                in_word = !space;
        }
        return n;
}

/* The i-th of n slices of the text (by characters, so UTF-8 stays whole), padded so that the n
 * slices together carry about size bytes. */
static char *content_slice(Ctx *c, unsigned i, unsigned n) {
        glong len = g_utf8_strlen(c->text, -1);
        glong a = len * (glong) i / (glong) n, b = len * (glong) (i + 1) / (glong) n;
        const char *pa = g_utf8_offset_to_pointer(c->text, a), *pb = g_utf8_offset_to_pointer(c->text, b);
        GString *s = g_string_new_len(pa, pb - pa);
        uint64_t text_len = strlen(c->text);

        if (c->size > text_len) {
                uint64_t pad = c->size - text_len;
                uint64_t mine = pad / n + (i < pad % n ? 1 : 0);
                size_t old_len = s->len;
                g_string_set_size(s, old_len + (size_t) mine);
                memset(s->str + old_len, 'x', (size_t) mine);
        }
        return g_string_free(s, FALSE);
}

static void chunk_begin(JsonBuilder *b, Ctx *c) {
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "id");
        json_builder_add_string_value(b, "chatcmpl-mock");
        json_builder_set_member_name(b, "object");
        json_builder_add_string_value(b, "chat.completion.chunk");
        json_builder_set_member_name(b, "created");
        json_builder_add_int_value(b, MOCK_CREATED);
        json_builder_set_member_name(b, "model");
        json_builder_add_string_value(b, c->model);
        json_builder_set_member_name(b, "system_fingerprint");
        json_builder_add_string_value(b, arg_name);
}

static const char *const tool_arguments[] = {
        "{\"location\":",
        " \"Z\xc3\xbcrich, CH\",",
        " \"unit\": \"celsius\"}",
};

static void add_tool_call_delta(JsonBuilder *b, unsigned frame) {
        json_builder_set_member_name(b, "tool_calls");
        json_builder_begin_array(b);
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "index");
        json_builder_add_int_value(b, 0);
        if (frame == 0) {
                json_builder_set_member_name(b, "id");
                json_builder_add_string_value(b, "call_mock_0");
                json_builder_set_member_name(b, "type");
                json_builder_add_string_value(b, "function");
        }
        json_builder_set_member_name(b, "function");
        json_builder_begin_object(b);
        if (frame == 0) {
                json_builder_set_member_name(b, "name");
                json_builder_add_string_value(b, "get_weather");
        }
        json_builder_set_member_name(b, "arguments");
        json_builder_add_string_value(b, frame == 0 ? "" : tool_arguments[frame - 1]);
        json_builder_end_object(b);
        json_builder_end_object(b);
        json_builder_end_array(b);
}

static void add_usage(JsonBuilder *b, Ctx *c) {
        unsigned prompt = count_words(c->text), completion = MAX(c->frames, 1u);

        json_builder_set_member_name(b, "usage");
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "prompt_tokens");
        json_builder_add_int_value(b, prompt);
        json_builder_set_member_name(b, "completion_tokens");
        json_builder_add_int_value(b, completion);
        json_builder_set_member_name(b, "total_tokens");
        json_builder_add_int_value(b, prompt + completion);
        json_builder_end_object(b);
}

static unsigned content_frames(Ctx *c) {
        return c->tool_calls ? 1 + G_N_ELEMENTS(tool_arguments) : c->frames;
}

/* The next event of the stream into c->pending. */
static void stream_next_event(Ctx *c) {
        g_autoptr(JsonBuilder) b = json_builder_new();
        g_autofree char *json = NULL;

        if (c->step == STEP_DONE) {
                g_string_append(c->pending, "data: [DONE]\n\n");
                c->step = STEP_END;
                return;
        }

        chunk_begin(b, c);
        json_builder_set_member_name(b, "choices");
        json_builder_begin_array(b);
        if (c->step != STEP_USAGE) {
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "index");
                json_builder_add_int_value(b, 0);
                json_builder_set_member_name(b, "delta");
                json_builder_begin_object(b);
                if (c->step == STEP_ROLE) {
                        json_builder_set_member_name(b, "role");
                        json_builder_add_string_value(b, "assistant");
                        json_builder_set_member_name(b, "content");
                        json_builder_add_string_value(b, "");
                } else if (c->step == STEP_CONTENT && c->tool_calls) {
                        add_tool_call_delta(b, c->frame);
                } else if (c->step == STEP_CONTENT) {
                        g_autofree char *piece = content_slice(c, c->frame, c->frames);
                        json_builder_set_member_name(b, "content");
                        json_builder_add_string_value(b, piece);
                }
                json_builder_end_object(b);
                json_builder_set_member_name(b, "finish_reason");
                if (c->step == STEP_FINISH)
                        json_builder_add_string_value(b, c->tool_calls ? "tool_calls" : "stop");
                else
                        json_builder_add_null_value(b);
                json_builder_end_object(b);
        }
        json_builder_end_array(b);
        if (c->step == STEP_USAGE)
                add_usage(b, c);
        json_builder_end_object(b);

        json = builder_to_string(b);
        g_string_append(c->pending, "data: ");
        g_string_append(c->pending, json);
        g_string_append(c->pending, "\n\n");

        switch (c->step) {
        case STEP_ROLE:
                c->step = content_frames(c) > 0 ? STEP_CONTENT : STEP_FINISH;
                break;
        case STEP_CONTENT:
                if (++c->frame >= content_frames(c))
                        c->step = STEP_FINISH;
                break;
        case STEP_FINISH:
                c->step = c->include_usage ? STEP_USAGE : STEP_DONE;
                break;
        default:
                c->step = STEP_DONE;
        }
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
        Ctx *c = cls;
        size_t n;

        if (c->pending_off >= c->pending->len) {
                g_string_truncate(c->pending, 0);
                c->pending_off = 0;

                if (c->step == STEP_END) {
                        c->stream_finished = true;
                        return MHD_CONTENT_READER_END_OF_STREAM;
                }
                if (c->step == STEP_CONTENT && c->drop_after >= 0 && c->frame >= (unsigned long) c->drop_after) {
                        /* Everything so far is on the wire (MHD asks for more only then): cut. */
                        c->stream_dropped = true;
                        return MHD_CONTENT_READER_END_WITH_ERROR;
                }
                if (c->step == STEP_CONTENT && c->frame_delay_ms > 0 && !sleep_watching(c->fd, c->frame_delay_ms)) {
                        c->client_gone = true;
                        return MHD_CONTENT_READER_END_WITH_ERROR;
                }
                if (g_atomic_int_get(&stopping))
                        return MHD_CONTENT_READER_END_WITH_ERROR;
                stream_next_event(c);
        }

        n = MIN(max, c->pending->len - c->pending_off);
        memcpy(buf, c->pending->str + c->pending_off, n);
        c->pending_off += n;
        return (ssize_t) n;
}

static enum MHD_Result respond_stream(struct MHD_Connection *conn, Ctx *c) {
        struct MHD_Response *resp;
        enum MHD_Result ret;

        c->pending = g_string_sized_new(4096);
        c->step = STEP_ROLE;
        c->stream_started = true;
        STAT_INC(streams_started);

        resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 64 * 1024, stream_reader, c, NULL);
        if (!resp)
                return MHD_NO;
        (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, c->content_type ?: "text/event-stream");
        (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        (void) MHD_add_response_header(resp, "X-Mock-Name", arg_name);
        if (c->retry_after)
                (void) MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, c->retry_after);
        ret = MHD_queue_response(conn, MHD_HTTP_OK, resp);
        MHD_destroy_response(resp);
        return ret;
}

static char *completion_json(Ctx *c) {
        g_autoptr(JsonBuilder) b = json_builder_new();

        json_builder_begin_object(b);
        json_builder_set_member_name(b, "id");
        json_builder_add_string_value(b, "chatcmpl-mock");
        json_builder_set_member_name(b, "object");
        json_builder_add_string_value(b, "chat.completion");
        json_builder_set_member_name(b, "created");
        json_builder_add_int_value(b, MOCK_CREATED);
        json_builder_set_member_name(b, "model");
        json_builder_add_string_value(b, c->model);
        json_builder_set_member_name(b, "system_fingerprint");
        json_builder_add_string_value(b, arg_name);
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
        if (c->tool_calls) {
                g_autofree char *args = g_strjoinv("", (char **) tool_arguments);
                json_builder_add_null_value(b);
                json_builder_set_member_name(b, "tool_calls");
                json_builder_begin_array(b);
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "id");
                json_builder_add_string_value(b, "call_mock_0");
                json_builder_set_member_name(b, "type");
                json_builder_add_string_value(b, "function");
                json_builder_set_member_name(b, "function");
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "name");
                json_builder_add_string_value(b, "get_weather");
                json_builder_set_member_name(b, "arguments");
                json_builder_add_string_value(b, args);
                json_builder_end_object(b);
                json_builder_end_object(b);
                json_builder_end_array(b);
        } else {
                g_autofree char *all = content_slice(c, 0, 1);
                json_builder_add_string_value(b, all);
        }
        json_builder_end_object(b);
        json_builder_set_member_name(b, "finish_reason");
        json_builder_add_string_value(b, c->tool_calls ? "tool_calls" : "stop");
        json_builder_end_object(b);
        json_builder_end_array(b);
        add_usage(b, c);
        json_builder_end_object(b);
        return builder_to_string(b);
}

static enum MHD_Result handle_chat(struct MHD_Connection *conn, Ctx *c) {
        g_autoptr(JsonParser) parser = json_parser_new();
        g_autoptr(GError) error = NULL;
        JsonObject *o, *mock = NULL;
        JsonNode *root, *n;
        int64_t delay_ms;

        STAT_INC(chat);
        if (c->too_large)
                return respond_error(conn, MHD_HTTP_CONTENT_TOO_LARGE, "invalid_request_error", "body too large");
        if (!json_parser_load_from_data(parser, c->body ? c->body->str : "", c->body ? (gssize) c->body->len : 0,
                                        &error))
                return respond_error(conn, MHD_HTTP_BAD_REQUEST, "invalid_request_error", error->message);
        root = json_parser_get_root(parser);
        if (!root || !JSON_NODE_HOLDS_OBJECT(root))
                return respond_error(conn, MHD_HTTP_BAD_REQUEST, "invalid_request_error", "body is not a JSON object");
        o = json_node_get_object(root);

        n = json_object_get_member(o, "mock");
        if (n && JSON_NODE_HOLDS_OBJECT(n))
                mock = json_node_get_object(n);

        c->model = g_strdup(json_object_get_string_member_with_default(o, "model", "mock-model"));
        {
                g_autofree char *msg = last_user_message(o);
                c->text = g_strconcat(arg_name, ": ", msg, NULL);
        }
        n = json_object_get_member(o, "stream");
        c->stream = n && JSON_NODE_HOLDS_VALUE(n) && json_node_get_value_type(n) == G_TYPE_BOOLEAN &&
                    json_node_get_boolean(n);
        n = json_object_get_member(o, "stream_options");
        if (n && JSON_NODE_HOLDS_OBJECT(n))
                c->include_usage = json_object_get_boolean_member_with_default(json_node_get_object(n),
                                                                               "include_usage", FALSE);
        c->frames = MAX(count_words(c->text), 1u);
        c->drop_after = -1;

        /* A request offering tools gets a tool call, as from a model that chose one. */
        n = json_object_get_member(o, "tools");
        if (n && JSON_NODE_HOLDS_ARRAY(n) && json_array_get_length(json_node_get_array(n)) > 0 &&
            g_strcmp0(json_object_get_string_member_with_default(o, "tool_choice", ""), "none") != 0)
                c->tool_calls = true;

        if (mock) {
                c->frames = (unsigned) member_int(mock, "frames", c->frames, 0, MAX_FRAMES);
                c->frame_delay_ms = (unsigned) member_int(mock, "frame_delay_ms", 0, 0, MAX_DELAY_MS);
                c->drop_after = (long) member_int(mock, "drop_after", -1, -1, MAX_FRAMES);
                c->size = (uint64_t) member_int(mock, "size", 0, 0, (int64_t) MAX_SIZE);
                c->tool_calls = member_int(mock, "tool_calls", c->tool_calls, 0, 1) != 0;
                if (json_object_has_member(mock, "content_type"))
                        c->content_type = g_strdup(json_object_get_string_member_with_default(mock, "content_type", NULL));
                n = json_object_get_member(mock, "retry_after");
                if (n && JSON_NODE_HOLDS_VALUE(n))
                        c->retry_after = json_node_get_value_type(n) == G_TYPE_STRING
                                                 ? g_strdup(json_node_get_string(n))
                                                 : g_strdup_printf("%" G_GINT64_FORMAT, json_node_get_int(n));
        }
        g_mutex_lock(&stats.lock);
        stats.in_flight++;
        g_mutex_unlock(&stats.lock);
        c->in_flight = true;

        delay_ms = mock ? member_int(mock, "delay_ms", 0, 0, MAX_DELAY_MS) : 0;
        if (delay_ms > 0 && !sleep_watching(c->fd, (unsigned) delay_ms))
                return MHD_NO;

        if (mock && member_int(mock, "hang", 0, 0, 1)) {
                /* Never answer: wait for the client to give up, then count it. */
                STAT_INC(hangs);
                if (!sleep_watching(c->fd, HANG_MAX_MS)) {
                        STAT_INC(hangs_aborted);
                        return MHD_NO;
                }
                return respond_error(conn, MHD_HTTP_GATEWAY_TIMEOUT, "timeout_error", "mock hang ended");
        }

        if (mock && json_object_has_member(mock, "status")) {
                unsigned status = (unsigned) member_int(mock, "status", 500, 100, 599);
                JsonNode *body = json_object_get_member(mock, "body");
                char *text;

                if (!body || JSON_NODE_HOLDS_NULL(body))
                        text = error_json(status >= 500 ? "server_error" : "invalid_request_error", "mock error");
                else if (JSON_NODE_HOLDS_VALUE(body) && json_node_get_value_type(body) == G_TYPE_STRING)
                        text = g_strdup(json_node_get_string(body));
                else
                        text = node_to_string(body);
                STAT_INC(errors_sent);
                return respond(conn, c, status, "application/json", text);
        }

        if (mock && member_int(mock, "garbage", 0, 0, 1))
                return respond(conn, c, MHD_HTTP_OK, "application/json",
                               g_strdup("<html><body>502 Bad Gateway: this is not JSON</body></html>"));

        if (c->stream)
                return respond_stream(conn, c);
        return respond(conn, c, MHD_HTTP_OK, "application/json", completion_json(c));
}

static enum MHD_Result access_handler(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                      const char *version, const char *upload_data, size_t *upload_data_size,
                                      void **con_cls) {
        Ctx *c = *con_cls;

        if (!c) {
                const union MHD_ConnectionInfo *ci;

                c = g_new0(Ctx, 1);
                c->path = g_strdup(url);
                c->mock_path = g_str_has_prefix(url, "/_mock/");
                ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
                c->fd = ci ? ci->connect_fd : -1;
                *con_cls = c;
                if (!c->mock_path)
                        STAT_INC(requests);
                return MHD_YES;
        }

        if (*upload_data_size > 0) {
                if (!c->body)
                        c->body = g_string_new(NULL);
                if (c->body->len + *upload_data_size > MAX_BODY_SIZE)
                        c->too_large = true;
                else
                        g_string_append_len(c->body, upload_data, (gssize) *upload_data_size);
                *upload_data_size = 0;
                return MHD_YES;
        }

        if (!c->mock_path)
                record_last_request(conn, method, c);

        if (streq0(url, "/_mock/stats") && streq0(method, "GET"))
                return handle_stats(conn);
        if (streq0(url, "/_mock/reset") && streq0(method, "POST"))
                return handle_reset(conn);
        if (g_str_has_suffix(url, "/models") && streq0(method, "GET"))
                return handle_models(conn);
        if (g_str_has_suffix(url, "/chat/completions") && streq0(method, "POST"))
                return handle_chat(conn, c);
        return respond_error(conn, MHD_HTTP_NOT_FOUND, "invalid_request_error", "unknown path");
}

static void completed(void *cls, struct MHD_Connection *conn, void **con_cls, enum MHD_RequestTerminationCode toe) {
        g_autoptr(Ctx) c = *con_cls;

        *con_cls = NULL;
        if (!c)
                return;

        g_mutex_lock(&stats.lock);
        if (c->stream_started) {
                if (c->stream_finished && toe == MHD_REQUEST_TERMINATED_COMPLETED_OK)
                        stats.streams_completed++;
                else if (c->stream_dropped)
                        stats.streams_dropped++;
                else
                        stats.streams_aborted++;
        }
        if (c->in_flight)
                stats.in_flight--;
        g_mutex_unlock(&stats.lock);
}

static int write_port_file(const char *path, unsigned port) {
        g_autofree char *tmp = g_strconcat(path, ".tmp", NULL);
        g_autofree char *text = g_strdup_printf("%u\n", port);
        g_autoptr(GError) error = NULL;

        /* Written whole, then renamed: a reader never sees half a number. */
        if (!g_file_set_contents(tmp, text, -1, &error)) {
                fprintf(stderr, "mock-provider: cannot write '%s': %s\n", tmp, error->message);
                return -EIO;
        }
        if (rename(tmp, path) < 0) {
                int r = -errno;
                fprintf(stderr, "mock-provider: cannot rename '%s': %s\n", tmp, g_strerror(-r));
                return r;
        }
        return 0;
}

int main(int argc, char *argv[]) {
        static const GOptionEntry entries[] = {
                { "port", 'p', 0, G_OPTION_ARG_INT, &arg_port, "Port to listen on (0: any free port)", "N" },
                { "host", 0, 0, G_OPTION_ARG_STRING, &arg_host, "Loopback address to listen on (127.0.0.1)", "ADDR" },
                { "name", 'n', 0, G_OPTION_ARG_STRING, &arg_name, "Name shown in answers", "NAME" },
                { "port-file", 0, 0, G_OPTION_ARG_FILENAME, &arg_port_file, "Write the bound port here", "FILE" },
                { "model", 'm', 0, G_OPTION_ARG_STRING_ARRAY, &arg_models, "A model for /v1/models (repeatable)", "ID" },
                { "quiet", 'q', 0, G_OPTION_ARG_NONE, &arg_quiet, "Print nothing on start", NULL },
                {}
        };
        g_autoptr(GOptionContext) ctx = g_option_context_new("- loopback OpenAI-compatible mock provider");
        g_autoptr(GError) error = NULL;
        struct sockaddr_storage ss = {};
        const union MHD_DaemonInfo *di;
        struct MHD_Daemon *d;
        unsigned flags, port;
        sigset_t mask;
        int sig;

        g_option_context_add_main_entries(ctx, entries, NULL);
        if (!g_option_context_parse(ctx, &argc, &argv, &error)) {
                fprintf(stderr, "mock-provider: %s\n", error->message);
                return EXIT_FAILURE;
        }
        if (arg_port < 0 || arg_port > 65535) {
                fprintf(stderr, "mock-provider: --port=%d is out of range\n", arg_port);
                return EXIT_FAILURE;
        }

        /* Loopback only: this server does whatever a request body tells it to. */
        flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL | MHD_USE_ERROR_LOG;
        if (!arg_host || inet_pton(AF_INET, arg_host, &((struct sockaddr_in *) &ss)->sin_addr) == 1) {
                struct sockaddr_in *sin = (struct sockaddr_in *) &ss;
                sin->sin_family = AF_INET;
                sin->sin_port = htons((uint16_t) arg_port);
                if (!arg_host)
                        sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
                if ((ntohl(sin->sin_addr.s_addr) >> 24) != 127) {
                        fprintf(stderr, "mock-provider: --host=%s is not a loopback address\n", arg_host);
                        return EXIT_FAILURE;
                }
        } else {
                struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *) &ss;
                if (inet_pton(AF_INET6, arg_host, &sin6->sin6_addr) != 1 || !IN6_IS_ADDR_LOOPBACK(&sin6->sin6_addr)) {
                        fprintf(stderr, "mock-provider: --host=%s is not a loopback address\n", arg_host);
                        return EXIT_FAILURE;
                }
                sin6->sin6_family = AF_INET6;
                sin6->sin6_port = htons((uint16_t) arg_port);
                flags |= MHD_USE_IPv6;
        }

        /* Signals are taken with sigwait() below; every MHD thread inherits the mask. */
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        signal(SIGPIPE, SIG_IGN);
        g_mutex_init(&stats.lock);

        d = MHD_start_daemon(flags, (uint16_t) arg_port, NULL, NULL, access_handler, NULL,
                             MHD_OPTION_SOCK_ADDR, (struct sockaddr *) &ss,
                             MHD_OPTION_NOTIFY_COMPLETED, completed, NULL,
                             MHD_OPTION_LISTEN_BACKLOG_SIZE, 1024u,
                             MHD_OPTION_CONNECTION_LIMIT, 4096u,
                             MHD_OPTION_THREAD_STACK_SIZE, (size_t) (256 * 1024),
                             MHD_OPTION_END);
        if (!d) {
                fprintf(stderr, "mock-provider: cannot listen on %s port %d\n", arg_host ?: "127.0.0.1", arg_port);
                return EXIT_FAILURE;
        }
        di = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
        port = di ? di->port : (unsigned) arg_port;

        if (arg_port_file && write_port_file(arg_port_file, port) < 0) {
                MHD_stop_daemon(d);
                return EXIT_FAILURE;
        }
        if (!arg_quiet)
                fprintf(stderr, "mock-provider '%s' listening on %s port %u\n", arg_name, arg_host ?: "127.0.0.1", port);

        if (sigwait(&mask, &sig) != 0)
                sig = SIGTERM;

        /* Sleeping connection threads look at this and return, so that stopping never waits long. */
        g_atomic_int_set(&stopping, 1);
        MHD_stop_daemon(d);
        g_free(stats.last_request);
        return EXIT_SUCCESS;
}
