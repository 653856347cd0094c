/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <langinfo.h>
#include <libintl.h>
#include <locale.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <glib.h>
#include <systemd/sd-bus.h>

#define _(s) gettext(s)
#define N_(s) (s)

#define BUS_NAME "org.providerrouter.Router1"
#define BUS_PATH "/org/providerrouter/Router1"
#define BUS_INTERFACE "org.providerrouter.Router1"

/* The journal's MESSAGE_ID= of a comparison entry, for the hint under the table. */
#define COMPARISON_MESSAGE_ID "3f0a1c9e6b2d4e8f9a7c5b1d2e4f6a80"

/* Compare and Probe wait for providers (answers, streams, several requests per probe): give
 * them more than sd-bus's default of 25 s, bounded still. */
#define SLOW_CALL_TIMEOUT_USEC (10ULL * 60 * 1000000)

#define COMPARISONS_DEFAULT 20u

G_DEFINE_AUTOPTR_CLEANUP_FUNC(sd_bus, sd_bus_flush_close_unref)
G_DEFINE_AUTOPTR_CLEANUP_FUNC(sd_bus_message, sd_bus_message_unref)

typedef enum Transport {
        TRANSPORT_LOCAL,
        TRANSPORT_REMOTE,  /* -H: ssh to HOST, systemd-stdio-bridge there */
        TRANSPORT_MACHINE, /* -M: the system bus of a local container */
} Transport;

static bool arg_user = false;
static bool arg_ask_password = true;
static bool arg_legend = true;
static bool arg_pager = true;
static Transport arg_transport = TRANSPORT_LOCAL;
static const char *arg_host = NULL;
static const char *arg_providers = NULL;

static FILE *out;
static pid_t pager_pid = 0;
static pid_t agent_pid = 0;
static sd_bus *bus = NULL;

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

static bool utf8_locale(void) {
        const char *set = nl_langinfo(CODESET);
        return set && (strcmp(set, "UTF-8") == 0 || strcmp(set, "utf8") == 0);
}

typedef enum Glyph {
        GLYPH_CHECK_MARK,
        GLYPH_CROSS_MARK,
        GLYPH_VERTICAL_LINE,
        GLYPH_HORIZONTAL_LINE,
} Glyph;

/* As systemd's special_glyph(): the drawing characters, or ASCII where the locale is not UTF-8. */
static const char *glyph(Glyph g) {
        static const char *const utf8[] = { "✓", "✗", "│", "─" };
        static const char *const ascii[] = { "+", "-", "|", "-" };
        return utf8_locale() ? utf8[g] : ascii[g];
}

/* The width of the output: $COLUMNS, the terminal's, or 80. Asked before a pager takes stdout. */
static size_t columns(void) {
        const char *e = getenv("COLUMNS");
        struct winsize ws = {};
        unsigned long v;
        char *end;

        if (e && *e) {
                errno = 0;
                v = strtoul(e, &end, 10);
                if (errno == 0 && *end == 0 && v > 0 && v <= 10000)
                        return v;
        }
        if (isatty(STDOUT_FILENO) && ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) >= 0 && ws.ws_col > 0)
                return ws.ws_col;
        return 80;
}

static size_t char_width(gunichar c) {
        if (g_unichar_iszerowidth(c))
                return 0;
        return g_unichar_iswide(c) ? 2 : 1;
}

/* Display width of a valid UTF-8 string without control characters. */
static size_t text_width(const char *s) {
        size_t w = 0;
        for (const char *p = s; *p; p = g_utf8_next_char(p))
                w += char_width(g_utf8_get_char(p));
        return w;
}

/* Text from the router (names, answers of models) is shown on a terminal: control characters
 * and escape sequences become '?', tabs a space; newlines stay only where asked for. */
static char *sanitize(const char *s, bool keep_newlines) {
        GString *b = g_string_sized_new(strlen(s));

        for (const char *p = s; *p; p = g_utf8_next_char(p)) {
                gunichar c = g_utf8_get_char(p);
                if (c == '\n' && keep_newlines)
                        g_string_append_c(b, '\n');
                else if (c == '\t')
                        g_string_append_c(b, ' ');
                else if (c < 0x20 || c == 0x7f || (c >= 0x80 && c < 0xa0))
                        g_string_append_c(b, '?');
                else
                        g_string_append_len(b, p, g_utf8_next_char(p) - p);
        }
        return g_string_free(b, false);
}

/* Appends line (no newline in it) to lines, broken into pieces at most width wide: at the last
 * space that fits, or anywhere in a word longer than the width. Indentation is kept. */
static void wrap_line(const char *line, size_t width, GPtrArray *lines) {
        const char *p = line;

        for (;;) {
                const char *q = p, *last_space = NULL;
                size_t w = 0;

                while (*q) {
                        gunichar c = g_utf8_get_char(q);
                        if (w + char_width(c) > width)
                                break;
                        w += char_width(c);
                        if (c == ' ')
                                last_space = q;
                        q = g_utf8_next_char(q);
                }
                if (*q == 0) {
                        g_ptr_array_add(lines, g_strdup(p));
                        return;
                }
                if (*q == ' ') {
                        g_ptr_array_add(lines, g_strndup(p, q - p));
                        p = q + 1;
                } else if (last_space && last_space > p) {
                        g_ptr_array_add(lines, g_strndup(p, last_space - p));
                        p = last_space + 1;
                } else {
                        if (q == p) /* a character wider than the whole width */
                                q = g_utf8_next_char(q);
                        g_ptr_array_add(lines, g_strndup(p, q - p));
                        p = q;
                }
                if (*p == 0)
                        return;
        }
}

