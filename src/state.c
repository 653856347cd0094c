/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <sys/epoll.h>
#include <sys/eventfd.h>
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

/* A route's text is a split when it has weights: "a:80 b:20" (names never hold ':'). */
static bool is_split(const char *value) {
        return value && strchr(value, ':');
}

/* The configuration's own route of model, as router_new() makes it (NULL: none). */
static char *base_route(Manager *m, const char *model) {
        g_autofree char *v = router_config_route_string(m->config, model);

        /* A mapping to a provider that is gone makes no route. */
        if (v && !is_split(v) && !provider_set_find(m->providers, v))
                return NULL;
        return TAKE_PTR(v);
}

int state_save(Manager *m) {
        g_autoptr(GKeyFile) kf = g_key_file_new();
        g_autofree char *path = state_file_path(), *data = NULL, *dir = NULL;
        g_autofree char *def = NULL, *def_base = NULL;
        g_autofree const Route **routes = NULL;
        g_autoptr(GError) error = NULL;
        Router *cur = m->router;
        bool any = false;
        unsigned n;
        gsize size;

        def = route_to_string(cur->default_route);
        def_base = base_route(m, ROUTE_DEFAULT_MODEL);
        if (def && !streq(def, strempty(def_base))) {
                g_key_file_set_string(kf, "Routing", is_split(def) ? "DefaultSplit" : "DefaultProvider", def);
                any = true;
        }
        routes = router_routes(cur, &n);
        for (unsigned i = 0; i < n; i++) {
                const char *model = routes[i]->model;
                g_autofree char *v = route_to_string(routes[i]), *b = base_route(m, model);
                if (!b || !streq(v, b)) {
                        g_autofree char *key = state_key_escape(model);
                        g_key_file_set_string(kf, is_split(v) ? "SetModelSplits" : "SetModelMappings", key, v);
                        any = true;
                }
        }
        for (guint i = 0; i < m->config->mapping_order->len; i++) {
                const char *model = m->config->mapping_order->pdata[i];
                g_autofree char *b = base_route(m, model);
                if (b && !router_get_route(cur, model)) {
                        g_autofree char *key = state_key_escape(model);
                        g_key_file_set_string(kf, "RemovedModelMappings", key, "");
                        any = true;
                }
        }
        for (guint i = 0; i < m->config->routes->len; i++) {
                const RouteConfig *rc = m->config->routes->pdata[i];
                g_autofree char *b = NULL;
                if (streq(rc->model, ROUTE_DEFAULT_MODEL) || g_hash_table_contains(m->config->mappings, rc->model))
                        continue; /* the default route stays; mappings were listed above */
                b = base_route(m, rc->model);
                if (b && !router_get_route(cur, rc->model)) {
                        g_autofree char *key = state_key_escape(rc->model);
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
        g_free(def);
        def = g_key_file_get_string(kf, "Routing", "DefaultSplit", NULL);
        if (def) {
                if (router_set_route_string(m->router, ROUTE_DEFAULT_MODEL, def) >= 0)
                        applied++;
                else
                        log_warning("%s: saved default split '%s' is not valid now, ignoring", path, def);
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
        keys = g_key_file_get_keys(kf, "SetModelSplits", NULL, NULL);
        for (char **k = keys; k && *k; k++) {
                g_autofree char *v = g_key_file_get_string(kf, "SetModelSplits", *k, NULL);
                g_autofree char *model = g_uri_unescape_string(*k, NULL);
                if (v && model && router_set_route_string(m->router, model, v) >= 0)
                        applied++;
                else
                        log_warning("%s: saved split '%s' -> '%s' is not valid now, ignoring", path, *k, strna(v));
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

/* ---- the writer ---------------------------------------------------------------------------- */

typedef enum StateOpKind {
        STATE_OP_DEFAULT,     /* provider: the default differs (NULL: it does not) */
        STATE_OP_SET,         /* model is mapped to provider, unlike the configuration */
        STATE_OP_REMOVED,     /* model's configured mapping is removed */
        STATE_OP_SAME,        /* model is as configured */
        STATE_OP_CLEAR,       /* back to the configuration: no differences */
} StateOpKind;

typedef struct StateOp {
        StateOpKind kind;
        char *model;
        char *provider;
        uint64_t generation;
} StateOp;

static void state_op_free(StateOp *op) {
        if (!op)
                return;
        g_free(op->model);
        g_free(op->provider);
        g_free(op);
}

struct State {
        Manager *manager;
        Router *router;               /* whose changes we hear: the manager's, until a reload */
        char *base_default;           /* the default provider the configuration alone gives */
        uint64_t queued;              /* generation of the last change handed to the writer */
        uint64_t saved;               /* generation the writer reported */
        void (*saved_func)(uint64_t saved, void *userdata);
        void *saved_userdata;
        int event_fd;
        sd_event_source *event_source;
        bool sync;                    /* no writer thread: save on the loop, as a fallback */

        /* shared with the writer thread */
        GMutex lock;
        GCond wake;
        GQueue ops;                   /* StateOp* */
        bool stopping;
        uint64_t written;             /* generation the last write contained */
        int write_error;              /* of the last write: -errno, or 0 */
        char *write_error_message;
        GThread *thread;

        /* the writer thread's own: the differences, as in the file */
        char *w_default;
        GHashTable *w_set;            /* model → provider */
        GHashTable *w_removed;        /* model → "" */
        char *w_path;
};

static void state_diff_apply(State *s, StateOp *op) {
        switch (op->kind) {
        case STATE_OP_DEFAULT:
                g_free(s->w_default);
                s->w_default = g_steal_pointer(&op->provider);
                break;
        case STATE_OP_SET:
                g_hash_table_remove(s->w_removed, op->model);
                g_hash_table_replace(s->w_set, g_strdup(op->model), g_steal_pointer(&op->provider));
                break;
        case STATE_OP_REMOVED:
                g_hash_table_remove(s->w_set, op->model);
                g_hash_table_replace(s->w_removed, g_strdup(op->model), g_strdup(""));
                break;
        case STATE_OP_SAME:
                g_hash_table_remove(s->w_set, op->model);
                g_hash_table_remove(s->w_removed, op->model);
                break;
        case STATE_OP_CLEAR:
                g_clear_pointer(&s->w_default, g_free);
                g_hash_table_remove_all(s->w_set);
                g_hash_table_remove_all(s->w_removed);
                break;
        }
}

static int compare_keys(const void *a, const void *b) {
        return strcmp(*(char *const *) a, *(char *const *) b);
}

static void key_file_set_group(GKeyFile *kf, const char *group, const char *split_group, GHashTable *table) {
        g_autofree gpointer *keys = NULL;
        guint n;

        /* Sorted, so that the same differences are always the same file. */
        keys = g_hash_table_get_keys_as_array(table, &n);
        qsort(keys, n, sizeof(gpointer), compare_keys);
        for (guint i = 0; i < n; i++) {
                g_autofree char *key = state_key_escape(keys[i]);
                const char *v = g_hash_table_lookup(table, keys[i]);
                g_key_file_set_string(kf, split_group && is_split(v) ? split_group : group, key, v);
        }
}

/* On the writer thread: the file from its copy of the differences. Logs nothing. */
static int state_write(State *s, char **ret_message) {
        g_autoptr(GKeyFile) kf = NULL;
        g_autoptr(GError) error = NULL;
        g_autofree char *data = NULL, *dir = NULL;
        gsize size;

        if (!s->w_default && g_hash_table_size(s->w_set) == 0 && g_hash_table_size(s->w_removed) == 0) {
                if (unlink(s->w_path) < 0 && errno != ENOENT) {
                        *ret_message = g_strdup_printf("cannot remove %s: %s", s->w_path, g_strerror(errno));
                        return -errno;
                }
                return 0;
        }

        kf = g_key_file_new();
        if (s->w_default)
                g_key_file_set_string(kf, "Routing", is_split(s->w_default) ? "DefaultSplit" : "DefaultProvider",
                                      s->w_default);
        key_file_set_group(kf, "SetModelMappings", "SetModelSplits", s->w_set);
        key_file_set_group(kf, "RemovedModelMappings", NULL, s->w_removed);
        g_key_file_set_comment(kf, NULL, NULL,
                               " Routing changed at runtime over D-Bus, as differences from the configuration.\n"
                               " Written by provider-router; 'provider-routerctl reload' returns to the files.",
                               NULL);
        data = g_key_file_to_data(kf, &size, NULL);
        dir = g_path_get_dirname(s->w_path);
        (void) g_mkdir_with_parents(dir, 0755);
        if (!g_file_set_contents_full(s->w_path, data, (gssize) size,
                                      G_FILE_SET_CONTENTS_CONSISTENT | G_FILE_SET_CONTENTS_DURABLE, 0640, &error)) {
                *ret_message = g_strdup_printf("cannot write %s: %s", s->w_path, error->message);
                return -EIO;
        }
        return 0;
}

static gpointer state_writer(gpointer userdata) {
        State *s = userdata;

        for (;;) {
                GQueue batch = G_QUEUE_INIT;
                g_autofree char *message = NULL;
                uint64_t generation = 0;
                StateOp *op;
                int r;

                g_mutex_lock(&s->lock);
                while (g_queue_is_empty(&s->ops) && !s->stopping)
                        g_cond_wait(&s->wake, &s->lock);
                if (g_queue_is_empty(&s->ops)) {
                        g_mutex_unlock(&s->lock);
                        return NULL;
                }
                /* Everything queued meanwhile is one write. */
                batch = s->ops;
                g_queue_init(&s->ops);
                g_mutex_unlock(&s->lock);

                while ((op = g_queue_pop_head(&batch))) {
                        state_diff_apply(s, op);
                        generation = op->generation;
                        state_op_free(op);
                }
                r = state_write(s, &message);

                g_mutex_lock(&s->lock);
                s->written = generation;
                s->write_error = r;
                g_free(s->write_error_message);
                s->write_error_message = TAKE_PTR(message);
                g_mutex_unlock(&s->lock);
                (void) eventfd_write(s->event_fd, 1);
        }
}

/* ---- the loop's side ------------------------------------------------------------------------ */

static void state_report(State *s, uint64_t generation, int error, const char *message) {
        if (error < 0)
                log_warning_errno(error, "Failed to save the routing state (%s), the change is not persistent: %m",
                                  strna(message));
        s->saved = MAX(s->saved, generation);
        if (s->saved_func)
                s->saved_func(s->saved, s->saved_userdata);
}

static int state_on_written(sd_event_source *source, int fd, uint32_t revents, void *userdata) {
        State *s = userdata;
        g_autofree char *message = NULL;
        eventfd_t v;
        uint64_t generation;
        int error;

        (void) eventfd_read(fd, &v);
        g_mutex_lock(&s->lock);
        generation = s->written;
        error = s->write_error;
        message = TAKE_PTR(s->write_error_message);
        s->write_error = 0;
        g_mutex_unlock(&s->lock);
        state_report(s, generation, error, message);
        return 0;
}

static void state_queue(State *s, StateOpKind kind, const char *model, const char *provider) {
        StateOp *op;

        if (s->sync) {
                /* No writer: the old way, the whole file on the loop. */
                int r = state_save(s->manager);
                state_report(s, ++s->queued, r, r < 0 ? "see above" : NULL);
                return;
        }

        op = g_new0(StateOp, 1);
        op->kind = kind;
        op->model = g_strdup(model);
        op->provider = g_strdup(provider);
        op->generation = ++s->queued;
        g_mutex_lock(&s->lock);
        g_queue_push_tail(&s->ops, op);
        g_cond_signal(&s->wake);
        g_mutex_unlock(&s->lock);
}

/* The configuration's own default route, as router_new() makes it. */
static char *base_default_name(Manager *m) {
        g_autofree char *v = base_route(m, ROUTE_DEFAULT_MODEL);
        Provider *p;

        if (v)
                return TAKE_PTR(v);
        /* No valid default: router_new() takes the first provider. */
        p = provider_set_size(m->providers) > 0 ? provider_set_get(m->providers, 0) : NULL;
        return p ? g_strdup(p->name) : NULL;
}

/* One change, told by the router: what it makes of the differences, in constant time. */
static void state_on_route_changed(Router *r, const char *model, void *userdata) {
        State *s = userdata;
        g_autofree char *cur = NULL, *base = NULL;

        if (!model) {
                cur = route_to_string(r->default_route);
                state_queue(s, STATE_OP_DEFAULT, NULL, cur && !streq(cur, strempty(s->base_default)) ? cur : NULL);
                return;
        }
        cur = route_to_string(router_get_route(r, model));
        base = base_route(s->manager, model);
        if (cur && (!base || !streq(cur, base)))
                state_queue(s, STATE_OP_SET, model, cur);
        else if (!cur && base)
                state_queue(s, STATE_OP_REMOVED, model, NULL);
        else
                state_queue(s, STATE_OP_SAME, model, NULL);
}

static void state_follow(State *s) {
        Manager *m = s->manager;

        s->router = m->router;
        router_set_change_callback(s->router, state_on_route_changed, s);
        g_free(s->base_default);
        s->base_default = base_default_name(m);
}

static void state_on_manager(Manager *m, ManagerEvent event, void *userdata) {
        State *s = userdata;

        if (event != MANAGER_RELOADED)
                return;
        /* A new routing table from the files: no differences any more. */
        state_follow(s);
        state_queue(s, STATE_OP_CLEAR, NULL, NULL);
}

/* The writer's copy of the differences, from the routing as it is now (once, at start). */
static void state_diff_init(State *s) {
        Manager *m = s->manager;
        g_autofree const Route **routes = NULL;
        g_autofree char *def = route_to_string(m->router->default_route);
        unsigned n;

        if (def && !streq(def, strempty(s->base_default)))
                s->w_default = g_strdup(def);
        routes = router_routes(m->router, &n);
        for (unsigned i = 0; i < n; i++) {
                const char *model = routes[i]->model;
                g_autofree char *cur = route_to_string(routes[i]), *base = base_route(m, model);
                if (!base || !streq(cur, base))
                        g_hash_table_replace(s->w_set, g_strdup(model), TAKE_PTR(cur));
        }
        for (guint i = 0; i < m->config->mapping_order->len; i++) {
                const char *model = m->config->mapping_order->pdata[i];
                g_autofree char *base = base_route(m, model);
                if (base && !router_get_route(m->router, model))
                        g_hash_table_replace(s->w_removed, g_strdup(model), g_strdup(""));
        }
}

int state_new(Manager *m, State **ret) {
        g_autoptr(State) s = g_new0(State, 1);
        g_autoptr(GError) error = NULL;
        int r, k;

        s->manager = m;
        s->event_fd = -EBADF;
        g_mutex_init(&s->lock);
        g_cond_init(&s->wake);
        g_queue_init(&s->ops);
        s->w_set = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        s->w_removed = g_hash_table_new_full(g_str_hash, g_str_equal, g_free, g_free);
        s->w_path = state_file_path();

        r = state_load(m); /* logs why it could not */
        state_follow(s);
        state_diff_init(s);
        manager_add_listener(m, state_on_manager, s);

        s->event_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        k = s->event_fd < 0 ? -errno : sd_event_add_io(m->event, &s->event_source, s->event_fd, EPOLLIN,
                                                        state_on_written, s);
        if (k >= 0) {
                (void) sd_event_source_set_description(s->event_source, "state-written");
                s->thread = g_thread_try_new("state-writer", state_writer, s, &error);
                if (!s->thread)
                        k = -EAGAIN;
        }
        if (k < 0) {
                log_warning_errno(k, "Cannot save the routing state in the background (%s), saving on the loop: %m",
                                  error ? error->message : "no eventfd");
                s->sync = true;
        }
        *ret = TAKE_PTR(s);
        return r;
}

State *state_free(State *s) {
        if (!s)
                return NULL;
        if (s->thread) {
                g_mutex_lock(&s->lock);
                s->stopping = true;
                g_cond_signal(&s->wake);
                g_mutex_unlock(&s->lock);
                /* It writes what is queued first. */
                g_thread_join(s->thread);
                if (s->write_error < 0)
                        log_warning_errno(s->write_error, "Failed to save the routing state (%s): %m",
                                          strna(s->write_error_message));
        }
        if (s->router && s->router == s->manager->router)
                router_set_change_callback(s->router, NULL, NULL);
        g_queue_clear_full(&s->ops, (GDestroyNotify) state_op_free);
        sd_event_source_disable_unref(s->event_source);
        if (s->event_fd >= 0)
                close(s->event_fd);
        g_mutex_clear(&s->lock);
        g_cond_clear(&s->wake);
        g_free(s->base_default);
        g_free(s->write_error_message);
        g_free(s->w_default);
        g_hash_table_unref(s->w_set);
        g_hash_table_unref(s->w_removed);
        g_free(s->w_path);
        g_free(s);
        return NULL;
}

uint64_t state_pending(State *s) {
        return s->queued;
}

uint64_t state_saved(State *s) {
        return s->saved;
}

void state_set_saved_callback(State *s, void (*func)(uint64_t saved, void *userdata), void *userdata) {
        s->saved_func = func;
        s->saved_userdata = userdata;
}
