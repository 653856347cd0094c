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
        static const char hex[] = "0123456789abcdef";
        uint64_t v = splitmix64(w->request_id_seed + ++w->request_counter);

        /* "%016" PRIx64 without printf: one per request. */
        g_assert(size >= 17);
        for (int i = 15; i >= 0; i--, v >>= 4)
                buf[i] = hex[v & 15];
        buf[16] = 0;
}

usec_t worker_now(const Worker *w) {
        uint64_t t;

        if (!w->event || sd_event_now(w->event, CLOCK_MONOTONIC, &t) < 0)
                return now_usec(CLOCK_MONOTONIC);
        return t;
}
