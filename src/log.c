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

void log_buffer_requests(bool b) {
        static char buffer[64 * 1024];

        /* Request lines on stderr are collected and written once per event loop iteration (see
         * log_flush()); under load one write() carries many requests. Other messages flush at
         * once. */
        if (b)
                (void) setvbuf(stderr, buffer, _IOFBF, sizeof(buffer));
        else {
                (void) fflush(stderr);
                (void) setvbuf(stderr, NULL, _IONBF, 0);
        }
}

void log_flush(void) {
        (void) fflush(stderr);
}

void log_set_target(LogTarget t) {
        target = t;
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

static void format_duration(char *buf, size_t n, usec_t u) {
        /* Integer arithmetic: this runs for every request. */
        if (u == USEC_INFINITY)
                (void) snprintf(buf, n, "-");
        else if (u < 10 * USEC_PER_MSEC)
                (void) snprintf(buf, n, "%u.%02ums", (unsigned) (u / 1000), (unsigned) (u % 1000 / 10));
        else if (u < 10 * USEC_PER_SEC)
                (void) snprintf(buf, n, "%u.%01ums", (unsigned) (u / 1000), (unsigned) (u % 1000 / 100));
        else
                (void) snprintf(buf, n, "%" PRIu64 ".%01us", u / USEC_PER_SEC, (unsigned) (u % USEC_PER_SEC / 100000));
}

void log_request(const RequestLogEntry *e, int level) {
        char duration[32], ttfb[32], message[1024], tokens[64] = "";

        if (max_level < level)
                return;

        format_duration(duration, sizeof(duration), e->duration_usec);
        format_duration(ttfb, sizeof(ttfb), e->ttfb_usec);
        if (e->prompt_tokens != UINT64_MAX)
                (void) snprintf(tokens, sizeof(tokens), " tokens=%" PRIu64 "+%" PRIu64,
                                e->prompt_tokens, e->completion_tokens);

        /* User-controlled strings (model, path) are quoted; no header value is ever logged, so
         * credentials cannot reach the log. */
        (void) snprintf(message, sizeof(message),
                        "%s %s '%s' model='%s' stream=%s route=%s -> %u in %s (first byte %s) in=%" PRIu64
                        "B out=%" PRIu64 "B%s%s%s id=%s%s%s",
                        e->provider ?: "-", e->method, e->path, strempty(e->model), yes_no(e->stream),
                        e->route ?: "-", e->status, duration, ttfb, e->bytes_in, e->bytes_out, tokens,
                        e->tried ? " tried=" : "", strempty(e->tried),
                        e->request_id, e->error_message ? ": " : "", strempty(e->error_message));

        if (target == LOG_TARGET_JOURNAL) {
                struct iovec iov[26];
                size_t n = 0;
                g_autofree char *f_message = g_strconcat("MESSAGE=", message, NULL);
                g_autofree char *f_priority = g_strdup_printf("PRIORITY=%i", level);
                g_autofree char *f_provider = g_strconcat("PROVIDER=", strempty(e->provider), NULL);
                g_autofree char *f_model = g_strconcat("MODEL=", strempty(e->model), NULL);
                g_autofree char *f_status = g_strdup_printf("STATUS=%u", e->status);
                g_autofree char *f_duration = g_strdup_printf("DURATION_USEC=%" PRIu64, e->duration_usec);
                g_autofree char *f_request_id = g_strconcat("REQUEST_ID=", e->request_id, NULL);
                g_autofree char *f_stream = g_strdup_printf("STREAM=%i", e->stream);
                g_autofree char *f_method = g_strconcat("METHOD=", e->method, NULL);
                g_autofree char *f_path = g_strconcat("PATH=", e->path, NULL);
                g_autofree char *f_route = e->route ? g_strconcat("ROUTE=", e->route, NULL) : NULL;
                g_autofree char *f_bytes_in = g_strdup_printf("BYTES_IN=%" PRIu64, e->bytes_in);
                g_autofree char *f_bytes_out = g_strdup_printf("BYTES_OUT=%" PRIu64, e->bytes_out);
                g_autofree char *f_ttfb = e->ttfb_usec != USEC_INFINITY
                        ? g_strdup_printf("TTFB_USEC=%" PRIu64, e->ttfb_usec) : NULL;
                g_autofree char *f_error = e->error_type ? g_strconcat("ERROR_TYPE=", e->error_type, NULL) : NULL;
                g_autofree char *f_remote = e->remote ? g_strconcat("REMOTE_ADDR=", e->remote, NULL) : NULL;
                g_autofree char *f_pt = e->prompt_tokens != UINT64_MAX
                        ? g_strdup_printf("PROMPT_TOKENS=%" PRIu64, e->prompt_tokens) : NULL;
                g_autofree char *f_ct = e->prompt_tokens != UINT64_MAX
                        ? g_strdup_printf("COMPLETION_TOKENS=%" PRIu64, e->completion_tokens) : NULL;
                g_autofree char *f_attempts = e->attempts > 1 ? g_strdup_printf("ATTEMPTS=%u", e->attempts) : NULL;
                g_autofree char *f_tried = e->tried ? g_strconcat("PROVIDERS_TRIED=", e->tried, NULL) : NULL;
                g_autofree char *f_body = NULL;

                if (e->response_body) {
                        size_t sz = MIN(e->response_body_size, (size_t) 4096);
                        f_body = g_malloc(STRLEN("RESPONSE_BODY=") + sz + 1);
                        memcpy(f_body, "RESPONSE_BODY=", STRLEN("RESPONSE_BODY="));
                        memcpy(f_body + STRLEN("RESPONSE_BODY="), e->response_body, sz);
                        f_body[STRLEN("RESPONSE_BODY=") + sz] = 0;
                }

#define ADD(s) do { if (s) iov[n++] = (struct iovec) { .iov_base = (s), .iov_len = strlen(s) }; } while (0)
                ADD(f_message);
                ADD(f_priority);
                iov[n++] = (struct iovec) { .iov_base = (char *) "SYSLOG_IDENTIFIER=provider-router",
                                            .iov_len = STRLEN("SYSLOG_IDENTIFIER=provider-router") };
                ADD(f_provider);
                ADD(f_model);
                ADD(f_status);
                ADD(f_duration);
                ADD(f_request_id);
                ADD(f_stream);
                ADD(f_method);
                ADD(f_path);
                ADD(f_route);
                ADD(f_bytes_in);
                ADD(f_bytes_out);
                ADD(f_ttfb);
                ADD(f_error);
                ADD(f_remote);
                ADD(f_pt);
                ADD(f_ct);
                ADD(f_attempts);
                ADD(f_tried);
                ADD(f_body);
#undef ADD
                (void) sd_journal_sendv(iov, (int) n);
                return;
        }

        if (e->response_body)
                (void) fprintf(stderr, "%s\n  response: %.*s\n", message,
                               (int) MIN(e->response_body_size, (size_t) 4096), e->response_body);
        else
                (void) fprintf(stderr, "%s\n", message);
}
