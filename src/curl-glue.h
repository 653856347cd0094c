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

/* An easy handle, kept between transfers with the options that stay the same for every transfer
 * made for one key (a provider's configuration): the next transfer for the same key sets only
 * what changes. Setting up a handle from scratch (curl_easy_reset() and some twenty options) and
 * having libcurl parse the same URL again cost more per request than the rest of the set-up. */
typedef struct CurlHandle {
        CURL *easy;
        /* What it is set up for; NULL for a handle fresh or reset: the caller sets it up and then
         * sets key to a reference of its own, which the pool drops with key_unref. A pooled
         * handle keeps its key alive, so that no other key can take its address. */
        void *key;
        GDestroyNotify key_unref;
        CURLU *url;               /* CURLOPT_CURLU: the URL it fetched last, parsed once */
        char *url_string;
        bool url_set;             /* the handle's options name url */
} CurlHandle;

/* A handle set up for key (from the most recently used of the pool), or a fresh one (key NULL). */
CurlHandle *curl_glue_acquire(CurlGlue *g, const void *key);
/* Back to the pool. Only a handle whose transfer ended cleanly (complete, CURLE_OK) keeps its set-up:
 * any other is reset first. */
void curl_glue_release(CurlGlue *g, CurlHandle *h, bool clean);
/* CURLOPT_CURLU for url, parsed only when it differs from the handle's last one. */
int curl_glue_set_url(CurlHandle *h, const char *url);

/* func runs after curl's callbacks of each event it handled (data, a finished transfer), outside
 * of them: where the owner hands what they produced on at once (to libmicrohttpd), rather than in
 * another loop iteration. */
void curl_glue_set_after(CurlGlue *g, void (*func)(void *userdata), void *userdata);

int curl_glue_add(CurlGlue *g, CURL *easy, CurlSlot *slot);
/* Not from inside a curl callback. */
void curl_glue_remove(CurlGlue *g, CURL *easy);

