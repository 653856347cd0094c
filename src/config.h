/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "util.h"

typedef enum ProviderKind {
        PROVIDER_KIND_OPENAI, /* any OpenAI-compatible HTTP(S) server */
        PROVIDER_KIND_ECHO,   /* answers locally, for trying a client with no backend */
        _PROVIDER_KIND_MAX,
        _PROVIDER_KIND_INVALID = -EINVAL,
} ProviderKind;

const char *provider_kind_to_string(ProviderKind k);
ProviderKind provider_kind_from_string(const char *s);

/* Whether a client's own Authorization header may be passed to a provider (one without a key of
 * its own, and only when the header is not one of the router's client tokens). */
typedef enum ClientAuthorization {
        CLIENT_AUTHORIZATION_ROUTED,  /* only to the provider the request was routed to */
        CLIENT_AUTHORIZATION_ALWAYS,  /* also as a fallback and in the merged /v1/models */
        CLIENT_AUTHORIZATION_NEVER,
        _CLIENT_AUTHORIZATION_MAX,
        _CLIENT_AUTHORIZATION_INVALID = -EINVAL,
} ClientAuthorization;

const char *client_authorization_to_string(ClientAuthorization a);
ClientAuthorization client_authorization_from_string(const char *s);

/* One [Provider NAME] group, resolved: the secret is loaded, timeouts are in µs. Immutable once
 * loaded and reference counted, so a request in flight keeps the provider it started with
 * across a reload. */
typedef struct ProviderConfig {
        unsigned n_ref;
        char *name;
        ProviderKind kind;
        char *base_url;            /* no trailing slash */
        char *chat_url;            /* base_url + "/chat/completions" etc., made once at load */
        char *completions_url;
        char *embeddings_url;
        char *models_url;
        char *default_model;
        char **models;             /* advertised in /v1/models besides what the provider lists */
        char *api_key_credential;  /* sources, at most one is used */
        char *api_key_file;
        char *api_key_env;
        char *api_key;             /* the secret; wiped on free; NULL if none */
        char *api_key_source;      /* where the secret came from, for messages; never the secret */
        char **fallbacks;
        usec_t connect_timeout_usec;
        usec_t request_timeout_usec;
        usec_t first_byte_timeout_usec;
        usec_t idle_timeout_usec;
        unsigned max_concurrent;   /* 0 = unlimited */
        unsigned max_retries;
        GHashTable *aliases;       /* [ModelAliases NAME]: client's model → this provider's; NULL if none */

        /* TLS and proxy to the provider, checked at load */
        char *ca_file;                 /* CAFile=: trusted instead of the system store */
        char *client_cert_file;        /* ClientCertificateFile= */
        char *client_key_file;         /* ClientKeyFile=, not readable by everyone */
        char *client_cert_credential;  /* ClientCertificateCredential= */
        char *client_key_credential;   /* ClientKeyCredential= */
        char *client_cert_blob;        /* PEM, from the credential */
        size_t client_cert_blob_size;
        char *client_key_blob;         /* PEM, from the credential; a secret, wiped on free */
        size_t client_key_blob_size;
        char *proxy;                   /* Proxy=; with proxy_set and NULL: explicitly none */
        bool proxy_set;                /* unset: libcurl's environment (HTTPS_PROXY, NO_PROXY…) */
        ClientAuthorization client_authorization;
} ProviderConfig;

ProviderConfig *provider_config_ref(ProviderConfig *p);
ProviderConfig *provider_config_unref(ProviderConfig *p);
void provider_config_destroy(gpointer p); /* for GLib containers */
G_DEFINE_AUTOPTR_CLEANUP_FUNC(ProviderConfig, provider_config_unref)

/* How a split keeps one conversation on one arm. */
typedef enum StickyKind {
        STICKY_NONE,               /* each request drawn by weight */
        STICKY_USER,               /* the body's "user" member */
        STICKY_HEADER,             /* a request header */
        STICKY_TOKEN,              /* the client's bearer token */
        _STICKY_KIND_MAX,
        _STICKY_KIND_INVALID = -EINVAL,
} StickyKind;

/* One [Route MODEL] group ("*" is the default route). */
typedef struct RouteConfig {
        char *model;
        char **providers;          /* Providers=: the arms; NULL: the mapping's or default provider */
        uint32_t *weights;         /* one per provider, >= 1 */
        StickyKind sticky;
        char *sticky_header;       /* STICKY_HEADER */
        char **mirrors;            /* Mirror= */
        unsigned mirror_percent;   /* of requests mirrored, 0-100 */
} RouteConfig;

