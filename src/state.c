/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <unistd.h>

#include "log.h"
#include "state.h"

#define STATE_FILE_NAME "routing.state"

char *state_file_path(void) {
        const char *d = g_getenv("STATE_DIRECTORY");
        g_autofree char *first = NULL;

        if (!isempty(d)) {
                /* systemd passes a colon-separated list when several are configured. */
                const char *colon = strchr(d, ':');
                first = colon ? g_strndup(d, (gsize) (colon - d)) : g_strdup(d);
                return g_build_filename(first, STATE_FILE_NAME, NULL);
        }
        return g_build_filename(STATE_DIR, STATE_FILE_NAME, NULL);
}

/* A model name is a key in the file, and GKeyFile keys cannot hold '=', '[' or ']', nor begin
 * with '#' (a comment) or begin or end with a space: those characters are written as %XX, and
 * so is '%' itself. */
static char *state_key_escape(const char *model) {
        size_t n = strlen(model);
        GString *s = g_string_sized_new(n);

        for (size_t i = 0; i < n; i++) {
                char c = model[i];
                if (strchr("%=[]", c) || (i == 0 && c == '#') || (c == ' ' && (i == 0 || i == n - 1)))
                        g_string_append_printf(s, "%%%02X", (unsigned char) c);
                else
                        g_string_append_c(s, c);
        }
        return g_string_free(s, FALSE);
}

int state_save(Manager *m) {
        g_autoptr(Router) base = router_new(m->config, m->providers, NULL);
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autofree char *path = state_file_path(), *data = NULL, *dir = NULL;
        g_autofree const Route **routes = NULL;
        g_autoptr(GError) error = NULL;
        Router *cur = m->router;
        bool any = false;
        unsigned n;
        gsize size;

        if (!streq(router_default_name(cur), router_default_name(base))) {
                g_key_file_set_string(kf, "Routing", "DefaultProvider", router_default_name(cur));
                any = true;
        }
        routes = router_routes(cur, &n);
        for (unsigned i = 0; i < n; i++) {
                const char *model = routes[i]->model;
                const char *p = router_mapping(cur, model);
                const char *q = router_mapping(base, model);
                if (p && (!q || !streq(p, q))) {
                        g_autofree char *key = state_key_escape(model);
                        g_key_file_set_string(kf, "SetModelMappings", key, p);
                        any = true;
                }
        }
        g_clear_pointer(&routes, g_free);
        routes = router_routes(base, &n);
        for (unsigned i = 0; i < n; i++) {
                const char *model = routes[i]->model;
                if (!router_get_route(cur, model)) {
                        g_autofree char *key = state_key_escape(model);
                        g_key_file_set_string(kf, "RemovedModelMappings", key, "");
                        any = true;
                }
        }

        if (!any)
                return state_clear(m);

        g_key_file_set_comment(kf, NULL, NULL,
                               " Routing changed at runtime over D-Bus, as differences from the configuration.\n"
                               " Written by provider-router; 'provider-routerctl reload' returns to the files.",
                               NULL);
        data = g_key_file_to_data(kf, &size, NULL);
        dir = g_path_get_dirname(path);
        (void) g_mkdir_with_parents(dir, 0755);
        if (!g_file_set_contents_full(path, data, (gssize) size,
                                      G_FILE_SET_CONTENTS_CONSISTENT | G_FILE_SET_CONTENTS_DURABLE, 0640, &error))
                return log_debug_errno(EIO, "Failed to write %s: %s", path, error->message);
        log_debug("Routing state saved to %s.", path);
        return 0;
}

int state_load(Manager *m) {
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autofree char *path = state_file_path(), *def = NULL;
        g_autoptr(GError) error = NULL;
        g_auto(GStrv) keys = NULL;
        unsigned applied = 0;

        if (!g_key_file_load_from_file(kf, path, G_KEY_FILE_NONE, &error)) {
                if (g_error_matches(error, G_FILE_ERROR, G_FILE_ERROR_NOENT))
                        return 0;
                return log_warning_errno(EINVAL, "Failed to read the saved routing state %s, using the configuration: %s",
                                         path, error->message);
        }

        /* Entries naming providers that are no longer configured are dropped with a warning:
         * the configuration decides which providers exist. */
        def = g_key_file_get_string(kf, "Routing", "DefaultProvider", NULL);
        if (def) {
                if (router_set_default(m->router, def) >= 0)
                        applied++;
                else
                        log_warning("%s: saved default provider '%s' is not configured, ignoring", path, def);
        }
        keys = g_key_file_get_keys(kf, "SetModelMappings", NULL, NULL);
        for (char **k = keys; k && *k; k++) {
                g_autofree char *p = g_key_file_get_string(kf, "SetModelMappings", *k, NULL);
                g_autofree char *model = g_uri_unescape_string(*k, NULL);
                if (p && model && router_set_mapping(m->router, model, p) >= 0)
                        applied++;
                else
                        log_warning("%s: saved mapping '%s' -> '%s' is not valid now, ignoring", path, *k, strna(p));
        }
        g_strfreev(keys);
        keys = g_key_file_get_keys(kf, "RemovedModelMappings", NULL, NULL);
        for (char **k = keys; k && *k; k++) {
                g_autofree char *model = g_uri_unescape_string(*k, NULL);
                if (model && router_remove_mapping(m->router, model) >= 0)
                        applied++;
        }

        if (applied > 0)
                log_info("Restored %u routing change(s) made at runtime from %s; 'provider-routerctl reload' "
                         "returns to the configuration files.", applied, path);
        return 0;
}

int state_clear(Manager *m) {
        g_autofree char *path = state_file_path();

        if (unlink(path) < 0 && errno != ENOENT)
                return log_debug_errno(errno, "Failed to remove %s: %m", path);
        return 0;
}

static void state_on_manager(Manager *m, ManagerEvent event, void *userdata) {
        int r;

        switch (event) {
        case MANAGER_ROUTING_CHANGED:
                r = state_save(m);
                if (r < 0)
                        log_warning_errno(r, "Failed to save the routing state, the change is not persistent: %m");
                break;
        case MANAGER_RELOADED:
                (void) state_clear(m);
                break;
        default:
                break;
        }
}

int state_attach(Manager *m) {
        int r = state_load(m); /* logs why it could not */
        manager_add_listener(m, state_on_manager, NULL);
        return r;
}
