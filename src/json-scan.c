/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <errno.h>
#include <string.h>

#include <glib.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "json-scan.h"

typedef struct Scanner {
        const char *start, *p, *end;
        const char *reason;
} Scanner;

static int fail(Scanner *s, const char *reason) {
        s->reason = reason;
        return -EINVAL;
}

static inline void skip_whitespace(Scanner *s) {
        while (s->p < s->end && (*s->p == ' ' || *s->p == '\n' || *s->p == '\r' || *s->p == '\t'))
                s->p++;
}

static int hex_value(char c) {
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1;
}

static int read_u_escape(const char *p, const char *end, unsigned *ret) {
        unsigned v = 0;

        if (end - p < 4)
                return -EINVAL;
        for (int i = 0; i < 4; i++) {
                int h = hex_value(p[i]);
                if (h < 0)
                        return -EINVAL;
                v = (v << 4) | (unsigned) h;
        }
        *ret = v;
        return 0;
}

/* Length of the valid UTF-8 sequence at p (first byte >= 0x80), or 0 if invalid: no overlong
 * forms, no surrogates, nothing above U+10FFFF. */
static size_t utf8_sequence(const unsigned char *p, const unsigned char *end) {
        unsigned char c = p[0];

        if (c >= 0xC2 && c <= 0xDF) {
                if (end - p < 2 || (p[1] & 0xC0) != 0x80)
                        return 0;
                return 2;
        }
        if (c >= 0xE0 && c <= 0xEF) {
                if (end - p < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80)
                        return 0;
                if (c == 0xE0 && p[1] < 0xA0) /* overlong */
                        return 0;
                if (c == 0xED && p[1] >= 0xA0) /* UTF-16 surrogates */
                        return 0;
                return 3;
        }
        if (c >= 0xF0 && c <= 0xF4) {
                if (end - p < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80)
                        return 0;
                if (c == 0xF0 && p[1] < 0x90) /* overlong */
                        return 0;
                if (c == 0xF4 && p[1] >= 0x90) /* above U+10FFFF */
                        return 0;
                return 4;
        }
        return 0;
}

/* Eight bytes at a time: is any of them a quote, a backslash, a control character or non-ASCII?
 * Long strings (the messages) are almost all plain ASCII, so this is where a body's bytes go. */
static inline bool word_is_plain(uint64_t w) {
        const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
        uint64_t quote = w ^ (ones * '"'), backslash = w ^ (ones * '\\');
        uint64_t has_quote = (quote - ones) & ~quote & highs;
        uint64_t has_backslash = (backslash - ones) & ~backslash & highs;
        uint64_t has_control = (w - ones * 0x20) & ~w & highs;
        uint64_t has_high = w & highs;
        return (has_quote | has_backslash | has_control | has_high) == 0;
}

/* Skips plain string bytes (printable ASCII other than '"' and '\\'): sixteen at a time with
 * SSE2 where the compiler has it (every x86-64), else eight at a time. */
static inline const char *skip_plain(const char *p, const char *end) {
#ifdef __SSE2__
        const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\');
        const __m128i space = _mm_set1_epi8(0x20), sign = _mm_set1_epi8((char) 0x80);

        while (end - p >= 16) {
                __m128i v = _mm_loadu_si128((const __m128i *) (const void *) p);
                /* Signed compare after flipping the sign bit is an unsigned compare: bytes
                 * below 0x20 are control characters; bytes >= 0x80 show in the movemask. */
                __m128i special = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                                               _mm_cmpgt_epi8(_mm_xor_si128(space, sign), _mm_xor_si128(v, sign)));
                int mask = _mm_movemask_epi8(special) | _mm_movemask_epi8(v);
                if (mask != 0)
                        return p + __builtin_ctz((unsigned) mask);
                p += 16;
        }
#endif
        while (end - p >= 8) {
                uint64_t w;
                memcpy(&w, p, 8);
                if (!word_is_plain(w))
                        break;
                p += 8;
        }
        return p;
}

