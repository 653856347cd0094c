/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* config_load(): built-in defaults, key file, drop-ins, the plan's environment variables,
 * credentials, and validation that reports every problem at once. */

#include "src/config.h"
#include "log.h"
#include "test-util.h"

static char *dir; /* scratch directory of the running test */

static void setup(void) {
        dir = test_tmpdir_new();
}

static void teardown(void) {
        test_rm_rf(dir);
        g_clear_pointer(&dir, g_free);
}

static char *write_conf(const char *name, const char *text) {
        return test_write_file(dir, name, 0644, text);
}

/* Loads and insists on success; prints every error otherwise. */
static Config *load_ok(const ConfigSources *src, GPtrArray **ret_warnings) {
        g_autoptr(GPtrArray) errors = NULL, warnings = NULL;
        g_autofree char *joined = NULL;
        Config *c = NULL;
        int r;

        r = config_load(src, &c, &errors, &warnings);
        joined = test_messages_join(errors);
        ck_assert_msg(r == 0, "config_load() failed with %d:%s", r, joined);
        ck_assert_ptr_nonnull(c);
        ck_assert_ptr_null(errors);
        ck_assert_ptr_nonnull(warnings);
        if (ret_warnings)
                *ret_warnings = g_steal_pointer(&warnings);
        return c;
}

/* Loads and insists on failure with at least one error; the Config is not touched. */
static GPtrArray *load_fail(const ConfigSources *src) {
        Config *sentinel = (Config *) 0x1, *c = sentinel;
        GPtrArray *errors = NULL;
        g_autoptr(GPtrArray) warnings = NULL;
        int r;

        r = config_load(src, &c, &errors, &warnings);
        ck_assert_int_eq(r, -EINVAL);
        ck_assert_ptr_eq(c, sentinel);
        ck_assert_ptr_nonnull(errors);
        ck_assert_uint_gt(errors->len, 0);
        ck_assert_ptr_nonnull(warnings);
        return errors;
}

#define assert_message(messages, ...)                                                             \
        do {                                                                                      \
                g_autofree char *_j = test_messages_join(messages);                               \
                ck_assert_msg(test_messages_match(messages, __VA_ARGS__, NULL),                   \
                              "no message contains all of the expected words; got:%s", _j);       \
        } while (0)

#define assert_n_messages(messages, n)                                                            \
        do {                                                                                      \
                g_autofree char *_j = test_messages_join(messages);                               \
                ck_assert_msg((messages)->len == (n), "expected %u messages, got %u:%s", (unsigned) (n), \
                              (messages)->len, _j);                                               \
        } while (0)

static void assert_plan_defaults(const Config *c) {
        static const char *const names[] = { "lm-studio", "qwen-proxy", "qwen-direct", "echo" };
        ProviderConfig *p;

        ck_assert_str_eq(c->host, "127.0.0.1");
        ck_assert_uint_eq(c->port, 3001);
        ck_assert_str_eq(c->default_provider, "lm-studio");
        ck_assert(c->allow_provider_override);
        ck_assert_uint_eq(c->request_timeout_usec, 120 * USEC_PER_SEC);
        ck_assert_int_eq(c->log_level, LOG_INFO);
        ck_assert(c->log_requests);
        ck_assert(!c->log_responses);

        ck_assert_uint_eq(c->providers->len, ELEMENTSOF(names));
        for (size_t i = 0; i < ELEMENTSOF(names); i++)
                ck_assert_str_eq(((ProviderConfig *) c->providers->pdata[i])->name, names[i]);

        p = config_find_provider(c, "lm-studio");
        ck_assert_int_eq(p->kind, PROVIDER_KIND_OPENAI);
        ck_assert_str_eq(p->base_url, "http://127.0.0.1:1234/v1");
        ck_assert_str_eq(p->default_model, "qwen3-max");
        ck_assert_ptr_null(p->api_key);

        p = config_find_provider(c, "qwen-proxy");
        ck_assert_str_eq(p->base_url, "http://127.0.0.1:3000/v1");
        ck_assert_ptr_null(p->default_model);

        p = config_find_provider(c, "qwen-direct");
        ck_assert_str_eq(p->base_url, "https://dashscope.aliyuncs.com/compatible-mode/v1");
        ck_assert_str_eq(p->api_key_credential, "qwen-api-key");

        p = config_find_provider(c, "echo");
        ck_assert_int_eq(p->kind, PROVIDER_KIND_ECHO);
        ck_assert_ptr_null(p->base_url);

        ck_assert_ptr_null(config_find_provider(c, "nope"));
        ck_assert_ptr_null(config_find_provider(c, NULL));
}

START_TEST(test_defaults_without_file) {
        g_autofree char *path = g_build_filename(dir, "missing.conf", NULL);
        g_auto(GStrv) env = test_environ(NULL);
        ConfigSources src = { .path = path, .environ = env };
        g_autoptr(GPtrArray) warnings = NULL;
        g_autoptr(Config) c = load_ok(&src, &warnings);

        assert_plan_defaults(c);
        ck_assert_uint_eq(g_hash_table_size(c->mappings), 0);
        ck_assert_ptr_nonnull(c->sources);
        ck_assert_ptr_null(c->sources[0]);

        /* Providers inherit the [Router] timeouts once loaded. */
        for (guint i = 0; i < c->providers->len; i++) {
                ProviderConfig *p = c->providers->pdata[i];
                ck_assert_uint_eq(p->request_timeout_usec, 120 * USEC_PER_SEC);
                ck_assert_uint_eq(p->connect_timeout_usec, c->connect_timeout_usec);
                ck_assert_uint_eq(p->first_byte_timeout_usec, 120 * USEC_PER_SEC);
                ck_assert_uint_eq(p->idle_timeout_usec, c->stream_idle_timeout_usec);
        }

        /* qwen-direct's key is optional unless it is the default: a warning, not an error. */
        assert_message(warnings, "qwen-direct", "qwen-api-key");
}
END_TEST

START_TEST(test_defaults_all_sources_null) {
        ConfigSources src = {};
        g_autoptr(Config) c = load_ok(&src, NULL);

        assert_plan_defaults(c);
}
END_TEST

START_TEST(test_new_default) {
        g_autoptr(Config) c = config_new_default();

        assert_plan_defaults(c);
}
END_TEST

START_TEST(test_missing_required_file) {
        g_autofree char *path = g_build_filename(dir, "missing.conf", NULL);
        ConfigSources src = { .path = path, .path_required = true };
        g_autoptr(GPtrArray) errors = load_fail(&src);

        assert_n_messages(errors, 1);
        assert_message(errors, "missing.conf");
}
END_TEST

START_TEST(test_file_with_providers) {
        g_autofree char *path = write_conf("router.conf",
                "[Router]\n"
                "Host=0.0.0.0\n"
                "Port=8080\n"
                "DefaultProvider=alpha\n"
                "AllowProviderOverride=no\n"
                "RequestTimeoutSec=60\n"
                "ConnectTimeoutSec=2.5\n"
                "StreamIdleTimeoutSec=90\n"
                "LogLevel=warn\n"
                "LogRequests=off\n"
                "LogResponses=1\n"
                "MaxBodySize=1M\n"
                "MaxHeaderSize=16K\n"
                "StreamBufferSize=128KiB\n"
                "MaxConnections=100\n"
                "CORSAllowOrigin=\n"
                "\n"
                "[Provider alpha]\n"
                "BaseURL=http://127.0.0.1:9000/v1//\n"
                "DefaultModel=alpha-large\n"
                "Models=a1;a2;\n"
                "MaxConcurrent=4\n"
                "MaxRetries=0\n"
                "Fallbacks=beta\n"
                "\n"
                "[Provider beta]\n"
                "Kind=echo\n"
                "RequestTimeoutSec=5\n"
                "FirstByteTimeoutSec=1\n"
                "\n"
                "[ModelMappings]\n"
                "b-model=beta\n"
                "a-model=alpha\n");
        g_autofree char *dropins = g_build_filename(dir, "none.d", NULL);
        ConfigSources src = { .path = path, .dropin_dir = dropins };
        g_autoptr(GPtrArray) warnings = NULL;
        g_autoptr(Config) c = load_ok(&src, &warnings);
        ProviderConfig *a, *b;

        assert_n_messages(warnings, 0);
        ck_assert_str_eq(c->host, "0.0.0.0");
        ck_assert_uint_eq(c->port, 8080);
        ck_assert_str_eq(c->default_provider, "alpha");
        ck_assert(!c->allow_provider_override);
        ck_assert_uint_eq(c->request_timeout_usec, 60 * USEC_PER_SEC);
        ck_assert_uint_eq(c->connect_timeout_usec, 2500 * USEC_PER_MSEC);
        ck_assert_int_eq(c->log_level, LOG_WARNING);
        ck_assert(!c->log_requests);
        ck_assert(c->log_responses);
        ck_assert_uint_eq(c->max_body_size, 1024 * 1024);
        ck_assert_uint_eq(c->max_header_size, 16 * 1024);
        ck_assert_uint_eq(c->stream_buffer_size, 128 * 1024);
        ck_assert_uint_eq(c->max_connections, 100);
        ck_assert_ptr_null(c->cors_allow_origin); /* empty disables CORS */

        /* A file that defines providers gets exactly those, in file order. */
        ck_assert_uint_eq(c->providers->len, 2);
        a = c->providers->pdata[0];
        b = c->providers->pdata[1];
        ck_assert_str_eq(a->name, "alpha");
        ck_assert_str_eq(b->name, "beta");
        ck_assert_ptr_null(config_find_provider(c, "lm-studio"));
        ck_assert_ptr_null(config_find_provider(c, "echo"));

        ck_assert_int_eq(a->kind, PROVIDER_KIND_OPENAI);
        ck_assert_str_eq(a->base_url, "http://127.0.0.1:9000/v1"); /* trailing slashes dropped */
        ck_assert_str_eq(a->default_model, "alpha-large");
        ck_assert_ptr_nonnull(a->models);
        ck_assert_uint_eq(g_strv_length(a->models), 2);
        ck_assert_str_eq(a->models[0], "a1");
        ck_assert_str_eq(a->models[1], "a2");
        ck_assert_uint_eq(a->max_concurrent, 4);
        ck_assert_uint_eq(a->max_retries, 0);
        ck_assert_uint_eq(g_strv_length(a->fallbacks), 1);
        ck_assert_str_eq(a->fallbacks[0], "beta");
        ck_assert_uint_eq(a->request_timeout_usec, 60 * USEC_PER_SEC);       /* inherited */
        ck_assert_uint_eq(a->first_byte_timeout_usec, 60 * USEC_PER_SEC);    /* = request timeout */
        ck_assert_uint_eq(a->connect_timeout_usec, 2500 * USEC_PER_MSEC);
        ck_assert_uint_eq(a->idle_timeout_usec, 90 * USEC_PER_SEC);

        ck_assert_int_eq(b->kind, PROVIDER_KIND_ECHO);
        ck_assert_ptr_null(b->base_url);
        ck_assert_uint_eq(b->request_timeout_usec, 5 * USEC_PER_SEC);
        ck_assert_uint_eq(b->first_byte_timeout_usec, 1 * USEC_PER_SEC);

        ck_assert_uint_eq(g_hash_table_size(c->mappings), 2);
        ck_assert_str_eq(g_hash_table_lookup(c->mappings, "b-model"), "beta");
        ck_assert_str_eq(g_hash_table_lookup(c->mappings, "a-model"), "alpha");
        ck_assert_uint_eq(c->mapping_order->len, 2);
        ck_assert_str_eq(c->mapping_order->pdata[0], "b-model");
        ck_assert_str_eq(c->mapping_order->pdata[1], "a-model");

        ck_assert_uint_eq(g_strv_length(c->sources), 1);
        ck_assert_str_eq(c->sources[0], path);
}
END_TEST

START_TEST(test_file_without_providers_gets_builtins) {
        g_autofree char *path = write_conf("router.conf",
                "[Router]\nPort=4000\n\n[ModelMappings]\ncoder=echo\n");
        ConfigSources src = { .path = path };
        g_autoptr(Config) c = load_ok(&src, NULL);

        ck_assert_uint_eq(c->port, 4000);
        ck_assert_uint_eq(c->providers->len, 4);
        ck_assert_ptr_nonnull(config_find_provider(c, "echo"));
        ck_assert_str_eq(g_hash_table_lookup(c->mappings, "coder"), "echo");
}
END_TEST

