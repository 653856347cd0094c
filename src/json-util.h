/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <json-glib/json-glib.h>

#include "util.h"

/* {"error":{"message":…,"type":…,"provider":…,"code":…}} — the plan's error shape. provider and
 * code may be NULL. */
char *json_error_body(const char *type, const char *message, const char *provider, const char *code);

/* Appends s (UTF-8) as a JSON string, quotes included: '"' and '\\' escaped, control characters
 * as \\u00XX, everything else as it is. */
void json_append_string(GString *out, const char *s);

/* In an object being built: "model" and "messages" of a chat request with one user message. */
void json_builder_add_chat(JsonBuilder *b, const char *model, const char *prompt);

/* Serialises the builder's root compactly; frees nothing. */
char *json_builder_to_string(JsonBuilder *b, size_t *ret_size);

