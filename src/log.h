/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>
#include <syslog.h>

#include "util.h"

typedef enum LogTarget {
        LOG_TARGET_STDERR,
        LOG_TARGET_JOURNAL,
} LogTarget;

void log_setup(void);
/* Buffer request lines on stderr until log_flush(), which the event loop calls once per
 * iteration that logged something. */
void log_buffer_requests(void);
/* func is told each time a line is left in the buffer (it arranges for log_flush()); NULL: no one. */
void log_on_buffered(void (*func)(void *userdata), void *userdata);
void log_flush(void);
LogTarget log_get_target(void);
void log_set_max_level(int level);
int log_get_max_level(void);

int log_level_from_string(const char *s);
const char *log_level_to_string(int level);

int log_internal(int level, int error, const char *file, int line, const char *func,
                 const char *format, ...) _printf_(6, 7);

/* Returns -abs(error), so callers can write "return log_error_errno(r, ...);". The message is
 * formatted with errno set to the error, so %m names it. */
#define log_full_errno(level, error, ...)                                                   \
        ({                                                                                  \
                int _level = (level), _e = (error);                                         \
                _e = _e < 0 ? -_e : _e;                                                     \
                log_get_max_level() >= _level                                               \
                        ? log_internal(_level, _e, __FILE__, __LINE__, __func__, __VA_ARGS__) \
                        : -_e;                                                              \
        })

#define log_full(level, ...) (void) log_full_errno((level), 0, __VA_ARGS__)

#define log_debug(...) log_full(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_full(LOG_INFO, __VA_ARGS__)
#define log_notice(...) log_full(LOG_NOTICE, __VA_ARGS__)
#define log_warning(...) log_full(LOG_WARNING, __VA_ARGS__)
#define log_error(...) log_full(LOG_ERR, __VA_ARGS__)

#define log_debug_errno(e, ...) log_full_errno(LOG_DEBUG, (e), __VA_ARGS__)
#define log_info_errno(e, ...) log_full_errno(LOG_INFO, (e), __VA_ARGS__)
#define log_notice_errno(e, ...) log_full_errno(LOG_NOTICE, (e), __VA_ARGS__)
#define log_warning_errno(e, ...) log_full_errno(LOG_WARNING, (e), __VA_ARGS__)
#define log_error_errno(e, ...) log_full_errno(LOG_ERR, (e), __VA_ARGS__)

#define log_oom() log_error_errno(ENOMEM, "Out of memory.")

/* One finished request, as the request log sees it. Strings may be NULL. */
typedef struct RequestLogEntry {
        const char *request_id;
        const char *provider_request_id; /* the provider's own, PROVIDER_REQUEST_ID */
        const char *upstream_model; /* the model as the provider was asked for it, when renamed */
        const char *method;
        const char *path;
        const char *provider;
        const char *model;
        const char *route;        /* "header", "mapping", "default" */
        const char *error_type;   /* NULL on success */
        const char *error_message;
        const char *remote;
        const char *response_body; /* only with LogResponses=true */
        size_t response_body_size;
        unsigned status;
        bool stream;
        usec_t duration_usec;
        usec_t ttfb_usec;         /* USEC_INFINITY if no byte came */
        uint64_t bytes_in;
        uint64_t bytes_out;
        uint64_t prompt_tokens;   /* UINT64_MAX if unknown */
        uint64_t completion_tokens;
        unsigned attempts;
        const char *tried;        /* providers tried, when more than one */
} RequestLogEntry;

/* Writes one request's entry: to the journal with its fields, or one line on stderr. Every
 * client-controlled value is capped (a cut one ends in "…[cut N bytes]"), so the entry always
 * fits; should the journal refuse it anyway, a minimal entry (MESSAGE, PRIORITY, REQUEST_ID,
 * STATUS, PROVIDER) is sent instead, and failing that the line goes to stderr. On stderr and in
 * MESSAGE, control characters and bytes that are not UTF-8 are escaped (\n, \x1b), so no client
 * can forge a log line or reach a terminal. */
void log_request(const RequestLogEntry *e, int level);

/* Caps, in bytes. In the MESSAGE/stderr line, of each escaped value: */
#define LOG_MESSAGE_MAX 4096         /* the whole line; the caps below add up to less */
#define LOG_MESSAGE_SHORT_MAX 128    /* provider, method, route, request id */
#define LOG_MESSAGE_PATH_MAX 512
#define LOG_MESSAGE_MODEL_MAX 256
#define LOG_MESSAGE_TRIED_MAX 256
#define LOG_MESSAGE_ERROR_MAX 1024
/* Of each journal field's value, as it is: */
#define LOG_FIELD_MAX 2048           /* MODEL, PATH, REMOTE_ADDR, PROVIDERS_TRIED */
#define LOG_FIELD_SHORT_MAX 256      /* PROVIDER, REQUEST_ID, METHOD, ROUTE, ERROR_TYPE */
#define LOG_RESPONSE_BODY_MAX 4096   /* RESPONSE_BODY, and the response line on stderr */
/* One whole entry: MESSAGE + 6 short + 4 long fields + RESPONSE_BODY + numbers, with room. */
#define LOG_JOURNAL_ENTRY_MAX (24 * 1024)
#define LOG_JOURNAL_FIELDS_MAX 26

/* The parts of log_request(), for tests: the line (returns its length; buf holds it
 * NUL-terminated) and the journal fields (returns how many iovecs, pointing into buf). */
size_t log_request_message(const RequestLogEntry *e, char *buf, size_t size);
size_t log_request_fields(const RequestLogEntry *e, int level, const char *message,
                          char *buf, size_t size, struct iovec iov[static LOG_JOURNAL_FIELDS_MAX]);

/* One entry of the router's own events (a comparison, say): MESSAGE_ID, MESSAGE and the given
 * "NAME=value" fields (each capped at LOG_FIELD_MAX; a name may repeat) to the journal, or the
 * message alone, escaped, on stderr. */
void log_structured(int level, const char *message_id, const char *message, const char *const *fields, size_t n);

/* For tests: where journal entries go (NULL: sd_journal_sendv()), and the target. */
typedef int (*LogJournalSendv)(const struct iovec *iov, int n);
void log_set_journal_sendv(LogJournalSendv f);
void log_set_target(LogTarget t);
