/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "util.h"

/* What the router needs to know about a chat request to route it. The body itself is forwarded
 * untouched; nothing here points into it. */
typedef struct ChatRequestInfo {
        char *model;        /* NULL if the request names none */
        char *user;         /* the "user" member, a sticky key for A/B splits; NULL if none */
        bool stream;
        bool has_messages;
} ChatRequestInfo;

void chat_request_info_clear(ChatRequestInfo *info);

/* Returns 0, or -EINVAL with a message for the client in *ret_message (malformed JSON, not an
 * object, "model" not a string, "stream" not a boolean). */
int inspect_chat_request(const char *body, size_t size, ChatRequestInfo *ret, char **ret_message);

/* Returns a copy of the request with "model" set, for providers with a DefaultModel= when the
 * client named none: the member "model":"…" is inserted right after the top-level '{' (or a
 * "model": null is given the value), and every other byte stays as the client sent it — numbers
 * are not re-serialised, whitespace is kept. The copy is NUL-terminated. -EINVAL if body is not
 * a JSON object or model is not UTF-8. */
int inspect_set_model(const char *body, size_t size, const char *model, char **ret_body, size_t *ret_size);
/* Returns a copy of the request with the value of its top-level "model" member (the last one, which
 * is the one that counts) replaced by the string model, every other byte unchanged: a per-provider
 * model name. -ENOENT if there is no such member, -EINVAL as above. */
int inspect_replace_model(const char *body, size_t size, const char *model, char **ret_body, size_t *ret_size);

/* Finds "usage" in an OpenAI response or stream chunk; returns 0 and the counts if present,
 * -ENOENT if absent. */
int inspect_usage(const char *body, size_t size, uint64_t *ret_prompt, uint64_t *ret_completion);
