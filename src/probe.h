/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "worker.h"

/* A conformance probe of one provider: what OpenAI clients rely on and backends often get wrong.
 * The checks run one after the other, through the router (its keys, its model names):
 *   models     GET /models answers a list, with the model in it
 *   plain      a chat completion answers with text
 *   stream     a streamed one arrives as server-sent events and ends with [DONE]
 *   usage      stream_options.include_usage yields a usage chunk
 *   tool-args  streamed tool-call arguments arrive in pieces, each with its index
 *   ttfb       the stream's first byte, how long it took */

typedef struct ProbeCheck {
        const char *name;
        bool ok;
        char *detail;
} ProbeCheck;

typedef struct ProbeResult {
        char *provider;
        char *model;
        bool passed;
        usec_t ttfb_usec;            /* USEC_INFINITY if none */
        GPtrArray *checks;           /* ProbeCheck* */
} ProbeResult;

typedef struct Probe Probe;
typedef void (*ProbeDoneFunc)(Probe *p, const ProbeResult *result, void *userdata);

#define PROBE_STEP_TIMEOUT_USEC (30 * USEC_PER_SEC)

int probe_start(Worker *w, Provider *provider, ProbeDoneFunc done, void *userdata, Probe **ret);
/* Stops it; the callback is not called. */
Probe *probe_cancel(Probe *p);