static int scan_string(Scanner *s, JsonSpan *span) {
        const char *begin = s->p;
        bool escaped = false;

        s->p++; /* the opening quote */
        for (;;) {
                s->p = skip_plain(s->p, s->end);
                if (s->p >= s->end)
                        return fail(s, "unterminated string");

                unsigned char c = (unsigned char) *s->p;
                if (c == '"') {
                        s->p++;
                        break;
                }
                if (c < 0x20)
                        return fail(s, "control character in string");
                if (c == '\\') {
                        escaped = true;
                        if (s->end - s->p < 2)
                                return fail(s, "unterminated escape");
                        switch (s->p[1]) {
                        case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                                s->p += 2;
                                break;
                        case 'u': {
                                unsigned u, lo;
                                if (read_u_escape(s->p + 2, s->end, &u) < 0)
                                        return fail(s, "invalid \\u escape");
                                s->p += 6;
                                if (u >= 0xDC00 && u <= 0xDFFF)
                                        return fail(s, "unpaired surrogate in \\u escape");
                                if (u >= 0xD800 && u <= 0xDBFF) {
                                        if (s->end - s->p < 6 || s->p[0] != '\\' || s->p[1] != 'u' ||
                                            read_u_escape(s->p + 2, s->end, &lo) < 0 || lo < 0xDC00 || lo > 0xDFFF)
                                                return fail(s, "unpaired surrogate in \\u escape");
                                        s->p += 6;
                                }
                                break;
                        }
                        default:
                                return fail(s, "invalid escape in string");
                        }
                        continue;
                }
                if (c >= 0x80) {
                        size_t n = utf8_sequence((const unsigned char *) s->p, (const unsigned char *) s->end);
                        if (n == 0)
                                return fail(s, "invalid UTF-8 in string");
                        s->p += n;
                        continue;
                }
                s->p++;
        }

        if (span)
                *span = (JsonSpan) { .data = begin, .size = (size_t) (s->p - begin), .type = JSON_VALUE_STRING,
                                     .escaped = escaped };
        return 0;
}

static inline bool is_digit(char c) {
        return c >= '0' && c <= '9';
}

static int scan_number(Scanner *s) {
        if (s->p < s->end && *s->p == '-')
                s->p++;
        if (s->p >= s->end || !is_digit(*s->p))
                return fail(s, "invalid number");
        if (*s->p == '0') {
                s->p++;
                if (s->p < s->end && is_digit(*s->p))
                        return fail(s, "leading zero in number");
        } else
                while (s->p < s->end && is_digit(*s->p))
                        s->p++;
        if (s->p < s->end && *s->p == '.') {
                s->p++;
                if (s->p >= s->end || !is_digit(*s->p))
                        return fail(s, "invalid number: no digit after '.'");
                while (s->p < s->end && is_digit(*s->p))
                        s->p++;
        }
        if (s->p < s->end && (*s->p == 'e' || *s->p == 'E')) {
                s->p++;
                if (s->p < s->end && (*s->p == '+' || *s->p == '-'))
                        s->p++;
                if (s->p >= s->end || !is_digit(*s->p))
                        return fail(s, "invalid number: no digit in exponent");
                while (s->p < s->end && is_digit(*s->p))
                        s->p++;
        }
        return 0;
}

static int scan_literal(Scanner *s, const char *word) {
        size_t n = strlen(word);
        if ((size_t) (s->end - s->p) < n || memcmp(s->p, word, n) != 0)
                return fail(s, "invalid literal");
        s->p += n;
        return 0;
}

/* A scalar at s->p, or the type of the container it opens. */
static int scan_scalar_or_open(Scanner *s, JsonValueType *ret_type) {
        if (s->p >= s->end)
                return fail(s, "unexpected end of data, expected a value");
        switch (*s->p) {
        case '{':
                s->p++;
                *ret_type = JSON_VALUE_OBJECT;
                return 0;
        case '[':
                s->p++;
                *ret_type = JSON_VALUE_ARRAY;
                return 0;
        case '"':
                *ret_type = JSON_VALUE_STRING;
                return scan_string(s, NULL);
        case 't':
                *ret_type = JSON_VALUE_TRUE;
                return scan_literal(s, "true");
        case 'f':
                *ret_type = JSON_VALUE_FALSE;
                return scan_literal(s, "false");
        case 'n':
                *ret_type = JSON_VALUE_NULL;
                return scan_literal(s, "null");
        case '-':
        case '0' ... '9':
                *ret_type = JSON_VALUE_NUMBER;
                return scan_number(s);
        default:
                return fail(s, "expected a value");
        }
}

