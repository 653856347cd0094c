/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Who may change routing without asking polkit: only a uid the bus broker vouches for. */

#include <unistd.h>

#include "bus.h"
#include "test-util.h"

START_TEST(test_augmented_euid_not_trusted) {
        g_autoptr(sd_bus_creds) creds = NULL;
        uid_t uid = 12345;

        /* Credentials read from /proc (as SD_BUS_CREDS_AUGMENT would add them) are no proof:
         * the PID may belong to another process by now. */
        ck_assert_int_ge(sd_bus_creds_new_from_pid(&creds, getpid(), SD_BUS_CREDS_EUID | SD_BUS_CREDS_UID), 0);
        ck_assert(sd_bus_creds_get_augmented_mask(creds) & SD_BUS_CREDS_EUID);
        ck_assert_int_eq(bus_creds_trusted_euid(creds, &uid), -EPERM);
        ck_assert_uint_eq(uid, 12345);
}
END_TEST

static Suite *bus_suite(void) {
        Suite *s = suite_create("bus");
        TCase *tc = tcase_create("bus");

        tcase_add_test(tc, test_augmented_euid_not_trusted);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        return test_run_suite(bus_suite());
}
