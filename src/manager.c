/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>
#include <sys/resource.h>

#include <systemd/sd-daemon.h>

#include "bus.h"
#include "health.h"
#include "log.h"
#include "manager.h"
#include "request.h"
#include "state.h"

static const char *const bus_mode_table[_BUS_MODE_MAX] = {
        [BUS_MODE_NONE] = "none",
        [BUS_MODE_SYSTEM] = "system",
        [BUS_MODE_SESSION] = "session",
};

const char *bus_mode_to_string(BusMode m) {
        if (m < 0 || m >= _BUS_MODE_MAX)
                return NULL;
        return bus_mode_table[m];
}

BusMode bus_mode_from_string(const char *s) {
        for (int i = 0; s && i < _BUS_MODE_MAX; i++)
                if (streq(s, bus_mode_table[i]))
                        return (BusMode) i;
        return _BUS_MODE_INVALID;
}

static uint64_t splitmix64(uint64_t x) {
        x += 0x9e3779b97f4a7c15ULL;
        x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
        x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
        return x ^ (x >> 31);
}

void manager_next_request_id(Manager *m, char *buf, size_t size) {
        /* Unique within a run and unpredictable across runs, without a syscall per request. */
        (void) snprintf(buf, size, "%016" PRIx64, splitmix64(m->request_id_seed + ++m->request_counter));
}

void manager_request_added(Manager *m, Request *r) {
        m->requests = g_list_prepend(m->requests, r);
        r->link = m->requests;
        m->n_requests++;
}

static void manager_check_done(Manager *m) {
        if (m->stopping && m->n_requests == 0) {
                log_debug("All requests finished, exiting.");
                (void) sd_event_exit(m->event, 0);
        }
}

void manager_request_removed(Manager *m, Request *r) {
        m->requests = g_list_delete_link(m->requests, r->link);
        r->link = NULL;
        g_assert(m->n_requests > 0);
        m->n_requests--;
        manager_check_done(m);
}

static void manager_apply_log_settings(Manager *m) {
        log_set_max_level(m->config->log_level);
}

static int manager_load_config(Manager *m, Config **ret, char **ret_error) {
        g_autoptr(GPtrArray) errors = NULL, warnings = NULL;
        g_auto(GStrv) env = g_get_environ();
        ConfigSources src = {
                .path = m->config_path,
                .path_required = m->options.config_path_required,
                .environ = env,
                .credentials_dir = g_getenv("CREDENTIALS_DIRECTORY"),
        };
        int r;

        r = config_load(&src, ret, &errors, &warnings);
        for (guint i = 0; warnings && i < warnings->len; i++)
                log_warning("%s", (char *) warnings->pdata[i]);
        if (r < 0) {
                g_autoptr(GString) all = g_string_new(NULL);
                for (guint i = 0; i < errors->len; i++) {
                        log_error("%s", (char *) errors->pdata[i]);
                        if (i > 0)
                                g_string_append(all, "; ");
                        g_string_append(all, errors->pdata[i]);
                }
                if (ret_error)
                        *ret_error = g_string_free(g_steal_pointer(&all), FALSE);
                return log_error_errno(r, "Configuration has %u error(s).", errors->len);
        }
        return 0;
}

static void manager_update_status(Manager *m) {
        g_autofree char *where = m->http ? http_server_describe(m->http) : NULL;
        (void) sd_notifyf(false, "STATUS=Routing to '%s' by default on %s", m->router->default_provider, strna(where));
}

static void manager_routing_changed(Manager *m, bool save) {
        if (save) {
                int r = state_save(m);
                if (r < 0)
                        log_warning_errno(r, "Failed to save the routing state, the change is not persistent: %m");
        }
        bus_emit_routing_changed(m);
        manager_update_status(m);
}

int manager_set_default_provider(Manager *m, const char *name) {
        int r = router_set_default(m->router, name);
        if (r <= 0)
                return r;
        log_info("Default provider is now '%s'.", name);
        manager_routing_changed(m, true);
        return 1;
}

int manager_set_model_mapping(Manager *m, const char *model, const char *provider) {
        int r = router_set_mapping(m->router, model, provider);
        if (r <= 0)
                return r;
        log_info("Model '%s' is now routed to provider '%s'.", model, provider);
        manager_routing_changed(m, true);
        return 1;
}

