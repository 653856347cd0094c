/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "inspect.h"
#include "request.h"

/* The built-in "echo" provider: answers chat completions locally, in OpenAI's format, with the
 * last user message, so that a client can be tried with no backend at all. */
void echo_respond(Request *r, Provider *p, const ChatRequestInfo *info);
