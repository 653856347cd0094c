/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* What a provider sends back: the lines of an answer's head (each an exact-size buffer, as
 * curl hands them over), a Retry-After value, a GET /models list merged with another one, the
 * usage of an answer, and what a comparison reads of it (text, tool calls, finish, tokens). */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "answer.h"
#include "compare.h"
#include "config.h"
#include "health.h"
#include "inspect.h"
#include "json-scan.h"
#include "models.h"
#include "upstream.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void head_lines(const char *text, size_t size) {
        for (size_t i = 0; i < size;) {
                const char *nl = memchr(text + i, '\n', size - i);
                size_t n = nl ? (size_t) (nl - (text + i)) + 1 : size - i;
                g_autofree char *line = g_memdup2(text + i, n);
                const char *value = NULL;
                size_t name_len = 0, value_len = 0;
                long status = -1;

                switch (upstream_parse_head_line(line, n, &status, &name_len, &value, &value_len)) {
                case UPSTREAM_HEAD_FIELD:
                        assert(name_len < n);
                        assert(value >= line + name_len + 1 && value + value_len <= line + n);
                        break;
                case UPSTREAM_HEAD_STATUS:
                case UPSTREAM_HEAD_END:
                case UPSTREAM_HEAD_OTHER:
                        break;
                default:
                        abort();
                }
                i += n;
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        const char *text = (const char *) data;
        const char *nl = memchr(text, '\n', size);
        g_autofree char *first = g_strndup(text, nl ? (size_t) (nl - text) : size);
        g_autoptr(GString) merged = g_string_new("{\"data\":[");
        g_autoptr(GHashTable) seen = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
        uint64_t p, c;
        int n, m;

        head_lines(text, size);
        (void) parse_retry_after(first);
        /* Merged twice: the second time every id is taken, so nothing more is added. The
         * result is a list again, with each entry once. */
        n = models_list_append(merged, seen, text, size, "fuzz\"provider");
        m = models_list_append(merged, seen, text, size, "other");
        assert(n >= -EINVAL && (n < 0) == (m < 0) && m <= 0);
        g_string_append(merged, "]}");
        assert(json_scan(merged->str, merged->len, NULL, NULL, NULL) == 0);
        assert(n < 0 || g_hash_table_size(seen) == (guint) n);
        if (n > 0) {
                g_autoptr(GString) again = g_string_new("[");
                g_autoptr(GHashTable) seen_again = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, NULL);
                assert(models_list_append(again, seen_again, merged->str, merged->len, "again") == n);
        }
        (void) inspect_usage(text, size, &p, &c);

        /* What a comparison reads of an answer, whole and as a stream in two pieces; its text
         * against itself is alike in full. */
        for (int stream = 0; stream < 2; stream++) {
                AnswerSummary s;
                AnswerReader r;

                answer_summary_init(&s, "fuzz");
                answer_reader_init(&r, &s, stream);
                answer_reader_feed(&r, text, size / 2);
                answer_reader_feed(&r, text + size / 2, size - size / 2);
                answer_reader_finish(&r);
                assert(s.text->len <= ANSWER_TEXT_MAX && s.text->len <= s.answer_length);
                assert(s.tool_calls->len <= ANSWER_TOOL_CALLS_MAX);
                assert(compare_similarity(s.text->str, s.text->len, s.text->str, s.text->len) == 1.0);
                answer_reader_clear(&r);
                answer_summary_clear(&s);
        }
        return 0;
}