/* text (sanitized, newlines kept) wrapped to width, one string per line. */
static void wrap_text(const char *text, size_t width, GPtrArray *lines) {
        g_autofree char *clean = sanitize(text, true);
        g_auto(GStrv) paragraphs = g_strsplit(clean, "\n", -1);

        for (char **p = paragraphs; *p; p++)
                wrap_line(*p, width, lines);
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
 * as systemd's own tools do. Only for a router on this machine: polkit on another host or in
 * a container cannot reach an agent here. */
static void polkit_agent_open(void) {
        int fds[2];
        char notify[16];

        if (arg_user || arg_transport != TRANSPORT_LOCAL || !arg_ask_password || !isatty(STDIN_FILENO) ||
            geteuid() == 0)
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

/* A difference of two durations, signed: "+120.0ms", "-1.20s", "0". */
static char *format_usec_delta(int64_t d) {
        g_autofree char *abs = NULL;

        if (d == 0)
                return g_strdup("0");
        abs = format_usec(d < 0 ? (uint64_t) 0 - (uint64_t) d : (uint64_t) d);
        return g_strdup_printf("%c%s", d < 0 ? '-' : '+', abs);
}

static char *format_bytes(uint64_t b) {
        return g_format_size_full(b, G_FORMAT_SIZE_IEC_UNITS);
}

static char *format_rate(double tokens_per_sec) {
        if (!(tokens_per_sec > 0) || !isfinite(tokens_per_sec))
                return g_strdup("-");
        return g_strdup_printf("%.1f", tokens_per_sec);
}

static char *format_realtime(uint64_t usec) {
        time_t t = (time_t) (usec / 1000000);
        struct tm tm;
        char buf[64];

        if (usec == 0 || !localtime_r(&t, &tm) || strftime(buf, sizeof(buf), "%b %d %H:%M:%S", &tm) == 0)
                return g_strdup("-");
        return g_strdup(buf);
}

/* ---- tables -------------------------------------------------------------------------------- */

/* Columns as wide as their widest cell, like systemd's format-table: a header row, then cells
 * row by row. Cell text is sanitized; a cell may have a colour. */
typedef struct TableCell {
        char *text;
        const char *color;
} TableCell;

typedef struct Table {
        size_t n_columns;
        uint64_t right_aligned; /* one bit per column */
        GPtrArray *cells;       /* TableCell, row-major; the first row is the header */
} Table;

static void table_cell_free(gpointer p) {
        TableCell *c = p;
        g_free(c->text);
        g_free(c);
}

static Table *table_free(Table *t) {
        if (!t)
                return NULL;
        g_ptr_array_unref(t->cells);
        g_free(t);
        return NULL;
}

static void table_free_void(Table *t) {
        (void) table_free(t);
}
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Table, table_free_void)

static void table_add(Table *t, const char *color, const char *text) {
        TableCell *c = g_new0(TableCell, 1);
        c->text = sanitize(text ?: "", false);
        c->color = color && *color ? color : NULL;
        g_ptr_array_add(t->cells, c);
}

/* Takes text. */
static void table_take(Table *t, const char *color, char *text) {
        table_add(t, color, text);
        g_free(text);
}

static Table *table_new(uint64_t right_aligned, const char *first, ...) {
        Table *t = g_new0(Table, 1);
        va_list ap;

        t->right_aligned = right_aligned;
        t->cells = g_ptr_array_new_with_free_func(table_cell_free);
        va_start(ap, first);
        for (const char *h = first; h; h = va_arg(ap, const char *)) {
                table_add(t, NULL, h);
                t->n_columns++;
        }
        va_end(ap);
        return t;
}

static void table_print(const Table *t, bool header) {
        g_autofree size_t *width = g_new0(size_t, t->n_columns);

        assert(t->cells->len % t->n_columns == 0);
        for (guint i = header ? 0 : t->n_columns; i < t->cells->len; i++) {
                const TableCell *c = t->cells->pdata[i];
                width[i % t->n_columns] = MAX(width[i % t->n_columns], text_width(c->text));
        }
        for (guint i = header ? 0 : t->n_columns; i < t->cells->len; i++) {
                const TableCell *c = t->cells->pdata[i];
                size_t col = i % t->n_columns, pad = width[col] - text_width(c->text);
                bool right = t->right_aligned & (UINT64_C(1) << col), last = col == t->n_columns - 1;
                const char *color = i < t->n_columns ? ansi_highlight() : c->color;

                if (col > 0)
                        fputs("  ", out);
                if (right)
                        fprintf(out, "%*s", (int) pad, "");
                fprintf(out, "%s%s%s", color ?: "", c->text, color && *color ? ansi_normal() : "");
                if (!right && !last)
                        fprintf(out, "%*s", (int) pad, "");
                if (last)
                        fputc('\n', out);
        }
}

#define RIGHT(col) (UINT64_C(1) << (col))

/* ---- bus helpers -------------------------------------------------------------------------- */

static int bus_connect(sd_bus **ret) {
        int r;

        switch (arg_transport) {
        case TRANSPORT_REMOTE:
                r = sd_bus_open_system_remote(ret, arg_host);
                if (r == -EINVAL)
                        fprintf(stderr, _("Invalid host '%s' for -H/--host=: expected [USER@]HOST[:PORT].\n"),
                                arg_host);
                else if (r < 0)
                        fprintf(stderr, _("Failed to connect to the system bus of '%s' over SSH: %s\n"), arg_host,
                                strerror(-r));
                return r;
        case TRANSPORT_MACHINE:
                r = sd_bus_open_system_machine(ret, arg_host);
                if (r == -EINVAL)
                        fprintf(stderr, _("Invalid machine name '%s' for -M/--machine=.\n"), arg_host);
                else if (r == -ENOENT || r == -ENXIO || r == -EHOSTDOWN)
                        fprintf(stderr, _("No container '%s' is known to systemd-machined (see 'machinectl list').\n"),
                                arg_host);
                else if (r < 0)
                        fprintf(stderr, _("Failed to connect to the system bus of container '%s': %s\n"), arg_host,
                                strerror(-r));
                return r;
        case TRANSPORT_LOCAL:
        default:
                r = arg_user ? sd_bus_open_user(ret) : sd_bus_open_system(ret);
                if (r < 0)
                        fprintf(stderr, _("Failed to connect to the %s bus: %s\n"),
                                arg_user ? _("user") : _("system"), strerror(-r));
                return r;
        }
}

/* The bus, connected on first use: arguments are checked before anything is started (an
 * ssh for -H). */
static int acquire_bus(void) {
        if (bus)
                return 0;
        return bus_connect(&bus);
}

/* The connection went away under us: over SSH that is ssh failing (its own message is above
 * ours), in a container the bus there. */
static bool connection_lost(int r) {
        return r == -ECONNRESET || r == -ENOTCONN || r == -EPIPE || r == -ESHUTDOWN || r == -ECONNREFUSED;
}

static int report_error(const char *what, const sd_bus_error *error, int r) {
        const char *msg = error && error->message ? error->message : strerror(-r);
        bool local = arg_transport == TRANSPORT_LOCAL;

        if (error && sd_bus_error_has_names(error, SD_BUS_ERROR_SERVICE_UNKNOWN, SD_BUS_ERROR_NAME_HAS_NO_OWNER)) {
                if (local)
                        fprintf(stderr, _("%s: provider-router is not running (no %s on the %s bus).\n"), what,
                                BUS_NAME, arg_user ? _("user") : _("system"));
                else
                        fprintf(stderr, _("%s: provider-router is not running on '%s' (no %s on its system bus).\n"),
                                what, arg_host, BUS_NAME);
        } else if (error && sd_bus_error_has_names(error, SD_BUS_ERROR_ACCESS_DENIED,
                                                   SD_BUS_ERROR_INTERACTIVE_AUTHORIZATION_REQUIRED)) {
                if (local)
                        fprintf(stderr, _("%s: %s\nChanging routing needs root or authorization for "
                                          "org.providerrouter.Router1.manage (try with sudo).\n"), what, msg);
                else
                        fprintf(stderr, _("%s: %s\nChanging routing needs root or authorization for "
                                          "org.providerrouter.Router1.manage on '%s' (try as root there).\n"),
                                what, msg, arg_host);
        } else if (!local && connection_lost(r) &&
                   (!sd_bus_error_is_set(error) || g_str_has_prefix(error->name, "System.Error.")))
                fprintf(stderr, arg_transport == TRANSPORT_REMOTE
                                        ? _("%s: the connection to '%s' over SSH failed: %s\n")
                                        : _("%s: the connection to container '%s' failed: %s\n"),
                        what, arg_host, strerror(-r));
        else
                fprintf(stderr, "%s: %s\n", what, msg);
        return r < 0 ? r : -EIO;
}

static int new_call(const char *method, const char *what, sd_bus_message **ret) {
        int r;

        r = acquire_bus();
        if (r < 0)
                return r;
        r = sd_bus_message_new_method_call(bus, ret, BUS_NAME, BUS_PATH, BUS_INTERFACE, method);
        if (r < 0)
                return report_error(what, NULL, r);
        (void) sd_bus_message_set_allow_interactive_authorization(*ret, arg_ask_password);
        return 0;
}

static int send_call(sd_bus_message *m, const char *what, uint64_t timeout, sd_bus_message **ret) {
        sd_bus_error error = SD_BUS_ERROR_NULL;
        int r;

        r = sd_bus_call(bus, m, timeout, &error, ret);
        if (r >= 0)
                return r;
        if (sd_bus_error_has_name(&error, SD_BUS_ERROR_UNKNOWN_METHOD)) {
                /* A newer verb against an older router. */
                fprintf(stderr, _("%s: the router has no method %s; it is older than this provider-routerctl.\n"),
                        what, sd_bus_message_get_member(m));
                r = -EOPNOTSUPP;
        } else
                r = report_error(what, &error, r);
        sd_bus_error_free(&error);
        return r;
}

static int call(const char *method, const char *what, sd_bus_message **ret, const char *types, ...) {
        g_autoptr(sd_bus_message) m = NULL;
        va_list ap;
        int r;

        r = new_call(method, what, &m);
        if (r < 0)
                return r;
        if (types) {
                va_start(ap, types);
                r = sd_bus_message_appendv(m, types, ap);
                va_end(ap);
                if (r < 0)
                        return report_error(what, NULL, r);
        }
        return send_call(m, what, 0, ret);
}

static int get_string(const char *property, char **ret) {
        sd_bus_error error = SD_BUS_ERROR_NULL;
        int r;

        r = acquire_bus();
        if (r < 0)
                return r;
        r = sd_bus_get_property_string(bus, BUS_NAME, BUS_PATH, BUS_INTERFACE, property, &error, ret);
        if (r < 0) {
                r = report_error(_("Failed to query the router"), &error, r);
                sd_bus_error_free(&error);
        }
        return r;
}

static int get_strv(const char *property, char ***ret) {
        sd_bus_error error = SD_BUS_ERROR_NULL;
        int r;

        r = acquire_bus();
        if (r < 0)
                return r;
        r = sd_bus_get_property_strv(bus, BUS_NAME, BUS_PATH, BUS_INTERFACE, property, &error, ret);
        if (r < 0) {
                r = report_error(_("Failed to query the router"), &error, r);
                sd_bus_error_free(&error);
        }
        return r;
}

/* model → provider, in the daemon's order */
static int get_mappings(GPtrArray **ret) {
        sd_bus_error error = SD_BUS_ERROR_NULL;
        g_autoptr(sd_bus_message) reply = NULL;
        g_autoptr(GPtrArray) a = g_ptr_array_new_with_free_func(g_free);
        const char *k, *v;
        int r;

        r = acquire_bus();
        if (r < 0)
                return r;
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

/* Reads the next complete value, whatever its type, as a GVariant (floating), so that the
 * answers of the newer methods (a{sv} records, nested) are looked up by key, not by position. */
static int message_read_gvariant(sd_bus_message *m, GVariant **ret) {
        const char *contents;
        char type;
        int r;

        r = sd_bus_message_peek_type(m, &type, &contents);
        if (r < 0)
                return r;
        if (r == 0)
                return -EBADMSG;

#define BASIC(code, ctype, make)                                        \
        case code: {                                                    \
                ctype v;                                                \
                r = sd_bus_message_read_basic(m, code, &v);             \
                if (r < 0)                                              \
                        return r;                                       \
                *ret = make(v);                                         \
                return 0;                                               \
        }
        switch (type) {
                BASIC('y', uint8_t, g_variant_new_byte)
                BASIC('b', int, g_variant_new_boolean)
                BASIC('n', int16_t, g_variant_new_int16)
                BASIC('q', uint16_t, g_variant_new_uint16)
                BASIC('i', int32_t, g_variant_new_int32)
                BASIC('u', uint32_t, g_variant_new_uint32)
                BASIC('x', int64_t, g_variant_new_int64)
                BASIC('t', uint64_t, g_variant_new_uint64)
                BASIC('d', double, g_variant_new_double)
                BASIC('s', const char *, g_variant_new_string)
                BASIC('o', const char *, g_variant_new_object_path)
                BASIC('g', const char *, g_variant_new_signature)
#undef BASIC
        case 'a':
        case 'r':
        case 'e': {
                g_autofree char *sig = type == 'a' ? g_strconcat("a", contents, NULL)
                                     : type == 'r' ? g_strconcat("(", contents, ")", NULL)
                                                   : g_strconcat("{", contents, "}", NULL);
                GVariantBuilder b;

                if (!g_variant_type_string_is_valid(sig))
                        return -EBADMSG;
                r = sd_bus_message_enter_container(m, type, contents);
                if (r < 0)
                        return r;
                g_variant_builder_init(&b, G_VARIANT_TYPE(sig));
                while ((r = sd_bus_message_at_end(m, false)) == 0) {
                        GVariant *child;
                        r = message_read_gvariant(m, &child);
                        if (r < 0)
                                break;
                        g_variant_builder_add_value(&b, child);
                }
                if (r >= 0)
                        r = sd_bus_message_exit_container(m);
                if (r < 0) {
                        g_variant_builder_clear(&b);
                        return r;
                }
                *ret = g_variant_builder_end(&b);
                return 0;
        }
        case 'v': {
                GVariant *inner;
                r = sd_bus_message_enter_container(m, 'v', contents);
                if (r < 0)
                        return r;
                r = message_read_gvariant(m, &inner);
                if (r < 0)
                        return r;
                r = sd_bus_message_exit_container(m);
                if (r < 0) {
                        g_variant_unref(g_variant_ref_sink(inner));
                        return r;
                }
                *ret = g_variant_new_variant(inner);
                return 0;
        }
        default:
                return -EBADMSG;
        }
}

/* The whole answer of a method, of the given signature, as one (owned) GVariant. */
static int reply_read(sd_bus_message *reply, const char *signature, const char *what, GVariant **ret) {
        GVariant *v;
        int r;

        if (!sd_bus_message_has_signature(reply, signature)) {
                fprintf(stderr, _("%s: unexpected answer from the router (signature '%s' instead of '%s').\n"), what,
                        sd_bus_message_get_signature(reply, true) ?: "", signature);
                return -EBADMSG;
        }
        r = message_read_gvariant(reply, &v);
        if (r < 0)
                return report_error(what, NULL, r);
        *ret = g_variant_ref_sink(v);
        return 0;
}

/* Numbers in a{sv} records, whatever integer or floating type the router chose. */
static bool dict_number(GVariant *dict, const char *key, double *ret) {
        g_autoptr(GVariant) v = g_variant_lookup_value(dict, key, NULL);

        if (!v)
                return false;
        switch (g_variant_classify(v)) {
        case G_VARIANT_CLASS_BYTE: *ret = g_variant_get_byte(v); return true;
        case G_VARIANT_CLASS_INT16: *ret = g_variant_get_int16(v); return true;
        case G_VARIANT_CLASS_UINT16: *ret = g_variant_get_uint16(v); return true;
        case G_VARIANT_CLASS_INT32: *ret = g_variant_get_int32(v); return true;
        case G_VARIANT_CLASS_UINT32: *ret = g_variant_get_uint32(v); return true;
        case G_VARIANT_CLASS_INT64: *ret = (double) g_variant_get_int64(v); return true;
        case G_VARIANT_CLASS_UINT64: *ret = (double) g_variant_get_uint64(v); return true;
        case G_VARIANT_CLASS_DOUBLE: *ret = g_variant_get_double(v); return isfinite(*ret);
        default: return false;
        }
}

static uint64_t dict_uint(GVariant *dict, const char *key) {
        g_autoptr(GVariant) v = g_variant_lookup_value(dict, key, NULL);
        double d;

        /* Exact for the usual 't' and 'u'; through double for the rest. */
        if (v && g_variant_is_of_type(v, G_VARIANT_TYPE_UINT64))
                return g_variant_get_uint64(v);
        if (v && g_variant_is_of_type(v, G_VARIANT_TYPE_UINT32))
                return g_variant_get_uint32(v);
        if (!dict_number(dict, key, &d) || d < 0)
                return 0;
        return d >= 18446744073709551615.0 ? UINT64_MAX : (uint64_t) d;
}

static bool dict_has_signed(GVariant *dict, const char *key, int64_t *ret) {
        g_autoptr(GVariant) v = g_variant_lookup_value(dict, key, NULL);
        double d;

        if (v && g_variant_is_of_type(v, G_VARIANT_TYPE_INT64)) {
                *ret = g_variant_get_int64(v);
                return true;
        }
        if (!dict_number(dict, key, &d) || d < -9.2e18 || d > 9.2e18)
                return false;
        *ret = (int64_t) d;
        return true;
}

static double dict_double(GVariant *dict, const char *key, double fallback) {
        double d;
        return dict_number(dict, key, &d) ? d : fallback;
}

static const char *dict_string(GVariant *dict, const char *key) {
        const char *s;
        return g_variant_lookup(dict, key, "&s", &s) ? s : NULL;
}

static bool dict_bool(GVariant *dict, const char *key, bool fallback) {
        gboolean b;
        return g_variant_lookup(dict, key, "b", &b) ? b : fallback;
}

typedef struct ProviderFigures {
        char *name;
        char *state;
        uint64_t requests, errors, streams, p50, p99, ttfb50, ttfb99, bytes_in, bytes_out, prompt, completion;
        uint64_t rejected, retries;
        uint32_t in_flight;
        GPtrArray *extra;      /* "key", "value" */
        GVariant *routes;      /* aa{sv}, in "*": one per (model, provider) arm */
        GVariant *comparisons; /* aa{sv}, in "*": one per (primary, mirror) pair */
} ProviderFigures;

static void provider_figures_free(gpointer p) {
        ProviderFigures *f = p;
        g_free(f->name);
        g_free(f->state);
        if (f->extra)
                g_ptr_array_unref(f->extra);
        if (f->routes)
                g_variant_unref(f->routes);
        if (f->comparisons)
                g_variant_unref(f->comparisons);
        g_free(f);
}

static int read_stats(GPtrArray **ret) {
        g_autoptr(sd_bus_message) reply = NULL;
        g_autoptr(GPtrArray) list = g_ptr_array_new_with_free_func(provider_figures_free);
        const char *name;
        int r;

        r = call("GetStats", _("Failed to get statistics"), &reply, NULL);
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
                        } else if (strcmp(contents, "aa{sv}") == 0 &&
                                   (strcmp(key, "routes") == 0 || strcmp(key, "comparisons") == 0)) {
                                GVariant **slot = strcmp(key, "routes") == 0 ? &f->routes : &f->comparisons;
                                GVariant *v;
                                r = message_read_gvariant(reply, &v);
                                if (r < 0)
                                        goto fail;
                                if (*slot)
                                        g_variant_unref(*slot);
                                *slot = g_variant_ref_sink(v);
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
static int read_overview(char **ret_default, char ***ret_providers, GPtrArray **ret_stats) {
        int r;

        r = get_string("DefaultProvider", ret_default);
        if (r < 0)
                return r;
        r = get_strv("Providers", ret_providers);
        if (r < 0)
                return r;
        return read_stats(ret_stats);
}

/* ModelSplits (a{sa(su)}), or NULL from a router that is older than the property. */
static int get_splits(GVariant **ret) {
        sd_bus_error error = SD_BUS_ERROR_NULL;
        g_autoptr(sd_bus_message) reply = NULL;
        GVariant *v;
        int r;

        r = acquire_bus();
        if (r < 0)
                return r;
        r = sd_bus_get_property(bus, BUS_NAME, BUS_PATH, BUS_INTERFACE, "ModelSplits", &error, &reply, "a{sa(su)}");
        if (r < 0) {
                if (sd_bus_error_has_names(&error, SD_BUS_ERROR_UNKNOWN_PROPERTY, SD_BUS_ERROR_INVALID_ARGS)) {
                        sd_bus_error_free(&error);
                        *ret = NULL;
                        return 0;
                }
                r = report_error(_("Failed to query the router"), &error, r);
                sd_bus_error_free(&error);
                return r;
        }
        /* sd_bus_get_property() leaves us inside the variant. */
        r = message_read_gvariant(reply, &v);
        if (r < 0)
                return report_error(_("Failed to parse the answer"), NULL, r);
        *ret = g_variant_ref_sink(v);
        return 0;
}

/* "lm-studio 80%, qwen-proxy 20%" */
static char *format_split(GVariant *arms) {
        GString *s = g_string_new(NULL);
        uint64_t total = 0;
        gsize n = g_variant_n_children(arms);

        for (gsize i = 0; i < n; i++) {
                uint32_t w;
                g_variant_get_child(arms, i, "(&su)", NULL, &w);
                total += w;
        }
        for (gsize i = 0; i < n; i++) {
                const char *name;
                uint32_t w;
                g_variant_get_child(arms, i, "(&su)", &name, &w);
                g_string_append_printf(s, "%s%s %.0f%%", i > 0 ? ", " : "", name,
                                       total > 0 ? 100.0 * w / (double) total : 0.0);
        }
        return g_string_free(s, false);
}

static int verb_status(char **args, int n_args) {
        g_autofree char *def = NULL, *version = NULL;
        g_auto(GStrv) providers = NULL;
        g_autoptr(GPtrArray) mappings = NULL, stats = NULL;
        g_autoptr(GVariant) splits = NULL;
        ProviderFigures *total;
        int r;

        r = read_overview(&def, &providers, &stats);
        if (r < 0)
                return r;
        r = get_string("Version", &version);
        if (r < 0)
                return r;
        r = get_mappings(&mappings);
        if (r < 0)
                return r;
        r = get_splits(&splits);
        if (r < 0)
                return r;

        pager_open();
        fprintf(out, "%*s %s%s%s\n", 18, _("Default provider:"), ansi_highlight(), def, ansi_normal());
        if (mappings->len == 0)
                fprintf(out, "%*s %s\n", 18, _("Model mappings:"), _("none"));
        for (guint i = 0; i < mappings->len; i += 2)
                fprintf(out, "%*s %s → %s\n", 18, i == 0 ? _("Model mappings:") : "", (char *) mappings->pdata[i],
                        (char *) mappings->pdata[i + 1]);
        /* Only routes with more than one arm; one arm is a mapping, shown above. */
        for (gsize i = 0, n = splits ? g_variant_n_children(splits) : 0; i < n; i++) {
                g_autoptr(GVariant) arms = NULL;
                g_autofree char *text = NULL, *clean = NULL;
                const char *model;

                g_variant_get_child(splits, i, "{&s@a(su)}", &model, &arms);
                text = format_split(arms);
                clean = sanitize(text, false);
                fprintf(out, "%*s %s → %s\n", 18, i == 0 ? _("Model splits:") : "", model, clean);
        }
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

static int verb_providers(char **args, int n_args) {
        g_autofree char *def = NULL;
        g_auto(GStrv) providers = NULL;
        g_autoptr(GPtrArray) stats = NULL;
        int r, n = 0;

        r = read_overview(&def, &providers, &stats);
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

static char *format_percent(GVariant *dict, const char *key) {
        double d;
        if (!dict_number(dict, key, &d) || d < 0)
                return g_strdup("-");
        return g_strdup_printf("%.1f%%", d * 100.0);
}

static char *format_similarity(GVariant *dict, const char *key) {
        double d;
        if (!dict_number(dict, key, &d) || d < 0 || d > 1)
                return g_strdup("-");
        return g_strdup_printf("%.2f", d);
}

static char *format_delta(GVariant *dict, const char *key) {
        int64_t d;
        if (!dict_has_signed(dict, key, &d))
                return g_strdup("-");
        return format_usec_delta(d);
}

/* GetStats' "routes" in "*": one row per (model, provider) arm. */
static void print_routes(GVariant *routes) {
        g_autoptr(Table) t = table_new(RIGHT(2) | RIGHT(3) | RIGHT(4) | RIGHT(5) | RIGHT(6) | RIGHT(7) | RIGHT(8),
                                       _("MODEL"), _("PROVIDER"), _("REQUESTS"), _("ERRORS"), _("P50"), _("P99"),
                                       _("TTFB-P50"), _("TTFB-P99"), _("TOKENS/S"), NULL);

        for (gsize i = 0, n = g_variant_n_children(routes); i < n; i++) {
                g_autoptr(GVariant) r = g_variant_get_child_value(routes, i);
                uint64_t errors = dict_uint(r, "errors");

                table_add(t, NULL, dict_string(r, "model") ?: "-");
                table_add(t, NULL, dict_string(r, "provider") ?: "-");
                table_take(t, NULL, g_strdup_printf("%" PRIu64, dict_uint(r, "requests")));
                table_take(t, errors > 0 ? ansi_red() : NULL, g_strdup_printf("%" PRIu64, errors));
                table_take(t, NULL, format_usec(dict_uint(r, "latency_p50_usec")));
                table_take(t, NULL, format_usec(dict_uint(r, "latency_p99_usec")));
                table_take(t, NULL, format_usec(dict_uint(r, "ttfb_p50_usec")));
                table_take(t, NULL, format_usec(dict_uint(r, "ttfb_p99_usec")));
                table_take(t, NULL, format_rate(dict_double(r, "tokens_per_sec_p50", 0)));
        }
        fputc('\n', out);
        table_print(t, arg_legend);
}

/* GetStats' "comparisons" in "*": one row per (primary, mirror) pair. */
static void print_pairs(GVariant *pairs) {
        g_autoptr(Table) t = table_new(RIGHT(2) | RIGHT(3) | RIGHT(4) | RIGHT(5) | RIGHT(6) | RIGHT(7),
                                       _("PRIMARY"), _("MIRROR"), _("COUNT"), _("SIMILARITY"), _("TIME-DIFF"),
                                       _("TTFB-DIFF"), _("PRIMARY-ERRORS"), _("MIRROR-ERRORS"), NULL);

        for (gsize i = 0, n = g_variant_n_children(pairs); i < n; i++) {
                g_autoptr(GVariant) p = g_variant_get_child_value(pairs, i);

                table_add(t, NULL, dict_string(p, "primary") ?: "-");
                table_add(t, NULL, dict_string(p, "mirror") ?: "-");
                table_take(t, NULL, g_strdup_printf("%" PRIu64, dict_uint(p, "count")));
                table_take(t, NULL, format_similarity(p, "similarity_p50"));
                table_take(t, NULL, format_delta(p, "latency_delta_p50_usec"));
                table_take(t, NULL, format_delta(p, "ttfb_delta_p50_usec"));
                table_take(t, NULL, format_percent(p, "primary_error_rate"));
                table_take(t, NULL, format_percent(p, "mirror_error_rate"));
        }
        fputc('\n', out);
        table_print(t, arg_legend);
        if (arg_legend)
                fputs(_("\nSimilarity, time and TTFB differences (the mirror's minus the primary's) are medians.\n"),
                      out);
}

static int verb_stats(char **args, int n_args) {
        g_autoptr(GPtrArray) stats = NULL;
        ProviderFigures *total;
        int r;

        r = read_stats(&stats);
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
        total = find_figures(stats, "*");
        if (arg_legend && total) {
                fprintf(out, _("\nRefused before routing: %" PRIu64 "; retried on another provider: %" PRIu64 ".\n"),
                        total->rejected, total->retries);
                for (guint i = 0; i < total->extra->len; i += 2)
                        if (g_str_has_prefix(total->extra->pdata[i], "errors_"))
                                fprintf(out, _("Errors of class %s: %s\n"),
                                        (char *) total->extra->pdata[i] + strlen("errors_"),
                                        (char *) total->extra->pdata[i + 1]);
        }
        /* From routers that keep them (and only when there is something to show). */
        if (total && total->routes && g_variant_n_children(total->routes) > 0)
                print_routes(total->routes);
        if (total && total->comparisons && g_variant_n_children(total->comparisons) > 0)
                print_pairs(total->comparisons);
        return 0;
}

static int verb_set_default(char **args, int n_args) {
        polkit_agent_open();
        return call("SetDefaultProvider", _("Failed to set the default provider"), NULL, "s", args[0]);
}

static int verb_map(char **args, int n_args) {
        polkit_agent_open();
        return call("SetModelMapping", _("Failed to map the model"), NULL, "ss", args[0], args[1]);
}

static int verb_unmap(char **args, int n_args) {
        polkit_agent_open();
        return call("RemoveModelMapping", _("Failed to remove the model mapping"), NULL, "s", args[0]);
}

static int verb_reload(char **args, int n_args) {
        polkit_agent_open();
        return call("Reload", _("Failed to reload the configuration"), NULL, NULL);
}

/* A whole decimal number in [min, max]: no sign, no blanks, no suffix. */
static int parse_uint32(const char *s, uint32_t min, uint32_t max, uint32_t *ret) {
        unsigned long long v;
        char *end;

        if (!g_ascii_isdigit(s[0]))
                return -EINVAL;
        errno = 0;
        v = strtoull(s, &end, 10);
        if (errno != 0 || *end != 0 || v < min || v > max)
                return -ERANGE;
        *ret = (uint32_t) v;
        return 0;
}

/* PROVIDER or PROVIDER:WEIGHT (weight 1 when not given). The last ':' separates the weight. */
static int parse_arm(const char *arg, char **ret_name, uint32_t *ret_weight) {
        const char *colon = strrchr(arg, ':');
        uint32_t weight = 1;

        if (colon && parse_uint32(colon + 1, 1, UINT32_MAX, &weight) < 0)
                return -EINVAL;
        if (colon == arg || arg[0] == 0)
                return -EINVAL;
        *ret_name = colon ? g_strndup(arg, colon - arg) : g_strdup(arg);
        *ret_weight = weight;
        return 0;
}

static int verb_split(char **args, int n_args) {
        const char *what = _("Failed to set the model split");
        g_autoptr(GPtrArray) names = g_ptr_array_new_with_free_func(g_free);
        g_autoptr(GArray) weights = g_array_new(false, false, sizeof(uint32_t));
        g_autoptr(sd_bus_message) m = NULL;
        int r;

        for (int i = 1; i < n_args; i++) {
                char *name;
                uint32_t w;

                if (parse_arm(args[i], &name, &w) < 0) {
                        fprintf(stderr, _("Invalid arm '%s': expected PROVIDER or PROVIDER:WEIGHT, with a weight from 1 "
                                          "to %" PRIu32 ".\n"), args[i], UINT32_MAX);
                        return -EINVAL;
                }
                for (guint j = 0; j < names->len; j++)
                        if (strcmp(names->pdata[j], name) == 0) {
                                fprintf(stderr, _("Provider '%s' is named twice in the split of '%s'.\n"), name,
                                        args[0]);
                                g_free(name);
                                return -EINVAL;
                        }
                g_ptr_array_add(names, name);
                g_array_append_val(weights, w);
        }

        polkit_agent_open();
        r = new_call("SetModelSplit", what, &m);
        if (r < 0)
                return r;
        r = sd_bus_message_append(m, "s", args[0]);
        if (r >= 0)
                r = sd_bus_message_open_container(m, 'a', "(su)");
        for (guint i = 0; r >= 0 && i < names->len; i++)
                r = sd_bus_message_append(m, "(su)", names->pdata[i], g_array_index(weights, uint32_t, i));
        if (r >= 0)
                r = sd_bus_message_close_container(m);
        if (r < 0)
                return report_error(what, NULL, r);
        return send_call(m, what, 0, NULL);
}

/* "200", "err" when the side failed without a status, "-" when there is no such side. */
static char *side_status(GVariant *rec, const char *prefix, bool *failed) {
        g_autofree char *k_status = g_strconcat(prefix, "status", NULL), *k_error = g_strconcat(prefix, "error", NULL);
        const char *error = dict_string(rec, k_error);
        uint64_t status = dict_uint(rec, k_status);

        if ((error && *error) || status < 200 || status > 299)
                *failed = true;
        if (status > 0)
                return g_strdup_printf("%" PRIu64, status);
        return g_strdup(error && *error ? "err" : "-");
}

static char *side_delta(GVariant *rec, const char *field) {
        g_autofree char *p = g_strconcat("primary_", field, NULL), *m = g_strconcat("mirror_", field, NULL);
        uint64_t a = dict_uint(rec, p), b = dict_uint(rec, m);

        if (a == 0 || b == 0)
                return g_strdup("-");
        return format_usec_delta(b >= a ? (int64_t) MIN(b - a, (uint64_t) INT64_MAX)
                                        : -(int64_t) MIN(a - b, (uint64_t) INT64_MAX));
}

static int verb_comparisons(char **args, int n_args) {
        const char *what = _("Failed to get the comparisons");
        g_autoptr(sd_bus_message) reply = NULL;
        g_autoptr(GVariant) list = NULL;
        g_autoptr(Table) t = NULL;
        uint32_t max = COMPARISONS_DEFAULT;
        gsize n;
        int r;

        if (n_args > 0 && parse_uint32(args[0], 1, UINT32_MAX, &max) < 0) {
                fprintf(stderr, _("Invalid number of comparisons '%s': expected a whole number from 1 to %" PRIu32 ".\n"),
                        args[0], UINT32_MAX);
                return -EINVAL;
        }
        r = call("GetComparisons", what, &reply, "u", max);
        if (r < 0)
                return r;
        r = reply_read(reply, "aa{sv}", what, &list);
        if (r < 0)
                return r;

        pager_open();
        n = g_variant_n_children(list);
        if (n == 0) {
                if (arg_legend)
                        fputs(_("No comparisons recorded.\n"), out);
                return 0;
        }
        t = table_new(RIGHT(4) | RIGHT(5) | RIGHT(6) | RIGHT(7) | RIGHT(8), _("TIME"), _("MODEL"), _("PRIMARY"),
                      _("MIRROR"), _("STATUS"), _("TTFB-DIFF"), _("TIME-DIFF"), _("TOKENS/S"), _("SIMILARITY"), NULL);
        /* The router gives the newest first; newest last reads like journalctl, next to the prompt. */
        for (gsize i = n; i > 0; i--) {
                g_autoptr(GVariant) rec = g_variant_get_child_value(list, i - 1);
                g_autofree char *ps = NULL, *ms = NULL, *pr = NULL, *mr = NULL;
                bool failed = false;

                ps = side_status(rec, "primary_", &failed);
                ms = side_status(rec, "mirror_", &failed);
                pr = format_rate(dict_double(rec, "primary_tokens_per_sec", 0));
                mr = format_rate(dict_double(rec, "mirror_tokens_per_sec", 0));

                table_take(t, NULL, format_realtime(dict_uint(rec, "time_realtime_usec")));
                table_add(t, NULL, dict_string(rec, "model") ?: "-");
                table_add(t, NULL, dict_string(rec, "primary_provider") ?: "-");
                table_add(t, NULL, dict_string(rec, "mirror_provider") ?: "-");
                table_take(t, failed ? ansi_red() : ansi_green(), g_strdup_printf("%s/%s", ps, ms));
                table_take(t, NULL, side_delta(rec, "ttfb_usec"));
                table_take(t, NULL, side_delta(rec, "duration_usec"));
                table_take(t, NULL, g_strdup_printf("%s/%s", pr, mr));
                table_take(t, NULL, format_similarity(rec, "similarity"));
        }
        table_print(t, arg_legend);
        if (arg_legend) {
                fprintf(out, ngettext("\n%zu comparison listed, newest last. Differences are the mirror's minus the "
                                      "primary's; status and tokens/s are primary/mirror.\n",
                                      "\n%zu comparisons listed, newest last. Differences are the mirror's minus the "
                                      "primary's; status and tokens/s are primary/mirror.\n",
                                      (unsigned long) n),
                        (size_t) n);
                fprintf(out, _("Whole records: journalctl MESSAGE_ID=%s\n"), COMPARISON_MESSAGE_ID);
        }
        return 0;
}

typedef struct Line {
        char *text;
        const char *color;
} Line;

static void line_free(gpointer p) {
        Line *l = p;
        g_free(l->text);
        g_free(l);
}

/* text wrapped to width, each piece a line of the given colour. */
static void add_lines(GPtrArray *lines, const char *color, size_t width, const char *text) {
        g_autoptr(GPtrArray) pieces = g_ptr_array_new_with_free_func(g_free);

        wrap_text(text, width, pieces);
        for (guint i = 0; i < pieces->len; i++) {
                Line *l = g_new0(Line, 1);
                l->text = g_steal_pointer(&pieces->pdata[i]);
                l->color = color;
                g_ptr_array_add(lines, l);
        }
}

/* One answer of Compare as lines at most width wide: who, status, timings, tokens, a rule, the
 * error if any, the answer. */
static GPtrArray *compare_column(GVariant *rec, size_t width, bool *failed) {
        GPtrArray *lines = g_ptr_array_new_with_free_func(line_free);
        const char *error = dict_string(rec, "error"), *finish = dict_string(rec, "finish_reason");
        const char *content = dict_string(rec, "content");
        uint64_t status = dict_uint(rec, "status");
        bool bad = (error && *error) || status < 200 || status > 299;
        g_autofree char *ttfb = format_usec(dict_uint(rec, "ttfb_usec"));
        g_autofree char *duration = format_usec(dict_uint(rec, "duration_usec"));
        g_autofree char *rate = format_rate(dict_double(rec, "tokens_per_sec", 0));
        g_autofree char *s = NULL, *rule = NULL;
        GString *r;

        add_lines(lines, ansi_highlight(), width, dict_string(rec, "provider") ?: "?");
        s = status > 0 ? g_strdup_printf(_("status %" PRIu64), status) : g_strdup(_("no answer"));
        if (finish && *finish) {
                char *t = g_strdup_printf(_("%s, finish reason %s"), s, finish);
                g_free(s);
                s = t;
        }
        add_lines(lines, bad ? ansi_red() : ansi_green(), width, s);
        g_free(s);
        s = g_strdup_printf(_("TTFB %s, total %s"), ttfb, duration);
        add_lines(lines, NULL, width, s);
        g_free(s);
        s = g_strdup_printf(_("tokens: %" PRIu64 " in, %" PRIu64 " out, %s/s"), dict_uint(rec, "prompt_tokens"),
                            dict_uint(rec, "completion_tokens"), rate);
        add_lines(lines, NULL, width, s);

        r = g_string_new(NULL);
        for (size_t i = 0; i < width; i++)
                g_string_append(r, glyph(GLYPH_HORIZONTAL_LINE));
        rule = g_string_free(r, false);
        add_lines(lines, NULL, width, rule);

        if (error && *error) {
                g_autofree char *e = g_strdup_printf(_("error: %s"), error);
                add_lines(lines, ansi_red(), width, e);
        }
        if (content && *content)
                add_lines(lines, NULL, width, content);
        if (bad)
                *failed = true;
        return lines;
}

static void print_line(const Line *l, size_t pad_to) {
        fprintf(out, "%s%s%s", l->color ?: "", l->text, l->color && *l->color ? ansi_normal() : "");
        if (pad_to > 0)
                fprintf(out, "%*s", (int) (pad_to - MIN(pad_to, text_width(l->text))), "");
}

#define COMPARE_MIN_COLUMN 28

/* Side by side when every answer gets COMPARE_MIN_COLUMN columns, else one after another. */
static void print_compare(GVariant *records, size_t width, bool *failed) {
        gsize n = g_variant_n_children(records);
        size_t sep = 3, col = n > 0 ? (width - MIN(width, sep * (n - 1))) / n : width;
        bool side_by_side = n > 1 && col >= COMPARE_MIN_COLUMN;
        g_autoptr(GPtrArray) columns_ = g_ptr_array_new_with_free_func((GDestroyNotify) g_ptr_array_unref);
        guint rows = 0;

        if (!side_by_side)
                col = MAX(width, (size_t) 20);
        for (gsize i = 0; i < n; i++) {
                g_autoptr(GVariant) rec = g_variant_get_child_value(records, i);
                GPtrArray *lines = compare_column(rec, col, failed);
                rows = MAX(rows, lines->len);
                g_ptr_array_add(columns_, lines);
        }

        if (!side_by_side) {
                for (guint c = 0; c < columns_->len; c++) {
                        GPtrArray *lines = columns_->pdata[c];
                        if (c > 0)
                                fputc('\n', out);
                        for (guint i = 0; i < lines->len; i++) {
                                print_line(lines->pdata[i], 0);
                                fputc('\n', out);
                        }
                }
                return;
        }
        for (guint row = 0; row < rows; row++) {
                for (guint c = 0; c < columns_->len; c++) {
                        GPtrArray *lines = columns_->pdata[c];
                        bool last = c == columns_->len - 1;
                        Line empty = { .text = (char *) "" };

                        if (c > 0)
                                fprintf(out, last && row >= lines->len ? " %s" : " %s ",
                                        glyph(GLYPH_VERTICAL_LINE));
                        if (last && row >= lines->len)
                                break;
                        print_line(row < lines->len ? lines->pdata[row] : &empty, last ? 0 : col);
                }
                fputc('\n', out);
        }
}

/* A comma-separated list of names, none empty, none twice. */
static int parse_name_list(const char *s, char ***ret) {
        g_auto(GStrv) names = g_strsplit(s, ",", -1);

        if (!names[0])
                return -EINVAL;
        for (char **p = names; *p; p++) {
                if (**p == 0)
                        return -EINVAL;
                for (char **q = names; q < p; q++)
                        if (strcmp(*p, *q) == 0)
                                return -EEXIST;
        }
        *ret = g_steal_pointer(&names);
        return 0;
}

static int verb_compare(char **args, int n_args) {
        const char *what = _("Failed to compare the providers");
        g_autoptr(sd_bus_message) m = NULL, reply = NULL;
        g_autoptr(GVariant) records = NULL;
        g_auto(GStrv) providers = NULL;
        char *none[] = { NULL };
        bool failed = false;
        size_t width;
        int r;

        if (arg_providers) {
                r = parse_name_list(arg_providers, &providers);
                if (r == -EEXIST) {
                        fprintf(stderr, _("A provider is named twice in --providers='%s'.\n"), arg_providers);
                        return r;
                }
                if (r < 0) {
                        fprintf(stderr, _("Invalid --providers='%s': expected NAME[,NAME...].\n"), arg_providers);
                        return r;
                }
        }
        if (args[1][0] == 0) {
                fprintf(stderr, _("The prompt is empty.\n"));
                return -EINVAL;
        }
        width = columns();

        polkit_agent_open();
        r = new_call("Compare", what, &m);
        if (r < 0)
                return r;
        r = sd_bus_message_append(m, "s", args[0]);
        if (r >= 0)
                r = sd_bus_message_append_strv(m, providers ?: none);
        if (r >= 0)
                r = sd_bus_message_append(m, "s", args[1]);
        if (r < 0)
                return report_error(what, NULL, r);
        r = send_call(m, what, SLOW_CALL_TIMEOUT_USEC, &reply);
        if (r < 0)
                return r;
        r = reply_read(reply, "aa{sv}", what, &records);
        if (r < 0)
                return r;
        if (g_variant_n_children(records) == 0) {
                fprintf(stderr, _("%s: the router compared no provider.\n"), what);
                return -ENODATA;
        }

        pager_open();
        print_compare(records, width, &failed);
        /* Like probe: a script sees whether every provider answered. */
        return failed ? -EIO : 0;
}

static int verb_probe(char **args, int n_args) {
        const char *what = _("Failed to probe the provider");
        g_autoptr(sd_bus_message) m = NULL, reply = NULL;
        g_autoptr(GVariant) result = NULL, checks = NULL;
        g_autoptr(Table) t = NULL;
        g_autofree char *provider = NULL, *ttfb = NULL;
        size_t n = 0, n_failed = 0;
        bool passed;
        int r;

        polkit_agent_open();
        r = new_call("Probe", what, &m);
        if (r < 0)
                return r;
        r = sd_bus_message_append(m, "s", args[0]);
        if (r < 0)
                return report_error(what, NULL, r);
        r = send_call(m, what, SLOW_CALL_TIMEOUT_USEC, &reply);
        if (r < 0)
                return r;
        r = reply_read(reply, "a{sv}", what, &result);
        if (r < 0)
                return r;

        provider = sanitize(dict_string(result, "provider") ?: args[0], false);
        passed = dict_bool(result, "passed", false);
        ttfb = format_usec(dict_uint(result, "ttfb_usec"));
        checks = g_variant_lookup_value(result, "checks", G_VARIANT_TYPE("a(sbs)"));

        t = table_new(0, "", _("CHECK"), _("DETAIL"), NULL);
        for (gsize i = 0, k = checks ? g_variant_n_children(checks) : 0; i < k; i++) {
                const char *name, *detail;
                gboolean ok;

                g_variant_get_child(checks, i, "(&sb&s)", &name, &ok, &detail);
                table_add(t, ok ? ansi_green() : ansi_red(), glyph(ok ? GLYPH_CHECK_MARK : GLYPH_CROSS_MARK));
                table_add(t, NULL, name);
                table_add(t, NULL, detail);
                n++;
                if (!ok)
                        n_failed++;
        }

        pager_open();
        fprintf(out, _("Conformance of %s%s%s:\n"), ansi_highlight(), provider, ansi_normal());
        if (n > 0)
                table_print(t, arg_legend);
        fprintf(out, _("Time to first byte: %s\n"), ttfb);
        if (n_failed > 0)
                fprintf(out, ngettext("%s%zu of %zu check failed.%s\n", "%s%zu of %zu checks failed.%s\n",
                                      (unsigned long) n),
                        ansi_red(), n_failed, n, ansi_normal());
        else if (!passed)
                fprintf(out, _("%sThe probe did not pass.%s\n"), ansi_red(), ansi_normal());
        else
                fprintf(out, ngettext("%s%zu check passed.%s\n", "%sAll %zu checks passed.%s\n", (unsigned long) n),
                        ansi_green(), n, ansi_normal());
        return n_failed > 0 || !passed ? -EIO : 0;
}

#define ARGS_ANY (-1)

typedef struct Verb {
        const char *name;
        int min_args, max_args;
        int (*func)(char **args, int n_args);
} Verb;

static const Verb verbs[] = {
        { "status", 0, 0, verb_status },
        { "providers", 0, 0, verb_providers },
        { "set-default", 1, 1, verb_set_default },
        { "map", 2, 2, verb_map },
        { "unmap", 1, 1, verb_unmap },
        { "split", 2, ARGS_ANY, verb_split },
        { "stats", 0, 0, verb_stats },
        { "comparisons", 0, 1, verb_comparisons },
        { "compare", 2, 2, verb_compare },
        { "probe", 1, 1, verb_probe },
        { "reload", 0, 0, verb_reload },
};

static void help(void) {
        printf(_("%s [OPTIONS...] COMMAND ...\n\n"
                 "Query or change how provider-router routes requests.\n\n"
                 "Commands:\n"
                 "  status                 Show the default provider, mappings, splits and providers\n"
                 "  providers              List providers with their state and counters\n"
                 "  set-default NAME       Route requests without a mapping to NAME\n"
                 "  map MODEL PROVIDER     Route requests for MODEL to PROVIDER\n"
                 "  unmap MODEL            Remove the mapping for MODEL\n"
                 "  split MODEL PROVIDER[:WEIGHT]...\n"
                 "                         Share the requests for MODEL among providers by weight\n"
                 "  stats                  Show statistics per provider, route and compared pair\n"
                 "  comparisons [N]        Show the N most recent comparisons (default 20)\n"
                 "  compare MODEL PROMPT   Ask several providers the same, show the answers side by side\n"
                 "  probe NAME             Check that provider NAME does what OpenAI clients rely on\n"
                 "  reload                 Re-read the configuration files; drops runtime changes\n\n"
                 "Options:\n"
                 "  -h --help              Show this help\n"
                 "     --version           Show package version\n"
                 "     --system            Talk to the router on the system bus (default)\n"
                 "     --user              Talk to a router on the user's session bus\n"
                 "  -H --host=[USER@]HOST[:PORT]\n"
                 "                         Talk to the router on a remote host, over SSH\n"
                 "  -M --machine=CONTAINER Talk to the router in a local container\n"
                 "     --providers=NAME,...\n"
                 "                         The providers 'compare' asks (default: the router's choice)\n"
                 "     --no-ask-password   Do not ask for a password to authorize changes\n"
                 "     --no-legend         Do not print column headers and footers\n"
                 "     --no-pager          Do not pipe output into a pager\n\n"
                 "Changes apply to the next request, survive restarts of the router, and are\n"
                 "undone by 'reload'. See provider-routerctl(1).\n"),
               g_get_prgname());
}

int main(int argc, char *argv[]) {
        enum {
                ARG_VERSION = 0x100,
                ARG_SYSTEM,
                ARG_USER,
                ARG_NO_ASK_PASSWORD,
                ARG_NO_LEGEND,
                ARG_NO_PAGER,
                ARG_PROVIDERS,
        };
        static const struct option options[] = {
                { "help", no_argument, NULL, 'h' },
                { "version", no_argument, NULL, ARG_VERSION },
                { "system", no_argument, NULL, ARG_SYSTEM },
                { "user", no_argument, NULL, ARG_USER },
                { "host", required_argument, NULL, 'H' },
                { "machine", required_argument, NULL, 'M' },
                { "providers", required_argument, NULL, ARG_PROVIDERS },
                { "no-ask-password", no_argument, NULL, ARG_NO_ASK_PASSWORD },
                { "no-legend", no_argument, NULL, ARG_NO_LEGEND },
                { "no-pager", no_argument, NULL, ARG_NO_PAGER },
                {}
        };
        const Verb *verb = NULL;
        const char *name;
        int c, r, n;

        setlocale(LC_ALL, "");
        bindtextdomain(GETTEXT_PACKAGE, LOCALEDIR);
        bind_textdomain_codeset(GETTEXT_PACKAGE, "UTF-8");
        textdomain(GETTEXT_PACKAGE);
        g_set_prgname(program_invocation_short_name);
        out = stdout;

        while ((c = getopt_long(argc, argv, "hH:M:", options, NULL)) >= 0)
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
                case 'H':
                        /* As in systemd's tools, the last of -H and -M counts. */
                        arg_transport = TRANSPORT_REMOTE;
                        arg_host = optarg;
                        break;
                case 'M':
                        arg_transport = TRANSPORT_MACHINE;
                        arg_host = optarg;
                        break;
                case ARG_PROVIDERS:
                        arg_providers = optarg;
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

        if (arg_user && arg_transport != TRANSPORT_LOCAL) {
                fprintf(stderr, _("--user cannot be combined with -H/--host= or -M/--machine=: a router on another "
                                  "host or in a container is reached on its system bus.\n"));
                return EXIT_FAILURE;
        }
        if (arg_host && arg_host[0] == 0) {
                fprintf(stderr, arg_transport == TRANSPORT_REMOTE ? _("Empty host name for -H/--host=.\n")
                                                                  : _("Empty machine name for -M/--machine=.\n"));
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
        if (n < verb->min_args || (verb->max_args != ARGS_ANY && n > verb->max_args)) {
                fprintf(stderr, n < verb->min_args ? _("Too few arguments for '%s'. See '%s --help'.\n")
                                                   : _("Too many arguments for '%s'. See '%s --help'.\n"),
                        name, g_get_prgname());
                return EXIT_FAILURE;
        }
        if (arg_providers && verb->func != verb_compare) {
                fprintf(stderr, _("--providers= is an option of 'compare' only.\n"));
                return EXIT_FAILURE;
        }

        /* D-Bus strings are UTF-8; say so rather than let the call fail with EINVAL. */
        for (int i = optind + 1; i < argc; i++)
                if (!g_utf8_validate(argv[i], -1, NULL)) {
                        g_autofree char *escaped = g_strescape(argv[i], NULL);
                        fprintf(stderr, _("Argument '%s' is not valid UTF-8.\n"), escaped);
                        return EXIT_FAILURE;
                }
        if (arg_providers && !g_utf8_validate(arg_providers, -1, NULL)) {
                g_autofree char *escaped = g_strescape(arg_providers, NULL);
                fprintf(stderr, _("Argument '%s' is not valid UTF-8.\n"), escaped);
                return EXIT_FAILURE;
        }

        r = verb->func(optind < argc ? argv + optind + 1 : argv + argc, n);
        pager_close();
        polkit_agent_close();
        bus = sd_bus_flush_close_unref(bus);
        return r < 0 ? EXIT_FAILURE : EXIT_SUCCESS;
}
