/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <libintl.h>
#include <locale.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <glib.h>
#include <systemd/sd-bus.h>

#define _(s) gettext(s)
#define N_(s) (s)

#define BUS_NAME "org.providerrouter.Router1"
#define BUS_PATH "/org/providerrouter/Router1"
#define BUS_INTERFACE "org.providerrouter.Router1"

G_DEFINE_AUTOPTR_CLEANUP_FUNC(sd_bus, sd_bus_flush_close_unref)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(sd_bus_message, sd_bus_message_unref)

static bool arg_user = false;
static bool arg_ask_password = true;
static bool arg_legend = true;
static bool arg_pager = true;

static FILE *out;
static pid_t pager_pid = 0;
static pid_t agent_pid = 0;

/* ---- output helpers ---------------------------------------------------------------------- */

static bool colors_enabled(void) {
        const char *term = getenv("TERM");
        return isatty(STDOUT_FILENO) && !getenv("NO_COLOR") && term && strcmp(term, "dumb") != 0;
}

static const char *ansi_highlight(void) {
        return colors_enabled() ? "\x1b[0;1;39m" : "";
}

static const char *ansi_green(void) {
        return colors_enabled() ? "\x1b[0;32m" : "";
}

static const char *ansi_red(void) {
        return colors_enabled() ? "\x1b[0;1;31m" : "";
}

static const char *ansi_normal(void) {
        return colors_enabled() ? "\x1b[0m" : "";
}

static void pager_open(void) {
        int fds[2];
        const char *pager;

        out = stdout;
        if (!arg_pager || !isatty(STDOUT_FILENO) || getenv("SYSTEMD_PAGER_NONE"))
                return;
        pager = getenv("SYSTEMD_PAGER") ?: getenv("PAGER");
        if (pager && (pager[0] == 0 || strcmp(pager, "cat") == 0))
                return;
        if (pipe2(fds, O_CLOEXEC) < 0)
                return;
        fflush(stdout);
        pager_pid = fork();
        if (pager_pid < 0) {
                close(fds[0]);
                close(fds[1]);
                pager_pid = 0;
                return;
        }
        if (pager_pid == 0) {
                dup2(fds[0], STDIN_FILENO);
                /* Like systemd's tools: quit if one screen, keep colours. */
                setenv("LESS", "FRSXMK", 0);
                if (pager)
                        execl("/bin/sh", "sh", "-c", pager, (char *) NULL);
                execlp("less", "less", (char *) NULL);
                execlp("more", "more", (char *) NULL);
                /* No pager: copy through. */
                char buf[4096];
                ssize_t n;
                while ((n = read(STDIN_FILENO, buf, sizeof(buf))) > 0)
                        if (write(STDOUT_FILENO, buf, (size_t) n) < 0)
                                break;
                _exit(EXIT_SUCCESS);
        }
        dup2(fds[1], STDOUT_FILENO);
        close(fds[0]);
        close(fds[1]);
}

static void pager_close(void) {
        if (pager_pid <= 0)
                return;
        fflush(stdout);
        fclose(stdout);
        (void) waitpid(pager_pid, NULL, 0);
        pager_pid = 0;
}

/* Start a text-mode polkit agent when a person at a terminal may be asked for a password,
 * as systemd's own tools do. */
static void polkit_agent_open(void) {
        int fds[2];
        char notify[16];

        if (arg_user || !arg_ask_password || !isatty(STDIN_FILENO) || geteuid() == 0)
                return;
        if (access("/usr/bin/pkttyagent", X_OK) < 0)
                return;
        if (pipe2(fds, O_CLOEXEC) < 0)
                return;
        agent_pid = fork();
        if (agent_pid < 0) {
                agent_pid = 0;
                close(fds[0]);
                close(fds[1]);
                return;
        }
        if (agent_pid == 0) {
                char parent[16];
                int fd = dup(fds[1]); /* without O_CLOEXEC, for the agent */
                snprintf(notify, sizeof(notify), "%d", fd);
                snprintf(parent, sizeof(parent), "%d", (int) getppid());
                execl("/usr/bin/pkttyagent", "pkttyagent", "--notify-fd", notify, "--fallback", "--process", parent,
                      (char *) NULL);
                _exit(EXIT_FAILURE);
        }
        close(fds[1]);
        /* The agent closes the fd once it is registered; wait for that, bounded by EOF. */
        char c;
        while (read(fds[0], &c, 1) < 0 && errno == EINTR)
                ;
        close(fds[0]);
}

