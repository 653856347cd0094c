/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdbool.h>
#include <stdint.h>
#include <syslog.h>

#include "util.h"

typedef enum LogTarget {
        LOG_TARGET_STDERR,
        LOG_TARGET_JOURNAL,
} LogTarget;

void log_setup(void);
/* Buffer request lines on stderr until log_flush(), which the event loop calls once per
 * iteration. */
void log_buffer_requests(void);
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

void log_request(const RequestLogEntry *e, int level);
