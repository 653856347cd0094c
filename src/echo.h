/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "inspect.h"
#include "request.h"

/* The built-in "echo" provider: answers chat completions locally, in OpenAI's format, with the
 * last user message, so that a client can be tried with no backend at all. */
void echo_respond(Request *r, Provider *p, const ChatRequestInfo *info);

/* The text echo_respond() answers a chat request's body with, and whether it was cut short
 * (finish_reason "length"); NULL if the body is not one it answers. For comparisons, whose
 * primary answer does not pass through a reader when the echo provider gives it. */
char *echo_reply_text(const char *body, size_t body_size, bool *ret_truncated);
