/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <assert.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#define SD_JOURNAL_SUPPRESS_LOCATION 1
#include <systemd/sd-journal.h>

#include "log.h"

static int max_level = LOG_INFO;
static LogTarget target = LOG_TARGET_STDERR;

static const char *const level_names[] = {
        [LOG_EMERG] = "emerg",   [LOG_ALERT] = "alert", [LOG_CRIT] = "crit",
        [LOG_ERR] = "error",     [LOG_WARNING] = "warn", [LOG_NOTICE] = "notice",
        [LOG_INFO] = "info",     [LOG_DEBUG] = "debug",
};

int log_level_from_string(const char *s) {
        if (!s)
                return -EINVAL;
        for (size_t i = 0; i < ELEMENTSOF(level_names); i++)
                if (strcaseeq(s, level_names[i]))
                        return (int) i;
        /* Accept the spellings systemd and the plan use, too. */
        if (strcaseeq(s, "warning"))
                return LOG_WARNING;
        if (strcaseeq(s, "err"))
                return LOG_ERR;
        return -EINVAL;
}

const char *log_level_to_string(int level) {
        if (level < 0 || (size_t) level >= ELEMENTSOF(level_names))
                return NULL;
        return level_names[level];
}

static bool stderr_is_journal(void) {
        const char *e = getenv("JOURNAL_STREAM");
        unsigned long long dev, ino;
        struct stat st;

        if (!e || sscanf(e, "%llu:%llu", &dev, &ino) != 2)
                return false;
        if (fstat(STDERR_FILENO, &st) < 0)
                return false;
        return (unsigned long long) st.st_dev == dev && (unsigned long long) st.st_ino == ino;
}

void log_setup(void) {
        /* Under systemd, stderr is connected to the journal: talk to it natively instead, so
         * every request entry carries its own fields. */
        target = stderr_is_journal() ? LOG_TARGET_JOURNAL : LOG_TARGET_STDERR;
}

static void (*buffered_func)(void *userdata) = NULL;
static void *buffered_userdata = NULL;

void log_buffer_requests(void) {
        static char buffer[64 * 1024];

        /* Request lines on stderr are collected and written once per event loop iteration (see
         * log_flush()); under load one write() carries many requests. Other messages flush at
         * once. */
        (void) setvbuf(stderr, buffer, _IOFBF, sizeof(buffer));
}

void log_on_buffered(void (*func)(void *userdata), void *userdata) {
        buffered_func = func;
        buffered_userdata = userdata;
}

/* A line waits in stderr's buffer. */
static void log_buffered(void) {
        if (buffered_func)
                buffered_func(buffered_userdata);
}

void log_flush(void) {
        (void) fflush(stderr);
}

LogTarget log_get_target(void) {
        return target;
}

void log_set_max_level(int level) {
        max_level = level;
}

int log_get_max_level(void) {
        return max_level;
}

/* A bounded text builder for the request log, which runs for every request: plain appends and
 * integer formatting, no printf machinery and no allocation. Output past the end is cut; the
 * buffers are sized so that, with every field capped, it never is. */
typedef struct Text {
        char *p;
        size_t size, len;
} Text;

static void text_mem(Text *t, const char *s, size_t n) {
        if (n > t->size - 1 - t->len)
                n = t->size - 1 - t->len;
        memcpy(t->p + t->len, s, n);
        t->len += n;
        t->p[t->len] = 0;
}

static void text_str(Text *t, const char *s) {
        text_mem(t, s, strlen(s));
}

static void text_u64(Text *t, uint64_t v) {
        char d[20];
        size_t n = 0;

        do
                d[sizeof(d) - 1 - n++] = (char) ('0' + v % 10);
        while ((v /= 10) > 0);
        text_mem(t, d + sizeof(d) - n, n);
}

/* whole.frac with frac of one or two digits (0-9 or 0-99). */
static void text_frac(Text *t, uint64_t whole, unsigned frac, unsigned digits, const char *unit) {
        char d[2] = { (char) ('0' + frac / 10 % 10), (char) ('0' + frac % 10) };

        text_u64(t, whole);
        text_mem(t, ".", 1);
        text_mem(t, digits == 2 ? d : d + 1, digits);
        text_str(t, unit);
}

