/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>
#include <sys/resource.h>

#include <systemd/sd-daemon.h>

#include "dispatch.h"
#include "log.h"
#include "models.h"
#include "manager.h"

typedef struct ManagerListener {
        ManagerListenerFunc func;
        void *userdata;
} ManagerListener;

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

void manager_add_listener(Manager *m, ManagerListenerFunc func, void *userdata) {
        ManagerListener l = { .func = func, .userdata = userdata };
        g_array_append_val(m->listeners, l);
}

static void manager_notify(Manager *m, ManagerEvent event) {
        for (guint i = 0; i < m->listeners->len; i++) {
                ManagerListener *l = &g_array_index(m->listeners, ManagerListener, i);
                l->func(m, event, l->userdata);
        }
}

static void manager_on_provider_state(Provider *p, void *userdata) {
        manager_notify(userdata, MANAGER_PROVIDER_STATES);
}

static void manager_check_done(Manager *m) {
        if (m->stopping && exchange_front_count(m->worker.front) == 0) {
                log_debug("All requests finished, exiting.");
                (void) sd_event_exit(m->event, 0);
        }
}

/* The worker sees the snapshot the manager holds now. */
static void manager_publish(Manager *m) {
        Worker *w = &m->worker;

        w->config = m->config;
        w->providers = m->providers;
        w->router = m->router;
        w->stopping = m->stopping;
        if (w->mirrors)
                mirror_pool_set_max(w->mirrors, m->config->mirror_max_concurrent);
        if (w->comparisons)
                compare_store_set_kept(w->comparisons, m->config->comparisons_kept);
        if (w->front)
                exchange_front_set_limits(w->front, m->config->max_body_size, (size_t) m->config->stream_buffer_size,
                                          m->config->max_buffered_size);
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

/* A provider set and route table for config, carrying over what the current set knows. */
static void manager_build(Manager *m, Config *c, ProviderSet **ret_providers, Router **ret_router) {
        ProviderSetSetup setup = {
                .event = m->event,
                .curl = m->curl,
                .state_changed = manager_on_provider_state,
                .userdata = m,
        };

        *ret_providers = provider_set_new(c, m->providers, &setup);
        *ret_router = router_new(c, *ret_providers, m->router);
}

static void manager_update_status(Manager *m) {
        g_autofree char *where = m->worker.front ? exchange_front_describe(m->worker.front) : NULL;
        (void) sd_notifyf(false, "STATUS=Routing to '%s' by default on %s", strna(router_default_name(m->router)),
                          strna(where));
}

static void manager_routing_changed(Manager *m) {
        manager_notify(m, MANAGER_ROUTING_CHANGED);
        manager_update_status(m);
}

int manager_set_default_provider(Manager *m, const char *name) {
        int r = router_set_default(m->router, name);
        if (r <= 0)
                return r;
        log_info("Default provider is now '%s'.", name);
        manager_routing_changed(m);
        return 1;
}

int manager_set_model_mapping(Manager *m, const char *model, const char *provider) {
        int r = router_set_mapping(m->router, model, provider);
        if (r <= 0)
                return r;
        log_info("Model '%s' is now routed to provider '%s'.", model, provider);
        manager_routing_changed(m);
        return 1;
}

int manager_remove_model_mapping(Manager *m, const char *model) {
        int r = router_remove_mapping(m->router, model);
        if (r <= 0)
                return r;
        log_info("Model mapping for '%s' removed.", model);
        manager_routing_changed(m);
        return 1;
}

int manager_set_model_split(Manager *m, const char *model, const char *const *providers, const uint32_t *weights,
                            unsigned n, const char **ret_unknown) {
        g_autoptr(GString) arms = g_string_new(NULL);
        int r = router_set_split(m->router, model, providers, weights, n, ret_unknown);

        if (r <= 0)
                return r;
        for (unsigned i = 0; i < n; i++)
                g_string_append_printf(arms, "%s%s:%u", i > 0 ? " " : "", providers[i], weights[i]);
        log_info("Model '%s' is now split between %s.", model, arms->str);
        manager_routing_changed(m);
        return 1;
}

int manager_reload(Manager *m, char **ret_error) {
        g_autoptr(Config) c = NULL;
        ProviderSet *providers;
        Router *router;
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

        /* Swap: requests in flight hold their provider set and finish as they began; the old
         * set stops probing. */
        manager_build(m, c, &providers, &router);
        provider_set_retire(m->providers);
        router_free(m->router);
        provider_set_unref(m->providers);
        config_free(m->config);
        m->config = TAKE_PTR(c);
        m->providers = providers;
        m->router = router;
        m->worker.models_cache = models_cache_free(m->worker.models_cache);
        manager_publish(m);
        log_set_max_level(m->config->log_level);

        log_info("Configuration reloaded: %u provider(s), default '%s', %u model mapping(s).",
                 provider_set_size(m->providers), router_default_name(m->router), router_n_routes(m->router));
        (void) sd_notify(false, "READY=1");
        /* A reload returns routing to what the files say: runtime changes are dropped. */
        manager_notify(m, MANAGER_RELOADED);
        manager_update_status(m);
        return 0;
}

static int manager_on_shutdown_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        Manager *m = userdata;
        log_warning("%u request(s) still running after ShutdownTimeoutSec=, exiting anyway.",
                    exchange_front_count(m->worker.front));
        (void) sd_event_exit(m->event, 0);
        return 0;
}

