/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "util.h"

/* One CURLM for the whole process, driven by sd-event: curl tells us which sockets to watch and
 * when to wake it, we tell curl what happened. One multi handle means one connection cache, so a
 * provider's connections are reused by every request that goes to it. */
typedef struct CurlGlue CurlGlue;

typedef void (*CurlDoneFunc)(CURL *easy, CURLcode result, void *userdata);

/* Embedded in whatever owns a transfer; CURLOPT_PRIVATE points at it. */
typedef struct CurlSlot {
        CurlDoneFunc done;
        void *userdata;
} CurlSlot;

int curl_glue_new(sd_event *event, CurlGlue **ret);
CurlGlue *curl_glue_free(CurlGlue *g);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(CurlGlue, curl_glue_free)

/* A reset easy handle, from a small pool so that per-request setup stays cheap. */
CURL *curl_glue_acquire(CurlGlue *g);
void curl_glue_release(CurlGlue *g, CURL *easy);

int curl_glue_add(CurlGlue *g, CURL *easy, CurlSlot *slot);
/* Not from inside a curl callback. */
void curl_glue_remove(CurlGlue *g, CURL *easy);