static void text_duration(Text *t, usec_t u) {
        if (u == USEC_INFINITY)
                text_str(t, "-");
        else if (u < 10 * USEC_PER_MSEC)
                text_frac(t, u / 1000, (unsigned) (u % 1000 / 10), 2, "ms");
        else if (u < 10 * USEC_PER_SEC)
                text_frac(t, u / 1000, (unsigned) (u % 1000 / 100), 1, "ms");
        else
                text_frac(t, u / USEC_PER_SEC, (unsigned) (u % USEC_PER_SEC / 100000), 1, "s");
}

/* "…[cut N bytes]": N bytes of the value were left out. At most LOG_CUT_MARKER_MAX bytes. */
static void text_cut_marker(Text *t, size_t cut) {
        text_str(t, "…[cut ");
        text_u64(t, cut);
        text_str(t, " bytes]");
}

/* Up to max bytes of a value as it is (the journal takes any bytes), never ending inside a UTF-8
 * sequence, then the cut marker if it did not all fit. */
static void text_capped(Text *t, const char *s, size_t n, size_t max) {
        size_t k = n;

        if (n > max) {
                k = max;
                /* Back off over continuation bytes to the start of the sequence that was cut. */
                for (size_t i = 0; i < 3 && k > 0 && ((unsigned char) s[k] & 0xc0) == 0x80; i++)
                        k--;
        }
        text_mem(t, s, k);
        if (k < n)
                text_cut_marker(t, n - k);
}

/* A value for a line a person reads, at most max bytes of output (then the cut marker):
 * control characters, bytes that are not UTF-8, C1 controls and the backslash are written as
 * escapes (\n, \r, \t, \\, \xNN), so that no client can start a forged log line or send an escape
 * sequence to a terminal. With quote, a ' is escaped too (the value is shown in quotes). */
static void text_escaped(Text *t, const char *s, size_t n, size_t max, bool quote) {
        static const char hex[] = "0123456789abcdef";
        size_t start = t->len, i = 0;

        while (i < n) {
                unsigned char c = (unsigned char) s[i];
                char e[16];
                size_t e_len = 0, in_len = 1;

                if (c >= 0x20 && c < 0x7f && c != '\\' && !(quote && c == '\'')) {
                        /* Most values are plain ASCII throughout: the whole run at once. */
                        size_t j = i + 1, room = max - (t->len - start);

                        while (j < n && (unsigned char) s[j] >= 0x20 && (unsigned char) s[j] < 0x7f && s[j] != '\\' &&
                               !(quote && s[j] == '\''))
                                j++;
                        if (j - i > room) {
                                text_mem(t, s + i, room);
                                i += room;
                                break;
                        }
                        text_mem(t, s + i, j - i);
                        i = j;
                        continue;
                } else if (c == '\\' || c == '\'') {
                        e[e_len++] = '\\';
                        e[e_len++] = (char) c;
                } else if (c == '\n' || c == '\r' || c == '\t') {
                        e[e_len++] = '\\';
                        e[e_len++] = c == '\n' ? 'n' : c == '\r' ? 'r' : 't';
                } else {
                        gunichar u = c >= 0x80 ? g_utf8_get_char_validated(s + i, (gssize) MIN(n - i, (size_t) 4))
                                               : (gunichar) -1;

                        if (u < (gunichar) -2 && u >= 0xa0) {
                                /* A valid character that is not a C1 control: as it is. */
                                in_len = (size_t) (g_utf8_next_char(s + i) - (s + i));
                                memcpy(e, s + i, in_len);
                                e_len = in_len;
                        } else {
                                /* A C0/C1 control, DEL, or a byte that is not UTF-8: every byte escaped. */
                                if (u < (gunichar) -2)
                                        in_len = (size_t) (g_utf8_next_char(s + i) - (s + i));
                                for (size_t k = 0; k < in_len; k++) {
                                        unsigned char b = (unsigned char) s[i + k];
                                        e[e_len++] = '\\';
                                        e[e_len++] = 'x';
                                        e[e_len++] = hex[b >> 4];
                                        e[e_len++] = hex[b & 15];
                                }
                        }
                }
                if (t->len - start + e_len > max)
                        break;
                text_mem(t, e, e_len);
                i += in_len;
        }
        if (i < n)
                text_cut_marker(t, n - i);
}