void manager_begin_shutdown(Manager *m) {
        int r;

        if (m->stopping)
                return;
        m->stopping = true;
        (void) sd_event_source_set_enabled(m->post, SD_EVENT_ON);
        manager_publish(m);
        (void) sd_notify(false, "STOPPING=1\nSTATUS=Finishing requests in flight…");
        log_info("Stopping: no new connections; waiting for %u request(s) in flight.",
                 m->worker.front ? exchange_front_count(m->worker.front) : 0);

        if (!m->worker.front) {
                (void) sd_event_exit(m->event, 0);
                return;
        }
        exchange_front_quiesce(m->worker.front);

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

/* Runs after a loop iteration that logged (the log lines go out in one write), and after every
 * iteration of a stopping daemon (has the last request ended?). A post source pending costs a
 * loop iteration of its own, so it is not left on when there is nothing to do: a stream event
 * relayed logs nothing. */
static int manager_on_post(sd_event_source *s, void *userdata) {
        Manager *m = userdata;

        log_flush();
        if (m->stopping)
                manager_check_done(m);
        return 0;
}

/* What curl's data produced for clients goes to libmicrohttpd in the same loop iteration. */
static void manager_after_curl(void *userdata) {
        Manager *m = userdata;

        if (m->worker.front)
                exchange_front_flush(m->worker.front);
}

static void manager_on_log_buffered(void *userdata) {
        Manager *m = userdata;

        if (!m->stopping)
                (void) sd_event_source_set_enabled(m->post, SD_EVENT_ONESHOT);
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
        m->listeners = g_array_new(FALSE, FALSE, sizeof(ManagerListener));

        r = manager_load_config(m, &m->config, NULL);
        if (r < 0)
                return r;
        log_set_max_level(m->config->log_level);

        /* A loop of its own, not the thread's default one: sd-event checks that a default loop
         * runs in its thread with a gettid() syscall in every iteration (sd_event_prepare()). */
        r = sd_event_new(&m->event);
        if (r < 0)
                return log_error_errno(r, "Failed to allocate the event loop: %m");
        r = curl_glue_new(m->event, &m->curl);
        if (r < 0)
                return log_error_errno(r, "Failed to set up libcurl: %m");

        manager_build(m, m->config, &m->providers, &m->router);

        if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != sizeof(seed))
                seed = now_usec(CLOCK_REALTIME) ^ (uint64_t) getpid();
        m->worker = (Worker) {
                .event = m->event,
                .curl = m->curl,
                .mirrors = mirror_pool_new(m->event, m->curl, m->config->mirror_max_concurrent),
                .comparisons = compare_store_new(m->config->comparisons_kept),
                .started_usec = now_usec(CLOCK_MONOTONIC),
                .request_id_seed = seed,
        };
        stats_init(&m->worker.stats);
        manager_publish(m);

        *ret = TAKE_PTR(m);
        return 0;
}