static void polkit_agent_close(void) {
        if (agent_pid <= 0)
                return;
        kill(agent_pid, SIGTERM);
        (void) waitpid(agent_pid, NULL, 0);
        agent_pid = 0;
}

static char *format_usec(uint64_t u) {
        if (u == 0)
                return g_strdup("-");
        if (u < 1000)
                return g_strdup_printf("%" PRIu64 "us", u);
        if (u < 1000000)
                return g_strdup_printf("%.1fms", (double) u / 1000.0);
        return g_strdup_printf("%.2fs", (double) u / 1000000.0);
}

static char *format_bytes(uint64_t b) {
        return g_format_size_full(b, G_FORMAT_SIZE_IEC_UNITS);
}

/* ---- bus helpers -------------------------------------------------------------------------- */

static int bus_connect(sd_bus **ret) {
        int r = arg_user ? sd_bus_open_user(ret) : sd_bus_open_system(ret);
        if (r < 0)
                fprintf(stderr, _("Failed to connect to the %s bus: %s\n"), arg_user ? _("user") : _("system"),
                        strerror(-r));
        return r;
}

static int report_error(const char *what, const sd_bus_error *error, int r) {
        const char *msg = error && error->message ? error->message : strerror(-r);

        if (error && sd_bus_error_has_names(error, SD_BUS_ERROR_SERVICE_UNKNOWN, SD_BUS_ERROR_NAME_HAS_NO_OWNER))
                fprintf(stderr, _("%s: provider-router is not running (no %s on the %s bus).\n"), what, BUS_NAME,
                        arg_user ? _("user") : _("system"));
        else if (error && sd_bus_error_has_names(error, SD_BUS_ERROR_ACCESS_DENIED,
                                                 SD_BUS_ERROR_INTERACTIVE_AUTHORIZATION_REQUIRED))
                fprintf(stderr, _("%s: %s\nChanging routing needs root or authorization for "
                                  "org.providerrouter.Router1.manage (try with sudo).\n"), what, msg);
        else
                fprintf(stderr, "%s: %s\n", what, msg);
        return r < 0 ? r : -EIO;
}

static int call(sd_bus *bus, const char *method, const char *what, sd_bus_message **ret, const char *types, ...) {
        sd_bus_error error = SD_BUS_ERROR_NULL;
        g_autoptr(sd_bus_message) m = NULL;
        va_list ap;
        int r;

        r = sd_bus_message_new_method_call(bus, &m, BUS_NAME, BUS_PATH, BUS_INTERFACE, method);
        if (r < 0)
                return report_error(what, NULL, r);
        if (types) {
                va_start(ap, types);
                r = sd_bus_message_appendv(m, types, ap);
                va_end(ap);
                if (r < 0)
                        return report_error(what, NULL, r);
        }
        (void) sd_bus_message_set_allow_interactive_authorization(m, arg_ask_password);

        r = sd_bus_call(bus, m, 0, &error, ret);
        if (r < 0) {
                r = report_error(what, &error, r);
                sd_bus_error_free(&error);
        }
        return r;
}

static int get_string(sd_bus *bus, const char *property, char **ret) {
        sd_bus_error error = SD_BUS_ERROR_NULL;
        int r = sd_bus_get_property_string(bus, BUS_NAME, BUS_PATH, BUS_INTERFACE, property, &error, ret);
        if (r < 0) {
                r = report_error(_("Failed to query the router"), &error, r);
                sd_bus_error_free(&error);
        }
        return r;
}

static int get_strv(sd_bus *bus, const char *property, char ***ret) {
        sd_bus_error error = SD_BUS_ERROR_NULL;
        int r = sd_bus_get_property_strv(bus, BUS_NAME, BUS_PATH, BUS_INTERFACE, property, &error, ret);
        if (r < 0) {
                r = report_error(_("Failed to query the router"), &error, r);
                sd_bus_error_free(&error);
        }
        return r;
}

