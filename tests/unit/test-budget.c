/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The buffer budget (MaxBufferedSize=): what fits is taken, what does not is refused, accepted
 * work may go over, and those waiting for room are woken from the loop when bytes come back. */

#include "budget.h"
#include "test-util.h"

static unsigned woken;

static void on_room(void *userdata) {
        woken++;
        (void) userdata;
}

START_TEST(test_take_and_give) {
        g_autoptr(sd_event) e = NULL;
        g_autoptr(Budget) b = NULL;

        ck_assert_int_ge(sd_event_new(&e), 0);
        ck_assert_int_eq(budget_new(e, 100, &b), 0);
        ck_assert_uint_eq(budget_room(b), 100);
        ck_assert(budget_try_take(b, 60));
        ck_assert(!budget_try_take(b, 41));
        ck_assert_uint_eq(budget_used(b), 60);
        ck_assert_uint_eq(budget_room(b), 40);
        ck_assert(budget_try_take(b, 40));
        ck_assert(budget_exhausted(b));
        ck_assert(!budget_try_take(b, 1));
        ck_assert(!budget_try_take(b, UINT64_MAX));
        /* Accepted work goes over. */
        budget_take(b, 10);
        ck_assert_uint_eq(budget_used(b), 110);
        ck_assert_uint_eq(budget_room(b), 0);
        budget_give(b, 110);
        ck_assert_uint_eq(budget_used(b), 0);
        ck_assert(!budget_exhausted(b));
        budget_set_limit(b, 10);
        ck_assert_uint_eq(budget_limit(b), 10);
        ck_assert(!budget_try_take(b, 11));

        /* Growth: the doubling when it fits, else all the room left if that holds what is
         * needed, else nothing. */
        budget_set_limit(b, 100);
        ck_assert_uint_eq(budget_take_growth(b, 0, 10, 20), 20);
        ck_assert_uint_eq(budget_used(b), 20);
        ck_assert_uint_eq(budget_take_growth(b, 20, 30, 40), 40);
        ck_assert_uint_eq(budget_used(b), 40);
        ck_assert_uint_eq(budget_take_growth(b, 40, 50, 80), 80);  /* the doubling fits */
        ck_assert_uint_eq(budget_used(b), 80);
        ck_assert_uint_eq(budget_take_growth(b, 80, 90, 160), 100); /* the 20 left, not 10 */
        ck_assert_uint_eq(budget_used(b), 100);
        ck_assert_uint_eq(budget_take_growth(b, 100, 101, 200), 0);
        ck_assert_uint_eq(budget_used(b), 100);
        budget_give(b, 100);
}
END_TEST

START_TEST(test_waiters) {
        g_autoptr(sd_event) e = NULL;
        g_autoptr(Budget) b = NULL;
        BudgetWaiter w1 = {}, w2 = {};

        ck_assert_int_ge(sd_event_new(&e), 0);
        ck_assert_int_eq(budget_new(e, 100, &b), 0);
        woken = 0;
        ck_assert(budget_try_take(b, 95));
        ck_assert(!budget_try_take(b, 10));
        budget_wait(b, &w1, on_room, NULL);
        budget_wait(b, &w2, on_room, NULL);
        ck_assert(budget_waiting(&w1));
        /* Someone waits: new work is refused although 5 bytes are free. */
        ck_assert(budget_exhausted(b));

        /* Nothing given back: nobody is woken. */
        ck_assert_int_ge(sd_event_run(e, 0), 0);
        ck_assert_uint_eq(woken, 0);

        budget_unwait(b, &w2);
        ck_assert(!budget_waiting(&w2));
        budget_give(b, 50);
        ck_assert_uint_eq(woken, 0); /* from the loop, not from inside budget_give() */
        ck_assert_int_ge(sd_event_run(e, 0), 0);
        ck_assert_uint_eq(woken, 1);
        ck_assert(!budget_waiting(&w1));
        ck_assert(!budget_exhausted(b));

        /* Freed while waiting: fine. */
        budget_wait(b, &w1, on_room, NULL);
        b = budget_free(b);
        ck_assert(!budget_waiting(&w1));
}
END_TEST

static Suite *budget_suite(void) {
        Suite *s = suite_create("budget");
        TCase *tc = tcase_create("budget");

        tcase_add_test(tc, test_take_and_give);
        tcase_add_test(tc, test_waiters);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        return test_run_suite(budget_suite());
}