Manager *manager_free(Manager *m) {
        if (!m)
                return NULL;
        /* Stopping the front end completes the requests still open, which may still use
         * everything below. */
        m->worker.front = exchange_front_free(m->worker.front);
        m->worker.mirrors = mirror_pool_free(m->worker.mirrors);
        m->worker.comparisons = compare_store_free(m->worker.comparisons);
        m->worker.models_cache = models_cache_free(m->worker.models_cache);
        sd_event_source_disable_unref(m->shutdown_timer);
        log_on_buffered(NULL, NULL);
        log_flush();
        m->post = sd_event_source_disable_unref(m->post);
        if (m->providers)
                provider_set_retire(m->providers);
        router_free(m->router);
        provider_set_unref(m->providers);
        curl_glue_free(m->curl);
        config_free(m->config);
        if (m->listeners)
                g_array_unref(m->listeners);
        g_free(m->config_path);
        sd_event_unref(m->event);
        g_free(m);
        return NULL;
}

int manager_start(Manager *m) {
        int r;

        raise_fd_limit();

        r = sd_event_add_signal(m->event, NULL, SIGTERM, manager_on_sigterm, m);
        if (r >= 0)
                r = sd_event_add_signal(m->event, NULL, SIGINT, manager_on_sigterm, m);
        if (r >= 0)
                r = sd_event_add_signal(m->event, NULL, SIGHUP, manager_on_sighup, m);
        if (r < 0)
                return log_error_errno(r, "Failed to watch signals: %m");

        r = sd_event_add_post(m->event, &m->post, manager_on_post, m);
        if (r < 0)
                return log_error_errno(r, "Failed to set up log flushing: %m");
        (void) sd_event_source_set_enabled(m->post, SD_EVENT_OFF);
        (void) sd_event_source_set_description(m->post, "log-flush");
        log_on_buffered(manager_on_log_buffered, m);
        if (log_get_target() == LOG_TARGET_STDERR)
                log_buffer_requests();

        /* Feeds the watchdog from the loop itself, so a stuck loop is noticed. */
        r = sd_event_set_watchdog(m->event, true);
        if (r < 0)
                log_warning_errno(r, "Failed to enable the watchdog, ignoring: %m");

        ExchangeFrontSetup fs = {
                .http = {
                        .host = m->config->host,
                        .port = m->config->port,
                        .max_connections = m->config->max_connections,
                        .connection_timeout_sec = (unsigned) MAX(m->config->client_timeout_usec / USEC_PER_SEC, (usec_t) 1),
                        .connection_memory_limit = (size_t) m->config->max_header_size,
                },
                .max_body_size = m->config->max_body_size,
                .stream_buffer_size = (size_t) m->config->stream_buffer_size,
                .max_buffered_size = m->config->max_buffered_size,
                .start = dispatch_start,
                .ops = &dispatch_ops,
                .userdata = &m->worker,
        };
        r = exchange_front_new(m->event, &fs, &m->worker.front);
        if (r < 0)
                return r;
        curl_glue_set_after(m->curl, manager_after_curl, m);
        return 0;
}

void manager_ready(Manager *m) {
        g_autofree char *where = exchange_front_describe(m->worker.front);

        log_info("provider-router %s listening on %s%s; default provider '%s', %u provider(s).", PACKAGE_VERSION,
                 where, exchange_front_socket_activated(m->worker.front) ? " (socket activated)" : "",
                 router_default_name(m->router), provider_set_size(m->providers));
        (void) sd_notify(false, "READY=1");
        manager_update_status(m);
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