/* model → provider, in the daemon's order */
static int get_mappings(sd_bus *bus, GPtrArray **ret) {
        sd_bus_error error = SD_BUS_ERROR_NULL;
        g_autoptr(sd_bus_message) reply = NULL;
        g_autoptr(GPtrArray) a = g_ptr_array_new_with_free_func(g_free);
        const char *k, *v;
        int r;

        r = sd_bus_get_property(bus, BUS_NAME, BUS_PATH, BUS_INTERFACE, "ModelMappings", &error, &reply, "a{ss}");
        if (r < 0) {
                r = report_error(_("Failed to query the router"), &error, r);
                sd_bus_error_free(&error);
                return r;
        }
        r = sd_bus_message_enter_container(reply, 'a', "{ss}");
        if (r < 0)
                return report_error(_("Failed to parse the answer"), NULL, r);
        while ((r = sd_bus_message_read(reply, "{ss}", &k, &v)) > 0) {
                g_ptr_array_add(a, g_strdup(k));
                g_ptr_array_add(a, g_strdup(v));
        }
        if (r < 0)
                return report_error(_("Failed to parse the answer"), NULL, r);
        *ret = g_steal_pointer(&a);
        return 0;
}

typedef struct ProviderFigures {
        char *name;
        char *state;
        uint64_t requests, errors, streams, p50, p99, ttfb50, ttfb99, bytes_in, bytes_out, prompt, completion;
        uint64_t rejected, retries;
        uint32_t in_flight;
        GPtrArray *extra; /* "key", "value" */
} ProviderFigures;

static void provider_figures_free(gpointer p) {
        ProviderFigures *f = p;
        g_free(f->name);
        g_free(f->state);
        if (f->extra)
                g_ptr_array_unref(f->extra);
        g_free(f);
}

static int read_stats(sd_bus *bus, GPtrArray **ret) {
        g_autoptr(sd_bus_message) reply = NULL;
        g_autoptr(GPtrArray) list = g_ptr_array_new_with_free_func(provider_figures_free);
        const char *name;
        int r;

        r = call(bus, "GetStats", _("Failed to get statistics"), &reply, NULL);
        if (r < 0)
                return r;
        r = sd_bus_message_enter_container(reply, 'a', "{sa{sv}}");
        if (r < 0)
                goto fail;
        while ((r = sd_bus_message_enter_container(reply, 'e', "sa{sv}")) > 0) {
                ProviderFigures *f = g_new0(ProviderFigures, 1);
                f->extra = g_ptr_array_new_with_free_func(g_free);
                g_ptr_array_add(list, f);

                r = sd_bus_message_read(reply, "s", &name);
                if (r < 0)
                        goto fail;
                f->name = g_strdup(name);
                r = sd_bus_message_enter_container(reply, 'a', "{sv}");
                if (r < 0)
                        goto fail;
                while ((r = sd_bus_message_enter_container(reply, 'e', "sv")) > 0) {
                        const char *key, *contents;
                        char type;

                        r = sd_bus_message_read(reply, "s", &key);
                        if (r < 0)
                                goto fail;
                        r = sd_bus_message_peek_type(reply, &type, &contents);
                        if (r < 0)
                                goto fail;
                        r = sd_bus_message_enter_container(reply, 'v', contents);
                        if (r < 0)
                                goto fail;
                        if (strcmp(contents, "t") == 0) {
                                uint64_t v;
                                r = sd_bus_message_read(reply, "t", &v);
                                if (r < 0)
                                        goto fail;
#define KEY(k, field) else if (strcmp(key, k) == 0) f->field = v
                                if (0) {}
                                KEY("requests", requests);
                                KEY("errors", errors);
                                KEY("streams", streams);
                                KEY("latency_p50_usec", p50);
                                KEY("latency_p99_usec", p99);
                                KEY("ttfb_p50_usec", ttfb50);
                                KEY("ttfb_p99_usec", ttfb99);
                                KEY("bytes_in", bytes_in);
                                KEY("bytes_out", bytes_out);
                                KEY("prompt_tokens", prompt);
                                KEY("completion_tokens", completion);
                                KEY("rejected", rejected);
                                KEY("retries", retries);
#undef KEY
                                else if (v > 0) {
                                        g_ptr_array_add(f->extra, g_strdup(key));
                                        g_ptr_array_add(f->extra, g_strdup_printf("%" PRIu64, v));
                                }
                        } else if (strcmp(contents, "u") == 0) {
                                uint32_t v;
                                r = sd_bus_message_read(reply, "u", &v);
                                if (r < 0)
                                        goto fail;
                                if (strcmp(key, "in_flight") == 0)
                                        f->in_flight = v;
                        } else if (strcmp(contents, "s") == 0) {
                                const char *v;
                                r = sd_bus_message_read(reply, "s", &v);
                                if (r < 0)
                                        goto fail;
                                if (strcmp(key, "state") == 0)
                                        f->state = g_strdup(v);
                                else {
                                        g_ptr_array_add(f->extra, g_strdup(key));
                                        g_ptr_array_add(f->extra, g_strdup(v));
                                }
                        } else {
                                r = sd_bus_message_skip(reply, contents);
                                if (r < 0)
                                        goto fail;
                        }
                        r = sd_bus_message_exit_container(reply); /* v */
                        if (r < 0)
                                goto fail;
                        r = sd_bus_message_exit_container(reply); /* e */
                        if (r < 0)
                                goto fail;
                }
                if (r < 0)
                        goto fail;
                r = sd_bus_message_exit_container(reply); /* a{sv} */
                if (r < 0)
                        goto fail;
                r = sd_bus_message_exit_container(reply); /* e */
                if (r < 0)
                        goto fail;
        }
        if (r < 0)
                goto fail;
        *ret = g_steal_pointer(&list);
        return 0;
fail:
        return report_error(_("Failed to parse the statistics"), NULL, r);
}