static void text_escaped_str(Text *t, const char *s, size_t max, bool quote) {
        text_escaped(t, s, strlen(s), max, quote);
}

int log_internal(int level, int error, const char *file, int line, const char *func,
                 const char *format, ...) {
        char buf[2048];
        va_list ap;
        int saved_errno = errno;

        errno = error;
        va_start(ap, format);
        (void) vsnprintf(buf, sizeof(buf), format, ap);
        va_end(ap);

        if (target == LOG_TARGET_JOURNAL) {
                char code_line[32];
                (void) snprintf(code_line, sizeof(code_line), "CODE_LINE=%d", line);
                if (error > 0)
                        (void) sd_journal_send("MESSAGE=%s", buf, "PRIORITY=%i", level,
                                               "SYSLOG_IDENTIFIER=provider-router",
                                               "ERRNO=%i", error, "CODE_FILE=%s", file,
                                               code_line, "CODE_FUNC=%s", func, NULL);
                else
                        (void) sd_journal_send("MESSAGE=%s", buf, "PRIORITY=%i", level,
                                               "SYSLOG_IDENTIFIER=provider-router",
                                               "CODE_FILE=%s", file, code_line,
                                               "CODE_FUNC=%s", func, NULL);
        } else {
                /* Messages quote what clients and files said: no control character reaches the
                 * terminal as it is. */
                char out[sizeof(buf) * 4 + 64];
                Text t = { .p = out, .size = sizeof(out) };

                text_escaped_str(&t, buf, sizeof(out) - 64, false);
                text_mem(&t, "\n", 1);
                (void) fwrite(out, 1, t.len, stderr);
                (void) fflush(stderr);
        }

        errno = saved_errno;
        return -error;
}

/* "NAME=value" into the field buffer, and an iovec pointing at it. */
typedef struct Fields {
        Text text;
        struct iovec iov[LOG_JOURNAL_FIELDS_MAX];
        size_t n;
} Fields;

static void field_begin(Fields *f, const char *name) {
        assert(f->n < ELEMENTSOF(f->iov));
        f->iov[f->n].iov_base = f->text.p + f->text.len;
        text_str(&f->text, name);
        text_mem(&f->text, "=", 1);
}

static void field_end(Fields *f) {
        f->iov[f->n].iov_len = (size_t) (f->text.p + f->text.len - (char *) f->iov[f->n].iov_base);
        f->n++;
}

/* A value as it is, capped; NULL leaves the field out. */
static void field_str(Fields *f, const char *name, const char *value, size_t max) {
        if (!value)
                return;
        field_begin(f, name);
        text_capped(&f->text, value, strlen(value), max);
        field_end(f);
}

static void field_u64(Fields *f, const char *name, uint64_t value) {
        field_begin(f, name);
        text_u64(&f->text, value);
        field_end(f);
}

static LogJournalSendv journal_sendv = NULL;

void log_set_journal_sendv(LogJournalSendv f) {
        journal_sendv = f;
}

void log_set_target(LogTarget t) {
        target = t;
}

static int send_entry(const struct iovec *iov, size_t n) {
        if (journal_sendv)
                return journal_sendv(iov, (int) n);
        return sd_journal_sendv(iov, (int) n);
}

