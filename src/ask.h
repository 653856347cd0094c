/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "worker.h"

/* A one-shot comparison: one prompt sent to several providers at once, through the router (its
 * keys, its model names per provider), and their answers side by side. The answers are also
 * recorded as comparisons (the first provider against each other one). */
typedef struct Ask Ask;

/* answers: AnswerSummary*, one per provider in the order asked; borrowed for the call. */
typedef void (*AskDoneFunc)(Ask *a, const GPtrArray *answers, void *userdata);

#define ASK_PROVIDERS_MAX 8
#define ASK_PROMPT_MAX (64 * 1024)
#define ASK_TIMEOUT_USEC (120 * USEC_PER_SEC)

int ask_start(Worker *w, const char *model, Provider *const *providers, unsigned n, const char *prompt,
              AskDoneFunc done, void *userdata, Ask **ret);
/* Stops what is still running; the callback is not called. */
Ask *ask_cancel(Ask *a);
