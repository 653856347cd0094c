/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Runtime routing changes kept in $STATE_DIRECTORY: saved as differences from the
 * configuration, restored after a restart, stale entries dropped. */

#include "state.h"
#include "test-util.h"

static char *dir;
static Manager m;

static Config *config_with_mappings(const char *mappings) {
        g_autofree char *var = g_strconcat("MODEL_MAPPINGS=", mappings, NULL);
        char *env[] = { var, NULL };
        ConfigSources src = { .environ = env };
        Config *c = NULL;

        ck_assert_int_eq(config_load(&src, &c, NULL, NULL), 0);
        return c;
}

static void setup(void) {
        dir = test_tmpdir_new();
        g_setenv("STATE_DIRECTORY", dir, TRUE);
        m = (Manager) {};
        m.config = config_with_mappings("a:echo,b:qwen-proxy");
        m.providers = provider_set_new(m.config, NULL, NULL);
        m.router = router_new(m.config, m.providers, NULL);
}

static void teardown(void) {
        g_clear_pointer(&m.router, router_free);
        g_clear_pointer(&m.providers, provider_set_unref);
        g_clear_pointer(&m.config, config_free);
        g_unsetenv("STATE_DIRECTORY");
        test_rm_rf(dir);
        g_clear_pointer(&dir, g_free);
}

static bool state_file_exists(void) {
        g_autofree char *path = state_file_path();
        return g_file_test(path, G_FILE_TEST_EXISTS);
}

static const char *mapping(const Router *r, const char *model) {
        return router_mapping(r, model);
}

START_TEST(test_path) {
        g_autofree char *p1 = NULL, *p2 = NULL, *p3 = NULL, *expected = g_build_filename(dir, "routing.state", NULL);

        p1 = state_file_path();
        ck_assert_str_eq(p1, expected);

        /* systemd passes a colon-separated list when several directories are configured. */
        g_setenv("STATE_DIRECTORY", "/var/lib/a:/var/lib/b", TRUE);
        p2 = state_file_path();
        ck_assert_str_eq(p2, "/var/lib/a/routing.state");

        g_unsetenv("STATE_DIRECTORY");
        p3 = state_file_path();
        ck_assert_str_eq(p3, STATE_DIR "/routing.state");
}
END_TEST

START_TEST(test_no_changes_no_file) {
        ck_assert_int_eq(state_save(&m), 0);
        ck_assert(!state_file_exists());

        /* Changed and changed back: the file goes away again. */
        ck_assert_int_eq(router_set_default(m.router, "echo"), 1);
        ck_assert_int_eq(state_save(&m), 0);
        ck_assert(state_file_exists());
        ck_assert_int_eq(router_set_default(m.router, "lm-studio"), 1);
        ck_assert_int_eq(state_save(&m), 0);
        ck_assert(!state_file_exists());
}
END_TEST

START_TEST(test_save_and_restore) {
        g_autoptr(Router) restored = NULL;
        g_autofree char *path = state_file_path();
        struct stat st;

        ck_assert_int_eq(router_set_default(m.router, "echo"), 1);
        ck_assert_int_eq(router_set_mapping(m.router, "a", "qwen-direct"), 1);   /* remapped */
        ck_assert_int_eq(router_remove_mapping(m.router, "b"), 1);               /* removed */
        ck_assert_int_eq(router_set_mapping(m.router, "llama3:8b", "echo"), 1);  /* added */
        ck_assert_int_eq(state_save(&m), 0);
        ck_assert_int_eq(stat(path, &st), 0);
        ck_assert_uint_eq(st.st_mode & 07777, 0640);

        /* A restart: the router from the configuration, then the saved changes. */
        restored = router_new(m.config, m.providers, NULL);
        g_clear_pointer(&m.router, router_free);
        m.router = TAKE_PTR(restored);
        ck_assert_str_eq(router_default_name(m.router), "lm-studio");
        ck_assert_int_eq(state_load(&m), 0);

        ck_assert_str_eq(router_default_name(m.router), "echo");
        ck_assert_str_eq(mapping(m.router, "a"), "qwen-direct");
        ck_assert_ptr_null(mapping(m.router, "b"));
        ck_assert_str_eq(mapping(m.router, "llama3:8b"), "echo");
        ck_assert_uint_eq(router_n_routes(m.router), 2);

        /* Saving the restored state again writes the same differences. */
        ck_assert_int_eq(state_save(&m), 0);
        ck_assert(state_file_exists());

        ck_assert_int_eq(state_clear(&m), 0);
        ck_assert(!state_file_exists());
        ck_assert_int_eq(state_clear(&m), 0); /* already gone: fine */
}
END_TEST

