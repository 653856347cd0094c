/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "answer.h"
#include "provider.h"
#include "upstream.h"

/* Requests the router makes on its own behalf, beside the clients': a copy of a client's request
 * sent to a mirror or an X-Compare provider, a one-shot Compare, a conformance Probe. Each reads
 * the provider's answer to its end in the background, in bounded memory, and hands over what a
 * comparison keeps of it. A pool bounds how many run at once. */

typedef struct MirrorPool MirrorPool;
typedef struct Mirror Mirror;

/* The answer is in, or the transfer failed (summary->error says why). m is freed after, and
 * userdata handed to the destroy function given to mirror_pool_start() (also when cancelled). */
typedef void (*MirrorDoneFunc)(Mirror *m, const AnswerSummary *summary, void *userdata);

typedef struct MirrorRequest {
        Provider *provider;          /* its provider set is kept alive while the transfer runs */
        const char *suffix;          /* API path after /v1: "/chat/completions", "/models" */
        bool get;                    /* GET instead of POST (no body) */
        const char *body;            /* copied */
        size_t body_size;
        bool stream;
        const char *request_id;
        bool keep_body;              /* keep the raw answer (bounded), see mirror_body() */
        usec_t timeout;              /* for the whole answer; 0: the provider's own timeouts */
        SseEventFunc on_event;       /* each SSE event of a streamed answer, optional */
        void *event_data;
} MirrorRequest;

MirrorPool *mirror_pool_new(sd_event *event, CurlGlue *curl, unsigned max);
/* Cancels every transfer still running; their callbacks are not called. */
MirrorPool *mirror_pool_free(MirrorPool *p);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(MirrorPool, mirror_pool_free)
void mirror_pool_set_max(MirrorPool *p, unsigned max);
unsigned mirror_pool_running(const MirrorPool *p);

/* Starts a transfer. With bounded, refused with -EBUSY while MirrorMaxConcurrent= of them run (the
 * caller counts it skipped); Compare and Probe, bounded by their callers, pass false. */
int mirror_pool_start(MirrorPool *p, const MirrorRequest *req, bool bounded, MirrorDoneFunc done, void *userdata,
                      GDestroyNotify destroy, Mirror **ret);
/* Stops a transfer; its callback is not called. */
Mirror *mirror_cancel(Mirror *m);
/* The raw answer (keep_body), inside the done callback. */
const GByteArray *mirror_body(const Mirror *m);