int manager_remove_model_mapping(Manager *m, const char *model) {
        int r = router_remove_mapping(m->router, model);
        if (r <= 0)
                return r;
        log_info("Model mapping for '%s' removed.", model);
        manager_routing_changed(m, true);
        return 1;
}

int manager_reload(Manager *m, char **ret_error) {
        g_autoptr(Config) c = NULL;
        g_auto(GStrv) names = NULL;
        Router *old_router;
        Config *old_config;
        int r;

        (void) sd_notifyf(false, "RELOADING=1\nSTATUS=Reloading configuration…");
        r = manager_load_config(m, &c, ret_error);
        if (r < 0) {
                log_warning("Keeping the previous configuration.");
                (void) sd_notify(false, "READY=1");
                manager_update_status(m);
                return r;
        }

        if (!streq(c->host, m->config->host) || c->port != m->config->port)
                log_notice("Host=/Port= changes take effect when the service restarts; the listening sockets stay.");

        /* Swap: requests in flight hold their own provider references and finish as they began. */
        old_router = m->router;
        old_config = m->config;
        m->config = TAKE_PTR(c);
        m->router = router_new(m->config);
        router_free(old_router);
        config_free(old_config);

        names = router_provider_names(m->router);
        stats_prune(m->stats, names);
        health_prune(m, names);
        manager_apply_log_settings(m);

        /* A reload returns routing to what the files say: runtime changes are dropped. */
        (void) state_clear(m);

        log_info("Configuration reloaded: %u provider(s), default '%s', %u model mapping(s).",
                 m->router->providers->len, m->router->default_provider, m->router->mapping_order->len);
        (void) sd_notify(false, "READY=1");
        manager_routing_changed(m, false);
        return 0;
}

static int manager_on_shutdown_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        Manager *m = userdata;
        log_warning("%u request(s) still running after ShutdownTimeoutSec=, exiting anyway.", m->n_requests);
        (void) sd_event_exit(m->event, 0);
        return 0;
}

void manager_begin_shutdown(Manager *m) {
        int r;

        if (m->stopping)
                return;
        m->stopping = true;
        (void) sd_notify(false, "STOPPING=1\nSTATUS=Finishing requests in flight…");
        log_info("Stopping: no new connections; waiting for %u request(s) in flight.", m->n_requests);

        if (m->http)
                http_server_quiesce(m->http);

        r = sd_event_add_time_relative(m->event, &m->shutdown_timer, CLOCK_MONOTONIC,
                                       m->config->shutdown_timeout_usec, 0, manager_on_shutdown_timeout, m);
        if (r < 0) {
                log_warning_errno(r, "Failed to arm the shutdown timer, exiting now: %m");
                (void) sd_event_exit(m->event, 0);
                return;
        }
        (void) sd_event_source_set_description(m->shutdown_timer, "shutdown-timeout");
        manager_check_done(m);
}

static int manager_on_sigterm(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        Manager *m = userdata;

        if (m->stopping) {
                /* A second signal: the operator does not want to wait. */
                log_notice("Second stop signal, exiting now.");
                (void) sd_event_exit(m->event, 0);
                return 0;
        }
        manager_begin_shutdown(m);
        return 0;
}

static int manager_on_sighup(sd_event_source *s, const struct signalfd_siginfo *si, void *userdata) {
        Manager *m = userdata;
        (void) manager_reload(m, NULL);
        return 0;
}

static int manager_on_post(sd_event_source *s, void *userdata) {
        log_flush();
        return 0;
}

static void raise_fd_limit(void) {
        struct rlimit rl;

        /* Each connection is a socket, and so is each provider connection; the soft limit of
         * 1024 is too low for a proxy. Like systemd's own daemons, take the hard limit. */
        if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur >= rl.rlim_max)
                return;
        rl.rlim_cur = MIN(rl.rlim_max, (rlim_t) 524288);
        (void) setrlimit(RLIMIT_NOFILE, &rl);
}