static ProviderFigures *find_figures(GPtrArray *list, const char *name) {
        for (guint i = 0; i < list->len; i++) {
                ProviderFigures *f = list->pdata[i];
                if (strcmp(f->name, name) == 0)
                        return f;
        }
        return NULL;
}

static const char *state_color(const char *state) {
        if (!state)
                return "";
        if (strcmp(state, "up") == 0)
                return ansi_green();
        if (strcmp(state, "down") == 0 || strcmp(state, "failing") == 0)
                return ansi_red();
        return "";
}

/* ---- verbs -------------------------------------------------------------------------------- */

/* What status and providers both show: the default, the providers, their figures. */
static int read_overview(sd_bus *bus, char **ret_default, char ***ret_providers, GPtrArray **ret_stats) {
        int r;

        r = get_string(bus, "DefaultProvider", ret_default);
        if (r < 0)
                return r;
        r = get_strv(bus, "Providers", ret_providers);
        if (r < 0)
                return r;
        return read_stats(bus, ret_stats);
}

static int verb_status(sd_bus *bus, char **args) {
        g_autofree char *def = NULL, *version = NULL;
        g_auto(GStrv) providers = NULL;
        g_autoptr(GPtrArray) mappings = NULL, stats = NULL;
        ProviderFigures *total;
        int r;

        r = read_overview(bus, &def, &providers, &stats);
        if (r < 0)
                return r;
        r = get_string(bus, "Version", &version);
        if (r < 0)
                return r;
        r = get_mappings(bus, &mappings);
        if (r < 0)
                return r;

        pager_open();
        fprintf(out, "%*s %s%s%s\n", 18, _("Default provider:"), ansi_highlight(), def, ansi_normal());
        if (mappings->len == 0)
                fprintf(out, "%*s %s\n", 18, _("Model mappings:"), _("none"));
        for (guint i = 0; i < mappings->len; i += 2)
                fprintf(out, "%*s %s → %s\n", 18, i == 0 ? _("Model mappings:") : "", (char *) mappings->pdata[i],
                        (char *) mappings->pdata[i + 1]);
        for (char **p = providers; p && *p; p++) {
                ProviderFigures *f = find_figures(stats, *p);
                const char *state = f && f->state ? f->state : "unknown";
                fprintf(out, "%*s %s%s (%s%s%s)\n", 18, p == providers ? _("Providers:") : "", *p,
                        strcmp(*p, def) == 0 ? _(" [default]") : "", state_color(state), state, ansi_normal());
        }
        total = find_figures(stats, "*");
        if (total)
                fprintf(out, _("%*s %" PRIu64 " (%" PRIu32 " in flight, %" PRIu64 " failed, %" PRIu64 " refused)\n"),
                        18, _("Requests:"), total->requests, total->in_flight, total->errors, total->rejected);
        fprintf(out, "%*s %s\n", 18, _("Version:"), version);
        return 0;
}