START_TEST(test_dropins_in_lexical_order) {
        g_autofree char *path = write_conf("router.conf",
                "[Router]\n"
                "Port=1000\n"
                "LogLevel=info\n"
                "[Provider lm-studio]\n"
                "BaseURL=http://127.0.0.1:1234/v1\n"
                "DefaultModel=qwen3-max\n"
                "[Provider echo]\n"
                "Kind=echo\n"
                "[ModelMappings]\n"
                "m1=lm-studio\n"
                "m2=lm-studio\n");
        g_autofree char *d05 = write_conf("router.conf.d/05-c.conf", "[Router]\nPort=5000\nLogLevel=debug\n");
        g_autofree char *d10 = write_conf("router.conf.d/10-a.conf",
                "[Router]\nPort=1010\n"
                "[Provider lm-studio]\nBaseURL=http://127.0.0.1:4321/v1\n"
                "[ModelMappings]\nm3=echo\nm2=echo\n");
        /* "100-…" sorts before "20-…": the order is lexical, not numeric. */
        g_autofree char *d100 = write_conf("router.conf.d/100-x.conf", "[Router]\nPort=1100\n");
        g_autofree char *d20 = write_conf("router.conf.d/20-b.conf", "[Router]\nPort=2000\n[ModelMappings]\nm1=\n");
        g_autofree char *ignored1 = write_conf("router.conf.d/99-z.conf.disabled", "[Router]\nPort=9\n");
        g_autofree char *ignored2 = write_conf("router.conf.d/.hidden.conf", "[Router]\nPort=8\n");
        ConfigSources src = { .path = path };
        g_autoptr(Config) c = load_ok(&src, NULL);
        ProviderConfig *p;

        ck_assert_uint_eq(c->port, 2000);
        ck_assert_int_eq(c->log_level, LOG_DEBUG);

        /* A drop-in overrides single keys of a group and keeps the others. */
        p = config_find_provider(c, "lm-studio");
        ck_assert_str_eq(p->base_url, "http://127.0.0.1:4321/v1");
        ck_assert_str_eq(p->default_model, "qwen3-max");
        ck_assert_uint_eq(c->providers->len, 2);

        /* m1 removed by an empty value, m2 remapped, m3 added. */
        ck_assert(!g_hash_table_contains(c->mappings, "m1"));
        ck_assert_str_eq(g_hash_table_lookup(c->mappings, "m2"), "echo");
        ck_assert_str_eq(g_hash_table_lookup(c->mappings, "m3"), "echo");
        ck_assert_uint_eq(g_hash_table_size(c->mappings), 2);
        ck_assert_uint_eq(c->mapping_order->len, 2);
        ck_assert_str_eq(c->mapping_order->pdata[0], "m2");
        ck_assert_str_eq(c->mapping_order->pdata[1], "m3");

        ck_assert_uint_eq(g_strv_length(c->sources), 5);
        ck_assert_str_eq(c->sources[0], path);
        ck_assert_str_eq(c->sources[1], d05);
        ck_assert_str_eq(c->sources[2], d10);
        ck_assert_str_eq(c->sources[3], d100);
        ck_assert_str_eq(c->sources[4], d20);
}
END_TEST

START_TEST(test_dropin_dir_explicit_without_main_file) {
        g_autofree char *d1 = write_conf("conf.d/a.conf", "[Router]\nPort=1111\n[ModelMappings]\nx=echo\n");
        g_autofree char *d2 = write_conf("conf.d/b.conf", "[ModelMappings]\nx=\n");
        g_autofree char *dropins = g_build_filename(dir, "conf.d", NULL);
        ConfigSources src = { .dropin_dir = dropins };
        g_autoptr(Config) c = load_ok(&src, NULL);

        ck_assert_uint_eq(c->port, 1111);
        ck_assert_uint_eq(g_hash_table_size(c->mappings), 0);
        ck_assert_uint_eq(c->mapping_order->len, 0);
        ck_assert_uint_eq(c->providers->len, 4);
}
END_TEST

START_TEST(test_dropin_error_names_file) {
        g_autofree char *path = write_conf("router.conf", "[Router]\nPort=3001\n");
        g_autofree char *bad = write_conf("router.conf.d/50-bad.conf", "[Router]\nPort=0\n");
        ConfigSources src = { .path = path };
        g_autoptr(GPtrArray) errors = load_fail(&src);

        assert_n_messages(errors, 1);
        assert_message(errors, "50-bad.conf", "Port", "'0'");
}
END_TEST

static const char plan_file[] =
        "[Router]\n"
        "Host=127.0.0.1\n"
        "Port=3001\n"
        "DefaultProvider=lm-studio\n"
        "RequestTimeoutSec=120\n"
        "LogLevel=info\n"
        "LogRequests=true\n"
        "LogResponses=false\n"
        "[Provider lm-studio]\n"
        "BaseURL=http://127.0.0.1:1234/v1\n"
        "DefaultModel=qwen3-max\n"
        "[Provider qwen-proxy]\n"
        "BaseURL=http://127.0.0.1:3000/v1\n"
        "[Provider qwen-direct]\n"
        "BaseURL=https://dashscope.aliyuncs.com/compatible-mode/v1\n"
        "APIKeyCredential=qwen-api-key\n"
        "[ModelMappings]\n"
        "qwen3-coder=lm-studio\n";

START_TEST(test_env_overrides_file) {
        g_autofree char *path = write_conf("router.conf", plan_file);
        g_auto(GStrv) env = test_environ(
                "PORT=4000",
                "HOST=::1",
                "DEFAULT_PROVIDER=qwen-direct",
                "LM_STUDIO_BASE_URL=http://127.0.0.1:5555/v1",
                "LM_STUDIO_DEFAULT_MODEL=llama-3.1-8b",
                "QWEN_PROXY_BASE_URL=http://127.0.0.1:3333",
                "QWEN_API_KEY=sk-test-123",
                "QWEN_BASE_URL=https://qwen.example.invalid/api/v1",
                "MODEL_MAPPINGS=qwen3-coder:qwen-proxy, qwen3-max : qwen-direct ,",
                "LOG_LEVEL=debug",
                "LOG_REQUESTS=false",
                "LOG_RESPONSES=yes",
                "REQUEST_TIMEOUT=30000",
                "UNRELATED=1",
                NULL);
        ConfigSources src = { .path = path, .environ = env };
        g_autoptr(Config) c = load_ok(&src, NULL);
        ProviderConfig *p;

        ck_assert_uint_eq(c->port, 4000);
        ck_assert_str_eq(c->host, "::1");
        ck_assert_str_eq(c->default_provider, "qwen-direct");
        ck_assert_int_eq(c->log_level, LOG_DEBUG);
        ck_assert(!c->log_requests);
        ck_assert(c->log_responses);
        ck_assert_uint_eq(c->request_timeout_usec, 30 * USEC_PER_SEC);

        p = config_find_provider(c, "lm-studio");
        ck_assert_str_eq(p->base_url, "http://127.0.0.1:5555/v1");
        ck_assert_str_eq(p->default_model, "llama-3.1-8b");
        ck_assert_uint_eq(p->request_timeout_usec, 30 * USEC_PER_SEC);

        p = config_find_provider(c, "qwen-proxy");
        ck_assert_str_eq(p->base_url, "http://127.0.0.1:3333/v1");

        p = config_find_provider(c, "qwen-direct");
        ck_assert_str_eq(p->base_url, "https://qwen.example.invalid/api/v1");
        ck_assert_str_eq(p->api_key, "sk-test-123");
        ck_assert_ptr_nonnull(p->api_key_source);
        ck_assert_ptr_nonnull(strstr(p->api_key_source, "QWEN_API_KEY"));
        ck_assert_ptr_null(strstr(p->api_key_source, "sk-test"));

        ck_assert_uint_eq(g_hash_table_size(c->mappings), 2);
        ck_assert_str_eq(g_hash_table_lookup(c->mappings, "qwen3-coder"), "qwen-proxy");
        ck_assert_str_eq(g_hash_table_lookup(c->mappings, "qwen3-max"), "qwen-direct");
}
END_TEST

START_TEST(test_env_qwen_proxy_gets_v1) {
        static const struct {
                const char *value;
                const char *expected;
        } cases[] = {
                { "http://127.0.0.1:3000", "http://127.0.0.1:3000/v1" },
                { "http://127.0.0.1:3000/", "http://127.0.0.1:3000/v1" },
                { "http://127.0.0.1:3000/v1", "http://127.0.0.1:3000/v1" },
                { "http://127.0.0.1:3000/v1/", "http://127.0.0.1:3000/v1" },
                { "https://proxy.example.invalid/qwen", "https://proxy.example.invalid/qwen/v1" },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                g_autofree char *var = g_strconcat("QWEN_PROXY_BASE_URL=", cases[i].value, NULL);
                g_auto(GStrv) env = test_environ(var, NULL);
                ConfigSources src = { .environ = env };
                g_autoptr(Config) c = load_ok(&src, NULL);

                ck_assert_str_eq(config_find_provider(c, "qwen-proxy")->base_url, cases[i].expected);
        }
}
END_TEST

START_TEST(test_env_creates_plan_providers) {
        /* The file names other providers; the plan's variables still work. */
        g_autofree char *path = write_conf("router.conf",
                "[Router]\nDefaultProvider=mine\n[Provider mine]\nBaseURL=http://127.0.0.1:7000/v1\n");
        g_auto(GStrv) env = test_environ("LM_STUDIO_BASE_URL=http://127.0.0.1:1235/v1",
                                         "QWEN_API_KEY=sk-abc", NULL);
        ConfigSources src = { .path = path, .environ = env };
        g_autoptr(Config) c = load_ok(&src, NULL);
        ProviderConfig *p;

        ck_assert_uint_eq(c->providers->len, 3);
        ck_assert_str_eq(((ProviderConfig *) c->providers->pdata[0])->name, "mine");
        p = config_find_provider(c, "lm-studio");
        ck_assert_str_eq(p->base_url, "http://127.0.0.1:1235/v1");
        ck_assert_str_eq(p->default_model, "qwen3-max"); /* the rest from the built-in defaults */
        p = config_find_provider(c, "qwen-direct");
        ck_assert_str_eq(p->api_key, "sk-abc");
        ck_assert_str_eq(p->base_url, "https://dashscope.aliyuncs.com/compatible-mode/v1");
        ck_assert_ptr_null(config_find_provider(c, "qwen-proxy"));
}
END_TEST

START_TEST(test_env_empty_values_ignored) {
        g_auto(GStrv) env = test_environ("PORT=", "DEFAULT_PROVIDER=", "LOG_LEVEL=", "MODEL_MAPPINGS=", NULL);
        ConfigSources src = { .environ = env };
        g_autoptr(Config) c = load_ok(&src, NULL);

        assert_plan_defaults(c);
}
END_TEST

START_TEST(test_env_only_supplied_environ_is_read) {
        g_auto(GStrv) env = test_environ(NULL);
        ConfigSources src = { .environ = env };
        g_autoptr(Config) c = NULL;

        /* The process environment is not the source: tests and --check-config pass their own. */
        g_setenv("PORT", "4444", TRUE);
        g_setenv("DEFAULT_PROVIDER", "echo", TRUE);
        c = load_ok(&src, NULL);
        g_unsetenv("PORT");
        g_unsetenv("DEFAULT_PROVIDER");
        ck_assert_uint_eq(c->port, 3001);
        ck_assert_str_eq(c->default_provider, "lm-studio");
}
END_TEST

START_TEST(test_env_mapping_model_with_colon) {
        /* Ollama-style model names contain a colon; provider names never do. */
        g_auto(GStrv) env = test_environ("MODEL_MAPPINGS=llama3:8b:lm-studio,qwen3-coder:echo", NULL);
        ConfigSources src = { .environ = env };
        g_autoptr(Config) c = load_ok(&src, NULL);

        ck_assert_uint_eq(g_hash_table_size(c->mappings), 2);
        ck_assert_str_eq(g_hash_table_lookup(c->mappings, "llama3:8b"), "lm-studio");
        ck_assert_str_eq(g_hash_table_lookup(c->mappings, "qwen3-coder"), "echo");
}
END_TEST

START_TEST(test_env_errors_all_reported) {
        g_auto(GStrv) env = test_environ(
                "PORT=70000",
                "LOG_LEVEL=verbose",
                "LOG_REQUESTS=maybe",
                "LOG_RESPONSES=2",
                "REQUEST_TIMEOUT=1.5s",
                "LM_STUDIO_BASE_URL=ftp://127.0.0.1/v1",
                "QWEN_BASE_URL=dashscope",
                "MODEL_MAPPINGS=nocolon,ok:echo,:echo",
                "LM_STUDIO_DEFAULT_MODEL=bad\x01model",
                NULL);
        ConfigSources src = { .environ = env };
        g_autoptr(GPtrArray) errors = load_fail(&src);

        assert_message(errors, "PORT", "70000");
        assert_message(errors, "LOG_LEVEL", "verbose");
        assert_message(errors, "LOG_REQUESTS", "maybe");
        assert_message(errors, "LOG_RESPONSES", "'2'");
        assert_message(errors, "REQUEST_TIMEOUT", "1.5s");
        assert_message(errors, "LM_STUDIO_BASE_URL", "ftp://");
        assert_message(errors, "QWEN_BASE_URL", "dashscope");
        assert_message(errors, "MODEL_MAPPINGS", "nocolon");
        assert_message(errors, "MODEL_MAPPINGS", "':echo'");
        assert_message(errors, "LM_STUDIO_DEFAULT_MODEL");
        assert_n_messages(errors, 10);
}
END_TEST