int json_scan(const char *data, size_t size, JsonMemberFunc func, void *userdata, JsonScanError *ret_error) {
        Scanner s = { .start = data, .p = data, .end = data + size };
        char stack[JSON_SCAN_MAX_DEPTH];  /* '{' or '[' per open container */
        unsigned depth = 0;
        JsonSpan key = {}, value;
        const char *value_start = NULL;
        JsonValueType type, value_type = JSON_VALUE_NULL;
        bool first, report;
        int r;

        skip_whitespace(&s);
        r = scan_scalar_or_open(&s, &type);
        if (r < 0)
                goto error;
        report = func && type == JSON_VALUE_OBJECT;
        if (type == JSON_VALUE_OBJECT || type == JSON_VALUE_ARRAY) {
                stack[depth++] = type == JSON_VALUE_OBJECT ? '{' : '[';
                first = true;
        }

        while (depth > 0) {
                char open = stack[depth - 1], close = open == '{' ? '}' : ']';

                skip_whitespace(&s);
                if (s.p >= s.end) {
                        r = fail(&s, "unexpected end of data inside an object or array");
                        goto error;
                }
                if (*s.p == close) {
                        s.p++;
                        depth--;
                        first = false;
                        /* A member of the top-level object whose value was a container ends here. */
                        if (report && depth == 1) {
                                value = (JsonSpan) { .data = value_start, .size = (size_t) (s.p - value_start),
                                                     .type = value_type };
                                r = func(&key, &value, userdata);
                                if (r < 0)
                                        return r;
                        }
                        continue;
                }
                if (!first) {
                        if (*s.p != ',') {
                                r = fail(&s, open == '{' ? "expected ',' or '}'" : "expected ',' or ']'");
                                goto error;
                        }
                        s.p++;
                        skip_whitespace(&s);
                }
                first = false;

                if (open == '{') {
                        if (s.p >= s.end || *s.p != '"') {
                                r = fail(&s, "expected a string as member name");
                                goto error;
                        }
                        r = scan_string(&s, depth == 1 ? &key : NULL);
                        if (r < 0)
                                goto error;
                        skip_whitespace(&s);
                        if (s.p >= s.end || *s.p != ':') {
                                r = fail(&s, "expected ':' after member name");
                                goto error;
                        }
                        s.p++;
                        skip_whitespace(&s);
                }

                if (depth == 1)
                        value_start = s.p;
                r = scan_scalar_or_open(&s, &type);
                if (r < 0)
                        goto error;
                if (type == JSON_VALUE_OBJECT || type == JSON_VALUE_ARRAY) {
                        if (depth >= JSON_SCAN_MAX_DEPTH) {
                                r = fail(&s, "nesting too deep");
                                goto error;
                        }
                        if (depth == 1)
                                value_type = type;
                        stack[depth++] = type == JSON_VALUE_OBJECT ? '{' : '[';
                        first = true;
                        continue;
                }
                if (report && depth == 1) {
                        value = (JsonSpan) { .data = value_start, .size = (size_t) (s.p - value_start), .type = type };
                        if (type == JSON_VALUE_STRING)
                                value.escaped = memchr(value_start, '\\', value.size) != NULL;
                        r = func(&key, &value, userdata);
                        if (r < 0)
                                return r;
                }
        }

        skip_whitespace(&s);
        if (s.p != s.end) {
                r = fail(&s, "trailing data after the JSON value");
                goto error;
        }
        return 0;

error:
        if (ret_error)
                *ret_error = (JsonScanError) { .offset = (size_t) (s.p - s.start), .reason = s.reason };
        return r;
}

bool json_span_equal(const JsonSpan *s, const char *name) {
        size_t n = strlen(name);

        if (s->type != JSON_VALUE_STRING)
                return false;
        if (!s->escaped)
                return s->size == n + 2 && memcmp(s->data + 1, name, n) == 0;
        g_autofree char *u = json_span_to_string(s);
        return u && strcmp(u, name) == 0;
}