static int verb_providers(sd_bus *bus, char **args) {
        g_autofree char *def = NULL;
        g_auto(GStrv) providers = NULL;
        g_autoptr(GPtrArray) stats = NULL;
        int r, n = 0;

        r = read_overview(bus, &def, &providers, &stats);
        if (r < 0)
                return r;

        pager_open();
        if (arg_legend)
                fprintf(out, "%s%-20s %-8s %-8s %10s %8s %9s%s\n", ansi_highlight(), _("PROVIDER"), _("STATE"),
                        _("DEFAULT"), _("REQUESTS"), _("ERRORS"), _("IN-FLIGHT"), ansi_normal());
        for (char **p = providers; p && *p; p++, n++) {
                ProviderFigures *f = find_figures(stats, *p);
                const char *state = f && f->state ? f->state : "unknown";
                fprintf(out, "%-20s %s%-8s%s %-8s %10" PRIu64 " %8" PRIu64 " %9" PRIu32 "\n", *p, state_color(state), state,
                        ansi_normal(), strcmp(*p, def) == 0 ? _("yes") : _("no"), f ? f->requests : 0,
                        f ? f->errors : 0, f ? f->in_flight : 0);
        }
        if (arg_legend)
                fprintf(out, ngettext("\n%d provider listed.\n", "\n%d providers listed.\n", (unsigned long) n), n);
        return 0;
}

static int verb_stats(sd_bus *bus, char **args) {
        g_autoptr(GPtrArray) stats = NULL;
        int r;

        r = read_stats(bus, &stats);
        if (r < 0)
                return r;

        pager_open();
        if (arg_legend)
                fprintf(out, "%s%-20s %10s %8s %6s %9s %9s %9s %9s %10s %10s%s\n", ansi_highlight(), _("PROVIDER"),
                        _("REQUESTS"), _("ERRORS"), _("ACTIVE"), _("P50"), _("P99"), _("TTFB-P50"), _("TTFB-P99"),
                        _("SENT"), _("TOKENS"), ansi_normal());
        for (guint i = 0; i < stats->len; i++) {
                ProviderFigures *f = stats->pdata[i];
                g_autofree char *p50 = format_usec(f->p50), *p99 = format_usec(f->p99),
                                *t50 = format_usec(f->ttfb50), *t99 = format_usec(f->ttfb99),
                                *sent = format_bytes(f->bytes_out);
                g_autofree char *tokens = g_strdup_printf("%" PRIu64, f->prompt + f->completion);
                const char *name = strcmp(f->name, "*") == 0 ? _("(total)") : f->name;

                fprintf(out, "%-20s %10" PRIu64 " %8" PRIu64 " %6" PRIu32 " %9s %9s %9s %9s %10s %10s\n", name,
                        f->requests, f->errors, f->in_flight, p50, p99, t50, t99, sent, tokens);
        }
        if (arg_legend) {
                ProviderFigures *total = find_figures(stats, "*");
                if (total) {
                        fprintf(out, _("\nRefused before routing: %" PRIu64 "; retried on another provider: %" PRIu64 ".\n"),
                                total->rejected, total->retries);
                        for (guint i = 0; i < total->extra->len; i += 2)
                                if (g_str_has_prefix(total->extra->pdata[i], "errors_"))
                                        fprintf(out, _("Errors of class %s: %s\n"),
                                                (char *) total->extra->pdata[i] + strlen("errors_"),
                                                (char *) total->extra->pdata[i + 1]);
                }
        }
        return 0;
}

static int verb_set_default(sd_bus *bus, char **args) {
        polkit_agent_open();
        return call(bus, "SetDefaultProvider", _("Failed to set the default provider"), NULL, "s", args[0]);
}

static int verb_map(sd_bus *bus, char **args) {
        polkit_agent_open();
        return call(bus, "SetModelMapping", _("Failed to map the model"), NULL, "ss", args[0], args[1]);
}

static int verb_unmap(sd_bus *bus, char **args) {
        polkit_agent_open();
        return call(bus, "RemoveModelMapping", _("Failed to remove the model mapping"), NULL, "s", args[0]);
}

static int verb_reload(sd_bus *bus, char **args) {
        polkit_agent_open();
        return call(bus, "Reload", _("Failed to reload the configuration"), NULL, NULL);
}

typedef struct Verb {
        const char *name;
        int n_args;
        int (*func)(sd_bus *bus, char **args);
} Verb;

static const Verb verbs[] = {
        { "status", 0, verb_status },
        { "providers", 0, verb_providers },
        { "set-default", 1, verb_set_default },
        { "map", 2, verb_map },
        { "unmap", 1, verb_unmap },
        { "stats", 0, verb_stats },
        { "reload", 0, verb_reload },
};

