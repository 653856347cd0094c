/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <stdarg.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "log.h"

static const char *const provider_kind_table[_PROVIDER_KIND_MAX] = {
        [PROVIDER_KIND_OPENAI] = "openai",
        [PROVIDER_KIND_ECHO] = "echo",
};

const char *provider_kind_to_string(ProviderKind k) {
        if (k < 0 || k >= _PROVIDER_KIND_MAX)
                return NULL;
        return provider_kind_table[k];
}

ProviderKind provider_kind_from_string(const char *s) {
        if (!s)
                return _PROVIDER_KIND_INVALID;
        for (int i = 0; i < _PROVIDER_KIND_MAX; i++)
                if (streq(s, provider_kind_table[i]))
                        return (ProviderKind) i;
        return _PROVIDER_KIND_INVALID;
}

static ProviderConfig *provider_config_free(ProviderConfig *p) {
        if (!p)
                return NULL;
        g_free(p->name);
        g_free(p->base_url);
        g_free(p->chat_url);
        g_free(p->completions_url);
        g_free(p->embeddings_url);
        g_free(p->models_url);
        g_free(p->default_model);
        g_strfreev(p->models);
        g_free(p->api_key_credential);
        g_free(p->api_key_file);
        g_free(p->api_key_env);
        erase_and_free(p->api_key);
        g_free(p->api_key_source);
        g_strfreev(p->fallbacks);
        if (p->aliases)
                g_hash_table_unref(p->aliases);
        g_free(p->ca_file);
        g_free(p->client_cert_file);
        g_free(p->client_key_file);
        g_free(p->client_cert_credential);
        g_free(p->client_key_credential);
        g_free(p->client_cert_blob);
        if (p->client_key_blob) {
                explicit_bzero(p->client_key_blob, p->client_key_blob_size);
                g_free(p->client_key_blob);
        }
        g_free(p->proxy);
        g_free(p);
        return NULL;
}

ProviderConfig *provider_config_ref(ProviderConfig *p) {
        if (p)
                p->n_ref++;
        return p;
}

static const char *const client_authorization_table[_CLIENT_AUTHORIZATION_MAX] = {
        [CLIENT_AUTHORIZATION_ROUTED] = "routed",
        [CLIENT_AUTHORIZATION_ALWAYS] = "always",
        [CLIENT_AUTHORIZATION_NEVER] = "never",
};

const char *client_authorization_to_string(ClientAuthorization a) {
        if (a < 0 || a >= _CLIENT_AUTHORIZATION_MAX)
                return NULL;
        return client_authorization_table[a];
}

ClientAuthorization client_authorization_from_string(const char *s) {
        for (int i = 0; s && i < _CLIENT_AUTHORIZATION_MAX; i++)
                if (streq(s, client_authorization_table[i]))
                        return (ClientAuthorization) i;
        return _CLIENT_AUTHORIZATION_INVALID;
}

void provider_config_destroy(gpointer p) {
        provider_config_unref(p);
}

ProviderConfig *provider_config_unref(ProviderConfig *p) {
        if (!p)
                return NULL;
        g_assert(p->n_ref > 0);
        if (--p->n_ref == 0)
                provider_config_free(p);
        return NULL;
}

static void route_config_free(gpointer v) {
        RouteConfig *rc = v;

        if (!rc)
                return;
        g_free(rc->model);
        g_strfreev(rc->providers);
        g_free(rc->weights);
        g_free(rc->sticky_header);
        g_strfreev(rc->mirrors);
        g_free(rc);
}

const RouteConfig *config_find_route(const Config *c, const char *model) {
        for (guint i = 0; model && c->routes && i < c->routes->len; i++) {
                const RouteConfig *rc = c->routes->pdata[i];
                if (streq(rc->model, model))
                        return rc;
        }
        return NULL;
}

StickyKind sticky_kind_from_string(const char *s, char **ret_header) {
        if (isempty(s))
                return _STICKY_KIND_INVALID;
        if (streq(s, "user"))
                return STICKY_USER;
        if (streq(s, "token"))
                return STICKY_TOKEN;
        if (g_str_has_prefix(s, "header:")) {
                const char *h = s + STRLEN("header:");
                if (isempty(h) || strlen(h) > 128)
                        return _STICKY_KIND_INVALID;
                for (const char *q = h; *q; q++)
                        if (!g_ascii_isalnum(*q) && *q != '-' && *q != '_')
                                return _STICKY_KIND_INVALID;
                if (ret_header)
                        *ret_header = g_strdup(h);
                return STICKY_HEADER;
        }
        return _STICKY_KIND_INVALID;
}

static ProviderConfig *provider_config_new(const char *name) {
        ProviderConfig *p = g_new0(ProviderConfig, 1);
        p->n_ref = 1;
        p->name = g_strdup(name);
        p->kind = PROVIDER_KIND_OPENAI;
        /* USEC_INFINITY here means "inherit the [Router] value" */
        p->connect_timeout_usec = USEC_INFINITY;
        p->request_timeout_usec = USEC_INFINITY;
        p->first_byte_timeout_usec = USEC_INFINITY;
        p->idle_timeout_usec = USEC_INFINITY;
        p->max_retries = 0;
        return p;
}

Config *config_free(Config *c) {
        if (!c)
                return NULL;
        g_free(c->host);
        g_free(c->default_provider);
        g_free(c->cors_allow_origin);
        g_strfreev(c->allowed_hosts);
        g_free(c->client_tokens_credential);
        g_free(c->client_tokens_file);
        if (c->client_token_digests)
                g_ptr_array_unref(c->client_token_digests);
        if (c->providers_by_name)
                g_hash_table_unref(c->providers_by_name);
        if (c->providers)
                g_ptr_array_unref(c->providers);
        if (c->mappings)
                g_hash_table_unref(c->mappings);
        if (c->mapping_order)
                g_ptr_array_unref(c->mapping_order);
        if (c->routes)
                g_ptr_array_unref(c->routes);
        g_strfreev(c->sources);
        g_free(c);
        return NULL;
}

ProviderConfig *config_find_provider(const Config *c, const char *name) {
        if (!name)
                return NULL;
        return g_hash_table_lookup(c->providers_by_name, name);
}

/* Takes the reference; the name must be new. */
static ProviderConfig *config_add_provider(Config *c, ProviderConfig *p) {
        g_assert(!g_hash_table_contains(c->providers_by_name, p->name));
        g_ptr_array_add(c->providers, p);
        g_hash_table_insert(c->providers_by_name, p->name, p);
        return p;
}

static Config *config_new_empty(void) {
        Config *c = g_new0(Config, 1);

        c->host = g_strdup("127.0.0.1");
        c->port = 3001;
        c->default_provider = g_strdup("lm-studio");
        c->allow_provider_override = true;
        c->request_timeout_usec = 120 * USEC_PER_SEC;
        c->connect_timeout_usec = 10 * USEC_PER_SEC;
        c->first_byte_timeout_usec = USEC_INFINITY; /* = RequestTimeoutSec */
        c->stream_idle_timeout_usec = 300 * USEC_PER_SEC;
        c->client_timeout_usec = 60 * USEC_PER_SEC;
        c->shutdown_timeout_usec = 30 * USEC_PER_SEC;
        c->log_level = LOG_INFO;
        c->log_requests = true;
        c->log_responses = false;
        c->max_body_size = 8 * 1024 * 1024;
        c->max_response_size = 64 * 1024 * 1024;
        c->max_header_size = 32 * 1024;
        c->stream_buffer_size = 16 * 1024;
        c->max_buffered_size = 256 * 1024 * 1024;
        c->max_routes = 10000;
        c->max_connections = 4096;
        c->cors_allow_origin = NULL; /* a web page may use the router only when told so */
        c->models_cache_usec = 10 * USEC_PER_SEC;
        c->failure_threshold = 3;
        c->cooldown_usec = 30 * USEC_PER_SEC;
        c->max_cooldown_usec = 300 * USEC_PER_SEC;
        c->retry_backoff_usec = 250 * USEC_PER_MSEC;
        c->max_retry_wait_usec = 10 * USEC_PER_SEC;
        c->providers = g_ptr_array_new_with_free_func(provider_config_destroy);
        c->providers_by_name = g_hash_table_new(g_str_hash, g_str_equal);
        c->mappings = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        c->mapping_order = g_ptr_array_new_with_free_func(g_free);
        c->routes = g_ptr_array_new_with_free_func(route_config_free);
        c->mirror_max_concurrent = 8;
        c->comparisons_kept = 256;
        return c;
}

