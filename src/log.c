/* SPDX-License-Identifier: LGPL-2.1-or-later */
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

void log_buffer_requests(void) {
        static char buffer[64 * 1024];

        /* Request lines on stderr are collected and written once per event loop iteration (see
         * log_flush()); under load one write() carries many requests. Other messages flush at
         * once. */
        (void) setvbuf(stderr, buffer, _IOFBF, sizeof(buffer));
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
                (void) fprintf(stderr, "%s\n", buf);
                (void) fflush(stderr);
        }

        errno = saved_errno;
        return -error;
}

/* A bounded text builder for the request log, which runs for every request: plain appends and
 * integer formatting, no printf machinery and no allocation. Output past the end is cut. */
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

/* "NAME=value" into the field buffer, and an iovec pointing at it. */
typedef struct Fields {
        Text text;
        struct iovec iov[26];
        size_t n;
} Fields;

static void field_begin(Fields *f, const char *name) {
        f->iov[f->n].iov_base = f->text.p + f->text.len;
        text_str(&f->text, name);
        text_mem(&f->text, "=", 1);
}

static void field_end(Fields *f) {
        f->iov[f->n].iov_len = (size_t) (f->text.p + f->text.len - (char *) f->iov[f->n].iov_base);
        f->n++;
}

static void field_str(Fields *f, const char *name, const char *value) {
        if (!value)
                return;
        field_begin(f, name);
        text_str(&f->text, value);
        field_end(f);
}

static void field_u64(Fields *f, const char *name, uint64_t value) {
        field_begin(f, name);
        text_u64(&f->text, value);
        field_end(f);
}

void log_request(const RequestLogEntry *e, int level) {
        char message_buf[1024];
        /* One byte kept back for the newline of the stderr line. */
        Text m = { .p = message_buf, .size = sizeof(message_buf) - 1 };

        if (max_level < level)
                return;

        /* User-controlled strings (model, path) are quoted; no header value is ever logged, so
         * credentials cannot reach the log. */
        text_str(&m, e->provider ?: "-");
        text_mem(&m, " ", 1);
        text_str(&m, e->method);
        text_mem(&m, " '", 2);
        text_str(&m, e->path);
        text_str(&m, "' model='");
        text_str(&m, strempty(e->model));
        text_str(&m, "' stream=");
        text_str(&m, yes_no(e->stream));
        text_str(&m, " route=");
        text_str(&m, e->route ?: "-");
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
                text_str(&m, e->tried);
        }
        text_str(&m, " id=");
        text_str(&m, e->request_id);
        if (e->error_message) {
                text_str(&m, ": ");
                text_str(&m, e->error_message);
        }

        if (target == LOG_TARGET_JOURNAL) {
                char fields_buf[8192];
                Fields f = { .text = { .p = fields_buf, .size = sizeof(fields_buf) } };

                field_str(&f, "MESSAGE", message_buf);
                field_u64(&f, "PRIORITY", (uint64_t) level);
                field_str(&f, "SYSLOG_IDENTIFIER", "provider-router");
                field_str(&f, "PROVIDER", strempty(e->provider));
                field_str(&f, "MODEL", strempty(e->model));
                field_u64(&f, "STATUS", e->status);
                field_u64(&f, "DURATION_USEC", e->duration_usec);
                field_str(&f, "REQUEST_ID", e->request_id);
                field_u64(&f, "STREAM", e->stream);
                field_str(&f, "METHOD", e->method);
                field_str(&f, "PATH", e->path);
                field_str(&f, "ROUTE", e->route);
                field_u64(&f, "BYTES_IN", e->bytes_in);
                field_u64(&f, "BYTES_OUT", e->bytes_out);
                if (e->ttfb_usec != USEC_INFINITY)
                        field_u64(&f, "TTFB_USEC", e->ttfb_usec);
                field_str(&f, "ERROR_TYPE", e->error_type);
                field_str(&f, "REMOTE_ADDR", e->remote);
                if (e->prompt_tokens != UINT64_MAX) {
                        field_u64(&f, "PROMPT_TOKENS", e->prompt_tokens);
                        field_u64(&f, "COMPLETION_TOKENS", e->completion_tokens);
                }
                if (e->attempts > 1)
                        field_u64(&f, "ATTEMPTS", e->attempts);
                field_str(&f, "PROVIDERS_TRIED", e->tried);
                if (e->response_body) {
                        field_begin(&f, "RESPONSE_BODY");
                        text_mem(&f.text, e->response_body, MIN(e->response_body_size, (size_t) 4096));
                        field_end(&f);
                }
                (void) sd_journal_sendv(f.iov, (int) f.n);
                return;
        }

        message_buf[m.len++] = '\n';
        (void) fwrite(message_buf, 1, m.len, stderr);
        if (e->response_body)
                (void) fprintf(stderr, "  response: %.*s\n", (int) MIN(e->response_body_size, (size_t) 4096),
                               e->response_body);
}