size_t log_request_message(const RequestLogEntry *e, char *buf, size_t size) {
        Text m = { .p = buf, .size = size };

        assert(size > 0);
        buf[0] = 0;

        /* Client-controlled strings (model, path, the X-Provider name in an error) are escaped and
         * capped; no header value is ever logged, so credentials cannot reach the log. */
        text_escaped_str(&m, e->provider ?: "-", LOG_MESSAGE_SHORT_MAX, false);
        text_mem(&m, " ", 1);
        text_escaped_str(&m, strempty(e->method), LOG_MESSAGE_SHORT_MAX, false);
        text_mem(&m, " '", 2);
        text_escaped_str(&m, strempty(e->path), LOG_MESSAGE_PATH_MAX, true);
        text_str(&m, "' model='");
        text_escaped_str(&m, strempty(e->model), LOG_MESSAGE_MODEL_MAX, true);
        if (e->upstream_model) {
                text_str(&m, "' as '");
                text_escaped_str(&m, e->upstream_model, LOG_MESSAGE_MODEL_MAX, true);
        }
        text_str(&m, "' stream=");
        text_str(&m, yes_no(e->stream));
        text_str(&m, " route=");
        text_escaped_str(&m, e->route ?: "-", LOG_MESSAGE_SHORT_MAX, false);
        text_str(&m, " -> ");
        text_u64(&m, e->status);
        text_str(&m, " in ");
        text_duration(&m, e->duration_usec);
        text_str(&m, " (first byte ");
        text_duration(&m, e->ttfb_usec);
        text_str(&m, ") in=");
        text_u64(&m, e->bytes_in);
        text_str(&m, "B out=");
        text_u64(&m, e->bytes_out);
        text_mem(&m, "B", 1);
        if (e->prompt_tokens != UINT64_MAX) {
                text_str(&m, " tokens=");
                text_u64(&m, e->prompt_tokens);
                text_mem(&m, "+", 1);
                text_u64(&m, e->completion_tokens);
        }
        if (e->tried) {
                text_str(&m, " tried=");
                text_escaped_str(&m, e->tried, LOG_MESSAGE_TRIED_MAX, false);
        }
        text_str(&m, " id=");
        text_escaped_str(&m, strempty(e->request_id), LOG_MESSAGE_SHORT_MAX, false);
        if (e->error_message) {
                text_str(&m, ": ");
                text_escaped_str(&m, e->error_message, LOG_MESSAGE_ERROR_MAX, false);
        }
        return m.len;
}

size_t log_request_fields(const RequestLogEntry *e, int level, const char *message,
                          char *buf, size_t size, struct iovec iov[static LOG_JOURNAL_FIELDS_MAX]) {
        Fields f = { .text = { .p = buf, .size = size } };

        field_str(&f, "MESSAGE", message, LOG_MESSAGE_MAX);
        field_u64(&f, "PRIORITY", (uint64_t) level);
        field_str(&f, "SYSLOG_IDENTIFIER", "provider-router", LOG_FIELD_SHORT_MAX);
        field_str(&f, "PROVIDER", strempty(e->provider), LOG_FIELD_SHORT_MAX);
        field_str(&f, "MODEL", strempty(e->model), LOG_FIELD_MAX);
        field_u64(&f, "STATUS", e->status);
        field_u64(&f, "DURATION_USEC", e->duration_usec);
        field_str(&f, "REQUEST_ID", e->request_id, LOG_FIELD_SHORT_MAX);
        field_str(&f, "PROVIDER_REQUEST_ID", e->provider_request_id, LOG_FIELD_SHORT_MAX);
        field_str(&f, "UPSTREAM_MODEL", e->upstream_model, LOG_FIELD_SHORT_MAX);
        field_u64(&f, "STREAM", e->stream);
        field_str(&f, "METHOD", e->method, LOG_FIELD_SHORT_MAX);
        field_str(&f, "PATH", e->path, LOG_FIELD_MAX);
        field_str(&f, "ROUTE", e->route, LOG_FIELD_SHORT_MAX);
        field_u64(&f, "BYTES_IN", e->bytes_in);
        field_u64(&f, "BYTES_OUT", e->bytes_out);
        if (e->ttfb_usec != USEC_INFINITY)
                field_u64(&f, "TTFB_USEC", e->ttfb_usec);
        field_str(&f, "ERROR_TYPE", e->error_type, LOG_FIELD_SHORT_MAX);
        field_str(&f, "REMOTE_ADDR", e->remote, LOG_FIELD_MAX);
        if (e->prompt_tokens != UINT64_MAX) {
                field_u64(&f, "PROMPT_TOKENS", e->prompt_tokens);
                field_u64(&f, "COMPLETION_TOKENS", e->completion_tokens);
        }
        if (e->attempts > 1)
                field_u64(&f, "ATTEMPTS", e->attempts);
        field_str(&f, "PROVIDERS_TRIED", e->tried, LOG_FIELD_MAX);
        if (e->response_body) {
                field_begin(&f, "RESPONSE_BODY");
                text_capped(&f.text, e->response_body, e->response_body_size, LOG_RESPONSE_BODY_MAX);
                field_end(&f);
        }
        memcpy(iov, f.iov, f.n * sizeof(struct iovec));
        return f.n;
}

/* What is left when the journal refused the whole entry: who, what came of it, and why the rest
 * is missing. Every value here is the router's own or already validated, and short. */