START_TEST(test_splits_saved_and_restored) {
        g_autoptr(Router) restored = NULL;
        const char *ab[] = { "echo", "qwen-proxy" };
        const uint32_t w[] = { 80, 20 };
        g_autofree char *path = state_file_path(), *text = NULL;
        const Route *rt;

        ck_assert_int_eq(router_set_split(m.router, "s", ab, w, 2, NULL), 1);
        ck_assert_int_eq(router_set_split(m.router, ROUTE_DEFAULT_MODEL, ab, w, 2, NULL), 1);
        ck_assert_int_eq(state_save(&m), 0);
        ck_assert(g_file_get_contents(path, &text, NULL, NULL));
        ck_assert_ptr_nonnull(strstr(text, "[SetModelSplits]\ns=echo:80 qwen-proxy:20"));
        ck_assert_ptr_nonnull(strstr(text, "DefaultSplit=echo:80 qwen-proxy:20"));

        restored = router_new(m.config, m.providers, NULL);
        g_clear_pointer(&m.router, router_free);
        m.router = TAKE_PTR(restored);
        ck_assert_int_eq(state_load(&m), 0);
        rt = router_get_route(m.router, "s");
        ck_assert_ptr_nonnull(rt);
        ck_assert_uint_eq(rt->n_arms, 2);
        ck_assert_str_eq(rt->arms[1].provider->name, "qwen-proxy");
        ck_assert_uint_eq(rt->arms[0].weight, 80);
        ck_assert_uint_eq(m.router->default_route->n_arms, 2);

        /* Back to one provider as configured: no difference left. */
        ck_assert_int_eq(router_remove_mapping(m.router, "s"), 1);
        ck_assert_int_eq(router_set_default(m.router, "lm-studio"), 1);
        ck_assert_int_eq(state_save(&m), 0);
        ck_assert(!state_file_exists());
}
END_TEST

START_TEST(test_load_missing_file) {
        ck_assert_int_eq(state_load(&m), 0);
        ck_assert_str_eq(router_default_name(m.router), "lm-studio");
        ck_assert_str_eq(mapping(m.router, "a"), "echo");
}
END_TEST

START_TEST(test_load_drops_stale_entries) {
        g_autofree char *f = test_write_file(dir, "routing.state", 0640,
                "[Routing]\n"
                "DefaultProvider=ghost\n"
                "[SetModelMappings]\n"
                "x=ghost\n"
                "y=echo\n"
                "[RemovedModelMappings]\n"
                "b=\n"
                "never-mapped=\n");

        /* Providers no longer configured are ignored; the rest applies. */
        ck_assert_int_eq(state_load(&m), 0);
        ck_assert_str_eq(router_default_name(m.router), "lm-studio");
        ck_assert_ptr_null(mapping(m.router, "x"));
        ck_assert_str_eq(mapping(m.router, "y"), "echo");
        ck_assert_ptr_null(mapping(m.router, "b"));
        ck_assert_str_eq(mapping(m.router, "a"), "echo");
}
END_TEST

