/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "util.h"

/* One account of the bytes the router holds for requests in flight (MaxBufferedSize=): request
 * bodies (their announced length, from the moment they are accepted), stream buffers and the
 * answers it keeps whole. Work not yet accepted asks first and is refused when it does not fit;
 * what is already accepted and cannot wait is counted anyway, and what can wait (a provider's
 * answer being read) waits for room. So memory stays near the budget whatever clients announce
 * and providers send. */
typedef struct Budget Budget;

/* Someone waiting for room: func runs once, from the loop, when bytes were given back. */
typedef struct BudgetWaiter {
        GList link;                /* in the budget's queue while waiting */
        void (*func)(void *userdata);
        void *userdata;
} BudgetWaiter;

int budget_new(sd_event *event, uint64_t limit, Budget **ret);
Budget *budget_free(Budget *b);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Budget, budget_free)

void budget_set_limit(Budget *b, uint64_t limit);
uint64_t budget_limit(const Budget *b);
uint64_t budget_used(const Budget *b);
/* What is left before the limit (0 when it is reached or passed). */
uint64_t budget_room(const Budget *b);
/* Nothing is left, or accepted work waits for room: new work is refused. */
bool budget_exhausted(const Budget *b);

/* Takes n bytes if they fit; false (and nothing taken) if not. */
bool budget_try_take(Budget *b, uint64_t n);
/* Room for a buffer counted as `counted` bytes to grow to at least `need`: takes `want` (its
 * doubling) if that fits, else all the room left if that holds `need` — never just `need`, which
 * near the limit would mean a realloc (a copy of the whole buffer) for every piece that arrives.
 * Returns the buffer's new count, or 0 (nothing taken) when the room left is too small.
 * counted < need <= want. */
uint64_t budget_take_growth(Budget *b, uint64_t counted, uint64_t need, uint64_t want);
/* Takes n bytes, fitting or not: for what was accepted already and cannot wait. */
void budget_take(Budget *b, uint64_t n);
void budget_give(Budget *b, uint64_t n);

/* Queues w (not already waiting); func(userdata) runs once when room was given back. */
void budget_wait(Budget *b, BudgetWaiter *w, void (*func)(void *userdata), void *userdata);
bool budget_waiting(const BudgetWaiter *w);
void budget_unwait(Budget *b, BudgetWaiter *w);
