/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "config.h"
#include "curl-glue.h"
#include "http-server.h"
#include "router.h"
#include "stats.h"
#include "util.h"

typedef enum BusMode {
        BUS_MODE_NONE,
        BUS_MODE_SYSTEM,
        BUS_MODE_SESSION,
        _BUS_MODE_MAX,
        _BUS_MODE_INVALID = -EINVAL,
} BusMode;

const char *bus_mode_to_string(BusMode m);
BusMode bus_mode_from_string(const char *s);

typedef struct Request Request;

typedef struct ManagerOptions {
        const char *config_path;     /* NULL: the default path, missing is fine */
        bool config_path_required;
        BusMode bus_mode;
} ManagerOptions;

typedef struct Manager {
        sd_event *event;
        ManagerOptions options;
        char *config_path;

        Config *config;
        Router *router;
        Stats *stats;
        GHashTable *health;          /* name → ProviderHealth* */
        HttpServer *http;
        CurlGlue *curl;

        sd_bus *bus;
        void *bus_data;              /* owned by bus.c */

        GList *requests;             /* Request* alive, for shutdown */
        unsigned n_requests;
        uint64_t request_counter;
        uint64_t request_id_seed;

        bool stopping;
        sd_event_source *shutdown_timer;
        sd_event_source *watchdog_timer;
        sd_event_source *hup_sweep;  /* owned by request.c */
        usec_t started_usec;         /* CLOCK_MONOTONIC */
} Manager;

int manager_new(const ManagerOptions *options, Manager **ret);
Manager *manager_free(Manager *m);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Manager, manager_free)

int manager_start(Manager *m);
int manager_run(Manager *m);

/* Re-reads the configuration files; keeps the old one on any error. */
int manager_reload(Manager *m, char **ret_error);
void manager_begin_shutdown(Manager *m);

/* Routing changes at runtime; they notify the bus and are kept in the state directory. */
int manager_set_default_provider(Manager *m, const char *name);
int manager_set_model_mapping(Manager *m, const char *model, const char *provider);
int manager_remove_model_mapping(Manager *m, const char *model);

void manager_request_added(Manager *m, Request *r);
void manager_request_removed(Manager *m, Request *r);
void manager_next_request_id(Manager *m, char *buf, size_t size);
