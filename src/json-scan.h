/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A strict JSON (RFC 8259) validator that builds nothing. The router must reject malformed
 * bodies and needs two or three top-level members of each request and answer; json-glib builds a
 * whole tree of GObjects for that (and is lenient: comments, single quotes, hex numbers), which
 * profiling showed to be half of the router's instructions per request. This reads each byte
 * once, allocates nothing, and reports the members of the top-level object as spans into the
 * caller's buffer. */

#define JSON_SCAN_MAX_DEPTH 128

typedef enum JsonValueType {
        JSON_VALUE_NULL,
        JSON_VALUE_FALSE,
        JSON_VALUE_TRUE,
        JSON_VALUE_NUMBER,
        JSON_VALUE_STRING,
        JSON_VALUE_ARRAY,
        JSON_VALUE_OBJECT,
} JsonValueType;

typedef struct JsonSpan {
        const char *data;  /* points into the scanned buffer; strings include their quotes */
        size_t size;
        JsonValueType type;
        bool escaped;      /* a string with backslash escapes: unescape before use */
} JsonSpan;

/* Called for each member of the top-level object, in order. A negative return stops the scan
 * and is returned by json_scan(). */
typedef int (*JsonMemberFunc)(const JsonSpan *key, const JsonSpan *value, void *userdata);

typedef struct JsonScanError {
        size_t offset;
        const char *reason;
} JsonScanError;

/* Validates that data[0..size) is exactly one JSON value. If it is an object and func is not
 * NULL, reports its members. Returns 0, or -EINVAL and fills *ret_error (if not NULL). */
int json_scan(const char *data, size_t size, JsonMemberFunc func, void *userdata, JsonScanError *ret_error);

/* Compares a key span with a plain ASCII name, handling escaped keys. */
bool json_span_equal(const JsonSpan *s, const char *name);
/* The UTF-8 text of a string span, unescaped, NUL-terminated; NULL if it holds U+0000. */
char *json_span_to_string(const JsonSpan *s);
/* A non-negative integer number span; -ERANGE if it does not fit, -EINVAL if not an integer. */
int json_span_to_uint64(const JsonSpan *s, uint64_t *ret);

/* Calls func for each element of an array span that json_scan() has validated (a member's value),
 * in order, with the element's bytes without the whitespace around them. Stops at the first
 * negative return of func and returns it; 0 after the last element. */
typedef int (*JsonElementFunc)(const char *data, size_t size, void *userdata);
int json_array_foreach(const JsonSpan *array, JsonElementFunc func, void *userdata);