/* The plan's three providers, with loopback addresses where the plan had LAN ones. */
static ProviderConfig *builtin_provider(const char *name) {
        ProviderConfig *p;

        if (streq(name, "lm-studio")) {
                p = provider_config_new(name);
                p->base_url = g_strdup("http://127.0.0.1:1234/v1");
                p->default_model = g_strdup("qwen3-max");
                return p;
        }
        if (streq(name, "qwen-proxy")) {
                p = provider_config_new(name);
                p->base_url = g_strdup("http://127.0.0.1:3000/v1");
                return p;
        }
        if (streq(name, "qwen-direct")) {
                p = provider_config_new(name);
                p->base_url = g_strdup("https://dashscope.aliyuncs.com/compatible-mode/v1");
                p->api_key_credential = g_strdup("qwen-api-key");
                return p;
        }
        if (streq(name, "echo")) {
                p = provider_config_new(name);
                p->kind = PROVIDER_KIND_ECHO;
                return p;
        }
        return NULL;
}

static const char *const builtin_provider_names[] = { "lm-studio", "qwen-proxy", "qwen-direct", "echo" };

static void config_add_builtin_providers(Config *c) {
        for (size_t i = 0; i < ELEMENTSOF(builtin_provider_names); i++)
                if (!config_find_provider(c, builtin_provider_names[i]))
                        config_add_provider(c, builtin_provider(builtin_provider_names[i]));
}

Config *config_new_default(void) {
        Config *c = config_new_empty();
        config_add_builtin_providers(c);
        return c;
}

bool provider_name_is_valid(const char *name) {
        size_t n;

        if (isempty(name))
                return false;
        n = strlen(name);
        if (n > PROVIDER_NAME_MAX)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!g_ascii_isalnum(name[i]) && !strchr("-_.", name[i]))
                        return false;
        return true;
}

bool model_name_is_valid(const char *model) {
        size_t n;

        if (isempty(model))
                return false;
        n = strlen(model);
        if (n > MODEL_NAME_MAX)
                return false;
        if (!g_utf8_validate(model, (gssize) n, NULL))
                return false;
        for (size_t i = 0; i < n; i++)
                if ((unsigned char) model[i] < 0x20 || model[i] == 0x7f)
                        return false;
        return true;
}

int parse_boolean(const char *s) {
        static const char *const yes[] = { "1", "yes", "y", "true", "t", "on" };
        static const char *const no[] = { "0", "no", "n", "false", "f", "off" };

        if (!s)
                return -EINVAL;
        for (size_t i = 0; i < ELEMENTSOF(yes); i++)
                if (strcaseeq(s, yes[i]))
                        return 1;
        for (size_t i = 0; i < ELEMENTSOF(no); i++)
                if (strcaseeq(s, no[i]))
                        return 0;
        return -EINVAL;
}

int parse_seconds(const char *s, usec_t *ret) {
        char *end = NULL;
        double d;

        if (isempty(s))
                return -EINVAL;
        errno = 0;
        d = g_ascii_strtod(s, &end);
        if (errno != 0 || end == s || *end != 0 || !isfinite(d) || d <= 0 || d > 31536000.0)
                return -EINVAL;
        *ret = (usec_t) (d * (double) USEC_PER_SEC);
        if (*ret == 0)
                return -EINVAL;
        return 0;
}

int parse_size(const char *s, uint64_t *ret) {
        char *end = NULL;
        guint64 v;
        uint64_t factor = 1;

        if (isempty(s) || !g_ascii_isdigit(s[0]))
                return -EINVAL;
        errno = 0;
        v = g_ascii_strtoull(s, &end, 10);
        if (errno != 0 || end == s)
                return -EINVAL;
        if (*end) {
                switch (g_ascii_toupper(*end)) {
                case 'K': factor = 1024ULL; break;
                case 'M': factor = 1024ULL * 1024; break;
                case 'G': factor = 1024ULL * 1024 * 1024; break;
                default: return -EINVAL;
                }
                end++;
                if (*end == 'i')
                        end++;
                if (*end == 'B')
                        end++;
                if (*end)
                        return -EINVAL;
        }
        if (v > UINT64_MAX / factor)
                return -ERANGE;
        *ret = v * factor;
        return 0;
}

static int parse_unsigned(const char *s, unsigned min, unsigned max, unsigned *ret) {
        char *end = NULL;
        guint64 v;

        if (isempty(s) || !g_ascii_isdigit(s[0]))
                return -EINVAL;
        errno = 0;
        v = g_ascii_strtoull(s, &end, 10);
        if (errno != 0 || *end != 0)
                return -EINVAL;
        if (v < min || v > max)
                return -ERANGE;
        *ret = (unsigned) v;
        return 0;
}

static bool base_url_is_valid(const char *url) {
        g_autoptr(CURLU) u = NULL;
        g_autofree char *scheme = NULL;
        char *s = NULL, *host = NULL;
        bool ok;

        if (isempty(url) || strlen(url) > 2048)
                return false;
        u = curl_url();
        if (!u)
                return false;
        if (curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK)
                return false;
        if (curl_url_get(u, CURLUPART_SCHEME, &s, 0) != CURLUE_OK)
                return false;
        ok = streq(s, "http") || streq(s, "https");
        curl_free(s);
        if (curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK)
                return false;
        ok = ok && !isempty(host);
        curl_free(host);
        return ok;
}

/* Collects problems while reading, so that every one can be reported at once. */
typedef struct Parser {
        Config *config;
        GPtrArray *errors;
        GPtrArray *warnings;
        const char *source;      /* file name or "environment" */
        bool saw_provider_group;
        GHashTable *aliases;     /* [ModelAliases NAME]: provider name → (client model → provider model) */
} Parser;

/* Messages go to the terminal, the journal and D-Bus replies, which need valid UTF-8: a group or
 * key name that is not shows U+FFFD where its bad bytes were. */
static char *message_vprintf(const char *format, va_list ap) _printf_(1, 0);
static char *message_vprintf(const char *format, va_list ap) {
        g_autofree char *m = g_strdup_vprintf(format, ap);

        if (g_utf8_validate(m, -1, NULL))
                return TAKE_PTR(m);
        return g_utf8_make_valid(m, -1);
}

static void parser_error(Parser *p, const char *format, ...) _printf_(2, 3);
static void parser_error(Parser *p, const char *format, ...) {
        va_list ap;
        va_start(ap, format);
        g_ptr_array_add(p->errors, message_vprintf(format, ap));
        va_end(ap);
}

static void parser_warning(Parser *p, const char *format, ...) _printf_(2, 3);
static void parser_warning(Parser *p, const char *format, ...) {
        va_list ap;
        if (!p->warnings)
                return;
        va_start(ap, format);
        g_ptr_array_add(p->warnings, message_vprintf(format, ap));
        va_end(ap);
}

static int find_control_char(const char *s) {
        for (const char *c = s; *c; c++)
                if ((unsigned char) *c < 0x20 || *c == 0x7f)
                        return (unsigned char) *c;
        return -1;
}

static void parser_value_error(Parser *p, const char *group, const char *key, const GError *error) {
        if (g_error_matches(error, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_UNKNOWN_ENCODING))
                parser_error(p, "%s: [%s] %s= is not valid UTF-8", p->source, group, key);
        else if (g_error_matches(error, G_KEY_FILE_ERROR, G_KEY_FILE_ERROR_INVALID_VALUE))
                parser_error(p, "%s: [%s] %s= has an invalid escape sequence (a backslash may only be "
                             "followed by s, n, t, r, a backslash, or in a list ';')", p->source, group, key);
        else
                parser_error(p, "%s: [%s] %s= cannot be read: %s", p->source, group, key,
                             error ? error->message : "no value");
}

/* No value has a use for a control character (an escaped line break or tab), and some values end
 * up in headers. */
static bool parser_check_no_control(Parser *p, const char *group, const char *key, const char *v) {
        int c = find_control_char(v);

        if (c < 0)
                return true;
        parser_error(p, "%s: [%s] %s= contains a control character (0x%02x)", p->source, group, key, c);
        return false;
}

/* One value of a key file. A value that cannot be read is an error, never skipped: a key that
 * silently vanished keeps its default, and for some keys (ClientTokensFile=, CORSAllowOrigin=)
 * the default is the open door. Returns NULL after reporting the error. */
static char *parser_get_value(Parser *p, GKeyFile *kf, const char *group, const char *key) {
        g_autoptr(GError) error = NULL;
        g_autofree char *v = g_key_file_get_string(kf, group, key, &error);

        /* On a bad escape sequence GLib returns a value and an error: the error counts. */
        if (error || !v) {
                parser_value_error(p, group, key, error);
                return NULL;
        }
        if (!parser_check_no_control(p, group, key, v))
                return NULL;
        g_strstrip(v);
        return TAKE_PTR(v);
}