START_TEST(test_env_request_timeout_zero) {
        g_auto(GStrv) env = test_environ("REQUEST_TIMEOUT=0", NULL);
        ConfigSources src = { .environ = env };
        g_autoptr(GPtrArray) errors = load_fail(&src);

        assert_n_messages(errors, 1);
        assert_message(errors, "REQUEST_TIMEOUT");
}
END_TEST

/* One bad setting each: the load fails with exactly one error that contains all the words. */
typedef struct BadCase {
        const char *conf;
        const char *env;       /* one NAME=value, or NULL */
        const char *words[4];
        unsigned n_errors;     /* 0 means 1 */
} BadCase;

static void check_bad_cases(const BadCase *cases, size_t n) {
        for (size_t i = 0; i < n; i++) {
                g_autofree char *path = write_conf("bad.conf", cases[i].conf);
                g_autofree char *dropins = g_build_filename(dir, "none.d", NULL);
                g_auto(GStrv) env = test_environ(cases[i].env, NULL);
                ConfigSources src = { .path = path, .dropin_dir = dropins, .environ = env };
                g_autoptr(GPtrArray) errors = NULL;
                g_autofree char *joined = NULL;
                Config *c = NULL;
                int r;

                r = config_load(&src, &c, &errors, NULL);
                joined = test_messages_join(errors);
                ck_assert_msg(r == -EINVAL, "case %zu (%s%s) loaded", i, cases[i].conf, strempty(cases[i].env));
                ck_assert_ptr_null(c);
                ck_assert_msg(errors->len == MAX(cases[i].n_errors, 1u), "case %zu: expected %u error(s), got %u:%s", i,
                              MAX(cases[i].n_errors, 1u), errors->len, joined);
                ck_assert_msg(test_messages_match(errors, cases[i].words[0], cases[i].words[1],
                                                  cases[i].words[2], cases[i].words[3], NULL),
                              "case %zu: error does not name '%s' '%s': %s", i, cases[i].words[0],
                              strempty(cases[i].words[1]), joined);
        }
}

#define P_HEAD "[Router]\nDefaultProvider=p\n[Provider p]\n"
#define ONE_PROVIDER P_HEAD "BaseURL=http://127.0.0.1:9/v1\n"

START_TEST(test_validate_plan_cases) {
        static const BadCase cases[] = {
                /* validateConfig(): port */
                { "[Router]\nPort=0\n", NULL, { "Port", "'0'", "1 and 65535" } },
                { "[Router]\nPort=65536\n", NULL, { "Port", "65536" } },
                { "[Router]\nPort=-1\n", NULL, { "Port", "'-1'" } },
                { "[Router]\nPort=http\n", NULL, { "Port", "'http'" } },
                { "[Router]\nPort=80x\n", NULL, { "Port", "'80x'" } },
                { "", "PORT=abc", { "PORT", "'abc'" } },
                /* validateConfig(): default provider must exist */
                { "[Router]\nDefaultProvider=nope\n", NULL, { "DefaultProvider", "'nope'", "lm-studio" } },
                { "", "DEFAULT_PROVIDER=nope", { "DefaultProvider", "'nope'", "known" } },
                { "[Router]\nDefaultProvider=\n", NULL, { "DefaultProvider" } },
                /* validateConfig(): QWEN_API_KEY required when DEFAULT_PROVIDER=qwen-direct */
                { "", "DEFAULT_PROVIDER=qwen-direct", { "QWEN_API_KEY", "required", "qwen-direct" } },
                { "[Router]\nDefaultProvider=qwen-direct\n", NULL, { "QWEN_API_KEY", "required" } },
                /* validateConfig(): log level */
                { "[Router]\nLogLevel=verbose\n", NULL, { "LogLevel", "'verbose'" } },
                { "[Router]\nLogLevel=emerg\n", NULL, { "LogLevel", "'emerg'" } },
                { "", "LOG_LEVEL=trace", { "LOG_LEVEL", "'trace'" } },
        };

        check_bad_cases(cases, ELEMENTSOF(cases));
}
END_TEST

START_TEST(test_validate_more_cases) {
        static const BadCase cases[] = {
                /* URLs: the bad value, and then the provider has none */
                { P_HEAD "BaseURL=ftp://127.0.0.1/v1\n", NULL, { "[Provider p]", "BaseURL", "ftp://" }, 2 },
                { P_HEAD "BaseURL=not a url\n", NULL, { "BaseURL", "'not a url'" }, 2 },
                { P_HEAD "BaseURL=http://\n", NULL, { "BaseURL", "'http://'" }, 2 },
                { P_HEAD "BaseURL=127.0.0.1:1234/v1\n", NULL, { "BaseURL", "'127.0.0.1:1234/v1'" }, 2 },
                { P_HEAD "BaseURL=\n", NULL, { "BaseURL", "''" }, 2 },
                { "[Router]\nDefaultProvider=p\n[Provider p]\nDefaultModel=x\n", NULL, { "'p'", "no BaseURL" } },
                /* mappings */
                { ONE_PROVIDER "[ModelMappings]\nm=nope\n", NULL, { "'m'", "'nope'", "not configured", "known: p" } },
                { ONE_PROVIDER, "MODEL_MAPPINGS=m:nope", { "'m'", "'nope'" } },
                /* booleans */
                { "[Router]\nAllowProviderOverride=maybe\n", NULL, { "AllowProviderOverride", "'maybe'", "boolean" } },
                { "[Router]\nLogRequests=2\n", NULL, { "LogRequests", "'2'" } },
                { "[Router]\nLogResponses=\n", NULL, { "LogResponses" } },
                /* sizes */
                { "[Router]\nMaxBodySize=12\n", NULL, { "MaxBodySize", "'12'", "between" } },
                { "[Router]\nMaxBodySize=1X\n", NULL, { "MaxBodySize", "'1X'" } },
                { "[Router]\nMaxBodySize=1KBB\n", NULL, { "MaxBodySize", "'1KBB'" } },
                { "[Router]\nMaxBodySize=-1M\n", NULL, { "MaxBodySize", "'-1M'" } },
                { "[Router]\nMaxHeaderSize=2G\n", NULL, { "MaxHeaderSize", "'2G'" } },
                { "[Router]\nMaxBodySize=99999999999999999999G\n", NULL, { "MaxBodySize" } },
                { "[Router]\nStreamBufferSize=1 M\n", NULL, { "StreamBufferSize" } },
                { "[Router]\nMaxConnections=0\n", NULL, { "MaxConnections", "'0'" } },
                /* timeouts */
                { "[Router]\nRequestTimeoutSec=0\n", NULL, { "RequestTimeoutSec", "'0'", "seconds" } },
                { "[Router]\nRequestTimeoutSec=-5\n", NULL, { "RequestTimeoutSec", "'-5'" } },
                { "[Router]\nRequestTimeoutSec=abc\n", NULL, { "RequestTimeoutSec", "'abc'" } },
                { "[Router]\nRequestTimeoutSec=nan\n", NULL, { "RequestTimeoutSec", "'nan'" } },
                { "[Router]\nRequestTimeoutSec=inf\n", NULL, { "RequestTimeoutSec", "'inf'" } },
                { "[Router]\nConnectTimeoutSec=10s\n", NULL, { "ConnectTimeoutSec", "'10s'" } },
                { "[Router]\nStreamIdleTimeoutSec=99999999999\n", NULL, { "StreamIdleTimeoutSec" } },
                { ONE_PROVIDER "RequestTimeoutSec=0.0000001\n", NULL, { "[Provider p]", "RequestTimeoutSec" } },
                { ONE_PROVIDER "FirstByteTimeoutSec=x\n", NULL, { "[Provider p]", "FirstByteTimeoutSec" } },
                /* provider names and keys */
                { "[Provider bad/name]\nBaseURL=http://127.0.0.1:9/v1\n", NULL, { "'bad/name'", "invalid" } },
                { "[Provider with space]\nKind=echo\n", NULL, { "'with space'", "invalid" } },
                { "[Provider ]\nKind=echo\n", NULL, { "''", "invalid" } },
                { "[Provider " "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" "]\nKind=echo\n",
                  NULL, { "invalid", "1-64" } },
                { ONE_PROVIDER "Kind=magic\n", NULL, { "Kind", "'magic'" } },
                { ONE_PROVIDER "DefaultModel=bad\\tmodel\n", NULL, { "DefaultModel" } },
                { ONE_PROVIDER "Models=good;bad\\nname\n", NULL, { "[Provider p]", "Models=", "control character" } },
                { ONE_PROVIDER "Models=good;"
                  "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm"
                  "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm"
                  "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm\n",
                  NULL, { "Models", "invalid model name" } },
                { ONE_PROVIDER "MaxRetries=11\n", NULL, { "MaxRetries", "'11'" } },
                { ONE_PROVIDER "MaxConcurrent=lots\n", NULL, { "MaxConcurrent", "'lots'" } },
                { ONE_PROVIDER "APIKeyCredential=../etc/key\n", NULL, { "APIKeyCredential", "not a path" } },
                { ONE_PROVIDER "APIKeyCredential=..\n", NULL, { "APIKeyCredential" } },
                { ONE_PROVIDER "APIKeyFile=relative/key\n", NULL, { "APIKeyFile", "absolute" } },
                /* fallbacks */
                { ONE_PROVIDER "Fallbacks=nope\n", NULL, { "'p'", "fallback 'nope'", "not a configured" } },
                { ONE_PROVIDER "Fallbacks=p\n", NULL, { "'p'", "itself" } },
                /* [Router] Host */
                { "[Router]\nHost=\n", NULL, { "Host" } },
                /* mapping keys */
                { "[ModelMappings]\n"
                  "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm"
                  "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm"
                  "mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm=echo\n",
                  NULL, { "[ModelMappings]", "not a valid model name" } },
                /* syntax */
                { "[Router\nPort=1\n", NULL, { "bad.conf" } },
                { "Port=1\n", NULL, { "bad.conf" } },
        };

        check_bad_cases(cases, ELEMENTSOF(cases));
}
END_TEST

START_TEST(test_inline_api_key_refused) {
        g_autofree char *path = write_conf("router.conf",
                ONE_PROVIDER "APIKey=sk-very-secret-value\n");
        ConfigSources src = { .path = path };
        g_autoptr(GPtrArray) errors = load_fail(&src);

        assert_n_messages(errors, 1);
        assert_message(errors, "APIKey=", "APIKeyCredential=");
        /* The secret itself never appears in a message. */
        ck_assert(!test_messages_match(errors, "sk-very-secret", NULL));
}
END_TEST

START_TEST(test_api_key_file) {
        g_autofree char *key = test_write_file(dir, "secret-key", 0600, "sk-from-file\n");
        g_autofree char *conf = g_strdup_printf(ONE_PROVIDER "APIKeyFile=%s\n", key);
        g_autofree char *path = write_conf("router.conf", conf);
        ConfigSources src = { .path = path };
        g_autoptr(Config) c = load_ok(&src, NULL);
        ProviderConfig *p = config_find_provider(c, "p");

        ck_assert_str_eq(p->api_key, "sk-from-file"); /* trailing newline is not part of it */
        ck_assert_ptr_nonnull(strstr(p->api_key_source, key));
        ck_assert_ptr_null(strstr(p->api_key_source, "sk-from-file"));
}
END_TEST

START_TEST(test_api_key_file_world_readable_refused) {
        g_autofree char *key = test_write_file(dir, "secret-key", 0644, "sk-world\n");
        g_autofree char *conf = g_strdup_printf(ONE_PROVIDER "APIKeyFile=%s\n", key);
        g_autofree char *path = write_conf("router.conf", conf);
        ConfigSources src = { .path = path };
        g_autoptr(GPtrArray) errors = load_fail(&src);

        assert_n_messages(errors, 1);
        assert_message(errors, "'p'", key, "readable by everyone");
        ck_assert(!test_messages_match(errors, "sk-world", NULL));
}
END_TEST

START_TEST(test_api_key_file_problems) {
        g_autofree char *empty = test_write_file(dir, "empty-key", 0600, "\n");
        g_autofree char *missing = g_build_filename(dir, "missing-key", NULL);
        g_autofree char *conf = g_strdup_printf(
                "[Router]\nDefaultProvider=p\n"
                "[Provider p]\nBaseURL=http://127.0.0.1:9/v1\nAPIKeyFile=%s\n"
                "[Provider q]\nBaseURL=http://127.0.0.1:9/v1\nAPIKeyFile=%s\n"
                "[Provider r]\nBaseURL=http://127.0.0.1:9/v1\nAPIKeyFile=%s\n",
                empty, missing, dir);
        g_autofree char *path = write_conf("router.conf", conf);
        ConfigSources src = { .path = path };
        g_autoptr(GPtrArray) errors = load_fail(&src);

        assert_n_messages(errors, 3);
        assert_message(errors, "'p'", "empty");
        assert_message(errors, "'q'", "missing-key");
        assert_message(errors, "'r'", "APIKeyFile");
}
END_TEST

