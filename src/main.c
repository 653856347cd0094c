/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <getopt.h>
#include <locale.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>

#include <systemd/sd-daemon.h>

#include "bus.h"
#include "config.h"
#include "log.h"
#include "manager.h"
#include "state.h"

static void help(void) {
        printf("%s [OPTIONS...]\n\n"
               "OpenAI-compatible router: one endpoint, many LLM providers.\n\n"
               "  -h --help             Show this help\n"
               "     --version          Show package version\n"
               "  -c --config=FILE      Read FILE instead of " CONFIG_FILE "\n"
               "                        (drop-ins are read from FILE.d/*.conf)\n"
               "     --check-config     Validate the configuration, print every problem, exit\n"
               "     --bus=MODE         Serve the D-Bus API on the 'system' bus (default),\n"
               "                        the 'session' bus, or 'none'\n",
               program_invocation_short_name);
}

static int check_config(const ManagerOptions *o) {
        g_autoptr(GPtrArray) errors = NULL, warnings = NULL;
        g_autoptr(Config) c = NULL;
        g_auto(GStrv) env = g_get_environ();
        ConfigSources src = {
                .path = o->config_path ?: CONFIG_FILE,
                .path_required = o->config_path_required,
                .environ = env,
                .credentials_dir = g_getenv("CREDENTIALS_DIRECTORY"),
        };
        int r;

        r = config_load(&src, &c, &errors, &warnings);
        for (guint i = 0; warnings && i < warnings->len; i++)
                fprintf(stderr, "warning: %s\n", (char *) warnings->pdata[i]);
        if (r < 0) {
                for (guint i = 0; i < errors->len; i++)
                        fprintf(stderr, "error: %s\n", (char *) errors->pdata[i]);
                fprintf(stderr, "%u error(s) in the configuration.\n", errors->len);
                return EXIT_FAILURE;
        }

        printf("Configuration OK: %u provider(s), default '%s', listening on %s:%u.\n", c->providers->len,
               c->default_provider, c->host, c->port);
        for (char **s = c->sources; s && *s; s++)
                printf("  read %s\n", *s);
        if (!c->sources || !c->sources[0])
                printf("  no configuration file found: built-in defaults and environment\n");
        return EXIT_SUCCESS;
}

/* A routing change over D-Bus is answered once the saved state holds it. */
static uint64_t state_pending_for_bus(void *userdata) {
        return state_pending(userdata);
}

static void state_saved_for_bus(uint64_t saved, void *userdata) {
        bus_persisted(userdata, saved);
}

int main(int argc, char *argv[]) {
        enum { ARG_VERSION = 0x100, ARG_CHECK_CONFIG, ARG_BUS };
        static const struct option options[] = {
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, ARG_VERSION },
                { "config", required_argument, NULL, 'c' },
                { "check-config", no_argument, NULL, ARG_CHECK_CONFIG },
                { "bus", required_argument, NULL, ARG_BUS },
                {}
        };
        ManagerOptions o = { .bus_mode = BUS_MODE_SYSTEM };
        g_autoptr(Manager) m = NULL;
        g_autoptr(Bus) bus = NULL;
        g_autoptr(State) state = NULL;
        bool do_check = false;
        sigset_t mask;
        int c, r;

        setlocale(LC_ALL, "");
        log_setup();

        while ((c = getopt_long(argc, argv, "hc:", options, NULL)) >= 0)
                switch (c) {
                case 'h':
                        help();
                        return EXIT_SUCCESS;
                case ARG_VERSION:
                        printf("provider-router %s\n", PACKAGE_VERSION);
                        return EXIT_SUCCESS;
                case 'c':
                        o.config_path = optarg;
                        o.config_path_required = true;
                        break;
                case ARG_CHECK_CONFIG:
                        do_check = true;
                        break;
                case ARG_BUS:
                        o.bus_mode = bus_mode_from_string(optarg);
                        if (o.bus_mode < 0) {
                                log_error("Invalid --bus= value '%s': expected system, session or none.", optarg);
                                return EXIT_FAILURE;
                        }
                        break;
                case '?':
                        return EXIT_FAILURE;
                default:
                        g_assert_not_reached();
                }
        if (optind < argc) {
                log_error("%s takes no arguments.", program_invocation_short_name);
                return EXIT_FAILURE;
        }

        if (do_check)
                return check_config(&o);

        /* Signals are read from a signalfd on the loop; block them before any thread exists
         * (curl's resolver threads inherit the mask). */
        sigemptyset(&mask);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGHUP);
        sigprocmask(SIG_BLOCK, &mask, NULL);
        signal(SIGPIPE, SIG_IGN);

        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
                log_error("Failed to initialise libcurl.");
                return EXIT_FAILURE;
        }

        /* The manager owns the loop and the routing; the saved state and the D-Bus object follow
         * its changes. Runtime routing changes outlive restarts until a reload. */
        r = manager_new(&o, &m);
        if (r >= 0) {
                (void) state_new(m, &state);
                r = manager_start(m);
        }
        if (r >= 0)
                r = bus_new(m, &bus);
        if (r >= 0 && bus && state) {
                bus_set_persistence(bus, state_pending_for_bus, state);
                state_set_saved_callback(state, state_saved_for_bus, bus);
        }
        if (r >= 0) {
                manager_ready(m);
                r = manager_run(m);
        }

        g_clear_pointer(&bus, bus_free);
        g_clear_pointer(&state, state_free);
        g_clear_pointer(&m, manager_free);
        curl_global_cleanup();

        if (r < 0) {
                (void) sd_notifyf(false, "ERRNO=%i", -r);
                return EXIT_FAILURE;
        }
        return EXIT_SUCCESS;
}