/* A ';'-separated list ("\;" is a ';' inside an element). Returns NULL after reporting. */
static char **parser_get_list(Parser *p, GKeyFile *kf, const char *group, const char *key) {
        g_autoptr(GError) error = NULL;
        g_auto(GStrv) l = g_key_file_get_string_list(kf, group, key, NULL, &error);

        if (error || !l) {
                parser_value_error(p, group, key, error);
                return NULL;
        }
        for (char **i = l; *i; i++) {
                if (!parser_check_no_control(p, group, key, *i))
                        return NULL;
                g_strstrip(*i);
        }
        return TAKE_PTR(l);
}

static void set_string(char **field, const char *value) {
        g_free(*field);
        *field = isempty(value) ? NULL : g_strdup(value);
}

static void set_url(Parser *p, const char *group, const char *key, char **field, const char *value) {
        g_autofree char *v = g_strdup(value);
        size_t n = strlen(v);

        while (n > 0 && v[n - 1] == '/')
                v[--n] = 0;
        if (!base_url_is_valid(v)) {
                parser_error(p, "%s: [%s] %s='%s' is not an http:// or https:// URL", p->source, group, key, value);
                return;
        }
        g_free(*field);
        *field = TAKE_PTR(v);
}

static void set_seconds(Parser *p, const char *group, const char *key, usec_t *field, const char *value) {
        if (parse_seconds(value, field) < 0)
                parser_error(p, "%s: [%s] %s='%s' is not a positive number of seconds", p->source, group, key, value);
}

static void set_bool(Parser *p, const char *group, const char *key, bool *field, const char *value) {
        int b = parse_boolean(value);
        if (b < 0)
                parser_error(p, "%s: [%s] %s='%s' is not a boolean (true/false, yes/no, 1/0)",
                             p->source, group, key, value);
        else
                *field = b;
}

static void set_size(Parser *p, const char *group, const char *key, uint64_t *field, const char *value,
                     uint64_t min, uint64_t max) {
        uint64_t v;
        if (parse_size(value, &v) < 0 || v < min || v > max)
                parser_error(p, "%s: [%s] %s='%s' is not a size between %" PRIu64 " and %" PRIu64
                             " bytes (suffixes K, M, G allowed)", p->source, group, key, value, min, max);
        else
                *field = v;
}

static void set_log_level(Parser *p, const char *where, int *field, const char *value) {
        int l = log_level_from_string(value);
        if (l < 0 || l < LOG_ERR)
                parser_error(p, "%s: %s='%s' is not a log level (debug, info, notice, warn, error)",
                             p->source, where, value);
        else
                *field = l;
}

static void set_port(Parser *p, const char *where, uint16_t *field, const char *value) {
        unsigned v;
        if (parse_unsigned(value, 1, 65535, &v) < 0)
                parser_error(p, "%s: %s='%s' is not a valid port: must be between 1 and 65535", p->source, where, value);
        else
                *field = (uint16_t) v;
}

static void mapping_set(Config *c, const char *model, const char *provider) {
        if (!g_hash_table_contains(c->mappings, model))
                g_ptr_array_add(c->mapping_order, g_strdup(model));
        g_hash_table_replace(c->mappings, g_strdup(model), g_strdup(provider));
}

static void mapping_remove(Config *c, const char *model) {
        if (!g_hash_table_remove(c->mappings, model))
                return;
        for (guint i = 0; i < c->mapping_order->len; i++)
                if (streq(c->mapping_order->pdata[i], model)) {
                        g_ptr_array_remove_index(c->mapping_order, i);
                        break;
                }
}

/* A name or address as a client writes it in Host: (no port); IPv6 with or without brackets. */
static bool allowed_host_is_valid(const char *h) {
        size_t n = strlen(h);

        if (n == 0 || n > 253)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!g_ascii_isalnum(h[i]) && !strchr("-._:[]", h[i]))
                        return false;
        return true;
}

/* AllowedHosts=: space-separated; kept lower-case, without brackets or a trailing dot, as the
 * front door compares them. An empty value resets the list. */
static void set_allowed_hosts(Parser *p, char ***field, const char *value) {
        g_auto(GStrv) words = g_strsplit_set(value, " \t", -1);
        g_autoptr(GPtrArray) hosts = g_ptr_array_new_with_free_func(g_free);

        for (char **w = words; *w; w++) {
                size_t n;
                char *h;

                if (isempty(*w))
                        continue;
                if (streq(*w, "*")) {
                        g_ptr_array_add(hosts, g_strdup("*"));
                        continue;
                }
                if (!allowed_host_is_valid(*w)) {
                        parser_error(p, "%s: [Router] AllowedHosts= contains '%s', which is not a host name or address",
                                     p->source, *w);
                        continue;
                }
                h = g_ascii_strdown(*w, -1);
                n = strlen(h);
                if (h[0] == '[' && n > 2 && h[n - 1] == ']') {
                        memmove(h, h + 1, n - 2);
                        h[n - 2] = 0;
                } else if (n > 1 && h[n - 1] == '.')
                        h[n - 1] = 0;
                g_ptr_array_add(hosts, h);
        }
        g_strfreev(*field);
        *field = NULL;
        if (hosts->len > 0) {
                g_ptr_array_add(hosts, NULL);
                *field = (char **) g_ptr_array_free(g_steal_pointer(&hosts), FALSE);
        }
}

static void parse_router_group(Parser *p, GKeyFile *kf) {
        const char *group = "Router";
        g_auto(GStrv) keys = g_key_file_get_keys(kf, group, NULL, NULL);
        Config *c = p->config;

        for (char **k = keys; k && *k; k++) {
                g_autofree char *v = parser_get_value(p, kf, group, *k);
                const char *key = *k;

                if (!v)
                        continue;

                if (streq(key, "Host")) {
                        if (isempty(v) || strlen(v) > 255)
                                parser_error(p, "%s: [Router] Host= must be an address or host name", p->source);
                        else
                                set_string(&c->host, v);
                } else if (streq(key, "Port"))
                        set_port(p, "[Router] Port", &c->port, v);
                else if (streq(key, "DefaultProvider"))
                        set_string(&c->default_provider, v);
                else if (streq(key, "AllowProviderOverride"))
                        set_bool(p, group, key, &c->allow_provider_override, v);
                else if (streq(key, "RequestTimeoutSec"))
                        set_seconds(p, group, key, &c->request_timeout_usec, v);
                else if (streq(key, "ConnectTimeoutSec"))
                        set_seconds(p, group, key, &c->connect_timeout_usec, v);
                else if (streq(key, "FirstByteTimeoutSec"))
                        set_seconds(p, group, key, &c->first_byte_timeout_usec, v);
                else if (streq(key, "StreamIdleTimeoutSec"))
                        set_seconds(p, group, key, &c->stream_idle_timeout_usec, v);
                else if (streq(key, "ClientTimeoutSec"))
                        set_seconds(p, group, key, &c->client_timeout_usec, v);
                else if (streq(key, "ShutdownTimeoutSec"))
                        set_seconds(p, group, key, &c->shutdown_timeout_usec, v);
                else if (streq(key, "LogLevel"))
                        set_log_level(p, "[Router] LogLevel", &c->log_level, v);
                else if (streq(key, "LogRequests"))
                        set_bool(p, group, key, &c->log_requests, v);
                else if (streq(key, "LogResponses"))
                        set_bool(p, group, key, &c->log_responses, v);
                else if (streq(key, "MaxBodySize"))
                        set_size(p, group, key, &c->max_body_size, v, 1024, 1024ULL * 1024 * 1024);
                else if (streq(key, "MaxResponseSize"))
                        set_size(p, group, key, &c->max_response_size, v, 1024, 4ULL * 1024 * 1024 * 1024);
                else if (streq(key, "MaxHeaderSize"))
                        set_size(p, group, key, &c->max_header_size, v, 4096, 1024 * 1024);
                else if (streq(key, "StreamBufferSize"))
                        set_size(p, group, key, &c->stream_buffer_size, v, 4096, 64ULL * 1024 * 1024);
                else if (streq(key, "MaxRoutes")) {
                        if (parse_unsigned(v, 1, 10000000, &c->max_routes) < 0)
                                parser_error(p, "%s: [Router] MaxRoutes='%s' must be between 1 and 10000000", p->source, v);
                } else if (streq(key, "MaxBufferedSize"))
                        set_size(p, group, key, &c->max_buffered_size, v, 1024 * 1024, 1024ULL * 1024 * 1024 * 1024);
                else if (streq(key, "MaxConnections")) {
                        if (parse_unsigned(v, 1, 1000000, &c->max_connections) < 0)
                                parser_error(p, "%s: [Router] MaxConnections='%s' must be between 1 and 1000000",
                                             p->source, v);
                } else if (streq(key, "CORSAllowOrigin"))
                        set_string(&c->cors_allow_origin, v);
                else if (streq(key, "AllowedHosts"))
                        set_allowed_hosts(p, &c->allowed_hosts, v);
                else if (streq(key, "FailureThreshold")) {
                        if (parse_unsigned(v, 0, 1000, &c->failure_threshold) < 0)
                                parser_error(p, "%s: [Router] FailureThreshold='%s' must be between 0 (never) and 1000",
                                             p->source, v);
                } else if (streq(key, "CooldownSec"))
                        set_seconds(p, group, key, &c->cooldown_usec, v);
                else if (streq(key, "MaxCooldownSec"))
                        set_seconds(p, group, key, &c->max_cooldown_usec, v);
                else if (streq(key, "MirrorMaxConcurrent")) {
                        if (parse_unsigned(v, 0, 100000, &c->mirror_max_concurrent) < 0)
                                parser_error(p, "%s: [Router] MirrorMaxConcurrent='%s' must be between 0 and 100000",
                                             p->source, v);
                } else if (streq(key, "ComparisonsKept")) {
                        if (parse_unsigned(v, 0, 100000, &c->comparisons_kept) < 0)
                                parser_error(p, "%s: [Router] ComparisonsKept='%s' must be between 0 and 100000",
                                             p->source, v);
                } else if (streq(key, "RetryBackoffSec"))
                        set_seconds(p, group, key, &c->retry_backoff_usec, v);
                else if (streq(key, "MaxRetryWaitSec"))
                        set_seconds(p, group, key, &c->max_retry_wait_usec, v);
                else if (streq(key, "ModelsCacheSec")) {
                        /* 0 turns the cache off. */
                        if (streq(v, "0"))
                                c->models_cache_usec = 0;
                        else
                                set_seconds(p, group, key, &c->models_cache_usec, v);
                }
                else if (streq(key, "ClientTokensCredential")) {
                        if (!isempty(v) && (strchr(v, '/') || streq(v, ".") || streq(v, "..")))
                                parser_error(p, "%s: [Router] ClientTokensCredential='%s' must be a credential name, not a path",
                                             p->source, v);
                        else
                                set_string(&c->client_tokens_credential, v);
                } else if (streq(key, "ClientTokensFile")) {
                        if (!isempty(v) && v[0] != '/')
                                parser_error(p, "%s: [Router] ClientTokensFile='%s' must be an absolute path", p->source, v);
                        else
                                set_string(&c->client_tokens_file, v);
                }
                else
                        parser_warning(p, "%s: unknown key '%s' in [Router], ignoring", p->source, key);
        }
}