START_TEST(test_credentials_dir) {
        g_autofree char *creds = g_build_filename(dir, "credentials", NULL);
        g_autofree char *cred = test_write_file(creds, "qwen-api-key", 0644, "sk-credential\n");
        g_auto(GStrv) env = test_environ("DEFAULT_PROVIDER=qwen-direct", NULL);
        ConfigSources src = { .environ = env, .credentials_dir = creds };
        g_autoptr(GPtrArray) warnings = NULL;
        g_autoptr(Config) c = load_ok(&src, &warnings);
        ProviderConfig *p = config_find_provider(c, "qwen-direct");

        ck_assert_str_eq(c->default_provider, "qwen-direct");
        ck_assert_str_eq(p->api_key, "sk-credential");
        ck_assert_ptr_nonnull(strstr(p->api_key_source, "qwen-api-key"));
        ck_assert(!test_messages_match(warnings, "qwen-direct", NULL));
}
END_TEST

START_TEST(test_credentials_dir_without_credential) {
        g_autofree char *creds = g_build_filename(dir, "credentials", NULL);
        g_auto(GStrv) env = test_environ("DEFAULT_PROVIDER=qwen-direct", NULL);
        ConfigSources src = { .environ = env, .credentials_dir = creds };
        g_autoptr(GPtrArray) errors = NULL;

        ck_assert_int_eq(g_mkdir(creds, 0700), 0);
        errors = load_fail(&src);
        assert_n_messages(errors, 1);
        assert_message(errors, "QWEN_API_KEY", "qwen-api-key");
}
END_TEST

START_TEST(test_qwen_api_key_env_satisfies_default) {
        g_autofree char *creds = g_build_filename(dir, "credentials", NULL);
        g_autofree char *cred = test_write_file(creds, "qwen-api-key", 0600, "sk-credential");
        g_auto(GStrv) env = test_environ("DEFAULT_PROVIDER=qwen-direct", "QWEN_API_KEY=sk-env", NULL);
        ConfigSources src = { .environ = env, .credentials_dir = creds };
        g_autoptr(Config) c = load_ok(&src, NULL);

        /* The plan's variable overrides, like every other one. */
        ck_assert_str_eq(config_find_provider(c, "qwen-direct")->api_key, "sk-env");
}
END_TEST

START_TEST(test_api_key_env) {
        g_autofree char *path = write_conf("router.conf",
                ONE_PROVIDER "APIKeyEnv=P_KEY\n"
                "[Provider q]\nBaseURL=http://127.0.0.1:9/v1\nAPIKeyEnv=Q_KEY\n");
        g_auto(GStrv) env = test_environ("P_KEY=sk-p", NULL);
        ConfigSources src = { .path = path, .environ = env };
        g_autoptr(GPtrArray) warnings = NULL;
        g_autoptr(Config) c = NULL;

        g_setenv("Q_KEY", "sk-process", TRUE); /* not in the supplied environment: not used */
        c = load_ok(&src, &warnings);
        g_unsetenv("Q_KEY");

        ck_assert_str_eq(config_find_provider(c, "p")->api_key, "sk-p");
        ck_assert_ptr_nonnull(strstr(config_find_provider(c, "p")->api_key_source, "P_KEY"));
        ck_assert_ptr_null(config_find_provider(c, "q")->api_key);
        assert_n_messages(warnings, 1);
        assert_message(warnings, "'q'", "Q_KEY");
        ck_assert(!test_messages_match(warnings, "sk-", NULL));
}
END_TEST

START_TEST(test_api_key_env_missing_for_default) {
        g_autofree char *path = write_conf("router.conf", ONE_PROVIDER "APIKeyEnv=P_KEY\n");
        ConfigSources src = { .path = path };
        g_autoptr(GPtrArray) errors = load_fail(&src);

        assert_n_messages(errors, 1);
        assert_message(errors, "'p'", "default provider", "P_KEY");
}
END_TEST

START_TEST(test_many_errors_all_reported) {
        g_autofree char *path = write_conf("router.conf",
                "[Router]\n"
                "Port=0\n"
                "LogLevel=loud\n"
                "AllowProviderOverride=perhaps\n"
                "RequestTimeoutSec=-1\n"
                "DefaultProvider=ghost\n"
                "[Provider a]\n"
                "BaseURL=gopher://127.0.0.1/\n"
                "APIKey=sk-inline\n"
                "Fallbacks=a;nobody\n"
                "[Provider b!]\n"
                "Kind=echo\n"
                "[ModelMappings]\n"
                "m=phantom\n");
        g_autofree char *dropin = write_conf("router.conf.d/10-more.conf", "[Router]\nMaxBodySize=tiny\n");
        g_auto(GStrv) env = test_environ("REQUEST_TIMEOUT=never", "MODEL_MAPPINGS=broken", NULL);
        ConfigSources src = { .path = path, .environ = env };
        g_autoptr(GPtrArray) errors = load_fail(&src);

        assert_message(errors, "Port", "'0'");
        assert_message(errors, "LogLevel", "'loud'");
        assert_message(errors, "AllowProviderOverride", "'perhaps'");
        assert_message(errors, "RequestTimeoutSec", "'-1'");
        assert_message(errors, "DefaultProvider", "'ghost'");
        assert_message(errors, "BaseURL", "gopher://");
        assert_message(errors, "'a'", "no BaseURL");
        assert_message(errors, "APIKey=");
        assert_message(errors, "'a'", "itself");
        assert_message(errors, "'a'", "'nobody'");
        assert_message(errors, "'b!'", "invalid");
        assert_message(errors, "'m'", "'phantom'");
        assert_message(errors, "10-more.conf", "MaxBodySize", "'tiny'");
        assert_message(errors, "REQUEST_TIMEOUT", "'never'");
        assert_message(errors, "MODEL_MAPPINGS", "'broken'");
        assert_n_messages(errors, 15);
        ck_assert(!test_messages_match(errors, "sk-inline", NULL));
}
END_TEST

START_TEST(test_errors_and_warnings_optional_outputs) {
        g_autofree char *path = write_conf("router.conf", "[Router]\nPort=0\n");
        ConfigSources src = { .path = path };
        Config *c = NULL;

        ck_assert_int_eq(config_load(&src, &c, NULL, NULL), -EINVAL);
        ck_assert_ptr_null(c);
}
END_TEST

START_TEST(test_warnings_for_unknown_keys_and_sections) {
        g_autofree char *path = write_conf("router.conf",
                "[Router]\n"
                "DefaultProvider=p\n"
                "Prot=3001\n"
                "[Provider p]\n"
                "BaseURL=http://127.0.0.1:9/v1\n"
                "BaseUrl=http://127.0.0.1:10/v1\n"
                "[Providers]\n"
                "x=y\n"
                "[ModelMapping]\n"
                "a=p\n");
        ConfigSources src = { .path = path };
        g_autoptr(GPtrArray) warnings = NULL;
        g_autoptr(Config) c = load_ok(&src, &warnings);

        assert_message(warnings, "router.conf", "'Prot'", "[Router]", "ignoring");
        assert_message(warnings, "'BaseUrl'", "[Provider p]", "ignoring");
        assert_message(warnings, "[Providers]", "ignoring");
        assert_message(warnings, "[ModelMapping]", "ignoring");
        assert_n_messages(warnings, 4);
        ck_assert_uint_eq(c->port, 3001);
        ck_assert_str_eq(config_find_provider(c, "p")->base_url, "http://127.0.0.1:9/v1");
        ck_assert_uint_eq(g_hash_table_size(c->mappings), 0);
}
END_TEST

START_TEST(test_log_levels) {
        static const struct {
                const char *value;
                int level;
        } cases[] = {
                { "debug", LOG_DEBUG }, { "info", LOG_INFO },       { "notice", LOG_NOTICE }, { "warn", LOG_WARNING },
                { "warning", LOG_WARNING }, { "error", LOG_ERR },   { "err", LOG_ERR },       { "DEBUG", LOG_DEBUG },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                g_autofree char *text = g_strdup_printf("[Router]\nLogLevel=%s\n", cases[i].value);
                g_autofree char *path = write_conf("router.conf", text);
                g_autofree char *var = g_strconcat("LOG_LEVEL=", cases[i].value, NULL);
                g_auto(GStrv) env = test_environ(var, NULL);
                ConfigSources file = { .path = path }, environment = { .environ = env };
                g_autoptr(Config) a = load_ok(&file, NULL);
                g_autoptr(Config) b = load_ok(&environment, NULL);

                ck_assert_int_eq(a->log_level, cases[i].level);
                ck_assert_int_eq(b->log_level, cases[i].level);
        }
}
END_TEST

START_TEST(test_warnings_returned_on_failure) {
        g_autofree char *path = write_conf("router.conf", "[Router]\nPort=0\nPrort=1\n");
        ConfigSources src = { .path = path };
        g_autoptr(GPtrArray) errors = NULL, warnings = NULL;
        Config *c = NULL;

        ck_assert_int_eq(config_load(&src, &c, &errors, &warnings), -EINVAL);
        assert_n_messages(errors, 1);
        assert_message(warnings, "'Prort'");
}
END_TEST

START_TEST(test_shipped_config) {
        g_autofree char *path = g_build_filename(SOURCE_ROOT, "data", "provider-router.conf", NULL);
        g_autofree char *dropins = g_build_filename(dir, "none.d", NULL);
        g_auto(GStrv) env = test_environ(NULL);
        ConfigSources src = { .path = path, .dropin_dir = dropins, .environ = env };
        g_autoptr(GPtrArray) warnings = NULL;
        g_autoptr(Config) c = load_ok(&src, &warnings);

        assert_plan_defaults(c);
        ck_assert_str_eq(c->sources[0], path);
        ck_assert_str_eq(g_hash_table_lookup(c->mappings, "qwen3-coder"), "lm-studio");
        /* Only the optional qwen-direct key may be missing; no unknown keys. */
        ck_assert(!test_messages_match(warnings, "unknown", NULL));
}
END_TEST

START_TEST(test_parse_boolean) {
        static const char *const yes[] = { "1", "yes", "YES", "y", "true", "True", "t", "on" };
        static const char *const no[] = { "0", "no", "n", "false", "FALSE", "f", "off", "Off" };
        static const char *const bad[] = { "", "2", "yess", "enable", " true", "-1" };

        for (size_t i = 0; i < ELEMENTSOF(yes); i++)
                ck_assert_int_eq(parse_boolean(yes[i]), 1);
        for (size_t i = 0; i < ELEMENTSOF(no); i++)
                ck_assert_int_eq(parse_boolean(no[i]), 0);
        for (size_t i = 0; i < ELEMENTSOF(bad); i++)
                ck_assert_int_eq(parse_boolean(bad[i]), -EINVAL);
        ck_assert_int_eq(parse_boolean(NULL), -EINVAL);
}
END_TEST

START_TEST(test_parse_size) {
        static const struct {
                const char *s;
                uint64_t v;
        } good[] = {
                { "0", 0 },
                { "1024", 1024 },
                { "1K", 1024 },
                { "1k", 1024 },
                { "2KB", 2048 },
                { "2KiB", 2048 },
                { "2Ki", 2048 },
                { "8M", 8ULL << 20 },
                { "8MiB", 8ULL << 20 },
                { "3G", 3ULL << 30 },
                { "18446744073709551615", UINT64_MAX },
        };
        static const char *const bad[] = { "", "K", "-1", "+1", " 1", "1 ", "1X", "1KX", "1KBB", "1KiBB", "1KiB ",
                                           "1.5M", "0x10", "18446744073709551616", "1T" };
        uint64_t v;

        for (size_t i = 0; i < ELEMENTSOF(good); i++) {
                v = 7;
                ck_assert_msg(parse_size(good[i].s, &v) == 0, "'%s' refused", good[i].s);
                ck_assert_uint_eq(v, good[i].v);
        }
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                v = 7;
                ck_assert_msg(parse_size(bad[i], &v) < 0, "'%s' accepted", bad[i]);
                ck_assert_uint_eq(v, 7);
        }
        ck_assert_int_eq(parse_size("17179869184G", &v), -ERANGE);
        ck_assert_int_lt(parse_size(NULL, &v), 0);
}
END_TEST

