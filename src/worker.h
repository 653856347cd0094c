/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "compare.h"
#include "config.h"
#include "curl-glue.h"
#include "exchange.h"
#include "mirror.h"
#include "provider.h"
#include "router.h"
#include "stats.h"

/* What the request handlers of one event loop share: the loop, its HTTP front end and curl
 * multi handle, the configuration snapshot with its providers and routes (swapped by the
 * manager on reload), and what is counted per loop. Nothing here calls upwards; a second loop
 * would get a Worker of its own over the same snapshot. */
typedef struct Worker {
        sd_event *event;
        CurlGlue *curl;
        ExchangeFront *front;

        const Config *config;         /* the current snapshot; requests hold the provider set */
        ProviderSet *providers;
        Router *router;

        MirrorPool *mirrors;          /* requests the router makes on its own behalf */
        CompareStore *comparisons;
        struct ModelsCache *models_cache; /* the lists GET /v1/models keeps; emptied on reload */

        Stats stats;
        usec_t started_usec;          /* CLOCK_MONOTONIC */
        uint64_t request_counter;
        uint64_t request_id_seed;
        bool stopping;
} Worker;

/* Unique within a run and unpredictable across runs, without a syscall per request. */
void worker_next_request_id(Worker *w, char *buf, size_t size);
usec_t worker_now(const Worker *w);
