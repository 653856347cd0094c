/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stddef.h>

#include "request.h"

/* GET /v1/models: asks every provider (or the one named by X-Provider) for its list at once and
 * answers with the union, plus configured and mapped model names. */
extern const Handler models_handler;

/* The model ids of a provider's GET /models answer (the OpenAI list shape) that are valid model
 * names, in order, NULL-terminated. Returns 0, or -EINVAL if the answer is not such a list. */
int models_parse_list(const char *body, size_t size, char ***ret_ids);
