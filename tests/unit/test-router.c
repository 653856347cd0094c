/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* router_pick(): X-Provider header → model mapping → default provider; runtime changes. */

#include "router.h"
#include "test-util.h"

/* The plan's providers plus echo, with the given environment (MODEL_MAPPINGS=…, …). */
static Config *config_from_env(const char *first, ...) {
        g_autoptr(GPtrArray) a = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GPtrArray) errors = NULL;
        g_autofree char *joined = NULL;
        ConfigSources src = {};
        Config *c = NULL;
        va_list ap;
        int r;

        va_start(ap, first);
        for (const char *s = first; s; s = va_arg(ap, const char *))
                g_ptr_array_add(a, g_strdup(s));
        va_end(ap);
        g_ptr_array_add(a, NULL);
        src.environ = (char **) a->pdata;

        r = config_load(&src, &c, &errors, NULL);
        joined = test_messages_join(errors);
        ck_assert_msg(r == 0, "config_load() failed:%s", joined);
        return c;
}

/* A router over its own provider set (no event loop: no probes). */
static Router *test_router_new(const Config *c) {
        g_autoptr(ProviderSet) set = provider_set_new(c, NULL, NULL);
        return router_new(c, set, NULL);
}

static Router *router_from_env(const char *mappings, bool allow_override) {
        g_autofree char *var = mappings ? g_strconcat("MODEL_MAPPINGS=", mappings, NULL) : NULL;
        g_autoptr(Config) c = config_from_env(var, NULL);

        c->allow_provider_override = allow_override;
        return test_router_new(c);
}

/* The model of the i-th route, in creation order. */
static const char *mapping_at(const Router *r, unsigned i) {
        g_autofree const Route **routes = NULL;
        unsigned n;

        routes = router_routes(r, &n);
        ck_assert_uint_lt(i, n);
        return routes[i]->model;
}

/* Picks and returns the provider's name, or NULL with *ret_r set on failure. */
static const char *pick(const Router *r, const char *header, const char *model, RouteReason *ret_reason,
                        int *ret_r) {
        RoutePick pk = {};
        Provider *p;
        int k;

        k = router_pick(r, header, model, NULL, NULL, now_usec(CLOCK_MONOTONIC), &pk);
        if (ret_r)
                *ret_r = k;
        p = pk.provider;
        if (k < 0) {
                ck_assert_ptr_null(p); /* not written on failure */
                return NULL;
        }
        ck_assert_int_eq(k, 0);
        ck_assert_ptr_nonnull(p);
        ck_assert_ptr_eq(p, router_find(r, p->name));
        if (ret_reason)
                *ret_reason = pk.reason;
        return p->name;
}