START_TEST(test_parse_seconds) {
        usec_t u;

        ck_assert_int_eq(parse_seconds("120", &u), 0);
        ck_assert_uint_eq(u, 120 * USEC_PER_SEC);
        ck_assert_int_eq(parse_seconds("0.5", &u), 0);
        ck_assert_uint_eq(u, 500 * USEC_PER_MSEC);
        ck_assert_int_eq(parse_seconds("31536000", &u), 0);
        ck_assert_uint_eq(u, 31536000 * USEC_PER_SEC);

        static const char *const bad[] = { "", "0", "-1", "abc", "1s", "nan", "inf", "31536001", "0.0000001" };
        for (size_t i = 0; i < ELEMENTSOF(bad); i++) {
                u = 7;
                ck_assert_msg(parse_seconds(bad[i], &u) < 0, "'%s' accepted", bad[i]);
        }
        ck_assert_int_lt(parse_seconds(NULL, &u), 0);
}
END_TEST

START_TEST(test_names) {
        char longname[PROVIDER_NAME_MAX + 2];
        char longmodel[MODEL_NAME_MAX + 2];

        ck_assert(provider_name_is_valid("lm-studio"));
        ck_assert(provider_name_is_valid("a_b.c-D9"));
        ck_assert(!provider_name_is_valid(""));
        ck_assert(!provider_name_is_valid(NULL));
        ck_assert(!provider_name_is_valid("a b"));
        ck_assert(!provider_name_is_valid("a/b"));
        ck_assert(!provider_name_is_valid("a:b"));
        ck_assert(!provider_name_is_valid("a,b"));
        ck_assert(!provider_name_is_valid("é"));
        memset(longname, 'a', sizeof(longname));
        longname[PROVIDER_NAME_MAX] = 0;
        ck_assert(provider_name_is_valid(longname));
        longname[PROVIDER_NAME_MAX] = 'a';
        longname[PROVIDER_NAME_MAX + 1] = 0;
        ck_assert(!provider_name_is_valid(longname));

        ck_assert(model_name_is_valid("qwen3-coder"));
        ck_assert(model_name_is_valid("llama3:8b"));
        ck_assert(model_name_is_valid("org/model name with spaces"));
        ck_assert(model_name_is_valid("модель"));
        ck_assert(!model_name_is_valid(""));
        ck_assert(!model_name_is_valid(NULL));
        ck_assert(!model_name_is_valid("a\nb"));
        ck_assert(!model_name_is_valid("a\x7f"));
        ck_assert(!model_name_is_valid("\xff\xfe"));
        memset(longmodel, 'm', sizeof(longmodel));
        longmodel[MODEL_NAME_MAX] = 0;
        ck_assert(model_name_is_valid(longmodel));
        longmodel[MODEL_NAME_MAX] = 'm';
        longmodel[MODEL_NAME_MAX + 1] = 0;
        ck_assert(!model_name_is_valid(longmodel));
}
END_TEST

START_TEST(test_provider_kind_strings) {
        ck_assert_str_eq(provider_kind_to_string(PROVIDER_KIND_OPENAI), "openai");
        ck_assert_str_eq(provider_kind_to_string(PROVIDER_KIND_ECHO), "echo");
        ck_assert_ptr_null(provider_kind_to_string(_PROVIDER_KIND_MAX));
        ck_assert_ptr_null(provider_kind_to_string(_PROVIDER_KIND_INVALID));
        ck_assert_int_eq(provider_kind_from_string("openai"), PROVIDER_KIND_OPENAI);
        ck_assert_int_eq(provider_kind_from_string("echo"), PROVIDER_KIND_ECHO);
        ck_assert_int_eq(provider_kind_from_string("Echo"), _PROVIDER_KIND_INVALID);
        ck_assert_int_eq(provider_kind_from_string(NULL), _PROVIDER_KIND_INVALID);
}
END_TEST

START_TEST(test_provider_config_refcount) {
        g_autoptr(Config) c = config_new_default();
        ProviderConfig *p = provider_config_ref(config_find_provider(c, "lm-studio"));

        /* A request keeps its provider across a reload that frees the configuration. */
        g_clear_pointer(&c, config_free);
        ck_assert_str_eq(p->name, "lm-studio");
        ck_assert_ptr_null(provider_config_unref(p));
        ck_assert_ptr_null(provider_config_unref(NULL));
        ck_assert_ptr_null(provider_config_ref(NULL));
        ck_assert_ptr_null(config_free(NULL));
}
END_TEST

/* ---- values that cannot be read are errors, never skipped ---------------------------- */

START_TEST(test_value_not_utf8) {
        static const BadCase cases[] = {
                /* Skipped, this turned authentication off while --check-config said OK. */
                { "[Router]\nClientTokensFile=/etc/tok\xe9ns\n", NULL,
                  { "bad.conf", "[Router]", "ClientTokensFile=", "not valid UTF-8" } },
                /* Skipped, this left CORS at its default. */
                { "[Router]\nCORSAllowOrigin=https://caf\xe9.example\n", NULL,
                  { "bad.conf", "[Router]", "CORSAllowOrigin=", "not valid UTF-8" } },
                { "[Router]\nDefaultProvider=\xff\n", NULL, { "[Router]", "DefaultProvider=", "not valid UTF-8" } },
                { ONE_PROVIDER "APIKeyFile=/k\xe9y\n", NULL, { "[Provider p]", "APIKeyFile=", "not valid UTF-8" } },
                { ONE_PROVIDER "Models=a;b\xe9\n", NULL, { "[Provider p]", "Models=", "not valid UTF-8" } },
                { ONE_PROVIDER "Fallbacks=\xe9\n", NULL, { "[Provider p]", "Fallbacks=", "not valid UTF-8" } },
                { P_HEAD "BaseURL=http://127.0.0.1:9/\xe9\n", NULL, { "[Provider p]", "BaseURL=", "not valid UTF-8" }, 2 },
                { ONE_PROVIDER "[ModelMappings]\nm=\xe9\n", NULL, { "[ModelMappings]", "m=", "not valid UTF-8" } },
                /* An unknown key is still a value that was meant to say something. */
                { "[Router]\nNoSuchKey=\xe9\n", NULL, { "NoSuchKey=", "not valid UTF-8" } },
                { "", "DEFAULT_PROVIDER=caf\xe9", { "environment", "DEFAULT_PROVIDER", "not valid UTF-8" } },
                { "", "QWEN_API_KEY=sk-\xe9", { "environment", "QWEN_API_KEY", "not valid UTF-8" } },
        };

        check_bad_cases(cases, ELEMENTSOF(cases));
}
END_TEST

START_TEST(test_value_unreadable) {
        static const BadCase cases[] = {
                /* GLib hands back the raw text with an error; the error counts. */
                { "[Router]\nCORSAllowOrigin=a\\qb\n", NULL, { "[Router]", "CORSAllowOrigin=", "escape sequence" } },
                { "[Router]\nClientTokensFile=/etc/to\\kens\n", NULL, { "ClientTokensFile=", "escape sequence" } },
                /* Escaped control characters: a line break would end a header the value goes into. */
                { "[Router]\nCORSAllowOrigin=https://a.example\\r\\nSet-Cookie: x=1\n", NULL,
                  { "[Router]", "CORSAllowOrigin=", "control character", "0x0d" } },
                { "[Router]\nHost=127.0.0.1\\t\n", NULL, { "Host=", "control character", "0x09" } },
                { ONE_PROVIDER "Fallbacks=echo;\\necho\n", NULL, { "Fallbacks=", "control character" } },
        };
        static const char with_nul[] = "[Router]\nClientTokensFile=/etc/to\0kens\n";
        g_autofree char *path = g_build_filename(dir, "nul.conf", NULL);
        ConfigSources src = { .path = path };
        g_autoptr(GPtrArray) errors = NULL;

        check_bad_cases(cases, ELEMENTSOF(cases));

        /* A NUL byte would silently cut the line it is on: here the token file's name. */
        ck_assert(g_file_set_contents(path, with_nul, sizeof(with_nul) - 1, NULL));
        errors = load_fail(&src);
        assert_n_messages(errors, 1);
        assert_message(errors, "nul.conf", "NUL byte");
}
END_TEST

START_TEST(test_list_escaped_separator) {
        g_autofree char *path = write_conf("router.conf", ONE_PROVIDER "Models=a\\;b;c\n");
        ConfigSources src = { .path = path };
        g_autoptr(Config) c = load_ok(&src, NULL);
        ProviderConfig *p = config_find_provider(c, "p");

        ck_assert_str_eq(p->models[0], "a;b");
        ck_assert_str_eq(p->models[1], "c");
        ck_assert_ptr_null(p->models[2]);
}
END_TEST

/* ---- files that are not regular files are refused at once ----------------------------- */

static char *make_fifo(const char *name) {
        char *path = g_build_filename(dir, name, NULL);
        g_autofree char *parent = g_path_get_dirname(path);

        ck_assert_int_eq(g_mkdir_with_parents(parent, 0700), 0);
        ck_assert_int_eq(mkfifo(path, 0600), 0);
        return path;
}

START_TEST(test_fifo_refused_without_blocking) {
        g_autofree char *key = make_fifo("key-fifo");
        g_autofree char *tokens = make_fifo("tokens-fifo");
        g_autofree char *cred = make_fifo("credentials/q-key");
        g_autofree char *creds = g_path_get_dirname(cred);
        g_autofree char *conf = g_strdup_printf(
                "[Router]\nDefaultProvider=p\nClientTokensFile=%s\n"
                "[Provider p]\nBaseURL=http://127.0.0.1:9/v1\nAPIKeyFile=%s\n"
                "[Provider q]\nBaseURL=http://127.0.0.1:9/v1\nAPIKeyCredential=q-key\n", tokens, key);
        g_autofree char *path = write_conf("router.conf", conf);
        ConfigSources src = { .path = path, .credentials_dir = creds };
        g_autoptr(GPtrArray) errors = NULL;
        usec_t start = now_usec(CLOCK_MONOTONIC);

        /* Nobody ever writes to the FIFOs: open() without O_NONBLOCK would wait forever. */
        errors = load_fail(&src);
        ck_assert_uint_lt(now_usec(CLOCK_MONOTONIC) - start, 5 * USEC_PER_SEC);
        assert_n_messages(errors, 3);
        assert_message(errors, "'p'", "APIKeyFile=", key, "not a regular file");
        assert_message(errors, "ClientTokensFile=", tokens, "not a regular file");
        assert_message(errors, "'q'", "credential 'q-key'", "not a regular file");
}
END_TEST

START_TEST(test_fifo_config_files_refused) {
        g_autofree char *main_fifo = make_fifo("main.conf");
        g_autofree char *dropin_fifo = make_fifo("other.conf.d/50-fifo.conf");
        g_autofree char *other = write_conf("other.conf", "[Router]\nPort=3002\n");
        ConfigSources src_main = { .path = main_fifo, .path_required = true };
        ConfigSources src_dropin = { .path = other };
        g_autoptr(GPtrArray) errors_main = NULL, errors_dropin = NULL;

        errors_main = load_fail(&src_main);
        assert_n_messages(errors_main, 1);
        assert_message(errors_main, main_fifo, "not a regular file");

        errors_dropin = load_fail(&src_dropin);
        assert_n_messages(errors_dropin, 1);
        assert_message(errors_dropin, "50-fifo.conf", "not a regular file");
}
END_TEST

START_TEST(test_dropin_directory_named_conf_refused) {
        g_autofree char *path = write_conf("router.conf", "[Router]\nPort=3002\n");
        g_autofree char *d = g_build_filename(dir, "router.conf.d", "50-dir.conf", NULL);
        ConfigSources src = { .path = path };
        g_autoptr(GPtrArray) errors = NULL;

        ck_assert_int_eq(g_mkdir_with_parents(d, 0755), 0);
        errors = load_fail(&src);
        assert_n_messages(errors, 1);
        assert_message(errors, "50-dir.conf", "directory");
}
END_TEST

/* ---- keys with control characters would inject headers ---------------------------------- */

START_TEST(test_key_with_line_break_refused) {
        static const char *const bad_keys[] = {
                "sk-abc\r\nX-Injected: 1\n",
                "sk-abc\nX-Injected: 1",
                "sk-\x1b[31mabc",
                "sk-abc\tdef",
                "sk-abc\x7f",
        };

        for (size_t i = 0; i < ELEMENTSOF(bad_keys); i++) {
                g_autofree char *key = test_write_file(dir, "secret-key", 0600, bad_keys[i]);
                g_autofree char *conf = g_strdup_printf(ONE_PROVIDER "APIKeyFile=%s\n", key);
                g_autofree char *path = write_conf("router.conf", conf);
                ConfigSources src = { .path = path };
                g_autoptr(GPtrArray) errors = load_fail(&src);

                assert_n_messages(errors, 1);
                assert_message(errors, "'p'", key, "control character", "inject a header");
                ck_assert(!test_messages_match(errors, "sk-abc", NULL));
        }
}
END_TEST