static ProviderConfig *parser_get_provider(Parser *p, const char *name) {
        ProviderConfig *pc = config_find_provider(p->config, name);

        if (pc)
                return pc;
        return config_add_provider(p->config, provider_config_new(name));
}

static bool proxy_url_is_valid(const char *url) {
        static const char *const schemes[] = { "http", "https", "socks4", "socks4a", "socks5", "socks5h" };
        g_autoptr(CURLU) u = NULL;
        char *scheme = NULL, *host = NULL;
        bool ok = false;

        if (strlen(url) > 2048 || !strstr(url, "://"))
                return false;
        u = curl_url();
        if (!u || curl_url_set(u, CURLUPART_URL, url, CURLU_NON_SUPPORT_SCHEME) != CURLUE_OK)
                return false;
        if (curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK)
                for (size_t i = 0; i < ELEMENTSOF(schemes); i++)
                        ok = ok || streq(scheme, schemes[i]);
        curl_free(scheme);
        if (curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK)
                return false;
        ok = ok && !isempty(host);
        curl_free(host);
        return ok;
}

/* CAFile=, the client certificate and Proxy= of a [Provider] group: read here, checked in
 * resolve_tls() once every file is parsed. Returns false for a key that is none of them. */
static bool parse_provider_tls_key(Parser *p, const char *group, ProviderConfig *pc, const char *key, const char *v) {
        char **path_field = NULL, **credential_field = NULL;

        if (streq(key, "CAFile"))
                path_field = &pc->ca_file;
        else if (streq(key, "ClientCertificateFile"))
                path_field = &pc->client_cert_file;
        else if (streq(key, "ClientKeyFile"))
                path_field = &pc->client_key_file;
        else if (streq(key, "ClientCertificateCredential"))
                credential_field = &pc->client_cert_credential;
        else if (streq(key, "ClientKeyCredential"))
                credential_field = &pc->client_key_credential;
        else if (streq(key, "Proxy")) {
                /* Empty is a choice too: no proxy, whatever the environment says. */
                if (!isempty(v) && !proxy_url_is_valid(v)) {
                        parser_error(p, "%s: [%s] Proxy='%s' is not a proxy URL (http://, https://, socks5://HOST:PORT)",
                                     p->source, group, v);
                        return true;
                }
                set_string(&pc->proxy, v);
                pc->proxy_set = true;
                return true;
        } else
                return false;

        if (path_field) {
                if (!isempty(v) && v[0] != '/')
                        parser_error(p, "%s: [%s] %s='%s' must be an absolute path", p->source, group, key, v);
                else
                        set_string(path_field, v);
        } else {
                if (!isempty(v) && (strchr(v, '/') || streq(v, ".") || streq(v, "..")))
                        parser_error(p, "%s: [%s] %s='%s' must be a credential name, not a path", p->source, group, key, v);
                else
                        set_string(credential_field, v);
        }
        return true;
}

static void parse_provider_group(Parser *p, GKeyFile *kf, const char *group, const char *name) {
        g_auto(GStrv) keys = g_key_file_get_keys(kf, group, NULL, NULL);
        ProviderConfig *pc;

        if (!provider_name_is_valid(name)) {
                parser_error(p, "%s: [%s]: provider name '%s' is invalid: use 1-%d letters, digits, '-', '_' or '.'",
                             p->source, group, name, PROVIDER_NAME_MAX);
                return;
        }
        p->saw_provider_group = true;
        pc = parser_get_provider(p, name);

        for (char **k = keys; k && *k; k++) {
                g_autofree char *v = NULL;
                const char *key = *k;

                /* Lists are read as lists: an escaped ';' is valid in one, not in a plain value. */
                if (streq(key, "Models")) {
                        g_strfreev(pc->models);
                        pc->models = parser_get_list(p, kf, group, key);
                        for (char **m = pc->models; m && *m; m++)
                                if (!model_name_is_valid(*m))
                                        parser_error(p, "%s: [%s] Models= contains an invalid model name '%s'",
                                                     p->source, group, *m);
                        continue;
                }
                if (streq(key, "Fallbacks")) {
                        g_strfreev(pc->fallbacks);
                        pc->fallbacks = parser_get_list(p, kf, group, key);
                        continue;
                }

                v = parser_get_value(p, kf, group, key);
                if (!v)
                        continue;

                if (streq(key, "Kind")) {
                        ProviderKind kind = provider_kind_from_string(v);
                        if (kind < 0)
                                parser_error(p, "%s: [%s] Kind='%s' is not a provider kind (openai, echo)",
                                             p->source, group, v);
                        else
                                pc->kind = kind;
                } else if (streq(key, "BaseURL"))
                        set_url(p, group, key, &pc->base_url, v);
                else if (streq(key, "DefaultModel")) {
                        if (!isempty(v) && !model_name_is_valid(v))
                                parser_error(p, "%s: [%s] DefaultModel='%s' is not a valid model name", p->source, group, v);
                        else
                                set_string(&pc->default_model, v);
                } else if (streq(key, "APIKeyCredential")) {
                        if (!isempty(v) && (strchr(v, '/') || streq(v, ".") || streq(v, "..")))
                                parser_error(p, "%s: [%s] APIKeyCredential='%s' must be a credential name, not a path",
                                             p->source, group, v);
                        else
                                set_string(&pc->api_key_credential, v);
                } else if (streq(key, "APIKeyFile")) {
                        if (!isempty(v) && v[0] != '/')
                                parser_error(p, "%s: [%s] APIKeyFile='%s' must be an absolute path", p->source, group, v);
                        else
                                set_string(&pc->api_key_file, v);
                } else if (streq(key, "APIKeyEnv"))
                        set_string(&pc->api_key_env, v);
                else if (streq(key, "APIKey"))
                        parser_error(p, "%s: [%s] APIKey= would keep a secret in a configuration file; "
                                     "use APIKeyCredential=, APIKeyFile= or APIKeyEnv= instead", p->source, group);
                else if (streq(key, "ConnectTimeoutSec"))
                        set_seconds(p, group, key, &pc->connect_timeout_usec, v);
                else if (streq(key, "RequestTimeoutSec"))
                        set_seconds(p, group, key, &pc->request_timeout_usec, v);
                else if (streq(key, "FirstByteTimeoutSec"))
                        set_seconds(p, group, key, &pc->first_byte_timeout_usec, v);
                else if (streq(key, "StreamIdleTimeoutSec"))
                        set_seconds(p, group, key, &pc->idle_timeout_usec, v);
                else if (streq(key, "MaxConcurrent")) {
                        if (parse_unsigned(v, 0, 1000000, &pc->max_concurrent) < 0)
                                parser_error(p, "%s: [%s] MaxConcurrent='%s' must be a number (0 = unlimited)",
                                             p->source, group, v);
                } else if (streq(key, "MaxRetries")) {
                        if (parse_unsigned(v, 0, 10, &pc->max_retries) < 0)
                                parser_error(p, "%s: [%s] MaxRetries='%s' must be between 0 and 10", p->source, group, v);
                } else if (streq(key, "ClientAuthorization")) {
                        ClientAuthorization a = client_authorization_from_string(v);
                        if (a < 0)
                                parser_error(p, "%s: [%s] ClientAuthorization='%s' must be routed, always or never",
                                             p->source, group, v);
                        else
                                pc->client_authorization = a;
                } else if (!parse_provider_tls_key(p, group, pc, key, v))
                        parser_warning(p, "%s: unknown key '%s' in [%s], ignoring", p->source, key, group);
        }
}