#define ROUTE_DEFAULT_MODEL "*"

typedef struct Config {
        char *host;
        uint16_t port;
        char *default_provider;
        bool allow_provider_override;
        usec_t request_timeout_usec;
        usec_t connect_timeout_usec;
        usec_t first_byte_timeout_usec;
        usec_t stream_idle_timeout_usec;
        usec_t client_timeout_usec;
        usec_t shutdown_timeout_usec;
        int log_level;
        bool log_requests;
        bool log_responses;
        uint64_t max_body_size;
        uint64_t max_response_size;
        uint64_t max_header_size;
        uint64_t stream_buffer_size;
        uint64_t max_buffered_size; /* one budget for every buffered body and answer */
        unsigned max_routes;       /* model mappings and splits, at most */
        unsigned max_connections;
        char *cors_allow_origin;   /* "*" or origins separated by spaces; NULL: no CORS headers */
        char **allowed_hosts;      /* Host: names accepted besides loopback ones; "*" = any; NULL = none */
        usec_t models_cache_usec;  /* how long the merged GET /v1/models list is kept; 0 = not */

        /* failover and health */
        unsigned failure_threshold; /* failures in a row that mark a provider down; 0 = never */
        usec_t cooldown_usec;
        usec_t max_cooldown_usec;
        usec_t retry_backoff_usec;  /* first wait before trying the same provider again */
        usec_t max_retry_wait_usec; /* longest Retry-After the router waits out itself */

        /* client authentication: SHA-256 digests of the accepted bearer tokens; NULL = open */
        GPtrArray *client_token_digests;
        char *client_tokens_credential;
        char *client_tokens_file;

        GPtrArray *providers;      /* ProviderConfig*, in the order they were first defined */
        GPtrArray *routes;         /* RouteConfig*, in the order first defined */
        unsigned mirror_max_concurrent; /* mirrored transfers at once; past it a mirror is skipped */
        unsigned comparisons_kept; /* recent comparisons kept for GetComparisons */
        GHashTable *providers_by_name; /* name → ProviderConfig* (the references of providers) */
        GHashTable *mappings;      /* model → provider name */
        GPtrArray *mapping_order;  /* model names, insertion order, for stable output */

        char **sources;            /* files read, in order, for messages */
} Config;

Config *config_free(Config *c);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Config, config_free)

/* Where to read from; every field may be NULL. Tests pass their own. */
typedef struct ConfigSources {
        const char *path;           /* main file; a missing file means built-in defaults */
        bool path_required;         /* --config was given: a missing file is an error */
        const char *dropin_dir;     /* defaults to "<path>.d" */
        char **environ;             /* the plan's variables are looked up here */
        const char *credentials_dir;/* $CREDENTIALS_DIRECTORY */
} ConfigSources;

/* Reads and validates. On failure returns -EINVAL and *ret_errors lists every problem found
 * (one message each); warnings are always returned in *ret_warnings when non-NULL. */
int config_load(const ConfigSources *src, Config **ret, GPtrArray **ret_errors, GPtrArray **ret_warnings);

/* Built-in defaults: the plan's three providers plus the local echo provider. */
Config *config_new_default(void);

/* O(1): a hash table by name. */
ProviderConfig *config_find_provider(const Config *c, const char *name);
const RouteConfig *config_find_route(const Config *c, const char *model);
/* "a:80 b:20" → names (NULL-terminated) and weights; -EINVAL, -EEXIST (a name twice), -ENODATA. */
int config_parse_arms(const char *v, char ***ret_names, uint32_t **ret_weights);
/* "user", "header:NAME", "token" → kind (and the header's name). */
StickyKind sticky_kind_from_string(const char *s, char **ret_header);

bool provider_name_is_valid(const char *name);
bool model_name_is_valid(const char *model);

#define MODEL_NAME_MAX 256
#define PROVIDER_NAME_MAX 64

/* Lower-case hex SHA-256 of a bearer token, as kept in client_token_digests. */
char *config_token_digest(const char *token, size_t size);

int parse_size(const char *s, uint64_t *ret);
int parse_seconds(const char *s, usec_t *ret);
int parse_boolean(const char *s);