START_TEST(test_load_corrupt_file) {
        g_autofree char *f = test_write_file(dir, "routing.state", 0640, "this is [not a key file\n");

        ck_assert_int_eq(state_load(&m), -EINVAL);
        ck_assert_str_eq(router_default_name(m.router), "lm-studio");
        ck_assert_str_eq(mapping(m.router, "a"), "echo");
}
END_TEST

/* The writer thread: a change costs the loop one small record, the file follows. */
static void on_saved(uint64_t saved, void *userdata) {
        *(uint64_t *) userdata = saved;
}

static void run_until_saved(State *s, sd_event *e) {
        for (unsigned i = 0; i < 1000 && state_saved(s) < state_pending(s); i++)
                ck_assert_int_ge(sd_event_run(e, 10 * 1000), 0);
        ck_assert_uint_eq(state_saved(s), state_pending(s));
}

START_TEST(test_writer) {
        g_autoptr(State) s = NULL;
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autofree char *path = state_file_path(), *def = NULL, *a = NULL, *llama = NULL, *removed = NULL;
        uint64_t saved = 0;

        ck_assert_int_ge(sd_event_new(&m.event), 0);
        m.listeners = g_array_new(FALSE, FALSE, sizeof(void *) * 2);
        ck_assert_int_eq(state_new(&m, &s), 0);
        state_set_saved_callback(s, on_saved, &saved);
        ck_assert_uint_eq(state_pending(s), 0);

        ck_assert_int_eq(router_set_default(m.router, "echo"), 1);
        ck_assert_int_eq(router_set_mapping(m.router, "a", "qwen-direct"), 1);
        ck_assert_int_eq(router_remove_mapping(m.router, "b"), 1);
        ck_assert_int_eq(router_set_mapping(m.router, "llama3:8b", "echo"), 1);
        ck_assert_uint_eq(state_pending(s), 4);
        run_until_saved(s, m.event);
        ck_assert_uint_eq(saved, 4);

        ck_assert(g_key_file_load_from_file(kf, path, G_KEY_FILE_NONE, NULL));
        def = g_key_file_get_string(kf, "Routing", "DefaultProvider", NULL);
        a = g_key_file_get_string(kf, "SetModelMappings", "a", NULL);
        llama = g_key_file_get_string(kf, "SetModelMappings", "llama3:8b", NULL);
        removed = g_key_file_get_string(kf, "RemovedModelMappings", "b", NULL);
        ck_assert_str_eq(def, "echo");
        ck_assert_str_eq(a, "qwen-direct");
        ck_assert_str_eq(llama, "echo");
        ck_assert_str_eq(removed, "");

        /* Back to the configuration, change by change: no file. */
        ck_assert_int_eq(router_set_default(m.router, "lm-studio"), 1);
        ck_assert_int_eq(router_set_mapping(m.router, "a", "echo"), 1);
        ck_assert_int_eq(router_set_mapping(m.router, "b", "qwen-proxy"), 1);
        ck_assert_int_eq(router_remove_mapping(m.router, "llama3:8b"), 1);
        run_until_saved(s, m.event);
        ck_assert(!state_file_exists());

        /* What is queued is written on the way out. */
        ck_assert_int_eq(router_set_mapping(m.router, "late", "echo"), 1);
        s = state_free(s);
        ck_assert(state_file_exists());
        g_clear_pointer(&m.event, sd_event_unref);
        g_clear_pointer(&m.listeners, g_array_unref);
}
END_TEST

static Suite *state_suite(void) {
        Suite *s = suite_create("state");
        TCase *tc = tcase_create("state");

        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_path);
        tcase_add_test(tc, test_no_changes_no_file);
        tcase_add_test(tc, test_save_and_restore);
        tcase_add_test(tc, test_splits_saved_and_restored);
        tcase_add_test(tc, test_load_missing_file);
        tcase_add_test(tc, test_load_drops_stale_entries);
        tcase_add_test(tc, test_load_corrupt_file);
        tcase_add_test(tc, test_writer);
        suite_add_tcase(s, tc);
        return s;
}

int main(void) {
        return test_run_suite(state_suite());
}
