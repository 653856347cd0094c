/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "answer.h"
#include "inspect.h"
#include "request.h"

/* The built-in "echo" provider: answers chat completions locally, in OpenAI's format, with the
 * last user message, so that a client can be tried with no backend at all. answer, when not NULL,
 * gets what it says (a comparison's primary: echo's answer is produced, never read back). */
void echo_respond(Request *r, Provider *p, const ChatRequestInfo *info, AnswerSummary *answer);