int manager_new(const ManagerOptions *options, Manager **ret) {
        g_autoptr(Manager) m = g_new0(Manager, 1);
        uint64_t seed = 0;
        int r;

        m->options = *options;
        m->config_path = g_strdup(options->config_path ?: CONFIG_FILE);
        m->started_usec = now_usec(CLOCK_MONOTONIC);
        if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != sizeof(seed))
                seed = now_usec(CLOCK_REALTIME) ^ (uint64_t) getpid();
        m->request_id_seed = seed;

        r = manager_load_config(m, &m->config, NULL);
        if (r < 0)
                return r;
        manager_apply_log_settings(m);
        m->router = router_new(m->config);
        m->stats = stats_new();
        m->health = health_table_new();

        r = sd_event_default(&m->event);
        if (r < 0)
                return log_error_errno(r, "Failed to allocate the event loop: %m");

        *ret = TAKE_PTR(m);
        return 0;
}

Manager *manager_free(Manager *m) {
        if (!m)
                return NULL;

        /* Connections still parked must be let go before MHD can stop. */
        for (GList *l = m->requests; l; l = l->next) {
                Request *r = l->data;
                if (r->upstream)
                        r->upstream = upstream_free(r->upstream);
                r->client_gone = true;
                request_wake(r);
        }
        bus_done(m);
        http_server_free(m->http);
        if (m->health)
                g_hash_table_unref(m->health); /* probes are transfers: before curl goes */
        curl_glue_free(m->curl);
        sd_event_source_disable_unref(m->shutdown_timer);
        sd_event_source_disable_unref(m->hup_sweep);
        router_free(m->router);
        config_free(m->config);
        stats_free(m->stats);
        g_free(m->config_path);
        sd_event_unref(m->event);
        g_free(m);
        return NULL;
}

int manager_start(Manager *m) {
        g_autofree char *where = NULL;
        int r;

        raise_fd_limit();

        r = sd_event_add_signal(m->event, NULL, SIGTERM, manager_on_sigterm, m);
        if (r >= 0)
                r = sd_event_add_signal(m->event, NULL, SIGINT, manager_on_sigterm, m);
        if (r >= 0)
                r = sd_event_add_signal(m->event, NULL, SIGHUP, manager_on_sighup, m);
        if (r < 0)
                return log_error_errno(r, "Failed to watch signals: %m");

        if (log_get_target() == LOG_TARGET_STDERR) {
                r = sd_event_add_post(m->event, NULL, manager_on_post, m);
                if (r < 0)
                        return log_error_errno(r, "Failed to set up log flushing: %m");
                log_buffer_requests();
        }

        /* Feeds the watchdog from the loop itself, so a stuck loop is noticed. */
        r = sd_event_set_watchdog(m->event, true);
        if (r < 0)
                log_warning_errno(r, "Failed to enable the watchdog, ignoring: %m");

        r = curl_glue_new(m->event, &m->curl);
        if (r < 0)
                return log_error_errno(r, "Failed to set up libcurl: %m");

        /* Runtime routing changes outlive restarts until a reload. */
        (void) state_load(m); /* logs why it could not */

        HttpServerSettings hs = {
                .host = m->config->host,
                .port = m->config->port,
                .max_connections = m->config->max_connections,
                .connection_timeout_sec = (unsigned) MAX(m->config->client_timeout_usec / USEC_PER_SEC, (usec_t) 1),
                .connection_memory_limit = (size_t) m->config->max_header_size,
                .handler = request_access_handler,
                .completed = request_completed,
                .userdata = m,
        };
        r = http_server_new(m->event, &hs, &m->http);
        if (r < 0)
                return r;

        r = bus_setup(m);
        if (r < 0)
                return r;

        where = http_server_describe(m->http);
        log_info("provider-router %s listening on %s%s; default provider '%s', %u provider(s).", PACKAGE_VERSION,
                 where, http_server_socket_activated(m->http) ? " (socket activated)" : "",
                 m->router->default_provider, m->router->providers->len);
        (void) sd_notify(false, "READY=1");
        manager_update_status(m);
        return 0;
}

int manager_run(Manager *m) {
        int r = sd_event_loop(m->event);
        if (r < 0)
                return log_error_errno(r, "Event loop failed: %m");
        /* We leave the loop with 0; sd-bus leaves it with EXIT_FAILURE when the bus goes away
         * (sd_bus_set_exit_on_disconnect()). That is a failure, so that systemd restarts us. */
        if (r > 0)
                return log_error_errno(ENOTCONN, "Lost the connection to the %s bus, exiting.",
                                       bus_mode_to_string(m->options.bus_mode));
        return 0;
}
