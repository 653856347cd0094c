/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stddef.h>

#include "request.h"

/* GET /v1/models and GET /v1/models/{id}.
 *
 * Addressed to one provider (X-Provider, or the provider a model id routes to), its answer is
 * relayed as it sent it: status, body, Content-Type, its other headers. Otherwise the answer is
 * the merged list: each provider's entries byte for byte (with "provider" added when an entry has
 * none; the first provider wins a duplicate id), then the configured and mapped model names as
 * entries the router makes. Providers that would give the same answer (same URL, key and
 * transport) are asked once, at most MODELS_PARALLEL at a time, and their lists are kept for
 * ModelsCacheSec= — unless asked with the client's own credential. HEAD never asks a provider
 * for the merged list. */
extern const Handler models_handler;

/* The lists kept between requests, per worker; emptied on reload. */
typedef struct ModelsCache ModelsCache;
ModelsCache *models_cache_free(ModelsCache *c);

/* Appends to out, a JSON array being built (a ',' is written first unless out ends in '['),
 * each entry of a provider's GET /models answer (the OpenAI list shape) whose "id" is a valid
 * model name not yet in seen, and adds the id to seen. Each entry is copied byte for byte, with
 * ',"provider":NAME' before its closing brace when it has no "provider" member. Returns how many
 * were appended, or -EINVAL if body is not such a list. */
int models_list_append(GString *out, GHashTable *seen, const char *body, size_t size, const char *provider);

/* The ids of a provider's GET /models answer that are valid model names, in order,
 * NULL-terminated. Returns 0, or -EINVAL if the answer is not such a list. */
int models_parse_list(const char *body, size_t size, char ***ret_ids);