#define assert_pick(r, header, model, name, reason)                              \
        do {                                                                     \
                RouteReason _why = _ROUTE_REASON_MAX;                            \
                int _k;                                                          \
                const char *_n = pick((r), (header), (model), &_why, &_k);       \
                ck_assert_msg(_n, "router_pick(%s, %s) failed: %d", #header, #model, _k); \
                ck_assert_str_eq(_n, (name));                                    \
                ck_assert_int_eq(_why, (reason));                                \
        } while (0)

START_TEST(test_precedence) {
        g_autoptr(Router) r = router_from_env("qwen3-coder:qwen-proxy,echo:echo", true);

        /* Header beats mapping beats default. */
        assert_pick(r, "qwen-direct", "qwen3-coder", "qwen-direct", ROUTE_HEADER);
        assert_pick(r, "echo", NULL, "echo", ROUTE_HEADER);
        assert_pick(r, NULL, "qwen3-coder", "qwen-proxy", ROUTE_MAPPING);
        assert_pick(r, "", "qwen3-coder", "qwen-proxy", ROUTE_MAPPING); /* empty header = none */
        assert_pick(r, NULL, "echo", "echo", ROUTE_MAPPING);
        assert_pick(r, NULL, "qwen3-max", "lm-studio", ROUTE_DEFAULT);
        assert_pick(r, NULL, NULL, "lm-studio", ROUTE_DEFAULT);
        assert_pick(r, NULL, "", "lm-studio", ROUTE_DEFAULT);
}
END_TEST

START_TEST(test_mapping_is_exact) {
        g_autoptr(Router) r = router_from_env("qwen3-coder:qwen-proxy", true);

        assert_pick(r, NULL, "Qwen3-Coder", "lm-studio", ROUTE_DEFAULT);
        assert_pick(r, NULL, "qwen3-coder ", "lm-studio", ROUTE_DEFAULT);
        assert_pick(r, NULL, "qwen3-coder-flash", "lm-studio", ROUTE_DEFAULT);
}
END_TEST

START_TEST(test_reason_optional) {
        g_autoptr(Router) r = router_from_env("m:echo", true);
        usec_t now = now_usec(CLOCK_MONOTONIC);
        RoutePick pk;

        /* The pick names the route it came from: none for the header. */
        ck_assert_int_eq(router_pick(r, NULL, "m", NULL, NULL, now, &pk), 0);
        ck_assert_str_eq(pk.provider->name, "echo");
        ck_assert_str_eq(pk.route->model, "m");
        ck_assert_int_eq(router_pick(r, "qwen-proxy", NULL, NULL, NULL, now, &pk), 0);
        ck_assert_str_eq(pk.provider->name, "qwen-proxy");
        ck_assert_ptr_null(pk.route);
        ck_assert_int_eq(router_pick(r, NULL, NULL, NULL, NULL, now, &pk), 0);
        ck_assert_str_eq(pk.provider->name, "lm-studio");
        ck_assert_str_eq(pk.route->model, "*");
}
END_TEST

START_TEST(test_unknown_header_provider) {
        g_autoptr(Router) r = router_from_env("m:echo", true);
        usec_t now = now_usec(CLOCK_MONOTONIC);
        RoutePick pk = { .provider = (Provider *) 0x1, .reason = _ROUTE_REASON_MAX };

        /* An unknown name is an error, never a silent fallback to the mapping or default. */
        ck_assert_int_eq(router_pick(r, "nope", "m", NULL, NULL, now, &pk), -ENOENT);
        ck_assert_ptr_eq(pk.provider, (Provider *) 0x1); /* untouched */
        ck_assert_int_eq(pk.reason, _ROUTE_REASON_MAX);
        ck_assert_int_eq(router_pick(r, "Echo", NULL, NULL, NULL, now, &pk), -ENOENT); /* names are case-sensitive */
        ck_assert_int_eq(router_pick(r, "echo ", NULL, NULL, NULL, now, &pk), -ENOENT);
}
END_TEST

START_TEST(test_override_disabled) {
        g_autoptr(Router) r = router_from_env("qwen3-coder:qwen-proxy", false);

        /* AllowProviderOverride=false: the header is ignored, known or not. */
        assert_pick(r, "echo", "qwen3-coder", "qwen-proxy", ROUTE_MAPPING);
        assert_pick(r, "echo", "other", "lm-studio", ROUTE_DEFAULT);
        assert_pick(r, "nope", NULL, "lm-studio", ROUTE_DEFAULT);
}
END_TEST

START_TEST(test_router_new_copies_config) {
        g_autoptr(Config) c = config_from_env("MODEL_MAPPINGS=b:echo,a:qwen-proxy", "DEFAULT_PROVIDER=qwen-proxy", NULL);
        g_autoptr(Router) r = test_router_new(c);
        g_auto(GStrv) names = router_provider_names(r);
        g_autofree char *list = router_provider_list(r);

        ck_assert_str_eq(router_default_name(r), "qwen-proxy");
        ck_assert(r->allow_override);
        ck_assert_uint_eq(g_strv_length(names), 4);
        ck_assert_str_eq(names[0], "lm-studio");
        ck_assert_str_eq(names[1], "qwen-proxy");
        ck_assert_str_eq(names[2], "qwen-direct");
        ck_assert_str_eq(names[3], "echo");
        ck_assert_str_eq(list, "lm-studio, qwen-proxy, qwen-direct, echo");
        ck_assert_uint_eq(router_n_routes(r), 2);
        ck_assert_str_eq(mapping_at(r, 0), "b");
        ck_assert_str_eq(mapping_at(r, 1), "a");

        /* The router holds its own references: it outlives the configuration. */
        g_clear_pointer(&c, config_free);
        assert_pick(r, NULL, "a", "qwen-proxy", ROUTE_MAPPING);
        assert_pick(r, NULL, NULL, "qwen-proxy", ROUTE_DEFAULT);
        ck_assert_str_eq(router_find(r, "echo")->name, "echo");
        ck_assert_ptr_null(router_find(r, "nope"));
        ck_assert_ptr_null(router_find(r, NULL));
        ck_assert_ptr_null(router_free(NULL));
}
END_TEST

START_TEST(test_routers_independent) {
        g_autoptr(Config) c = config_from_env("MODEL_MAPPINGS=a:echo", NULL);
        g_autoptr(Router) r1 = test_router_new(c);
        g_autoptr(Router) r2 = test_router_new(c);

        ck_assert_int_eq(router_set_mapping(r1, "a", "qwen-proxy"), 1);
        ck_assert_int_eq(router_set_default(r1, "echo"), 1);
        assert_pick(r2, NULL, "a", "echo", ROUTE_MAPPING);
        assert_pick(r2, NULL, NULL, "lm-studio", ROUTE_DEFAULT);
        ck_assert_str_eq(g_hash_table_lookup(c->mappings, "a"), "echo");
        ck_assert_str_eq(c->default_provider, "lm-studio");
}
END_TEST

START_TEST(test_set_default) {
        g_autoptr(Router) r = router_from_env(NULL, true);

        ck_assert_int_eq(router_set_default(r, "nope"), -ENOENT);
        ck_assert_int_eq(router_set_default(r, NULL), -ENOENT);
        ck_assert_int_eq(router_set_default(r, ""), -ENOENT);
        ck_assert_str_eq(router_default_name(r), "lm-studio");
        ck_assert_int_eq(router_set_default(r, "lm-studio"), 0); /* unchanged */
        ck_assert_int_eq(router_set_default(r, "echo"), 1);
        ck_assert_str_eq(router_default_name(r), "echo");
        assert_pick(r, NULL, "anything", "echo", ROUTE_DEFAULT);
        ck_assert_int_eq(router_set_default(r, "echo"), 0);
}
END_TEST

START_TEST(test_set_mapping) {
        g_autoptr(Router) r = router_from_env(NULL, true);

        ck_assert_int_eq(router_set_mapping(r, "m", "echo"), 1);
        assert_pick(r, NULL, "m", "echo", ROUTE_MAPPING);
        ck_assert_int_eq(router_set_mapping(r, "m", "echo"), 0); /* unchanged */
        ck_assert_int_eq(router_set_mapping(r, "m", "qwen-proxy"), 1);
        assert_pick(r, NULL, "m", "qwen-proxy", ROUTE_MAPPING);
        ck_assert_uint_eq(router_n_routes(r), 1); /* remapping does not duplicate */

        /* Unknown provider: refused, the old mapping stays. */
        ck_assert_int_eq(router_set_mapping(r, "m", "nope"), -ENOENT);
        ck_assert_int_eq(router_set_mapping(r, "m", NULL), -ENOENT);
        ck_assert_int_eq(router_set_mapping(r, "n", "nope"), -ENOENT);
        assert_pick(r, NULL, "m", "qwen-proxy", ROUTE_MAPPING);
        assert_pick(r, NULL, "n", "lm-studio", ROUTE_DEFAULT);
        ck_assert_uint_eq(router_n_routes(r), 1);

        ck_assert_int_eq(router_set_mapping(r, "llama3:8b", "echo"), 1);
        ck_assert_int_eq(router_set_mapping(r, "модель", "echo"), 1);
        ck_assert_uint_eq(router_n_routes(r), 3);
        ck_assert_str_eq(mapping_at(r, 0), "m");
        ck_assert_str_eq(mapping_at(r, 1), "llama3:8b");
        ck_assert_str_eq(mapping_at(r, 2), "модель");
}
END_TEST

START_TEST(test_set_mapping_invalid_model) {
        g_autoptr(Router) r = router_from_env(NULL, true);
        char longest[MODEL_NAME_MAX + 1], toolong[MODEL_NAME_MAX + 2];

        ck_assert_int_eq(router_set_mapping(r, NULL, "echo"), -EINVAL);
        ck_assert_int_eq(router_set_mapping(r, "", "echo"), -EINVAL);
        ck_assert_int_eq(router_set_mapping(r, "a\nb", "echo"), -EINVAL);
        ck_assert_int_eq(router_set_mapping(r, "tab\there", "echo"), -EINVAL);
        ck_assert_int_eq(router_set_mapping(r, "del\x7f", "echo"), -EINVAL);
        ck_assert_int_eq(router_set_mapping(r, "\xc3\x28", "echo"), -EINVAL); /* invalid UTF-8 */
        /* The model is checked first: an invalid one with an unknown provider is -EINVAL. */
        ck_assert_int_eq(router_set_mapping(r, "", "nope"), -EINVAL);

        memset(toolong, 'x', sizeof(toolong) - 1);
        toolong[sizeof(toolong) - 1] = 0;
        ck_assert_int_eq(router_set_mapping(r, toolong, "echo"), -EINVAL);
        memset(longest, 'x', sizeof(longest) - 1);
        longest[sizeof(longest) - 1] = 0;
        ck_assert_int_eq(router_set_mapping(r, longest, "echo"), 1);

        ck_assert_uint_eq(router_n_routes(r), 1);
        ck_assert_uint_eq(router_n_routes(r), 1);
}
END_TEST

START_TEST(test_remove_mapping) {
        g_autoptr(Router) r = router_from_env("a:echo,b:qwen-proxy,c:qwen-direct", true);

        ck_assert_int_eq(router_remove_mapping(r, "b"), 1);
        assert_pick(r, NULL, "b", "lm-studio", ROUTE_DEFAULT);
        assert_pick(r, NULL, "a", "echo", ROUTE_MAPPING);
        assert_pick(r, NULL, "c", "qwen-direct", ROUTE_MAPPING);
        ck_assert_uint_eq(router_n_routes(r), 2);
        ck_assert_str_eq(mapping_at(r, 0), "a");
        ck_assert_str_eq(mapping_at(r, 1), "c");

        ck_assert_int_eq(router_remove_mapping(r, "b"), -ENOENT);
        ck_assert_int_eq(router_remove_mapping(r, "nope"), -ENOENT);
        ck_assert_int_eq(router_remove_mapping(r, NULL), -ENOENT);
        ck_assert_int_eq(router_remove_mapping(r, ""), -ENOENT);

        /* Removed and added again: goes to the end of the order. */
        ck_assert_int_eq(router_set_mapping(r, "b", "echo"), 1);
        ck_assert_uint_eq(router_n_routes(r), 3);
        ck_assert_str_eq(mapping_at(r, 2), "b");

        ck_assert_int_eq(router_remove_mapping(r, "a"), 1);
        ck_assert_int_eq(router_remove_mapping(r, "c"), 1);
        ck_assert_int_eq(router_remove_mapping(r, "b"), 1);
        ck_assert_uint_eq(router_n_routes(r), 0);
        ck_assert_uint_eq(router_n_routes(r), 0);
        assert_pick(r, NULL, "a", "lm-studio", ROUTE_DEFAULT);
}
END_TEST

START_TEST(test_mapping_and_header_after_default_change) {
        g_autoptr(Router) r = router_from_env("m:qwen-proxy", true);

        ck_assert_int_eq(router_set_default(r, "qwen-direct"), 1);
        assert_pick(r, NULL, "m", "qwen-proxy", ROUTE_MAPPING);
        assert_pick(r, "echo", "m", "echo", ROUTE_HEADER);
        assert_pick(r, NULL, "x", "qwen-direct", ROUTE_DEFAULT);
}
END_TEST

START_TEST(test_route_reason_strings) {
        ck_assert_str_eq(route_reason_to_string(ROUTE_HEADER), "header");
        ck_assert_str_eq(route_reason_to_string(ROUTE_MAPPING), "mapping");
        ck_assert_str_eq(route_reason_to_string(ROUTE_DEFAULT), "default");
        ck_assert_ptr_null(route_reason_to_string(_ROUTE_REASON_MAX));
        ck_assert_ptr_null(route_reason_to_string((RouteReason) -1));
}
END_TEST

static Suite *router_suite(void) {
        Suite *s = suite_create("router");
        TCase *tc;

        tc = tcase_create("pick");
        tcase_add_test(tc, test_precedence);
        tcase_add_test(tc, test_mapping_is_exact);
        tcase_add_test(tc, test_reason_optional);
        tcase_add_test(tc, test_unknown_header_provider);
        tcase_add_test(tc, test_override_disabled);
        tcase_add_test(tc, test_router_new_copies_config);
        tcase_add_test(tc, test_routers_independent);
        tcase_add_test(tc, test_route_reason_strings);
        suite_add_tcase(s, tc);

        tc = tcase_create("changes");
        tcase_add_test(tc, test_set_default);
        tcase_add_test(tc, test_set_mapping);
        tcase_add_test(tc, test_set_mapping_invalid_model);
        tcase_add_test(tc, test_remove_mapping);
        tcase_add_test(tc, test_mapping_and_header_after_default_change);
        suite_add_tcase(s, tc);

        return s;
}

int main(void) {
        return test_run_suite(router_suite());
}