START_TEST(test_key_with_nul_refused) {
        static const char key_text[] = "sk-abc\0def\n";
        g_autofree char *key = g_build_filename(dir, "secret-key", NULL);
        g_autofree char *conf = g_strdup_printf(ONE_PROVIDER "APIKeyFile=%s\n", key);
        g_autofree char *path = write_conf("router.conf", conf);
        ConfigSources src = { .path = path };
        g_autoptr(GPtrArray) errors = NULL;

        ck_assert(g_file_set_contents(key, key_text, sizeof(key_text) - 1, NULL));
        ck_assert_int_eq(chmod(key, 0600), 0);
        errors = load_fail(&src);
        assert_n_messages(errors, 1);
        assert_message(errors, "'p'", "APIKeyFile=", "NUL byte");
}
END_TEST

START_TEST(test_key_credential_and_env_with_line_break_refused) {
        g_autofree char *creds = g_build_filename(dir, "credentials", NULL);
        g_autofree char *cred = test_write_file(creds, "p-key", 0600, "sk-cred\r\nX-Injected: 1\n");
        g_autofree char *path = write_conf("router.conf",
                "[Router]\nDefaultProvider=echo\n[Provider echo]\nKind=echo\n"
                "[Provider p]\nBaseURL=http://127.0.0.1:9/v1\nAPIKeyCredential=p-key\n"
                "[Provider q]\nBaseURL=http://127.0.0.1:9/v1\nAPIKeyEnv=Q_KEY\n");
        g_auto(GStrv) env = test_environ("Q_KEY=sk-env\nX-Injected: 1", "QWEN_API_KEY=sk-qwen\r", NULL);
        ConfigSources src = { .path = path, .environ = env, .credentials_dir = creds };
        g_autoptr(GPtrArray) errors = load_fail(&src);

        assert_n_messages(errors, 3);
        assert_message(errors, "'p'", "credential 'p-key'", "control character");
        assert_message(errors, "'q'", "environment variable Q_KEY", "control character");
        assert_message(errors, "'qwen-direct'", "QWEN_API_KEY", "control character");
        ck_assert(!test_messages_match(errors, "sk-", NULL));
}
END_TEST

static char *tokens_conf(const char *tokens_text, char **ret_tokens_path) {
        g_autofree char *tokens = test_write_file(dir, "client-tokens", 0600, tokens_text);
        g_autofree char *conf = g_strdup_printf("[Router]\nClientTokensFile=%s\n", tokens);

        *ret_tokens_path = TAKE_PTR(tokens);
        return write_conf("router.conf", conf);
}

START_TEST(test_client_tokens) {
        g_autofree char *tokens = NULL;
        g_autofree char *path = tokens_conf("# comment\n\n  token-one  \r\ntoken-two\n", &tokens);
        ConfigSources src = { .path = path };
        g_autoptr(Config) c = load_ok(&src, NULL);
        g_autofree char *one = config_token_digest("token-one", 9);
        g_autofree char *two = config_token_digest("token-two", 9);

        ck_assert_ptr_nonnull(c->client_token_digests);
        ck_assert_uint_eq(c->client_token_digests->len, 2);
        ck_assert_str_eq(c->client_token_digests->pdata[0], one);
        ck_assert_str_eq(c->client_token_digests->pdata[1], two);
}
END_TEST

START_TEST(test_client_tokens_problems) {
        static const struct {
                const char *text;
                mode_t mode;
                const char *words[3];
                unsigned n_errors;
        } cases[] = {
                { "good\nbad\x1btoken\n", 0600, { "line 2", "control character" }, 1 },
                { "good\nsecond\0third\n", 0600, { "NUL byte" }, 1 },
                { "# only a comment\n", 0600, { "contain no token" }, 1 },
                { "\n", 0600, { "empty" }, 1 },
                { "token\n", 0644, { "readable by everyone" }, 1 },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                g_autofree char *tokens = g_build_filename(dir, "client-tokens", NULL);
                g_autofree char *conf = g_strdup_printf("[Router]\nClientTokensFile=%s\n", tokens);
                g_autofree char *path = write_conf("router.conf", conf);
                ConfigSources src = { .path = path };
                g_autoptr(GPtrArray) errors = NULL;
                size_t n = strlen(cases[i].text);

                if (strstr(cases[i].words[0], "NUL"))
                        n = sizeof("good\nsecond\0third\n") - 1;
                ck_assert(g_file_set_contents(tokens, cases[i].text, (gssize) n, NULL));
                ck_assert_int_eq(chmod(tokens, cases[i].mode), 0);
                errors = load_fail(&src);
                assert_n_messages(errors, cases[i].n_errors);
                assert_message(errors, "client-tokens", cases[i].words[0], cases[i].words[1]);
        }
}
END_TEST

/* ---- scale ---------------------------------------------------------------------------- */

/* Every provider names a fallback, so each is looked up by name twice or more while loading:
 * with a linear lookup, 50,000 of them took about 30 s; with the table, well under one. */
START_TEST(test_many_providers_load_fast) {
        const unsigned n = 50000;
        g_autoptr(GString) text = g_string_new("[Router]\nDefaultProvider=p0\nMaxRoutes=100000\n");
        g_autofree char *path = NULL;
        ConfigSources src = {};
        g_autoptr(Config) c = NULL;
        usec_t start;

        for (unsigned i = 0; i < n; i++)
                g_string_append_printf(text, "[Provider p%u]\nBaseURL=http://127.0.0.1:9/v1\nFallbacks=p%u\n"
                                       "[ModelMappings]\nm%u=p%u\n", i, (i + 1) % n, i, i);
        path = write_conf("many.conf", text->str);
        src.path = path;

        start = now_usec(CLOCK_MONOTONIC);
        c = load_ok(&src, NULL);
        ck_assert_uint_eq(c->providers->len, n);
        ck_assert_ptr_eq(config_find_provider(c, "p49999"), c->providers->pdata[n - 1]);
        ck_assert_msg(now_usec(CLOCK_MONOTONIC) - start < 10 * USEC_PER_SEC, "loading %u providers took %.1f s", n,
                      (double) (now_usec(CLOCK_MONOTONIC) - start) / USEC_PER_SEC);
}
END_TEST

/* ---- every default the man page documents is the code's ------------------------------- */

typedef enum FieldType {
        FIELD_STRING,
        FIELD_BOOL,
        FIELD_USEC,
        FIELD_U64,
        FIELD_UNSIGNED,
        FIELD_PORT,
        FIELD_INT,
        FIELD_KIND,
        FIELD_NONE,       /* a default in words: checked by a function of its own */
} FieldType;

typedef struct DocumentedDefault {
        const char *group;          /* "Router" or "Provider" */
        const char *key;
        FieldType type;
        size_t offset;              /* in Config for [Router], in ProviderConfig for [Provider] */
        const char *words;          /* FIELD_NONE: the documented words, e.g. "none" */
        void (*check)(const Config *c, const ProviderConfig *p);
} DocumentedDefault;

static void check_first_byte_default(const Config *c, const ProviderConfig *p) {
        /* "Default: the value of RequestTimeoutSec=" */
        ck_assert_uint_eq(c->first_byte_timeout_usec, USEC_INFINITY);
        ck_assert_uint_eq(p->first_byte_timeout_usec, p->request_timeout_usec);
}

static void check_no_client_tokens(const Config *c, const ProviderConfig *p) {
        /* "Default: unset, every client is served." */
        ck_assert_ptr_null(c->client_tokens_credential);
        ck_assert_ptr_null(c->client_tokens_file);
        ck_assert_ptr_null(c->client_token_digests);
}

static void check_no_fallbacks(const Config *c, const ProviderConfig *p) {
        ck_assert_ptr_null(p->fallbacks);
}

static void check_no_cors(const Config *c, const ProviderConfig *p) {
        /* "Default: empty": no CORS headers at all. */
        ck_assert_ptr_null(c->cors_allow_origin);
}

static void check_no_allowed_hosts(const Config *c, const ProviderConfig *p) {
        ck_assert_ptr_null(c->allowed_hosts);
}

#define ROUTER(k, f, t) { "Router", k, t, offsetof(Config, f), NULL, NULL }
#define PROVIDER(k, f, t) { "Provider", k, t, offsetof(ProviderConfig, f), NULL, NULL }

/* Every key whose default provider-router.conf(5) states. A default added to the page must be
 * added here, so that the page and the code cannot drift apart again (MaxRetries= once said 2
 * while the code used 0). */
static const DocumentedDefault documented_defaults[] = {
        ROUTER("Host", host, FIELD_STRING),
        ROUTER("Port", port, FIELD_PORT),
        ROUTER("DefaultProvider", default_provider, FIELD_STRING),
        ROUTER("AllowProviderOverride", allow_provider_override, FIELD_BOOL),
        ROUTER("RequestTimeoutSec", request_timeout_usec, FIELD_USEC),
        ROUTER("ConnectTimeoutSec", connect_timeout_usec, FIELD_USEC),
        { "Router", "FirstByteTimeoutSec", FIELD_NONE, 0, "the value of *RequestTimeoutSec=*", check_first_byte_default },
        ROUTER("StreamIdleTimeoutSec", stream_idle_timeout_usec, FIELD_USEC),
        ROUTER("ClientTimeoutSec", client_timeout_usec, FIELD_USEC),
        ROUTER("ShutdownTimeoutSec", shutdown_timeout_usec, FIELD_USEC),
        ROUTER("LogLevel", log_level, FIELD_INT),
        ROUTER("LogRequests", log_requests, FIELD_BOOL),
        ROUTER("LogResponses", log_responses, FIELD_BOOL),
        ROUTER("MaxBodySize", max_body_size, FIELD_U64),
        ROUTER("MaxResponseSize", max_response_size, FIELD_U64),
        ROUTER("MaxHeaderSize", max_header_size, FIELD_U64),
        ROUTER("StreamBufferSize", stream_buffer_size, FIELD_U64),
        ROUTER("MaxConnections", max_connections, FIELD_UNSIGNED),
        { "Router", "CORSAllowOrigin", FIELD_NONE, 0, "empty", check_no_cors },
        { "Router", "AllowedHosts", FIELD_NONE, 0, "empty", check_no_allowed_hosts },
        ROUTER("MaxBufferedSize", max_buffered_size, FIELD_U64),
        ROUTER("MaxRoutes", max_routes, FIELD_UNSIGNED),
        PROVIDER("ClientAuthorization", client_authorization, FIELD_INT),
        { "Router", "ClientTokensCredential", FIELD_NONE, 0, "unset, every client is served", check_no_client_tokens },
        { "Router", "ClientTokensFile", FIELD_NONE, 0, "unset, every client is served", check_no_client_tokens },
        ROUTER("FailureThreshold", failure_threshold, FIELD_UNSIGNED),
        ROUTER("CooldownSec", cooldown_usec, FIELD_USEC),
        ROUTER("MaxCooldownSec", max_cooldown_usec, FIELD_USEC),
        ROUTER("RetryBackoffSec", retry_backoff_usec, FIELD_USEC),
        ROUTER("MaxRetryWaitSec", max_retry_wait_usec, FIELD_USEC),
        ROUTER("ModelsCacheSec", models_cache_usec, FIELD_USEC),
        PROVIDER("Kind", kind, FIELD_KIND),
        PROVIDER("MaxConcurrent", max_concurrent, FIELD_UNSIGNED),
        { "Provider", "Fallbacks", FIELD_NONE, 0, "none", check_no_fallbacks },
        PROVIDER("MaxRetries", max_retries, FIELD_UNSIGNED),
        ROUTER("MirrorMaxConcurrent", mirror_max_concurrent, FIELD_UNSIGNED),
        ROUTER("ComparisonsKept", comparisons_kept, FIELD_UNSIGNED),
};

static char *field_to_string(FieldType type, const void *base, size_t offset) {
        const char *f = (const char *) base + offset;

        switch (type) {
        case FIELD_STRING:
                return g_strdup_printf("'%s'", strna(*(char *const *) f));
        case FIELD_BOOL:
                return g_strdup(yes_no(*(const bool *) f));
        case FIELD_USEC:
                return g_strdup_printf("%" PRIu64 " µs", (uint64_t) *(const usec_t *) f);
        case FIELD_U64:
                return g_strdup_printf("%" PRIu64, *(const uint64_t *) f);
        case FIELD_UNSIGNED:
                return g_strdup_printf("%u", *(const unsigned *) f);
        case FIELD_PORT:
                return g_strdup_printf("%u", (unsigned) *(const uint16_t *) f);
        case FIELD_INT:
                return g_strdup_printf("%i", *(const int *) f);
        case FIELD_KIND:
                return g_strdup(strna(provider_kind_to_string(*(const ProviderKind *) f)));
        case FIELD_NONE:
                break;
        }
        g_assert_not_reached();
}

/* One documented default as the page states it: a literal ("*8M*", unescaped) or words. */
typedef struct PageDefault {
        char *group;
        char *key;
        char *literal;   /* NULL for a default in words */
        char *words;
} PageDefault;

