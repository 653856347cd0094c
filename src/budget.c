/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "budget.h"

struct Budget {
        uint64_t limit;
        uint64_t used;
        GQueue waiters;            /* BudgetWaiter, by their link */
        sd_event_source *wake;     /* runs the waiters after bytes were given back */
};

static int budget_on_wake(sd_event_source *s, void *userdata) {
        Budget *b = userdata;

        /* Each waiter tries again; one that still finds no room queues itself anew, at the end,
         * so the queue is walked once per wake-up. */
        for (guint n = g_queue_get_length(&b->waiters); n > 0 && b->used < b->limit; n--) {
                GList *l = g_queue_pop_head_link(&b->waiters);
                BudgetWaiter *w = l->data;

                l->data = NULL;
                w->func(w->userdata);
        }
        return 0;
}

int budget_new(sd_event *event, uint64_t limit, Budget **ret) {
        g_autoptr(Budget) b = g_new0(Budget, 1);
        int r;

        b->limit = limit;
        g_queue_init(&b->waiters);
        r = sd_event_add_defer(event, &b->wake, budget_on_wake, b);
        if (r < 0)
                return r;
        (void) sd_event_source_set_enabled(b->wake, SD_EVENT_OFF);
        (void) sd_event_source_set_description(b->wake, "buffer-budget");
        *ret = TAKE_PTR(b);
        return 0;
}

Budget *budget_free(Budget *b) {
        if (!b)
                return NULL;
        while (!g_queue_is_empty(&b->waiters))
                g_queue_pop_head_link(&b->waiters)->data = NULL;
        sd_event_source_disable_unref(b->wake);
        g_free(b);
        return NULL;
}

void budget_set_limit(Budget *b, uint64_t limit) {
        bool more = limit > b->limit;

        b->limit = limit;
        if (more && !g_queue_is_empty(&b->waiters))
                (void) sd_event_source_set_enabled(b->wake, SD_EVENT_ONESHOT);
}

uint64_t budget_limit(const Budget *b) {
        return b->limit;
}

uint64_t budget_used(const Budget *b) {
        return b->used;
}

uint64_t budget_room(const Budget *b) {
        return b->used < b->limit ? b->limit - b->used : 0;
}

bool budget_exhausted(const Budget *b) {
        /* Accepted work waiting for room comes first, even when a few bytes are left. */
        return b->used >= b->limit || !g_queue_is_empty((GQueue *) &b->waiters);
}

bool budget_try_take(Budget *b, uint64_t n) {
        if (n > b->limit || b->used > b->limit - n)
                return false;
        b->used += n;
        return true;
}

uint64_t budget_take_growth(Budget *b, uint64_t counted, uint64_t need, uint64_t want) {
        uint64_t room;

        g_assert(counted < need && need <= want);
        if (budget_try_take(b, want - counted))
                return want;
        room = budget_room(b);
        if (room < need - counted)
                return 0;
        /* Less than the doubling, or that would have fitted: growth stays geometric. */
        b->used += room;
        return counted + room;
}

void budget_take(Budget *b, uint64_t n) {
        b->used += n;
}

void budget_give(Budget *b, uint64_t n) {
        g_assert(n <= b->used);
        b->used -= n;
        if (n > 0 && !g_queue_is_empty(&b->waiters))
                (void) sd_event_source_set_enabled(b->wake, SD_EVENT_ONESHOT);
}

void budget_wait(Budget *b, BudgetWaiter *w, void (*func)(void *userdata), void *userdata) {
        g_assert(!budget_waiting(w));
        w->func = func;
        w->userdata = userdata;
        w->link = (GList) { .data = w };
        /* Woken by the next budget_give(): a waiter asks right after it found no room. */
        g_queue_push_tail_link(&b->waiters, &w->link);
}

bool budget_waiting(const BudgetWaiter *w) {
        return w->link.data != NULL;
}

void budget_unwait(Budget *b, BudgetWaiter *w) {
        if (!budget_waiting(w))
                return;
        g_queue_unlink(&b->waiters, &w->link);
        w->link.data = NULL;
}