static void parse_mappings_group(Parser *p, GKeyFile *kf) {
        g_auto(GStrv) keys = g_key_file_get_keys(kf, "ModelMappings", NULL, NULL);

        for (char **k = keys; k && *k; k++) {
                g_autofree char *v = NULL;

                if (!model_name_is_valid(*k)) {
                        parser_error(p, "%s: [ModelMappings] '%s' is not a valid model name", p->source, *k);
                        continue;
                }
                v = parser_get_value(p, kf, "ModelMappings", *k);
                if (!v)
                        continue;
                if (isempty(v)) /* an empty value in a drop-in removes an earlier mapping */
                        mapping_remove(p->config, *k);
                else
                        mapping_set(p->config, *k, v);
        }
}

/* [Route MODEL]: a model's arms with weights, how a conversation sticks to one, and mirrors. A
 * later file's group replaces the keys it sets. */
static RouteConfig *parser_get_route(Parser *p, const char *model) {
        RouteConfig *rc = (RouteConfig *) config_find_route(p->config, model);

        if (rc)
                return rc;
        rc = g_new0(RouteConfig, 1);
        rc->model = g_strdup(model);
        rc->mirror_percent = 100;
        g_ptr_array_add(p->config->routes, rc);
        return rc;
}

/* "a:80 b:20" (commas work too; no weight is 1). A provider named twice is refused. */
int config_parse_arms(const char *v, char ***ret_names, uint32_t **ret_weights) {
        g_auto(GStrv) words = g_strsplit_set(v, " \t,", -1);
        g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GArray) weights = g_array_new(FALSE, FALSE, sizeof(uint32_t));

        for (char **w = words; *w; w++) {
                const char *colon;
                g_autofree char *name = NULL;
                unsigned weight = 1;

                if (isempty(*w))
                        continue;
                colon = strrchr(*w, ':');
                name = colon ? g_strndup(*w, (gsize) (colon - *w)) : g_strdup(*w);
                if (colon && parse_unsigned(colon + 1, 1, 1000000, &weight) < 0)
                        return -EINVAL;
                if (!provider_name_is_valid(name))
                        return -EINVAL;
                for (guint i = 0; i < names->len; i++)
                        if (streq(names->pdata[i], name))
                                return -EEXIST;
                g_ptr_array_add(names, TAKE_PTR(name));
                g_array_append_val(weights, weight);
        }
        if (names->len == 0)
                return -ENODATA;
        g_ptr_array_add(names, NULL);
        *ret_names = (char **) g_ptr_array_free(g_steal_pointer(&names), FALSE);
        *ret_weights = (uint32_t *) (void *) g_array_free(g_steal_pointer(&weights), FALSE);
        return 0;
}

static void parse_route_group(Parser *p, GKeyFile *kf, const char *group, const char *model) {
        g_auto(GStrv) keys = g_key_file_get_keys(kf, group, NULL, NULL);
        RouteConfig *rc;

        if (!streq(model, ROUTE_DEFAULT_MODEL) && !model_name_is_valid(model)) {
                parser_error(p, "%s: [%s]: '%s' is not a valid model name (or '*' for the default route)",
                             p->source, group, model);
                return;
        }
        rc = parser_get_route(p, model);

        for (char **k = keys; k && *k; k++) {
                g_autofree char *v = parser_get_value(p, kf, group, *k);
                const char *key = *k;

                if (!v)
                        continue;
                if (streq(key, "Providers")) {
                        g_auto(GStrv) names = NULL;
                        g_autofree uint32_t *weights = NULL;
                        int r = config_parse_arms(v, &names, &weights);
                        if (r == -EEXIST)
                                parser_error(p, "%s: [%s] Providers='%s' names a provider twice", p->source, group, v);
                        else if (r < 0)
                                parser_error(p, "%s: [%s] Providers='%s' is not a list of NAME[:WEIGHT] (weights 1-1000000)",
                                             p->source, group, v);
                        else {
                                g_strfreev(rc->providers);
                                g_free(rc->weights);
                                rc->providers = TAKE_PTR(names);
                                rc->weights = TAKE_PTR(weights);
                        }
                } else if (streq(key, "StickyKey")) {
                        g_autofree char *header = NULL;
                        StickyKind kind;
                        if (isempty(v))
                                kind = STICKY_NONE;
                        else if ((kind = sticky_kind_from_string(v, &header)) < 0) {
                                parser_error(p, "%s: [%s] StickyKey='%s' is not 'user', 'header:NAME' or 'token'",
                                             p->source, group, v);
                                continue;
                        }
                        rc->sticky = kind;
                        g_free(rc->sticky_header);
                        rc->sticky_header = TAKE_PTR(header);
                } else if (streq(key, "Mirror")) {
                        g_strfreev(rc->mirrors);
                        rc->mirrors = isempty(v) ? NULL : g_strsplit_set(v, " \t,", -1);
                        /* g_strsplit_set() leaves empty strings between separators: drop them. */
                        if (rc->mirrors) {
                                char **w = rc->mirrors, **o = rc->mirrors;
                                for (; *w; w++)
                                        if (isempty(*w))
                                                g_free(*w);
                                        else
                                                *o++ = *w;
                                *o = NULL;
                        }
                } else if (streq(key, "MirrorPercent")) {
                        if (parse_unsigned(v, 0, 100, &rc->mirror_percent) < 0)
                                parser_error(p, "%s: [%s] MirrorPercent='%s' must be between 0 and 100", p->source, group, v);
                } else
                        parser_warning(p, "%s: unknown key '%s' in [%s], ignoring", p->source, key, group);
        }
}

/* [ModelAliases PROVIDER]: the name a client sends → the name this provider knows the model by. */
static void parse_aliases_group(Parser *p, GKeyFile *kf, const char *group, const char *provider) {
        g_auto(GStrv) keys = g_key_file_get_keys(kf, group, NULL, NULL);
        GHashTable *aliases;

        if (!provider_name_is_valid(provider)) {
                parser_error(p, "%s: [%s]: provider name '%s' is invalid", p->source, group, provider);
                return;
        }
        /* The provider may be defined later, or in a later file: matched up in validate(). */
        if (!p->aliases)
                p->aliases = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, (GDestroyNotify) g_hash_table_unref);
        aliases = g_hash_table_lookup(p->aliases, provider);
        if (!aliases) {
                aliases = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
                g_hash_table_insert(p->aliases, g_strdup(provider), aliases);
        }
        for (char **k = keys; k && *k; k++) {
                g_autofree char *v = NULL;

                if (!model_name_is_valid(*k)) {
                        parser_error(p, "%s: [%s] '%s' is not a valid model name", p->source, group, *k);
                        continue;
                }
                v = parser_get_value(p, kf, group, *k);
                if (!v)
                        continue;
                if (isempty(v)) /* an empty value in a drop-in removes an earlier alias */
                        g_hash_table_remove(aliases, *k);
                else if (!model_name_is_valid(v))
                        parser_error(p, "%s: [%s] %s='%s' is not a valid model name", p->source, group, *k, v);
                else
                        g_hash_table_replace(aliases, g_strdup(*k), g_strdup(v));
        }
}

#define CONFIG_FILE_MAX (64U * 1024 * 1024)
#define SECRET_FILE_MAX (64U * 1024)

/* Reads a whole file that must be a regular one: opened without blocking and checked before a
 * byte is read, since open() of a FIFO waits for a writer, which would hang --check-config and
 * freeze the daemon in a reload. With refuse_world_readable, a file anyone may read is refused
 * (-EPERM). A NUL byte inside is refused (-EBADMSG): everything after it would silently vanish.
 * The contents are NUL-terminated. */
