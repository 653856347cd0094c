/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* What a provider sends back: the lines of an answer's head (each an exact-size buffer, as
 * curl hands them over), a Retry-After value, a GET /models list and the usage of an answer. */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "health.h"
#include "inspect.h"
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
        g_auto(GStrv) ids = NULL;
        uint64_t p, c;

        head_lines(text, size);
        (void) parse_retry_after(first);
        if (models_parse_list(text, size, &ids) >= 0)
                for (char **id = ids; *id; id++)
                        assert(model_name_is_valid(*id));
        (void) inspect_usage(text, size, &p, &c);
        return 0;
}