static int log_request_minimal(const RequestLogEntry *e, int level, int error) {
        char buf[1024];
        Fields f = { .text = { .p = buf, .size = sizeof(buf) } };

        field_begin(&f, "MESSAGE");
        text_escaped_str(&f.text, e->provider ?: "-", LOG_MESSAGE_SHORT_MAX, false);
        text_str(&f.text, " request id=");
        text_escaped_str(&f.text, strempty(e->request_id), LOG_MESSAGE_SHORT_MAX, false);
        text_str(&f.text, " -> ");
        text_u64(&f.text, e->status);
        text_str(&f.text, " (the full log entry was refused: ");
        text_str(&f.text, g_strerror(error));
        text_str(&f.text, ")");
        field_end(&f);
        field_u64(&f, "PRIORITY", (uint64_t) level);
        field_str(&f, "SYSLOG_IDENTIFIER", "provider-router", LOG_FIELD_SHORT_MAX);
        field_str(&f, "REQUEST_ID", e->request_id, LOG_FIELD_SHORT_MAX);
        field_u64(&f, "STATUS", e->status);
        field_str(&f, "PROVIDER", strempty(e->provider), LOG_FIELD_SHORT_MAX);
        return send_entry(f.iov, f.n);
}

void log_request(const RequestLogEntry *e, int level) {
        char message_buf[LOG_MESSAGE_MAX + 2];
        size_t len;

        if (max_level < level)
                return;

        /* One byte kept back for the newline of the stderr line. */
        len = log_request_message(e, message_buf, sizeof(message_buf) - 1);

        if (target == LOG_TARGET_JOURNAL) {
                char fields_buf[LOG_JOURNAL_ENTRY_MAX];
                struct iovec iov[LOG_JOURNAL_FIELDS_MAX];
                size_t n;
                int r;

                n = log_request_fields(e, level, message_buf, fields_buf, sizeof(fields_buf), iov);
                r = send_entry(iov, n);
                if (r < 0)
                        r = log_request_minimal(e, level, -r);
                if (r >= 0)
                        return;
                /* Not even that: the line goes to stderr, which systemd also collects. */
        }

        message_buf[len++] = '\n';
        (void) fwrite(message_buf, 1, len, stderr);
        log_buffered();
        if (e->response_body) {
                char body_buf[LOG_RESPONSE_BODY_MAX + 128];
                Text b = { .p = body_buf, .size = sizeof(body_buf) };

                text_str(&b, "  response: ");
                text_escaped(&b, e->response_body, e->response_body_size, LOG_RESPONSE_BODY_MAX, false);
                text_mem(&b, "\n", 1);
                (void) fwrite(body_buf, 1, b.len, stderr);
        }
}

void log_structured(int level, const char *message_id, const char *message, const char *const *fields, size_t n) {
        if (max_level < level)
                return;

        if (target == LOG_TARGET_JOURNAL) {
                g_autofree struct iovec *iov = g_new(struct iovec, n + 4);
                g_autofree char *m = g_strconcat("MESSAGE=", message, NULL);
                g_autofree char *id = g_strconcat("MESSAGE_ID=", message_id, NULL);
                char priority[32];
                size_t k = 0;

                (void) snprintf(priority, sizeof(priority), "PRIORITY=%i", level);
                iov[k++] = (struct iovec) { m, strlen(m) };
                iov[k++] = (struct iovec) { id, strlen(id) };
                iov[k++] = (struct iovec) { priority, strlen(priority) };
                iov[k++] = (struct iovec) { (char *) "SYSLOG_IDENTIFIER=provider-router",
                                            STRLEN("SYSLOG_IDENTIFIER=provider-router") };
                for (size_t i = 0; i < n; i++)
                        /* Values may come from providers: each is capped, as request fields are. */
                        iov[k++] = (struct iovec) { (char *) fields[i], MIN(strlen(fields[i]), (size_t) LOG_FIELD_MAX) };
                if (send_entry(iov, k) >= 0)
                        return;
        }

        char out[LOG_MESSAGE_MAX * 4 + 64];
        Text t = { .p = out, .size = sizeof(out) };

        text_escaped_str(&t, message, LOG_MESSAGE_MAX, false);
        text_mem(&t, "\n", 1);
        (void) fwrite(out, 1, t.len, stderr);
        log_buffered();
}