static int read_regular_file(const char *path, size_t max_size, bool refuse_world_readable,
                             char **ret, size_t *ret_size) {
        g_autofree char *contents = NULL;
        struct stat st;
        size_t n = 0;
        int fd, r = 0;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
        if (fd < 0)
                return negative_errno();
        if (fstat(fd, &st) < 0)
                r = negative_errno();
        else if (S_ISDIR(st.st_mode))
                r = -EISDIR;
        else if (!S_ISREG(st.st_mode))
                r = -EBADFD;
        else if (refuse_world_readable && (st.st_mode & S_IROTH))
                r = -EPERM;
        else if ((uint64_t) st.st_size > max_size)
                r = -EFBIG;
        if (r < 0) {
                close(fd);
                return r;
        }

        contents = g_malloc((size_t) st.st_size + 1);
        while (n < (size_t) st.st_size) {
                ssize_t k = read(fd, contents + n, (size_t) st.st_size - n);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k < 0) {
                        r = negative_errno();
                        break;
                }
                if (k == 0)
                        break;
                n += (size_t) k;
        }
        close(fd);
        if (r >= 0 && memchr(contents, 0, n))
                r = -EBADMSG;
        if (r < 0) {
                explicit_bzero(contents, n);
                return r;
        }
        contents[n] = 0;
        *ret = TAKE_PTR(contents);
        if (ret_size)
                *ret_size = n;
        return 0;
}

/* Why read_regular_file() failed, for a message. */
static const char *read_error_to_string(int r) {
        switch (r) {
        case -EISDIR:
                return "it is a directory";
        case -EBADFD:
                return "it is not a regular file (a FIFO, socket or device)";
        case -EFBIG:
                return "it is too large";
        case -EBADMSG:
                return "it contains a NUL byte";
        case -ENODATA:
                return "it is empty";
        default:
                return g_strerror(-r);
        }
}

static int parse_file(Parser *p, const char *path, bool required) {
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autoptr(GError) error = NULL;
        g_autofree char *text = NULL;
        g_auto(GStrv) groups = NULL;
        size_t size;
        int r;

        p->source = path;
        r = read_regular_file(path, CONFIG_FILE_MAX, false, &text, &size);
        if (r == -ENOENT && !required)
                return 0;
        if (r < 0) {
                parser_error(p, "%s: cannot read the file: %s", path, read_error_to_string(r));
                return r;
        }
        if (!g_key_file_load_from_data(kf, text, size, G_KEY_FILE_NONE, &error)) {
                parser_error(p, "%s: %s", path, error->message);
                return -EINVAL;
        }

        groups = g_key_file_get_groups(kf, NULL);
        for (char **g = groups; *g; g++) {
                if (streq(*g, "Router"))
                        parse_router_group(p, kf);
                else if (g_str_has_prefix(*g, "Provider "))
                        parse_provider_group(p, kf, *g, *g + STRLEN("Provider "));
                else if (streq(*g, "ModelMappings"))
                        parse_mappings_group(p, kf);
                else if (g_str_has_prefix(*g, "Route "))
                        parse_route_group(p, kf, *g, *g + STRLEN("Route "));
                else if (g_str_has_prefix(*g, "ModelAliases "))
                        parse_aliases_group(p, kf, *g, *g + STRLEN("ModelAliases "));
                else
                        parser_warning(p, "%s: unknown section [%s], ignoring", path, *g);
        }
        return 1;
}

static gint compare_strings(gconstpointer a, gconstpointer b) {
        return strcmp(*(char *const *) a, *(char *const *) b);
}

static GPtrArray *list_dropins(const char *dir) {
        GPtrArray *files = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GDir) d = g_dir_open(dir, 0, NULL);
        const char *name;

        if (!d)
                return files;
        while ((name = g_dir_read_name(d)))
                if (g_str_has_suffix(name, ".conf") && name[0] != '.')
                        g_ptr_array_add(files, g_build_filename(dir, name, NULL));
        g_ptr_array_sort(files, compare_strings);
        return files;
}

/* A variable that is set and not empty. One that is not UTF-8 is an error, like such a value in a
 * file: NULL after reporting it. */
static const char *env_get(Parser *p, char **environ_, const char *name) {
        const char *v = g_environ_getenv(environ_, name);

        if (isempty(v))
                return NULL;
        if (!g_utf8_validate(v, -1, NULL)) {
                parser_error(p, "environment: %s is not valid UTF-8", name);
                return NULL;
        }
        return v;
}

static ProviderConfig *parser_get_plan_provider(Parser *p, const char *name) {
        ProviderConfig *pc = config_find_provider(p->config, name);

        /* The plan's variables name its three providers; one that the files do not define is
         * created from the built-in defaults, so an existing .env works unchanged. */
        if (!pc)
                pc = config_add_provider(p->config, builtin_provider(name));
        return pc;
}

static void parse_environment(Parser *p, char **env) {
        Config *c = p->config;
        const char *v;

        p->source = "environment";

        if ((v = env_get(p, env, "PORT")))
                set_port(p, "PORT", &c->port, v);
        if ((v = env_get(p, env, "HOST")))
                set_string(&c->host, v);
        if ((v = env_get(p, env, "DEFAULT_PROVIDER")))
                set_string(&c->default_provider, v);
        if ((v = env_get(p, env, "LOG_LEVEL")))
                set_log_level(p, "LOG_LEVEL", &c->log_level, v);
        if ((v = env_get(p, env, "LOG_REQUESTS")))
                set_bool(p, "env", "LOG_REQUESTS", &c->log_requests, v);
        if ((v = env_get(p, env, "LOG_RESPONSES")))
                set_bool(p, "env", "LOG_RESPONSES", &c->log_responses, v);
        if ((v = env_get(p, env, "REQUEST_TIMEOUT"))) {
                unsigned ms;
                if (parse_unsigned(v, 1, UINT32_MAX, &ms) < 0)
                        parser_error(p, "environment: REQUEST_TIMEOUT='%s' is not a positive number of milliseconds", v);
                else
                        c->request_timeout_usec = (usec_t) ms * USEC_PER_MSEC;
        }

        if ((v = env_get(p, env, "LM_STUDIO_BASE_URL")))
                set_url(p, "env", "LM_STUDIO_BASE_URL", &parser_get_plan_provider(p, "lm-studio")->base_url, v);
        if ((v = env_get(p, env, "LM_STUDIO_DEFAULT_MODEL"))) {
                if (!model_name_is_valid(v))
                        parser_error(p, "environment: LM_STUDIO_DEFAULT_MODEL='%s' is not a valid model name", v);
                else
                        set_string(&parser_get_plan_provider(p, "lm-studio")->default_model, v);
        }
        if ((v = env_get(p, env, "QWEN_PROXY_BASE_URL"))) {
                /* As in the plan, the proxy's address is given without /v1. */
                g_autofree char *base = g_strdup(v);
                size_t n = strlen(base);
                while (n > 0 && base[n - 1] == '/')
                        base[--n] = 0;
                g_autofree char *url = g_str_has_suffix(base, "/v1") ? g_strdup(base) : g_strconcat(base, "/v1", NULL);
                set_url(p, "env", "QWEN_PROXY_BASE_URL", &parser_get_plan_provider(p, "qwen-proxy")->base_url, url);
        }
        if ((v = env_get(p, env, "QWEN_BASE_URL")))
                set_url(p, "env", "QWEN_BASE_URL", &parser_get_plan_provider(p, "qwen-direct")->base_url, v);
        if ((v = env_get(p, env, "QWEN_API_KEY"))) {
                ProviderConfig *pc = parser_get_plan_provider(p, "qwen-direct");
                erase_and_free(pc->api_key);
                pc->api_key = g_strdup(v);
                set_string(&pc->api_key_source, "environment variable QWEN_API_KEY");
        }
        if ((v = env_get(p, env, "MODEL_MAPPINGS"))) {
                g_auto(GStrv) pairs = g_strsplit(v, ",", -1);
                for (char **pair = pairs; *pair; pair++) {
                        g_auto(GStrv) kv = NULL;
                        const char *colon;
                        g_strstrip(*pair);
                        if (isempty(*pair))
                                continue;
                        /* At the last colon: model names may contain one ("llama3:8b"), provider names never do. */
                        colon = strrchr(*pair, ':');
                        if (!colon) {
                                parser_error(p, "environment: MODEL_MAPPINGS entry '%s' is not of the form model:provider", *pair);
                                continue;
                        }
                        kv = g_new0(char *, 3);
                        kv[0] = g_strndup(*pair, (gsize) (colon - *pair));
                        kv[1] = g_strdup(colon + 1);
                        g_strstrip(kv[0]);
                        g_strstrip(kv[1]);
                        if (!model_name_is_valid(kv[0]) || isempty(kv[1])) {
                                parser_error(p, "environment: MODEL_MAPPINGS entry '%s' is not of the form model:provider", *pair);
                                continue;
                        }
                        mapping_set(c, kv[0], kv[1]);
                }
        }
}