static void help(void) {
        printf(_("%s [OPTIONS...] COMMAND ...\n\n"
                 "Query or change how provider-router routes requests.\n\n"
                 "Commands:\n"
                 "  status                 Show the default provider, mappings and providers\n"
                 "  providers              List providers with their state and counters\n"
                 "  set-default NAME       Route requests without a mapping to NAME\n"
                 "  map MODEL PROVIDER     Route requests for MODEL to PROVIDER\n"
                 "  unmap MODEL            Remove the mapping for MODEL\n"
                 "  stats                  Show per-provider statistics\n"
                 "  reload                 Re-read the configuration files; drops runtime changes\n\n"
                 "Options:\n"
                 "  -h --help              Show this help\n"
                 "     --version          Show package version\n"
                 "     --system           Talk to the router on the system bus (default)\n"
                 "     --user             Talk to a router on the user's session bus\n"
                 "     --no-ask-password  Do not ask for a password to authorize changes\n"
                 "     --no-legend        Do not print column headers and footers\n"
                 "     --no-pager         Do not pipe output into a pager\n\n"
                 "Changes apply to the next request, survive restarts of the router, and are\n"
                 "undone by 'reload'. See provider-routerctl(1).\n"),
               g_get_prgname());
}

int main(int argc, char *argv[]) {
        enum { ARG_VERSION = 0x100, ARG_SYSTEM, ARG_USER, ARG_NO_ASK_PASSWORD, ARG_NO_LEGEND, ARG_NO_PAGER };
        static const struct option options[] = {
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, ARG_VERSION },
                { "system", no_argument, NULL, ARG_SYSTEM },
                { "user", no_argument, NULL, ARG_USER },
                { "no-ask-password", no_argument, NULL, ARG_NO_ASK_PASSWORD },
                { "no-legend", no_argument, NULL, ARG_NO_LEGEND },
                { "no-pager", no_argument, NULL, ARG_NO_PAGER },
                {}
        };
        g_autoptr(sd_bus) bus = NULL;
        const Verb *verb = NULL;
        const char *name;
        int c, r, n;

        setlocale(LC_ALL, "");
        bindtextdomain(GETTEXT_PACKAGE, LOCALEDIR);
        bind_textdomain_codeset(GETTEXT_PACKAGE, "UTF-8");
        textdomain(GETTEXT_PACKAGE);
        g_set_prgname(program_invocation_short_name);
        out = stdout;

        while ((c = getopt_long(argc, argv, "h", options, NULL)) >= 0)
                switch (c) {
                case 'h':
                        help();
                        return EXIT_SUCCESS;
                case ARG_VERSION:
                        printf("provider-routerctl %s\n", PACKAGE_VERSION);
                        return EXIT_SUCCESS;
                case ARG_SYSTEM:
                        arg_user = false;
                        break;
                case ARG_USER:
                        arg_user = true;
                        break;
                case ARG_NO_ASK_PASSWORD:
                        arg_ask_password = false;
                        break;
                case ARG_NO_LEGEND:
                        arg_legend = false;
                        break;
                case ARG_NO_PAGER:
                        arg_pager = false;
                        break;
                case '?':
                        return EXIT_FAILURE;
                default:
                        return EXIT_FAILURE;
                }

        name = optind < argc ? argv[optind] : "status";
        for (size_t i = 0; i < G_N_ELEMENTS(verbs); i++)
                if (strcmp(verbs[i].name, name) == 0)
                        verb = &verbs[i];
        if (!verb) {
                fprintf(stderr, _("Unknown command '%s'. See '%s --help'.\n"), name, g_get_prgname());
                return EXIT_FAILURE;
        }
        n = optind < argc ? argc - optind - 1 : 0;
        if (n != verb->n_args) {
                fprintf(stderr, n < verb->n_args ? _("Too few arguments for '%s'. See '%s --help'.\n")
                                                 : _("Too many arguments for '%s'. See '%s --help'.\n"),
                        name, g_get_prgname());
                return EXIT_FAILURE;
        }

        /* D-Bus strings are UTF-8; say so rather than let the call fail with EINVAL. */
        for (int i = optind + 1; i < argc; i++)
                if (!g_utf8_validate(argv[i], -1, NULL)) {
                        g_autofree char *escaped = g_strescape(argv[i], NULL);
                        fprintf(stderr, _("Argument '%s' is not valid UTF-8.\n"), escaped);
                        return EXIT_FAILURE;
                }

        r = bus_connect(&bus);
        if (r < 0)
                return EXIT_FAILURE;

        r = verb->func(bus, optind < argc ? argv + optind + 1 : argv + argc);
        pager_close();
        polkit_agent_close();
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