static void append_utf8(GString *out, unsigned cp) {
        char buf[6];
        int n = g_unichar_to_utf8((gunichar) cp, buf);
        g_string_append_len(out, buf, n);
}

char *json_span_to_string(const JsonSpan *s) {
        const char *p, *end;
        GString *out;

        if (s->type != JSON_VALUE_STRING || s->size < 2)
                return NULL;
        p = s->data + 1;
        end = s->data + s->size - 1;
        if (!s->escaped)
                return g_strndup(p, (gsize) (end - p));

        out = g_string_sized_new(s->size);
        while (p < end) {
                const char *bs = memchr(p, '\\', (size_t) (end - p));
                if (!bs) {
                        g_string_append_len(out, p, end - p);
                        break;
                }
                g_string_append_len(out, p, bs - p);
                p = bs + 1;
                switch (*p) {
                case 'b': g_string_append_c(out, '\b'); p++; break;
                case 'f': g_string_append_c(out, '\f'); p++; break;
                case 'n': g_string_append_c(out, '\n'); p++; break;
                case 'r': g_string_append_c(out, '\r'); p++; break;
                case 't': g_string_append_c(out, '\t'); p++; break;
                case 'u': {
                        unsigned u = 0, lo = 0;
                        (void) read_u_escape(p + 1, end, &u); /* validated by the scan */
                        p += 5;
                        if (u >= 0xD800 && u <= 0xDBFF) {
                                (void) read_u_escape(p + 2, end, &lo);
                                p += 6;
                                u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
                        }
                        if (u == 0) { /* a NUL cannot be a C string */
                                g_string_free(out, TRUE);
                                return NULL;
                        }
                        append_utf8(out, u);
                        break;
                }
                default: /* '"', '\\', '/' */
                        g_string_append_c(out, *p);
                        p++;
                }
        }
        return g_string_free(out, FALSE);
}

int json_span_to_uint64(const JsonSpan *s, uint64_t *ret) {
        uint64_t v = 0;

        if (s->type != JSON_VALUE_NUMBER || s->size == 0)
                return -EINVAL;
        for (size_t i = 0; i < s->size; i++) {
                char c = s->data[i];
                if (!is_digit(c))
                        return -EINVAL; /* negative, fraction or exponent */
                if (v > (UINT64_MAX - (uint64_t) (c - '0')) / 10)
                        return -ERANGE;
                v = v * 10 + (uint64_t) (c - '0');
        }
        *ret = v;
        return 0;
}

static bool is_json_space(char c) {
        return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Past the string that starts at p (its opening quote), in valid JSON: the next quote with an
 * even number of backslashes before it. memchr() finds candidates fast in long strings. */
static const char *skip_string_fast(const char *p, const char *end) {
        for (p++; p < end;) {
                const char *q = memchr(p, '"', (size_t) (end - p)), *b;

                if (!q)
                        return end;
                for (b = q; b > p && b[-1] == '\\'; b--)
                        ;
                if ((q - b) % 2 == 0)
                        return q + 1;
                p = q + 1;
        }
        return end;
}

int json_array_foreach(const JsonSpan *array, JsonElementFunc func, void *userdata) {
        const char *p, *end, *start = NULL;
        unsigned depth = 0;

        if (array->type != JSON_VALUE_ARRAY || array->size < 2)
                return 0;
        /* Valid JSON: an element ends at a comma outside strings and nested values, or at the
         * array's own ']'. */
        end = array->data + array->size - 1;
        for (p = array->data + 1; p <= end; p++) {
                if (!start) {
                        if (is_json_space(*p) || p == end)
                                continue;
                        start = p;
                }
                if (*p == '"')
                        p = skip_string_fast(p, end) - 1;
                else if (*p == '{' || *p == '[')
                        depth++;
                else if ((*p == '}' || *p == ']') && depth > 0)
                        depth--;
                else if ((*p == ',' && depth == 0) || p == end) {
                        const char *e = p;
                        int r;

                        while (e > start && is_json_space(e[-1]))
                                e--;
                        r = func(start, (size_t) (e - start), userdata);
                        if (r < 0)
                                return r;
                        start = NULL;
                }
        }
        return 0;
}
