/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

/* Small helpers shared by the unit test programs: scratch directories, files, environments. */

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <glib.h>
#include <glib/gstdio.h>

static inline void test_string_free(gpointer s) {
        g_string_free(s, TRUE);
}

static inline char *test_tmpdir_new(void) {
        g_autoptr(GError) error = NULL;
        char *d = g_dir_make_tmp("provider-router-test-XXXXXX", &error);

        ck_assert_msg(d, "cannot make a scratch directory: %s", error ? error->message : "?");
        return d;
}

static inline void test_rm_rf(const char *path) {
        g_autoptr(GDir) d = NULL;
        const char *name;

        if (!path)
                return;
        d = g_dir_open(path, 0, NULL);
        if (d) {
                while ((name = g_dir_read_name(d))) {
                        g_autofree char *p = g_build_filename(path, name, NULL);
                        test_rm_rf(p);
                }
                (void) g_rmdir(path);
        } else
                (void) g_unlink(path);
}

/* Writes dir/name (dir may be NULL for an absolute name) with the given mode; returns the path. */
static inline char *test_write_file(const char *dir, const char *name, mode_t mode, const char *contents) {
        g_autoptr(GError) error = NULL;
        char *path = dir ? g_build_filename(dir, name, NULL) : g_strdup(name);
        g_autofree char *parent = g_path_get_dirname(path);

        ck_assert_int_eq(g_mkdir_with_parents(parent, 0755), 0);
        ck_assert_msg(g_file_set_contents(path, contents, -1, &error), "cannot write %s: %s", path,
                      error ? error->message : "?");
        ck_assert_int_eq(chmod(path, mode), 0);
        return path;
}

/* An environment block ("NAME=value" strings), as config_load() takes it. NULL-terminated list. */
static inline char **test_environ(const char *first, ...) {
        GPtrArray *a = g_ptr_array_new();
        va_list ap;

        va_start(ap, first);
        for (const char *s = first; s; s = va_arg(ap, const char *))
                g_ptr_array_add(a, g_strdup(s));
        va_end(ap);
        g_ptr_array_add(a, NULL);
        return (char **) g_ptr_array_free(a, FALSE);
}

/* True if one of the messages contains all the given substrings (NULL-terminated list). */
static inline bool test_messages_match(const GPtrArray *messages, const char *first, ...) {
        if (!messages)
                return false;
        for (guint i = 0; i < messages->len; i++) {
                const char *m = messages->pdata[i];
                bool all = true;
                va_list ap;

                va_start(ap, first);
                for (const char *s = first; s; s = va_arg(ap, const char *))
                        if (!strstr(m, s)) {
                                all = false;
                                break;
                        }
                va_end(ap);
                if (all)
                        return true;
        }
        return false;
}

static inline char *test_messages_join(const GPtrArray *messages) {
        GString *s = g_string_new(NULL);

        for (guint i = 0; messages && i < messages->len; i++)
                g_string_append_printf(s, "\n  %s", (const char *) messages->pdata[i]);
        return g_string_free(s, FALSE);
}

static inline int test_run_suite(Suite *s) {
        SRunner *sr = srunner_create(s);
        int failed;

        srunner_run_all(sr, CK_NORMAL);
        failed = srunner_ntests_failed(sr);
        srunner_free(sr);
        return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
