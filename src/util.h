/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include <curl/curl.h>
#include <glib.h>
#include <systemd/sd-bus.h>
#include <systemd/sd-event.h>

typedef uint64_t usec_t;

#define USEC_INFINITY ((usec_t) UINT64_MAX)
#define USEC_PER_SEC ((usec_t) 1000000ULL)
#define USEC_PER_MSEC ((usec_t) 1000ULL)
#define NSEC_PER_USEC ((uint64_t) 1000ULL)

#define ELEMENTSOF(x) (sizeof(x) / sizeof((x)[0]))
#define _unused_ __attribute__((unused))
#define _fallthrough_ __attribute__((fallthrough))
#define _printf_(a, b) __attribute__((format(printf, a, b)))
#define _likely_(x) (__builtin_expect(!!(x), 1))
#define _unlikely_(x) (__builtin_expect(!!(x), 0))
#define _public_ __attribute__((visibility("default")))

#define STRLEN(x) (sizeof(x) - 1)
#define streq(a, b) (strcmp((a), (b)) == 0)
#define strcaseeq(a, b) (g_ascii_strcasecmp((a), (b)) == 0)

/* Hand an owned pointer on: returns it and clears the variable. */
#define TAKE_PTR(p) g_steal_pointer(&(p))

static inline int negative_errno(void) {
        /* errno may be 0 after a failed call in some libraries; never return success by accident. */
        return errno > 0 ? -errno : -EIO;
}

static inline usec_t now_usec(clockid_t clock) {
        struct timespec ts;
        clock_gettime(clock, &ts);
        return (usec_t) ts.tv_sec * USEC_PER_SEC + (usec_t) ts.tv_nsec / NSEC_PER_USEC;
}

static inline const char *yes_no(bool b) {
        return b ? "yes" : "no";
}

static inline const char *strempty(const char *s) {
        return s ?: "";
}

static inline const char *strna(const char *s) {
        return s ?: "n/a";
}

static inline bool isempty(const char *s) {
        return !s || s[0] == 0;
}

/* Overwrite a secret before its memory is released. */
static inline void erase_and_free(char *s) {
        if (!s)
                return;
        explicit_bzero(s, strlen(s));
        g_free(s);
}

G_DEFINE_AUTOPTR_CLEANUP_FUNC(sd_event, sd_event_unref)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(sd_event_source, sd_event_source_unref)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(sd_bus, sd_bus_flush_close_unref)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(sd_bus_message, sd_bus_message_unref)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(sd_bus_slot, sd_bus_slot_unref)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(sd_bus_creds, sd_bus_creds_unref)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CURLU, curl_url_cleanup)

static inline void sd_bus_error_free_wrapper(sd_bus_error *e) {
        sd_bus_error_free(e);
}

typedef char SecretString;
static inline void secret_string_free(SecretString *s) {
        erase_and_free(s);
}
G_DEFINE_AUTOPTR_CLEANUP_FUNC(SecretString, secret_string_free)
