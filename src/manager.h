/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "config.h"
#include "curl-glue.h"
#include "exchange.h"
#include "provider.h"
#include "router.h"
#include "worker.h"

typedef enum BusMode {
        BUS_MODE_NONE,
        BUS_MODE_SYSTEM,
        BUS_MODE_SESSION,
        _BUS_MODE_MAX,
        _BUS_MODE_INVALID = -EINVAL,
} BusMode;

const char *bus_mode_to_string(BusMode m);
BusMode bus_mode_from_string(const char *s);

typedef struct ManagerOptions {
        const char *config_path;     /* NULL: the default path, missing is fine */
        bool config_path_required;
        BusMode bus_mode;
} ManagerOptions;

/* What the manager tells those who listen (the D-Bus object, the saved state). */
typedef enum ManagerEvent {
        MANAGER_ROUTING_CHANGED,     /* default provider or a route changed at runtime */
        MANAGER_RELOADED,            /* the configuration files were read again */
        MANAGER_PROVIDER_STATES,     /* a provider's health state changed */
        _MANAGER_EVENT_MAX,
} ManagerEvent;

typedef struct Manager Manager;
typedef void (*ManagerListenerFunc)(Manager *m, ManagerEvent event, void *userdata);

/* Owns the event loop, the configuration snapshot with its provider set and route table, and the
 * loop's worker (HTTP front end, curl). Changes routing when asked, and tells its listeners. */
struct Manager {
        sd_event *event;
        ManagerOptions options;
        char *config_path;

        Config *config;
        ProviderSet *providers;
        Router *router;
        CurlGlue *curl;
        Worker worker;               /* the one loop's; handlers see only this */

        GArray *listeners;           /* ManagerListener */
        bool stopping;
        sd_event_source *shutdown_timer;
        sd_event_source *post;       /* log flushing, and the end of a shutdown: on when needed */
};

int manager_new(const ManagerOptions *options, Manager **ret);
Manager *manager_free(Manager *m);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Manager, manager_free)

void manager_add_listener(Manager *m, ManagerListenerFunc func, void *userdata);

/* Starts serving HTTP; manager_ready() tells systemd once everything else is up too. */
int manager_start(Manager *m);
void manager_ready(Manager *m);
int manager_run(Manager *m);

/* Re-reads the configuration files; keeps the old one on any error. */
int manager_reload(Manager *m, char **ret_error);
void manager_begin_shutdown(Manager *m);

/* Routing changes at runtime; they take effect for the next request. Return 1 if something
 * changed, 0 if it was so already, -ENOENT for an unknown provider, -EINVAL for a bad model. */
int manager_set_default_provider(Manager *m, const char *name);
int manager_set_model_mapping(Manager *m, const char *model, const char *provider);
int manager_remove_model_mapping(Manager *m, const char *model);
/* Several providers by weight; see router_set_split(). */
int manager_set_model_split(Manager *m, const char *model, const char *const *providers, const uint32_t *weights,
                            unsigned n, const char **ret_unknown);