/* A secret from a file: one trailing line break (as echo writes it) is not part of it. */
static int read_secret_file(const char *path, bool refuse_world_readable, char **ret) {
        char *contents = NULL;
        size_t n;
        int r;

        r = read_regular_file(path, SECRET_FILE_MAX, refuse_world_readable, &contents, &n);
        if (r < 0)
                return r;
        while (n > 0 && (contents[n - 1] == '\n' || contents[n - 1] == '\r'))
                contents[--n] = 0;
        if (n == 0) {
                g_free(contents);
                return -ENODATA;
        }
        *ret = contents;
        return 0;
}

/* A key goes into an Authorization: header: a line break in it would add a header of the key
 * file's choosing, and other control characters have no place there either. */
static bool secret_is_valid(const char *s) {
        return find_control_char(s) < 0;
}

static void find_secret(Parser *p, ProviderConfig *pc, const ConfigSources *src, bool needed) {
        g_autofree char *path = NULL;
        const char *v;
        int r;

        if (pc->api_key)
                return; /* from QWEN_API_KEY */

        if (pc->api_key_credential) {
                if (src->credentials_dir) {
                        path = g_build_filename(src->credentials_dir, pc->api_key_credential, NULL);
                        r = read_secret_file(path, false, &pc->api_key);
                        if (r >= 0) {
                                pc->api_key_source = g_strdup_printf("credential '%s'", pc->api_key_credential);
                                return;
                        }
                        if (r != -ENOENT) {
                                parser_error(p, "provider '%s': cannot read credential '%s': %s",
                                             pc->name, pc->api_key_credential, read_error_to_string(r));
                                return;
                        }
                }
        }
        if (pc->api_key_file) {
                r = read_secret_file(pc->api_key_file, true, &pc->api_key);
                if (r >= 0) {
                        pc->api_key_source = g_strdup_printf("file '%s'", pc->api_key_file);
                        return;
                }
                if (r == -EPERM)
                        parser_error(p, "provider '%s': APIKeyFile='%s' is readable by everyone; "
                                     "make it private (chmod o-r) or use a credential", pc->name, pc->api_key_file);
                else if (r == -ENODATA)
                        parser_error(p, "provider '%s': APIKeyFile='%s' is empty", pc->name, pc->api_key_file);
                else
                        parser_error(p, "provider '%s': cannot read APIKeyFile='%s': %s", pc->name,
                                     pc->api_key_file, read_error_to_string(r));
                return;
        }
        if (pc->api_key_env && (v = env_get(p, src->environ, pc->api_key_env))) {
                pc->api_key = g_strdup(v);
                pc->api_key_source = g_strdup_printf("environment variable %s", pc->api_key_env);
                return;
        }

        if (!pc->api_key_credential && !pc->api_key_env)
                return; /* no key wanted */

        if (needed) {
                if (streq(pc->name, "qwen-direct"))
                        parser_error(p, "QWEN_API_KEY (or credential '%s') is required when DEFAULT_PROVIDER=qwen-direct",
                                     strna(pc->api_key_credential));
                else
                        parser_error(p, "provider '%s' is the default provider but its API key (%s%s) is missing",
                                     pc->name, pc->api_key_credential ? "credential " : "environment variable ",
                                     pc->api_key_credential ?: pc->api_key_env);
        } else
                parser_warning(p, "provider '%s': API key (%s%s) not found, requests are sent without one",
                               pc->name, pc->api_key_credential ? "credential " : "environment variable ",
                               pc->api_key_credential ?: pc->api_key_env);
}

static void resolve_secret(Parser *p, ProviderConfig *pc, const ConfigSources *src, bool needed) {
        find_secret(p, pc, src, needed);
        if (pc->api_key && !secret_is_valid(pc->api_key)) {
                parser_error(p, "provider '%s': the API key from %s contains a line break or another control "
                             "character, which would inject a header into requests; refusing it",
                             pc->name, strna(pc->api_key_source));
                erase_and_free(TAKE_PTR(pc->api_key));
        }
}

#define TLS_FILE_MAX (16U * 1024 * 1024)

/* Reads one PEM file of a provider's TLS settings (a CA bundle, a certificate, a key); NULL after
 * reporting why not. what names the setting, as the user wrote it. With secret, a file readable
 * by everyone is refused, and the contents are the caller's to wipe. */
static char *read_pem(Parser *p, const ProviderConfig *pc, const char *what, const char *path, bool secret,
                      size_t *ret_size) {
        char *contents = NULL;
        size_t n = 0;
        int r;

        r = read_regular_file(path, TLS_FILE_MAX, secret, &contents, &n);
        if (r == -EPERM) {
                parser_error(p, "provider '%s': %s is readable by everyone; make it private (chmod o-r) or use a "
                             "credential", pc->name, what);
                return NULL;
        }
        if (r < 0) {
                parser_error(p, "provider '%s': cannot read %s: %s", pc->name, what, read_error_to_string(r));
                return NULL;
        }
        if (!strstr(contents, "-----BEGIN ")) {
                parser_error(p, "provider '%s': %s holds no PEM data (-----BEGIN …)", pc->name, what);
                explicit_bzero(contents, n);
                g_free(contents);
                return NULL;
        }
        if (ret_size)
                *ret_size = n;
        return contents;
}

static void read_pem_check(Parser *p, const ProviderConfig *pc, const char *key, const char *path, bool secret) {
        g_autofree char *what = g_strdup_printf("%s='%s'", key, path);
        size_t n = 0;
        char *contents = read_pem(p, pc, what, path, secret, &n);

        if (contents) {
                explicit_bzero(contents, n);
                g_free(contents);
        }
}

static char *read_pem_credential(Parser *p, const ProviderConfig *pc, const ConfigSources *src, const char *key,
                                 const char *name, size_t *ret_size) {
        g_autofree char *what = g_strdup_printf("%s='%s'", key, name);
        g_autofree char *path = NULL;

        if (!src->credentials_dir) {
                parser_error(p, "provider '%s': %s is set but no credentials were passed ($CREDENTIALS_DIRECTORY is unset)",
                             pc->name, what);
                return NULL;
        }
        path = g_build_filename(src->credentials_dir, name, NULL);
        return read_pem(p, pc, what, path, false, ret_size);
}

/* CAFile= and the client certificate: every file is read now, so that a missing or loose one is
 * an error of the configuration, not a failed handshake later. Certificates and keys from
 * credentials are kept in memory (the credential directory may not outlive the start). */
static void resolve_tls(Parser *p, ProviderConfig *pc, const ConfigSources *src) {
        bool have_cert = pc->client_cert_file || pc->client_cert_credential;
        bool have_key = pc->client_key_file || pc->client_key_credential;

        if (pc->ca_file)
                read_pem_check(p, pc, "CAFile", pc->ca_file, false);

        if (pc->client_cert_file && pc->client_cert_credential)
                parser_error(p, "provider '%s': set ClientCertificateFile= or ClientCertificateCredential=, not both",
                             pc->name);
        if (pc->client_key_file && pc->client_key_credential)
                parser_error(p, "provider '%s': set ClientKeyFile= or ClientKeyCredential=, not both", pc->name);
        if (have_key && !have_cert)
                parser_error(p, "provider '%s': a client key (ClientKeyFile=/ClientKeyCredential=) needs a client "
                             "certificate (ClientCertificateFile=/ClientCertificateCredential=)", pc->name);

        if (pc->client_cert_file)
                read_pem_check(p, pc, "ClientCertificateFile", pc->client_cert_file, false);
        if (pc->client_key_file)
                read_pem_check(p, pc, "ClientKeyFile", pc->client_key_file, true);
        if (pc->client_cert_credential)
                pc->client_cert_blob = read_pem_credential(p, pc, src, "ClientCertificateCredential",
                                                           pc->client_cert_credential, &pc->client_cert_blob_size);
        if (pc->client_key_credential)
                pc->client_key_blob = read_pem_credential(p, pc, src, "ClientKeyCredential", pc->client_key_credential,
                                                          &pc->client_key_blob_size);
}

static char *provider_names(const Config *c) {
        g_autoptr(GString) s = g_string_new(NULL);
        for (guint i = 0; i < c->providers->len; i++) {
                ProviderConfig *pc = c->providers->pdata[i];
                if (i > 0)
                        g_string_append(s, ", ");
                g_string_append(s, pc->name);
        }
        return g_string_free(g_steal_pointer(&s), FALSE);
}

char *config_token_digest(const char *token, size_t size) {
        return g_compute_checksum_for_data(G_CHECKSUM_SHA256, (const guchar *) token, size);
}

/* One bearer token per line; '#' starts a comment. Kept only as digests, so the secrets
 * themselves are wiped right after reading. */