static void page_default_free(gpointer p) {
        PageDefault *d = p;
        g_free(d->group);
        g_free(d->key);
        g_free(d->literal);
        g_free(d->words);
        g_free(d);
}

/* scdoc: *bold* with \* and \_ for literal characters. Returns the text between the first pair
 * of unescaped '*' at the start of s, unescaped; NULL if s does not start with one. */
static char *scd_bold_at(const char *s, const char **ret_end) {
        g_autoptr(GString) out = g_string_new(NULL);

        if (s[0] != '*')
                return NULL;
        for (const char *c = s + 1; *c; c++) {
                if (c[0] == '\\' && c[1]) {
                        g_string_append_c(out, *++c);
                        continue;
                }
                if (c[0] == '*') {
                        if (ret_end)
                                *ret_end = c + 1;
                        return g_string_free(g_steal_pointer(&out), FALSE);
                }
                g_string_append_c(out, *c);
        }
        return NULL;
}

static void page_add_defaults(GPtrArray *out, const char *group, char **keys, const char *text) {
        const char *d = strstr(text, "Default: ");
        g_autofree char *literal = NULL, *words = NULL;
        const char *t;

        if (d) {
                d += STRLEN("Default: ");
                /* A value in bold, or words, up to the end of the sentence. */
                literal = scd_bold_at(d, NULL);
                t = strstr(d, ". ");
                words = t ? g_strndup(d, (gsize) (t - d)) : g_strdup(d);
                if (g_str_has_suffix(words, "."))
                        words[strlen(words) - 1] = 0;
        } else if ((t = strstr(text, " (the default)"))) {
                /* "*openai* (the default) for …": the bold word just before it. */
                const char *start = t;
                while (start > text && start[-1] != ' ')
                        start--;
                literal = scd_bold_at(start, NULL);
                words = g_strndup(start, (gsize) (t - start));
        } else
                return;

        for (char **k = keys; *k; k++) {
                PageDefault *pd = g_new0(PageDefault, 1);
                pd->group = g_strdup(group);
                pd->key = g_strdup(*k);
                pd->literal = g_strdup(literal);
                pd->words = g_strdup(words);
                g_ptr_array_add(out, pd);
        }
}

/* The documented defaults of the [Router] and [Provider NAME] sections: every key heading
 * ("*Key=*" or "*A=*, *B=*" on a line of its own) and its tab-indented description. */
static GPtrArray *page_defaults(const char *page_path) {
        GPtrArray *out = g_ptr_array_new_with_free_func(page_default_free);
        g_autofree char *page = NULL;
        g_auto(GStrv) lines = NULL;
        g_auto(GStrv) keys = NULL;
        g_autoptr(GString) text = g_string_new(NULL);
        const char *group = NULL;

        ck_assert_msg(g_file_get_contents(page_path, &page, NULL, NULL), "cannot read %s", page_path);
        lines = g_strsplit(page, "\n", -1);
        for (char **l = lines; ; l++) {
                bool heading = *l && (*l)[0] == '*' && strstr(*l, "=*");

                if (keys && (!*l || (*l)[0] != '\t')) {
                        /* The end of one key's paragraph. */
                        if (group)
                                page_add_defaults(out, group, keys, text->str);
                        g_clear_pointer(&keys, g_strfreev);
                        g_string_truncate(text, 0);
                }
                if (!*l)
                        break;
                if (g_str_has_prefix(*l, "# ")) {
                        group = g_str_has_prefix(*l, "# [Router]") ? "Router" :
                                g_str_has_prefix(*l, "# [Provider") ? "Provider" : NULL;
                        continue;
                }
                if (heading) {
                        GPtrArray *b = g_ptr_array_new();
                        for (const char *c = *l; (c = strchr(c, '*')); ) {
                                const char *end = NULL;
                                char *bold = scd_bold_at(c, &end);
                                if (!bold)
                                        break;
                                if (g_str_has_suffix(bold, "=")) {
                                        bold[strlen(bold) - 1] = 0;
                                        g_ptr_array_add(b, bold);
                                } else
                                        g_free(bold);
                                c = end;
                        }
                        g_ptr_array_add(b, NULL);
                        keys = (char **) g_ptr_array_free(b, FALSE);
                        continue;
                }
                if (keys) {
                        if (text->len > 0)
                                g_string_append_c(text, ' ');
                        g_string_append(text, *l + 1);
                }
        }
        return out;
}

static const DocumentedDefault *find_documented_default(const char *group, const char *key) {
        for (size_t i = 0; i < ELEMENTSOF(documented_defaults); i++)
                if (streq(documented_defaults[i].group, group) && streq(documented_defaults[i].key, key))
                        return &documented_defaults[i];
        return NULL;
}

#define PROVIDER_BASE "[Router]\nDefaultProvider=p\n[Provider p]\nBaseURL=http://127.0.0.1:9/v1\n"

/* The configuration of a file with nothing set but, optionally, "Key=value" in the group. */
static Config *load_with(const char *group, const char *key, const char *value) {
        g_autofree char *text = NULL;
        g_autofree char *path = NULL;
        g_autofree char *dropins = g_build_filename(dir, "none.d", NULL);
        g_auto(GStrv) env = test_environ(NULL);
        ConfigSources src = { .dropin_dir = dropins, .environ = env };

        if (streq(group, "Router"))
                text = key ? g_strdup_printf("[Router]\n%s=%s\n", key, value) : g_strdup("");
        else
                text = key ? g_strdup_printf(PROVIDER_BASE "%s=%s\n", key, value) : g_strdup(PROVIDER_BASE);
        path = write_conf("defaults.conf", text);
        src.path = path;
        return load_ok(&src, NULL);
}

START_TEST(test_man_page_defaults) {
        g_autofree char *page_path = g_build_filename(SOURCE_ROOT, "man", "provider-router.conf.5.scd", NULL);
        g_autoptr(GPtrArray) page = page_defaults(page_path);
        g_autoptr(GString) problems = g_string_new(NULL);

        /* Every default on the page is held against the code. */
        for (guint i = 0; i < page->len; i++) {
                const PageDefault *pd = page->pdata[i];
                const DocumentedDefault *dd = find_documented_default(pd->group, pd->key);
                g_autoptr(Config) code = NULL, documented = NULL;
                const void *code_base, *doc_base;
                g_autofree char *code_value = NULL, *doc_value = NULL;

                if (!dd) {
                        g_string_append_printf(problems, "\n  [%s] %s=: the page says 'Default: %s', which this test "
                                               "does not check: add the key to documented_defaults[]",
                                               pd->group, pd->key, pd->words);
                        continue;
                }
                code = load_with(pd->group, NULL, NULL);
                if (dd->type == FIELD_NONE) {
                        if (pd->literal || !streq(pd->words, dd->words))
                                g_string_append_printf(problems, "\n  [%s] %s=: the page says 'Default: %s', the test "
                                                       "expects '%s'", pd->group, pd->key, pd->words, dd->words);
                        dd->check(code, config_find_provider(code, streq(pd->group, "Router") ? "lm-studio" : "p"));
                        continue;
                }
                if (!pd->literal) {
                        g_string_append_printf(problems, "\n  [%s] %s=: the page says 'Default: %s', not a value",
                                               pd->group, pd->key, pd->words);
                        continue;
                }

                /* The documented value, read by the parser itself, must give what no value gives. */
                documented = load_with(pd->group, pd->key, pd->literal);
                if (streq(pd->group, "Router")) {
                        code_base = code;
                        doc_base = documented;
                } else {
                        code_base = config_find_provider(code, "p");
                        doc_base = config_find_provider(documented, "p");
                }
                code_value = field_to_string(dd->type, code_base, dd->offset);
                doc_value = field_to_string(dd->type, doc_base, dd->offset);
                if (!streq(code_value, doc_value))
                        g_string_append_printf(problems, "\n  [%s] %s=: the page says %s (%s), the code uses %s",
                                               pd->group, pd->key, pd->literal, doc_value, code_value);
        }

        /* And every key of the table still has its default on the page. */
        for (size_t i = 0; i < ELEMENTSOF(documented_defaults); i++) {
                bool found = false;
                for (guint j = 0; j < page->len && !found; j++) {
                        const PageDefault *pd = page->pdata[j];
                        found = streq(pd->group, documented_defaults[i].group) &&
                                streq(pd->key, documented_defaults[i].key);
                }
                if (!found)
                        g_string_append_printf(problems, "\n  [%s] %s=: no documented default on the page",
                                               documented_defaults[i].group, documented_defaults[i].key);
        }

        ck_assert_msg(page->len >= ELEMENTSOF(documented_defaults), "only %u defaults found in %s", page->len, page_path);
        ck_assert_msg(problems->len == 0, "%s and the code disagree:%s", page_path, problems->str);
}
END_TEST

/* ---- TLS and proxy per provider -------------------------------------------------------- */

#define PEM_CERT "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
#define PEM_KEY "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"

START_TEST(test_tls_keys_loaded) {
        g_autofree char *ca = test_write_file(dir, "ca.pem", 0644, PEM_CERT);
        g_autofree char *cert = test_write_file(dir, "client.pem", 0644, PEM_CERT);
        g_autofree char *key = test_write_file(dir, "client.key", 0600, PEM_KEY);
        g_autofree char *creds = g_build_filename(dir, "credentials", NULL);
        g_autofree char *cred_cert = test_write_file(creds, "q-cert", 0644, PEM_CERT);
        g_autofree char *cred_key = test_write_file(creds, "q-key", 0600, PEM_KEY);
        g_autofree char *conf = g_strdup_printf(
                "[Router]\nDefaultProvider=p\n"
                "[Provider p]\nBaseURL=https://127.0.0.1:9/v1\nCAFile=%s\nClientCertificateFile=%s\n"
                "ClientKeyFile=%s\nProxy=http://127.0.0.1:3128\n"
                "[Provider q]\nBaseURL=https://127.0.0.1:9/v1\nClientCertificateCredential=q-cert\n"
                "ClientKeyCredential=q-key\nProxy=\n"
                "[Provider r]\nBaseURL=http://127.0.0.1:9/v1\nProxy=socks5h://[::1]:1080\n"
                "[Provider s]\nBaseURL=http://127.0.0.1:9/v1\n",
                ca, cert, key);
        g_autofree char *path = write_conf("router.conf", conf);
        ConfigSources src = { .path = path, .credentials_dir = creds };
        g_autoptr(GPtrArray) warnings = NULL;
        g_autoptr(Config) c = load_ok(&src, &warnings);
        ProviderConfig *p = config_find_provider(c, "p"), *q = config_find_provider(c, "q");
        ProviderConfig *r = config_find_provider(c, "r"), *s = config_find_provider(c, "s");

        assert_n_messages(warnings, 0);
        ck_assert_str_eq(p->ca_file, ca);
        ck_assert_str_eq(p->client_cert_file, cert);
        ck_assert_str_eq(p->client_key_file, key);
        ck_assert_ptr_null(p->client_cert_blob);
        ck_assert_ptr_null(p->client_key_blob);
        ck_assert(p->proxy_set);
        ck_assert_str_eq(p->proxy, "http://127.0.0.1:3128");

        /* Credentials are read into memory. */
        ck_assert_uint_eq(q->client_cert_blob_size, strlen(PEM_CERT));
        ck_assert(memcmp(q->client_cert_blob, PEM_CERT, strlen(PEM_CERT)) == 0);
        ck_assert_uint_eq(q->client_key_blob_size, strlen(PEM_KEY));
        ck_assert(memcmp(q->client_key_blob, PEM_KEY, strlen(PEM_KEY)) == 0);
        /* Proxy= empty: explicitly none; unset: the environment decides. */
        ck_assert(q->proxy_set);
        ck_assert_ptr_null(q->proxy);
        ck_assert(r->proxy_set);
        ck_assert_str_eq(r->proxy, "socks5h://[::1]:1080");
        ck_assert(!s->proxy_set);
        ck_assert_ptr_null(s->proxy);
        ck_assert_ptr_null(s->ca_file);
}
END_TEST

