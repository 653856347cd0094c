/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>
#include <stdio.h>

#include "worker.h"

static uint64_t splitmix64(uint64_t x) {
        x += 0x9e3779b97f4a7c15ULL;
        x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
        x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
        return x ^ (x >> 31);
}

void worker_next_request_id(Worker *w, char *buf, size_t size) {
        (void) snprintf(buf, size, "%016" PRIx64, splitmix64(w->request_id_seed + ++w->request_counter));
}

usec_t worker_now(const Worker *w) {
        uint64_t t;

        if (!w->event || sd_event_now(w->event, CLOCK_MONOTONIC, &t) < 0)
                return now_usec(CLOCK_MONOTONIC);
        return t;
}