static void load_client_tokens(Parser *p, const ConfigSources *src) {
        Config *c = p->config;
        g_autofree char *path = NULL;
        char *contents = NULL;
        const char *what;
        int r;

        if (c->client_tokens_credential) {
                if (!src->credentials_dir) {
                        parser_error(p, "ClientTokensCredential='%s' is set but no credentials were passed "
                                     "($CREDENTIALS_DIRECTORY is unset)", c->client_tokens_credential);
                        return;
                }
                path = g_build_filename(src->credentials_dir, c->client_tokens_credential, NULL);
                what = "credential";
                r = read_secret_file(path, false, &contents);
        } else if (c->client_tokens_file) {
                path = g_strdup(c->client_tokens_file);
                what = "ClientTokensFile=";
                r = read_secret_file(path, true, &contents);
        } else
                return;

        if (r == -EPERM) {
                parser_error(p, "ClientTokensFile='%s' is readable by everyone; make it private (chmod o-r)", path);
                return;
        }
        if (r < 0) {
                parser_error(p, "cannot read the client tokens (%s '%s'): %s", what, path, read_error_to_string(r));
                return;
        }

        size_t size = strlen(contents);
        unsigned line_number = 0;
        c->client_token_digests = g_ptr_array_new_with_free_func(g_free);
        for (char *line = contents, *next; line && *line; line = next) {
                next = strchr(line, '\n');
                if (next)
                        *next++ = 0;
                line_number++;
                g_strstrip(line);
                if (line[0] == 0 || line[0] == '#')
                        continue;
                /* No client could send it: a token that can never match is a mistake to report. */
                if (!secret_is_valid(line)) {
                        parser_error(p, "the client tokens (%s '%s'): the token on line %u contains a control "
                                     "character", what, path, line_number);
                        continue;
                }
                g_ptr_array_add(c->client_token_digests, config_token_digest(line, strlen(line)));
        }
        if (c->client_token_digests->len == 0)
                parser_error(p, "the client tokens (%s '%s') contain no token", what, path);
        explicit_bzero(contents, size);
        g_free(contents);
}

static void validate(Parser *p, const ConfigSources *src) {
        Config *c = p->config;
        g_autofree char *names = provider_names(c);

        load_client_tokens(p, src);
        if (c->max_cooldown_usec < c->cooldown_usec)
                c->max_cooldown_usec = c->cooldown_usec;
        if (c->max_buffered_size < c->max_body_size)
                parser_warning(p, "MaxBufferedSize=%" PRIu64 " is smaller than MaxBodySize=%" PRIu64
                               ": a body larger than the first is always refused with 503",
                               c->max_buffered_size, c->max_body_size);

        if (c->providers->len == 0)
                parser_error(p, "no providers are configured");

        if (!config_find_provider(c, c->default_provider))
                parser_error(p, "DefaultProvider='%s' is not a configured provider (known: %s)",
                             strempty(c->default_provider), names);

        for (guint i = 0; i < c->providers->len; i++) {
                ProviderConfig *pc = c->providers->pdata[i];

                /* Inherit router-wide values that the provider does not set itself. */
                if (pc->connect_timeout_usec == USEC_INFINITY)
                        pc->connect_timeout_usec = c->connect_timeout_usec;
                if (pc->request_timeout_usec == USEC_INFINITY)
                        pc->request_timeout_usec = c->request_timeout_usec;
                if (pc->first_byte_timeout_usec == USEC_INFINITY)
                        pc->first_byte_timeout_usec = c->first_byte_timeout_usec;
                if (pc->first_byte_timeout_usec == USEC_INFINITY)
                        pc->first_byte_timeout_usec = pc->request_timeout_usec;
                if (pc->idle_timeout_usec == USEC_INFINITY)
                        pc->idle_timeout_usec = c->stream_idle_timeout_usec;

                if (pc->kind == PROVIDER_KIND_OPENAI && !pc->base_url)
                        parser_error(p, "provider '%s' has no BaseURL=", pc->name);
                if (pc->base_url) {
                        pc->chat_url = g_strconcat(pc->base_url, "/chat/completions", NULL);
                        pc->completions_url = g_strconcat(pc->base_url, "/completions", NULL);
                        pc->embeddings_url = g_strconcat(pc->base_url, "/embeddings", NULL);
                        pc->models_url = g_strconcat(pc->base_url, "/models", NULL);
                }

                for (char **f = pc->fallbacks; f && *f; f++) {
                        if (streq(*f, pc->name))
                                parser_error(p, "provider '%s' lists itself in Fallbacks=", pc->name);
                        else if (!config_find_provider(c, *f))
                                parser_error(p, "provider '%s': fallback '%s' is not a configured provider (known: %s)",
                                             pc->name, *f, names);
                }

                resolve_secret(p, pc, src, streq(pc->name, strempty(c->default_provider)));
                resolve_tls(p, pc, src);
        }

        if (c->mapping_order->len > c->max_routes)
                parser_error(p, "%u model mappings are configured, more than MaxRoutes=%u", c->mapping_order->len,
                             c->max_routes);
        for (guint i = 0; i < c->mapping_order->len; i++) {
                const char *model = c->mapping_order->pdata[i];
                const char *provider = g_hash_table_lookup(c->mappings, model);
                if (!config_find_provider(c, provider))
                        parser_error(p, "model mapping '%s' names provider '%s', which is not configured (known: %s)",
                                     model, provider, names);
        }

        for (guint i = 0; i < c->routes->len; i++) {
                const RouteConfig *rc = c->routes->pdata[i];
                for (char **n = rc->providers; n && *n; n++)
                        if (!config_find_provider(c, *n))
                                parser_error(p, "[Route %s] Providers= names '%s', which is not a configured provider (known: %s)",
                                             rc->model, *n, names);
                for (char **n = rc->mirrors; n && *n; n++)
                        if (!config_find_provider(c, *n))
                                parser_error(p, "[Route %s] Mirror= names '%s', which is not a configured provider (known: %s)",
                                             rc->model, *n, names);
                if (!rc->providers && !streq(rc->model, ROUTE_DEFAULT_MODEL) && !g_hash_table_contains(c->mappings, rc->model))
                        parser_error(p, "[Route %s] has no Providers= and the model has no mapping", rc->model);
                if (rc->providers && g_hash_table_contains(c->mappings, rc->model))
                        parser_warning(p, "[Route %s] Providers= replaces the model's [ModelMappings] entry", rc->model);
        }

        if (p->aliases) {
                GHashTableIter it;
                gpointer k, v;

                g_hash_table_iter_init(&it, p->aliases);
                while (g_hash_table_iter_next(&it, &k, &v)) {
                        ProviderConfig *pc = config_find_provider(c, k);
                        if (!pc) {
                                parser_error(p, "[ModelAliases %s] names a provider that is not configured (known: %s)",
                                             (char *) k, names);
                                continue;
                        }
                        if (g_hash_table_size(v) == 0)
                                continue;
                        if (pc->aliases)
                                g_hash_table_unref(pc->aliases);
                        pc->aliases = g_hash_table_ref(v);
                }
        }
}

int config_load(const ConfigSources *src, Config **ret, GPtrArray **ret_errors, GPtrArray **ret_warnings) {
        g_autoptr(GPtrArray) errors = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GPtrArray) warnings = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GPtrArray) sources = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(Config) c = config_new_empty();
        g_autofree char *dropin_dir = NULL;
        g_autoptr(GPtrArray) dropins = NULL;
        Parser p = { .config = c, .errors = errors, .warnings = warnings };
        g_autoptr(GHashTable) aliases = NULL;

        g_assert(src);
        g_assert(ret);

        if (src->path) {
                if (parse_file(&p, src->path, src->path_required) > 0)
                        g_ptr_array_add(sources, g_strdup(src->path));
                dropin_dir = src->dropin_dir ? g_strdup(src->dropin_dir) : g_strconcat(src->path, ".d", NULL);
        } else if (src->dropin_dir)
                dropin_dir = g_strdup(src->dropin_dir);

        if (dropin_dir) {
                dropins = list_dropins(dropin_dir);
                for (guint i = 0; i < dropins->len; i++)
                        if (parse_file(&p, dropins->pdata[i], true) > 0)
                                g_ptr_array_add(sources, g_strdup(dropins->pdata[i]));
        }

        /* Files that define no provider at all get the built-in set, so a file that only sets
         * [Router] keys still has somewhere to route. */
        if (!p.saw_provider_group)
                config_add_builtin_providers(c);

        parse_environment(&p, src->environ);
        validate(&p, src);
        aliases = p.aliases;

        if (ret_warnings)
                *ret_warnings = g_steal_pointer(&warnings);

        if (errors->len > 0) {
                if (ret_errors)
                        *ret_errors = g_steal_pointer(&errors);
                return -EINVAL;
        }

        g_ptr_array_add(sources, NULL);
        c->sources = (char **) g_ptr_array_free(g_steal_pointer(&sources), FALSE);
        *ret = TAKE_PTR(c);
        if (ret_errors)
                *ret_errors = NULL;
        return 0;
}