START_TEST(test_tls_keys_refused) {
        g_autofree char *cert = test_write_file(dir, "client.pem", 0644, PEM_CERT);
        g_autofree char *loose = test_write_file(dir, "loose.key", 0644, PEM_KEY);
        g_autofree char *key = test_write_file(dir, "client.key", 0600, PEM_KEY);
        g_autofree char *not_pem = test_write_file(dir, "ca.der", 0644, "\x30\x82 binary");
        g_autofree char *conf = g_strdup_printf(
                "[Router]\nDefaultProvider=a\n"
                "[Provider a]\nBaseURL=https://127.0.0.1:9/v1\nCAFile=/nonexistent/ca.pem\n"
                "[Provider b]\nBaseURL=https://127.0.0.1:9/v1\nCAFile=%s\n"
                "[Provider c]\nBaseURL=https://127.0.0.1:9/v1\nClientCertificateFile=%s\nClientKeyFile=%s\n"
                "[Provider d]\nBaseURL=https://127.0.0.1:9/v1\nClientKeyFile=%s\n"
                "[Provider e]\nBaseURL=https://127.0.0.1:9/v1\nClientCertificateFile=%s\n"
                "ClientCertificateCredential=e-cert\n"
                "[Provider f]\nBaseURL=https://127.0.0.1:9/v1\nProxy=not a url\n"
                "[Provider g]\nBaseURL=https://127.0.0.1:9/v1\nProxy=ftp://127.0.0.1:21\n"
                "[Provider h]\nBaseURL=https://127.0.0.1:9/v1\nCAFile=relative/ca.pem\n"
                "[Provider i]\nBaseURL=https://127.0.0.1:9/v1\nClientKeyCredential=../key\n",
                not_pem, cert, loose, key, cert);
        g_autofree char *path = write_conf("router.conf", conf);
        ConfigSources src = { .path = path };
        g_autoptr(GPtrArray) errors = load_fail(&src);

        assert_message(errors, "'a'", "CAFile='/nonexistent/ca.pem'", "No such file");
        assert_message(errors, "'b'", "CAFile=", "no PEM data");
        assert_message(errors, "'c'", "ClientKeyFile=", loose, "readable by everyone");
        assert_message(errors, "'d'", "needs a client certificate");
        assert_message(errors, "'e'", "not both");
        assert_message(errors, "'e'", "ClientCertificateCredential='e-cert'", "$CREDENTIALS_DIRECTORY is unset");
        assert_message(errors, "[Provider f]", "Proxy='not a url'");
        assert_message(errors, "[Provider g]", "Proxy='ftp://127.0.0.1:21'");
        assert_message(errors, "[Provider h]", "CAFile='relative/ca.pem'", "absolute path");
        assert_message(errors, "[Provider i]", "ClientKeyCredential='../key'", "credential name");
        assert_n_messages(errors, 10);
}
END_TEST

START_TEST(test_models_cache_sec) {
        static const struct {
                const char *value;
                usec_t want; /* USEC_INFINITY: refused */
        } cases[] = {
                { "0", 0 }, { "2.5", 2500 * USEC_PER_MSEC }, { "60", 60 * USEC_PER_SEC },
                { "-1", USEC_INFINITY }, { "soon", USEC_INFINITY }, { "", USEC_INFINITY },
        };

        for (size_t i = 0; i < ELEMENTSOF(cases); i++) {
                g_autofree char *text = g_strdup_printf("[Router]\nModelsCacheSec=%s\n", cases[i].value);
                g_autofree char *path = write_conf("router.conf", text);
                ConfigSources src = { .path = path };

                if (cases[i].want == USEC_INFINITY) {
                        g_autoptr(GPtrArray) errors = load_fail(&src);
                        assert_message(errors, "ModelsCacheSec");
                } else {
                        g_autoptr(Config) c = load_ok(&src, NULL);
                        ck_assert_uint_eq(c->models_cache_usec, cases[i].want);
                }
        }
}
END_TEST

/* Issue 11: what a web page or a client could use is off unless configured. */
START_TEST(test_safe_defaults) {
        g_autoptr(Config) c = config_new_default();

        ck_assert_ptr_null(c->cors_allow_origin);
        ck_assert_ptr_null(c->allowed_hosts);
        ck_assert_uint_eq(c->max_buffered_size, 256 * 1024 * 1024);
        ck_assert_uint_eq(c->max_routes, 10000);
}
END_TEST

START_TEST(test_max_buffered_size) {
        g_autofree char *path = write_conf("a.conf", "[Router]\nMaxBufferedSize=1G\n");
        g_autofree char *small = write_conf("b.conf", "[Router]\nMaxBufferedSize=4M\n");
        g_autofree char *bad = write_conf("c.conf", "[Router]\nMaxBufferedSize=1K\n");
        ConfigSources src = { .path = path }, src_small = { .path = small }, src_bad = { .path = bad };
        g_autoptr(Config) c = load_ok(&src, NULL);
        g_autoptr(GPtrArray) warnings = NULL;
        g_autoptr(Config) c2 = load_ok(&src_small, &warnings);
        g_autoptr(GPtrArray) errors = load_fail(&src_bad);

        ck_assert_uint_eq(c->max_buffered_size, 1024 * 1024 * 1024);
        ck_assert_uint_eq(c2->max_buffered_size, 4 * 1024 * 1024);
        assert_message(warnings, "MaxBufferedSize=4194304 is smaller than MaxBodySize=8388608");
        assert_message(errors, "MaxBufferedSize='1K' is not a size");
}
END_TEST

START_TEST(test_allowed_hosts) {
        g_autofree char *path = write_conf("a.conf",
                "[Router]\n"
                "AllowedHosts=My-Box.LAN  [FD00::1] box.example. *\n");
        ConfigSources src = { .path = path };
        g_autoptr(Config) c = load_ok(&src, NULL);

        ck_assert_ptr_nonnull(c->allowed_hosts);
        ck_assert_str_eq(c->allowed_hosts[0], "my-box.lan");
        ck_assert_str_eq(c->allowed_hosts[1], "fd00::1");
        ck_assert_str_eq(c->allowed_hosts[2], "box.example");
        ck_assert_str_eq(c->allowed_hosts[3], "*");
        ck_assert_ptr_null(c->allowed_hosts[4]);
}
END_TEST

START_TEST(test_allowed_hosts_invalid) {
        g_autofree char *path = write_conf("a.conf",
                "[Router]\n"
                "AllowedHosts=good.example bad/host\n");
        ConfigSources src = { .path = path };
        g_autoptr(GPtrArray) errors = load_fail(&src);

        assert_message(errors, "AllowedHosts= contains 'bad/host', which is not a host name or address");
}
END_TEST

START_TEST(test_client_authorization) {
        g_autofree char *path = write_conf("a.conf",
                "[Provider a]\nBaseURL=http://127.0.0.1:1/v1\n"
                "[Provider b]\nBaseURL=http://127.0.0.1:2/v1\nClientAuthorization=always\n"
                "[Provider c]\nBaseURL=http://127.0.0.1:3/v1\nClientAuthorization=never\n"
                "[Router]\nDefaultProvider=a\n");
        g_autofree char *bad = write_conf("b.conf",
                "[Provider a]\nBaseURL=http://127.0.0.1:1/v1\nClientAuthorization=sometimes\n"
                "[Router]\nDefaultProvider=a\n");
        ConfigSources src = { .path = path }, src_bad = { .path = bad };
        g_autoptr(Config) c = load_ok(&src, NULL);
        g_autoptr(GPtrArray) errors = load_fail(&src_bad);

        ck_assert_int_eq(config_find_provider(c, "a")->client_authorization, CLIENT_AUTHORIZATION_ROUTED);
        ck_assert_int_eq(config_find_provider(c, "b")->client_authorization, CLIENT_AUTHORIZATION_ALWAYS);
        ck_assert_int_eq(config_find_provider(c, "c")->client_authorization, CLIENT_AUTHORIZATION_NEVER);
        assert_message(errors, "ClientAuthorization='sometimes' must be routed, always or never");
        ck_assert_str_eq(client_authorization_to_string(CLIENT_AUTHORIZATION_ALWAYS), "always");
        ck_assert_ptr_null(client_authorization_to_string(_CLIENT_AUTHORIZATION_MAX));
}
END_TEST

START_TEST(test_max_routes) {
        g_autofree char *path = write_conf("a.conf", "[Router]\nMaxRoutes=2\n[ModelMappings]\na=echo\nb=echo\n");
        g_autofree char *over = write_conf("b.conf", "[Router]\nMaxRoutes=1\n[ModelMappings]\na=echo\nb=echo\n");
        g_autofree char *bad = write_conf("c.conf", "[Router]\nMaxRoutes=0\n");
        ConfigSources src = { .path = path }, src_over = { .path = over }, src_bad = { .path = bad };
        g_autoptr(Config) c = load_ok(&src, NULL);
        g_autoptr(GPtrArray) errors = load_fail(&src_over), errors_bad = load_fail(&src_bad);

        ck_assert_uint_eq(c->max_routes, 2);
        assert_message(errors, "2 model mappings are configured, more than MaxRoutes=1");
        assert_message(errors_bad, "MaxRoutes='0' must be between 1 and 10000000");
}
END_TEST

static Suite *config_suite(void) {
        Suite *s = suite_create("config");
        TCase *tc;

        tc = tcase_create("defaults");
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_defaults_without_file);
        tcase_add_test(tc, test_defaults_all_sources_null);
        tcase_add_test(tc, test_new_default);
        tcase_add_test(tc, test_missing_required_file);
        tcase_add_test(tc, test_shipped_config);
        suite_add_tcase(s, tc);

        tc = tcase_create("files");
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_file_with_providers);
        tcase_add_test(tc, test_file_without_providers_gets_builtins);
        tcase_add_test(tc, test_dropins_in_lexical_order);
        tcase_add_test(tc, test_dropin_dir_explicit_without_main_file);
        tcase_add_test(tc, test_dropin_error_names_file);
        suite_add_tcase(s, tc);

        tc = tcase_create("environment");
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_env_overrides_file);
        tcase_add_test(tc, test_env_qwen_proxy_gets_v1);
        tcase_add_test(tc, test_env_creates_plan_providers);
        tcase_add_test(tc, test_env_empty_values_ignored);
        tcase_add_test(tc, test_env_only_supplied_environ_is_read);
        tcase_add_test(tc, test_env_mapping_model_with_colon);
        tcase_add_test(tc, test_env_errors_all_reported);
        tcase_add_test(tc, test_env_request_timeout_zero);
        suite_add_tcase(s, tc);

        tc = tcase_create("validation");
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_validate_plan_cases);
        tcase_add_test(tc, test_validate_more_cases);
        tcase_add_test(tc, test_many_errors_all_reported);
        tcase_add_test(tc, test_errors_and_warnings_optional_outputs);
        tcase_add_test(tc, test_warnings_for_unknown_keys_and_sections);
        tcase_add_test(tc, test_warnings_returned_on_failure);
        tcase_add_test(tc, test_log_levels);
        tcase_add_test(tc, test_models_cache_sec);
        suite_add_tcase(s, tc);

        tc = tcase_create("secrets");
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_inline_api_key_refused);
        tcase_add_test(tc, test_api_key_file);
        tcase_add_test(tc, test_api_key_file_world_readable_refused);
        tcase_add_test(tc, test_api_key_file_problems);
        tcase_add_test(tc, test_credentials_dir);
        tcase_add_test(tc, test_credentials_dir_without_credential);
        tcase_add_test(tc, test_qwen_api_key_env_satisfies_default);
        tcase_add_test(tc, test_api_key_env);
        tcase_add_test(tc, test_api_key_env_missing_for_default);
        suite_add_tcase(s, tc);

        tc = tcase_create("unreadable");
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_value_not_utf8);
        tcase_add_test(tc, test_value_unreadable);
        tcase_add_test(tc, test_list_escaped_separator);
        tcase_add_test(tc, test_fifo_refused_without_blocking);
        tcase_add_test(tc, test_fifo_config_files_refused);
        tcase_add_test(tc, test_dropin_directory_named_conf_refused);
        tcase_add_test(tc, test_key_with_line_break_refused);
        tcase_add_test(tc, test_key_with_nul_refused);
        tcase_add_test(tc, test_key_credential_and_env_with_line_break_refused);
        tcase_add_test(tc, test_client_tokens);
        tcase_add_test(tc, test_client_tokens_problems);
        suite_add_tcase(s, tc);

        tc = tcase_create("tls");
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_tls_keys_loaded);
        tcase_add_test(tc, test_tls_keys_refused);
        suite_add_tcase(s, tc);

        tc = tcase_create("documentation");
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_man_page_defaults);
        suite_add_tcase(s, tc);

        tc = tcase_create("scale");
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_many_providers_load_fast);
        suite_add_tcase(s, tc);

        tc = tcase_create("parsers");
        tcase_add_test(tc, test_parse_boolean);
        tcase_add_test(tc, test_parse_size);
        tcase_add_test(tc, test_parse_seconds);
        tcase_add_test(tc, test_names);
        tcase_add_test(tc, test_provider_kind_strings);
        tcase_add_test(tc, test_provider_config_refcount);
        suite_add_tcase(s, tc);

        tc = tcase_create("safe-by-default");
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, test_safe_defaults);
        tcase_add_test(tc, test_allowed_hosts);
        tcase_add_test(tc, test_allowed_hosts_invalid);
        tcase_add_test(tc, test_client_authorization);
        tcase_add_test(tc, test_max_buffered_size);
        tcase_add_test(tc, test_max_routes);
        suite_add_tcase(s, tc);

        return s;
}

int main(void) {
        return test_run_suite(config_suite());
}
