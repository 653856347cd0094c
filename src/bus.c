/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <unistd.h>

#include "ask.h"
#include "bus.h"
#include "log.h"
#include "probe.h"

#define BUS_NAME "org.providerrouter.Router1"
#define BUS_PATH "/org/providerrouter/Router1"
#define BUS_INTERFACE "org.providerrouter.Router1"
#define POLKIT_ACTION "org.providerrouter.Router1.manage"

#define BUS_ERROR_NO_SUCH_PROVIDER "org.providerrouter.Router1.Error.NoSuchProvider"
#define BUS_ERROR_NO_SUCH_MAPPING "org.providerrouter.Router1.Error.NoSuchMapping"
#define BUS_ERROR_INVALID_MODEL "org.providerrouter.Router1.Error.InvalidModel"
#define BUS_ERROR_CONFIG_INVALID "org.providerrouter.Router1.Error.ConfigInvalid"
#define BUS_ERROR_TOO_MANY_ROUTES "org.providerrouter.Router1.Error.TooManyRoutes"

/* polkit checks waiting for an answer, at most: past it a caller is refused at once. */
#define PENDING_AUTH_MAX 64
/* Calls answered once their change is on disk, at most: past it they are answered at once. */
#define WAITING_SAVE_MAX 4096

typedef struct Bus Bus;
/* With apply=false reads and checks the arguments only; with apply=true makes the change.
 * Returns 1 when it answers the call itself, later (Compare, Probe). */
typedef int (*AuthorizedFunc)(sd_bus_message *message, Bus *b, bool apply, sd_bus_error *error);

struct Bus {
        Manager *manager;
        sd_bus *bus;
        GList *pending;      /* PendingAuth* */
        GList *calls;        /* BusCall*: Compare and Probe calls being answered */
        unsigned n_pending;
        sd_bus_slot *object_slot;

        /* PropertiesChanged goes out when the loop is idle: a burst of changes is one signal,
         * not one serialization of every mapping per change. */
        sd_event_source *emit;
        unsigned dirty;      /* DIRTY_* */

        BusPendingFunc persist_pending;
        void *persist_userdata;
        uint64_t persisted;  /* generation of the saved state on disk */
        GQueue waiting;      /* WaitingSave*, oldest first */
};

enum {
        DIRTY_ROUTING = 1 << 0,      /* DefaultProvider, ModelMappings */
        DIRTY_PROVIDERS = 1 << 1,    /* Providers */
        DIRTY_STATES = 1 << 2,       /* ProviderStates */
};

/* A method call whose change is made, waiting to be on disk before it is answered. */
typedef struct WaitingSave {
        sd_bus_message *message;
        uint64_t generation;
} WaitingSave;

/* A method call waiting for polkit's answer. */
typedef struct PendingAuth {
        Bus *bus;
        sd_bus_message *message;
        sd_bus_slot *slot;
        AuthorizedFunc func;
} PendingAuth;

static PendingAuth *pending_auth_free(PendingAuth *p) {
        if (!p)
                return NULL;
        sd_bus_slot_unref(p->slot);
        sd_bus_message_unref(p->message);
        g_free(p);
        return NULL;
}

static void pending_auth_destroy(gpointer p) {
        pending_auth_free(p);
}

static void bus_reply_done(Bus *b, sd_bus_message *message) {
        int r = sd_bus_reply_method_return(message, NULL);
        if (r < 0)
                log_debug_errno(r, "Failed to answer a D-Bus call, ignoring: %m");
}

/* A change was made for message: answered now, or once it is on disk. */
static int bus_reply_changed(Bus *b, sd_bus_message *message) {
        WaitingSave *w;
        uint64_t gen;

        if (!b->persist_pending || g_queue_get_length(&b->waiting) >= WAITING_SAVE_MAX)
                return sd_bus_reply_method_return(message, NULL);
        gen = b->persist_pending(b->persist_userdata);
        if (gen <= b->persisted)
                return sd_bus_reply_method_return(message, NULL);
        w = g_new(WaitingSave, 1);
        w->message = sd_bus_message_ref(message);
        w->generation = gen;
        g_queue_push_tail(&b->waiting, w);
        return 1;
}

void bus_set_persistence(Bus *b, BusPendingFunc pending, void *userdata) {
        b->persist_pending = pending;
        b->persist_userdata = userdata;
}

void bus_persisted(Bus *b, uint64_t saved) {
        WaitingSave *w;

        b->persisted = MAX(b->persisted, saved);
        while ((w = g_queue_peek_head(&b->waiting)) && w->generation <= b->persisted) {
                g_queue_pop_head(&b->waiting);
                bus_reply_done(b, w->message);
                sd_bus_message_unref(w->message);
                g_free(w);
        }
}

int bus_creds_trusted_euid(sd_bus_creds *creds, uid_t *ret) {
        uid_t uid;
        int r;

        /* What sd-bus filled in from /proc rather than from the broker is not proof: the process
         * may have exited and its PID been reused. systemd's own services refuse it too. */
        if (sd_bus_creds_get_augmented_mask(creds) & SD_BUS_CREDS_EUID)
                return -EPERM;
        r = sd_bus_creds_get_euid(creds, &uid);
        if (r < 0)
                return -EPERM;
        *ret = uid;
        return 0;
}

static int reply_with(sd_bus_message *message, int r, sd_bus_error *error) {
        if (r < 0) {
                if (sd_bus_error_is_set(error))
                        return sd_bus_reply_method_error(message, error);
                return sd_bus_reply_method_errno(message, r, NULL);
        }
        return sd_bus_reply_method_return(message, NULL);
}

static int polkit_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        PendingAuth *p = userdata;
        Bus *b = p->bus;
        sd_bus_error error = SD_BUS_ERROR_NULL;
        int authorized = 0, challenge = 0, r;

        b->pending = g_list_remove(b->pending, p);
        b->n_pending--;

        if (sd_bus_message_is_method_error(reply, NULL)) {
                const sd_bus_error *e = sd_bus_message_get_error(reply);
                log_debug("polkit check failed: %s", e ? e->message : "unknown error");
                r = sd_bus_error_setf(&error, SD_BUS_ERROR_ACCESS_DENIED,
                                      "Changing routing needs root or polkit authorization, and polkit could not be asked: %s",
                                      e && e->message ? e->message : "no answer");
                goto finish;
        }

        r = sd_bus_message_enter_container(reply, 'r', "bba{ss}");
        if (r >= 0)
                r = sd_bus_message_read(reply, "bb", &authorized, &challenge);
        if (r < 0) {
                r = sd_bus_error_setf(&error, SD_BUS_ERROR_ACCESS_DENIED, "Malformed answer from polkit.");
                goto finish;
        }

        if (authorized) {
                (void) sd_bus_message_rewind(p->message, true);
                r = p->func(p->message, b, true, &error);
                if (r > 0)
                        goto done; /* it answers by itself */
        } else if (challenge)
                r = sd_bus_error_setf(&error, SD_BUS_ERROR_INTERACTIVE_AUTHORIZATION_REQUIRED,
                                      "Interactive authentication is required to change routing.");
        else
                r = sd_bus_error_setf(&error, SD_BUS_ERROR_ACCESS_DENIED,
                                      "Not authorized to change routing (polkit action " POLKIT_ACTION ").");

finish:
        if (r >= 0)
                (void) bus_reply_changed(b, p->message);
        else
                (void) reply_with(p->message, r, &error);
done:
        sd_bus_error_free(&error);
        pending_auth_free(p);
        return 0;
}

/* Root and the service's own user may always change routing; anyone else is asked about at
 * polkit, asynchronously, and the call is answered when polkit answers. Returns 1 if the call
 * was handled (now or later). */
static int verify_and_run(sd_bus_message *message, Bus *b, AuthorizedFunc func, sd_bus_error *error) {
        g_autoptr(sd_bus_creds) creds = NULL;
        Manager *m = b->manager;
        PendingAuth *p;
        uid_t uid;
        int r;

        /* Bad arguments are refused before anything else. */
        r = func(message, b, false, error);
        if (r < 0)
                return r;

        /* Only what the broker vouches for: dbus-daemon sends the sender's effective uid
         * (UnixUserID). Nothing is read from /proc (no SD_BUS_CREDS_AUGMENT). */
        r = sd_bus_query_sender_creds(message, SD_BUS_CREDS_EUID, &creds);
        if (r < 0)
                return r;
        if (bus_creds_trusted_euid(creds, &uid) >= 0 && (uid == 0 || uid == geteuid())) {
                /* The handler validated the arguments already; func reads them again. */
                r = sd_bus_message_rewind(message, true);
                if (r < 0)
                        return r;
                r = func(message, b, true, error);
                if (r < 0)
                        return r;
                if (r > 0)
                        return 1; /* it answers by itself */
                r = bus_reply_changed(b, message);
                return r < 0 ? r : 1;
        }

        /* polkit knows system bus names only: on a session bus, the owner decides alone. */
        if (m->options.bus_mode != BUS_MODE_SYSTEM)
                return sd_bus_error_setf(error, SD_BUS_ERROR_ACCESS_DENIED,
                                         "Only the user running the router may change its routing.");

        /* Every question to polkit holds a call and its message until polkit answers. */
        if (b->n_pending >= PENDING_AUTH_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                                         "Too many authorization checks are waiting for polkit (%u); try again shortly.",
                                         PENDING_AUTH_MAX);

        p = g_new0(PendingAuth, 1);
        p->bus = b;
        p->message = sd_bus_message_ref(message);
        p->func = func;

        r = sd_bus_call_method_async(
                        sd_bus_message_get_bus(message), &p->slot, "org.freedesktop.PolicyKit1",
                        "/org/freedesktop/PolicyKit1/Authority", "org.freedesktop.PolicyKit1.Authority",
                        "CheckAuthorization", polkit_reply, p, "(sa{sv})sa{ss}us", "system-bus-name", 1, "name",
                        "s", sd_bus_message_get_sender(message), POLKIT_ACTION, 0,
                        (uint32_t) (sd_bus_message_get_allow_interactive_authorization(message) ? 1 : 0), "");
        if (r < 0) {
                pending_auth_free(p);
                return r;
        }
        b->pending = g_list_prepend(b->pending, p);
        b->n_pending++;
        return 1;
}

static int no_such_provider(Manager *m, const char *name, sd_bus_error *error) {
        g_autofree char *known = provider_set_list(m->providers);
        return sd_bus_error_setf(error, BUS_ERROR_NO_SUCH_PROVIDER, "No provider '%s' is configured. Known providers: %s.",
                                 name, known);
}

static int check_model(const char *model, sd_bus_error *error) {
        if (!model_name_is_valid(model))
                return sd_bus_error_setf(error, BUS_ERROR_INVALID_MODEL,
                                         "Invalid model name: it must be 1-%d characters of valid UTF-8 without control characters.",
                                         MODEL_NAME_MAX);
        return 0;
}

/* Each changing method is one function: with apply=false it only reads and validates its
 * arguments (so a bad call is refused before anyone is asked for a password), with apply=true
 * it makes the change. */

static int do_set_default_provider(sd_bus_message *message, Bus *b, bool apply, sd_bus_error *error) {
        Manager *m = b->manager;
        const char *name;
        int r;

        r = sd_bus_message_read(message, "s", &name);
        if (r < 0)
                return r;
        if (!router_find(m->router, name))
                return no_such_provider(m, name, error);
        if (!apply)
                return 0;
        r = manager_set_default_provider(m, name);
        return r < 0 ? r : 0;
}

static int do_set_model_mapping(sd_bus_message *message, Bus *b, bool apply, sd_bus_error *error) {
        Manager *m = b->manager;
        const char *model, *provider;
        int r;

        r = sd_bus_message_read(message, "ss", &model, &provider);
        if (r < 0)
                return r;
        r = check_model(model, error);
        if (r < 0)
                return r;
        if (!router_find(m->router, provider))
                return no_such_provider(m, provider, error);
        if (!router_get_route(m->router, model) && router_is_full(m->router))
                return sd_bus_error_setf(error, BUS_ERROR_TOO_MANY_ROUTES,
                                         "The routing table is full: %u routes are set (MaxRoutes=%u). "
                                         "Remove one first, or raise MaxRoutes=.",
                                         router_n_routes(m->router), m->router->max_routes);
        if (!apply)
                return 0;
        r = manager_set_model_mapping(m, model, provider);
        return r < 0 ? r : 0;
}

static int do_remove_model_mapping(sd_bus_message *message, Bus *b, bool apply, sd_bus_error *error) {
        Manager *m = b->manager;
        const char *model;
        int r;

        r = sd_bus_message_read(message, "s", &model);
        if (r < 0)
                return r;
        r = check_model(model, error);
        if (r < 0)
                return r;
        if (!router_get_route(m->router, model))
                return sd_bus_error_setf(error, BUS_ERROR_NO_SUCH_MAPPING, "Model '%s' has no mapping.", model);
        if (!apply)
                return 0;
        r = manager_remove_model_mapping(m, model);
        return r < 0 ? r : 0;
}

static int do_reload(sd_bus_message *message, Bus *b, bool apply, sd_bus_error *error) {
        Manager *m = b->manager;
        g_autofree char *why = NULL;
        int r;

        if (!apply)
                return 0;
        r = manager_reload(m, &why);
        if (r < 0)
                return sd_bus_error_setf(error, BUS_ERROR_CONFIG_INVALID,
                                         "The configuration has errors and was not applied: %s", strna(why));
        return 0;
}

static int method_set_default_provider(sd_bus_message *message, void *userdata, sd_bus_error *error) {
        return verify_and_run(message, userdata, do_set_default_provider, error);
}

static int method_set_model_mapping(sd_bus_message *message, void *userdata, sd_bus_error *error) {
        return verify_and_run(message, userdata, do_set_model_mapping, error);
}

static int method_remove_model_mapping(sd_bus_message *message, void *userdata, sd_bus_error *error) {
        return verify_and_run(message, userdata, do_remove_model_mapping, error);
}

static int method_reload(sd_bus_message *message, void *userdata, sd_bus_error *error) {
        return verify_and_run(message, userdata, do_reload, error);
}

static int append_comparison_stats(sd_bus_message *reply, Manager *m);

static int append_stats_entry(sd_bus_message *reply, const char *name, const ProviderStats *s, const char *state,
                              Manager *m, bool total) {
        const Stats *all = &m->worker.stats;
        int r;

#define ENTRY(key, sig, value)                                                         \
        do {                                                                           \
                r = sd_bus_message_open_container(reply, 'e', "sv");                   \
                if (r >= 0)                                                            \
                        r = sd_bus_message_append(reply, "s", key);                    \
                if (r >= 0)                                                            \
                        r = sd_bus_message_append(reply, "v", sig, value);             \
                if (r >= 0)                                                            \
                        r = sd_bus_message_close_container(reply);                     \
                if (r < 0)                                                             \
                        return r;                                                      \
        } while (0)

        r = sd_bus_message_open_container(reply, 'e', "sa{sv}");
        if (r < 0)
                return r;
        r = sd_bus_message_append(reply, "s", name);
        if (r < 0)
                return r;
        r = sd_bus_message_open_container(reply, 'a', "{sv}");
        if (r < 0)
                return r;

        ENTRY("requests", "t", s->requests);
        ENTRY("errors", "t", s->errors);
        ENTRY("in_flight", "u", s->in_flight);
        ENTRY("latency_p50_usec", "t", histogram_percentile(&s->latency, 0.5));
        ENTRY("latency_p99_usec", "t", histogram_percentile(&s->latency, 0.99));
        ENTRY("latency_max_usec", "t", s->latency.max);
        ENTRY("ttfb_p50_usec", "t", histogram_percentile(&s->ttfb, 0.5));
        ENTRY("ttfb_p99_usec", "t", histogram_percentile(&s->ttfb, 0.99));
        ENTRY("streams", "t", s->streams);
        ENTRY("responses_2xx", "t", s->status_2xx);
        ENTRY("responses_4xx", "t", s->status_4xx);
        ENTRY("responses_5xx", "t", s->status_5xx);
        ENTRY("bytes_in", "t", s->bytes_in);
        ENTRY("bytes_out", "t", s->bytes_out);
        ENTRY("prompt_tokens", "t", s->prompt_tokens);
        ENTRY("completion_tokens", "t", s->completion_tokens);
        ENTRY("retries", "t", s->retries);
        for (int c = 0; c < _ERROR_CLASS_MAX; c++) {
                g_autofree char *key = g_strconcat("errors_", error_class_to_string(c), NULL);
                ENTRY(key, "t", s->errors_by_class[c]);
        }
        if (state)
                ENTRY("state", "s", state);
        if (total) {
                ENTRY("rejected", "t", all->rejected);
                ENTRY("http_requests", "t", all->http_requests);
                ENTRY("started_realtime_usec", "t", all->started_usec);
                r = append_comparison_stats(reply, m);
                if (r < 0)
                        return r;
        }
#undef ENTRY

        r = sd_bus_message_close_container(reply);
        if (r < 0)
                return r;
        return sd_bus_message_close_container(reply);
}

static int method_get_stats(sd_bus_message *message, void *userdata, sd_bus_error *error) {
        g_autoptr(sd_bus_message) reply = NULL;
        Bus *b = userdata;
        Manager *m = b->manager;
        g_autofree ProviderStats *total = g_new0(ProviderStats, 1);
        int r;

        r = sd_bus_message_new_method_return(message, &reply);
        if (r < 0)
                return r;
        r = sd_bus_message_open_container(reply, 'a', "{sa{sv}}");
        if (r < 0)
                return r;
        PROVIDER_SET_FOREACH(p, m->providers) {
                r = append_stats_entry(reply, p->name, p->stats, health_state_to_string(provider_state(p)), m, false);
                if (r < 0)
                        return r;
        }
        provider_set_total(m->providers, total);
        r = append_stats_entry(reply, "*", total, NULL, m, true);
        if (r < 0)
                return r;
        r = sd_bus_message_close_container(reply);
        if (r < 0)
                return r;
        return sd_bus_send(NULL, reply, NULL);
}

static int property_get_default_provider(sd_bus *bus, const char *path, const char *interface, const char *property,
                                         sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Bus *b = userdata;
        return sd_bus_message_append(reply, "s", router_default_name(b->manager->router));
}

static int property_get_model_mappings(sd_bus *bus, const char *path, const char *interface, const char *property,
                                       sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Bus *b = userdata;
        g_autofree const Route **routes = NULL;
        unsigned n;
        int r;

        r = sd_bus_message_open_container(reply, 'a', "{ss}");
        if (r < 0)
                return r;
        routes = router_routes(b->manager->router, &n);
        for (unsigned i = 0; i < n; i++) {
                if (routes[i]->n_arms != 1)
                        continue;
                r = sd_bus_message_append(reply, "{ss}", routes[i]->model, routes[i]->arms[0].provider->name);
                if (r < 0)
                        return r;
        }
        return sd_bus_message_close_container(reply);
}

static int property_get_providers(sd_bus *bus, const char *path, const char *interface, const char *property,
                                  sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Bus *b = userdata;
        g_auto(GStrv) names = provider_set_names(b->manager->providers);
        return sd_bus_message_append_strv(reply, names);
}

static int property_get_provider_states(sd_bus *bus, const char *path, const char *interface, const char *property,
                                        sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Bus *b = userdata;
        int r;

        r = sd_bus_message_open_container(reply, 'a', "{ss}");
        if (r < 0)
                return r;
        PROVIDER_SET_FOREACH(p, b->manager->providers) {
                r = sd_bus_message_append(reply, "{ss}", p->name, health_state_to_string(provider_state(p)));
                if (r < 0)
                        return r;
        }
        return sd_bus_message_close_container(reply);
}

static int property_get_version(sd_bus *bus, const char *path, const char *interface, const char *property,
                                sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        return sd_bus_message_append(reply, "s", PACKAGE_VERSION);
}


/* ---- splits and comparisons ------------------------------------------------------------- */

#define SPLIT_ARMS_MAX 16

static int read_arms(sd_bus_message *message, GPtrArray *names, GArray *weights, sd_bus_error *error) {
        const char *name;
        uint32_t weight;
        int r;

        r = sd_bus_message_enter_container(message, 'a', "(su)");
        if (r < 0)
                return r;
        while ((r = sd_bus_message_read(message, "(su)", &name, &weight)) > 0) {
                if (names->len >= SPLIT_ARMS_MAX)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "A split has at most %d providers.",
                                                 SPLIT_ARMS_MAX);
                if (weight < 1)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "Weight of provider '%s' must be at least 1.", name);
                for (guint i = 0; i < names->len; i++)
                        if (streq(names->pdata[i], name))
                                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                         "Provider '%s' is named twice.", name);
                g_ptr_array_add(names, (char *) name);
                g_array_append_val(weights, weight);
        }
        if (r < 0)
                return r;
        r = sd_bus_message_exit_container(message);
        if (r < 0)
                return r;
        if (names->len == 0)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "A split needs at least one provider.");
        return 0;
}

static int do_set_model_split(sd_bus_message *message, Bus *b, bool apply, sd_bus_error *error) {
        Manager *m = b->manager;
        g_autoptr(GPtrArray) names = g_ptr_array_new();
        g_autoptr(GArray) weights = g_array_new(FALSE, FALSE, sizeof(uint32_t));
        const char *model, *unknown = NULL;
        int r;

        r = sd_bus_message_read(message, "s", &model);
        if (r < 0)
                return r;
        if (!streq(model, ROUTE_DEFAULT_MODEL)) {
                r = check_model(model, error);
                if (r < 0)
                        return r;
        }
        r = read_arms(message, names, weights, error);
        if (r < 0)
                return r;
        for (guint i = 0; i < names->len; i++)
                if (!router_find(m->router, names->pdata[i]))
                        return no_such_provider(m, names->pdata[i], error);
        if (!streq(model, ROUTE_DEFAULT_MODEL) && !router_get_route(m->router, model) && router_is_full(m->router))
                return sd_bus_error_setf(error, BUS_ERROR_TOO_MANY_ROUTES,
                                         "The routing table is full: %u routes are set (MaxRoutes=%u). "
                                         "Remove one first, or raise MaxRoutes=.",
                                         router_n_routes(m->router), m->router->max_routes);
        if (!apply)
                return 0;
        r = manager_set_model_split(m, model, (const char *const *) names->pdata, (const uint32_t *) (void *) weights->data,
                                    names->len, &unknown);
        if (r == -ENOENT)
                return no_such_provider(m, unknown, error);
        return r < 0 ? r : 0;
}

static int method_set_model_split(sd_bus_message *message, void *userdata, sd_bus_error *error) {
        return verify_and_run(message, userdata, do_set_model_split, error);
}

static int append_arms(sd_bus_message *reply, const Route *rt) {
        int r = sd_bus_message_open_container(reply, 'a', "(su)");
        if (r < 0)
                return r;
        for (unsigned i = 0; i < rt->n_arms; i++) {
                r = sd_bus_message_append(reply, "(su)", rt->arms[i].provider->name, rt->arms[i].weight);
                if (r < 0)
                        return r;
        }
        return sd_bus_message_close_container(reply);
}

static int property_get_model_splits(sd_bus *bus, const char *path, const char *interface, const char *property,
                                     sd_bus_message *reply, void *userdata, sd_bus_error *error) {
        Bus *b = userdata;
        Router *router = b->manager->router;
        g_autofree const Route **routes = NULL;
        unsigned n;
        int r;

        r = sd_bus_message_open_container(reply, 'a', "{sa(su)}");
        if (r < 0)
                return r;
        routes = router_routes(router, &n);
        for (int i = -1; i < (int) n; i++) {
                const Route *rt = i < 0 ? router->default_route : routes[i];
                if (!rt || rt->n_arms < 2)
                        continue;
                r = sd_bus_message_open_container(reply, 'e', "sa(su)");
                if (r >= 0)
                        r = sd_bus_message_append(reply, "s", rt->model);
                if (r >= 0)
                        r = append_arms(reply, rt);
                if (r >= 0)
                        r = sd_bus_message_close_container(reply);
                if (r < 0)
                        return r;
        }
        return sd_bus_message_close_container(reply);
}

static int append_strv_variant(sd_bus_message *reply, const char *key, const GPtrArray *list) {
        int r = sd_bus_message_open_container(reply, 'e', "sv");
        if (r >= 0)
                r = sd_bus_message_append(reply, "s", key);
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'v', "as");
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'a', "s");
        for (guint i = 0; r >= 0 && list && i < list->len; i++)
                r = sd_bus_message_append(reply, "s", (const char *) list->pdata[i]);
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        return r;
}

/* One side of a comparison, or one answer of a Compare: its keys, with prefix ("primary_"). */
static int append_answer(sd_bus_message *reply, const char *prefix, const AnswerSummary *a, bool with_content) {
        g_autofree char *k = NULL;
        int r = 0;

#define KEY(name) (g_free(k), k = g_strconcat(prefix, name, NULL))
        r = sd_bus_message_append(reply, "{sv}", KEY("provider"), "s", strempty(a->provider));
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}", KEY("status"), "u", a->status);
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}", KEY("ttfb_usec"), "t",
                                          a->ttfb_usec == USEC_INFINITY ? (uint64_t) 0 : a->ttfb_usec);
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}", KEY("duration_usec"), "t", a->duration_usec);
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}", KEY("prompt_tokens"), "t",
                                          a->prompt_tokens == UINT64_MAX ? (uint64_t) 0 : a->prompt_tokens);
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}", KEY("completion_tokens"), "t",
                                          a->completion_tokens == UINT64_MAX ? (uint64_t) 0 : a->completion_tokens);
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}", KEY("tokens_per_sec"), "d", answer_summary_tokens_per_sec(a));
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}", KEY("finish_reason"), "s", strempty(a->finish_reason));
        if (r >= 0 && !with_content)
                r = append_strv_variant(reply, KEY("tool_calls"), a->tool_calls);
        if (r >= 0 && !with_content)
                r = sd_bus_message_append(reply, "{sv}", KEY("answer_length"), "t", a->answer_length);
        if (r >= 0 && with_content)
                r = sd_bus_message_append(reply, "{sv}", KEY("content"), "s", a->text->str);
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}", KEY("error"), "s", strempty(a->error));
#undef KEY
        return r;
}

static int method_get_comparisons(sd_bus_message *message, void *userdata, sd_bus_error *error) {
        g_autoptr(sd_bus_message) reply = NULL;
        Bus *b = userdata;
        g_autofree const Comparison **list = NULL;
        uint32_t max;
        unsigned n;
        int r;

        r = sd_bus_message_read(message, "u", &max);
        if (r < 0)
                return r;
        r = sd_bus_message_new_method_return(message, &reply);
        if (r < 0)
                return r;
        r = sd_bus_message_open_container(reply, 'a', "a{sv}");
        if (r < 0)
                return r;
        list = compare_store_recent(b->manager->worker.comparisons, max, &n);
        for (unsigned i = 0; i < n; i++) {
                const Comparison *c = list[i];

                r = sd_bus_message_open_container(reply, 'a', "{sv}");
                if (r >= 0)
                        r = sd_bus_message_append(reply, "{sv}", "request_id", "s", c->request_id);
                if (r >= 0)
                        r = sd_bus_message_append(reply, "{sv}", "time_realtime_usec", "t", c->time_realtime);
                if (r >= 0)
                        r = sd_bus_message_append(reply, "{sv}", "model", "s", strempty(c->model));
                if (r >= 0)
                        r = sd_bus_message_append(reply, "{sv}", "origin", "s", comparison_origin_to_string(c->origin));
                if (r >= 0)
                        r = sd_bus_message_append(reply, "{sv}", "similarity", "d", c->similarity);
                if (r >= 0)
                        r = append_answer(reply, "primary_", &c->primary, false);
                if (r >= 0)
                        r = append_answer(reply, "mirror_", &c->mirror, false);
                if (r >= 0)
                        r = sd_bus_message_close_container(reply);
                if (r < 0)
                        return r;
        }
        r = sd_bus_message_close_container(reply);
        if (r < 0)
                return r;
        return sd_bus_send(NULL, reply, NULL);
}

/* A Compare or Probe being answered: the call waits for the providers. */
typedef struct BusCall {
        Bus *bus;
        sd_bus_message *message;
        Ask *ask;
        Probe *probe;
} BusCall;

#define BUS_CALLS_MAX 8

static void bus_call_free(BusCall *c) {
        c->bus->calls = g_list_remove(c->bus->calls, c);
        ask_cancel(c->ask);
        probe_cancel(c->probe);
        sd_bus_message_unref(c->message);
        g_free(c);
}

static BusCall *bus_call_new(Bus *b, sd_bus_message *message) {
        BusCall *c = g_new0(BusCall, 1);

        c->bus = b;
        c->message = sd_bus_message_ref(message);
        b->calls = g_list_prepend(b->calls, c);
        return c;
}

static int check_calls(Bus *b, sd_bus_error *error) {
        if (g_list_length(b->calls) >= BUS_CALLS_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_LIMITS_EXCEEDED,
                                         "%d comparisons or probes are running already; try again when one is done.",
                                         BUS_CALLS_MAX);
        return 0;
}

static void on_ask_done(Ask *a, const GPtrArray *answers, void *userdata) {
        BusCall *c = userdata;
        g_autoptr(sd_bus_message) reply = NULL;
        int r;

        c->ask = NULL; /* it frees itself */
        r = sd_bus_message_new_method_return(c->message, &reply);
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'a', "a{sv}");
        for (guint i = 0; r >= 0 && i < answers->len; i++) {
                r = sd_bus_message_open_container(reply, 'a', "{sv}");
                if (r >= 0)
                        r = append_answer(reply, "", answers->pdata[i], true);
                if (r >= 0)
                        r = sd_bus_message_close_container(reply);
        }
        if (r >= 0)
                r = sd_bus_message_close_container(reply);
        if (r >= 0)
                r = sd_bus_send(NULL, reply, NULL);
        if (r < 0)
                (void) sd_bus_reply_method_errno(c->message, r, NULL);
        bus_call_free(c);
}

/* The providers to compare: those asked for, else the model's route (its arms and mirrors). */
static int compare_providers(Manager *m, const char *model, char **names, GPtrArray *ret, sd_bus_error *error) {
        if (names && names[0]) {
                for (char **n = names; *n; n++) {
                        Provider *p = router_find(m->router, *n);
                        if (!p)
                                return no_such_provider(m, *n, error);
                        if (!g_ptr_array_find(ret, p, NULL))
                                g_ptr_array_add(ret, p);
                }
        } else {
                const Route *rt = router_get_route(m->router, model) ?: m->router->default_route;
                for (unsigned i = 0; rt && i < rt->n_arms; i++)
                        g_ptr_array_add(ret, rt->arms[i].provider);
                for (Provider **p = rt ? rt->mirrors : NULL; p && *p; p++)
                        if (!g_ptr_array_find(ret, *p, NULL))
                                g_ptr_array_add(ret, *p);
                if (ret->len < 2)
                        return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                                 "Model '%s' is served by one provider only: name the providers to compare.",
                                                 model);
        }
        if (ret->len > ASK_PROVIDERS_MAX)
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS, "At most %d providers can be compared at once.",
                                         ASK_PROVIDERS_MAX);
        return 0;
}

static int do_compare(sd_bus_message *message, Bus *b, bool apply, sd_bus_error *error) {
        Manager *m = b->manager;
        g_autoptr(GPtrArray) providers = g_ptr_array_new();
        g_auto(GStrv) names = NULL;
        const char *model, *prompt;
        BusCall *c;
        int r;

        r = sd_bus_message_read(message, "s", &model);
        if (r >= 0)
                r = sd_bus_message_read_strv(message, &names);
        if (r >= 0)
                r = sd_bus_message_read(message, "s", &prompt);
        if (r < 0)
                return r;
        r = check_model(model, error);
        if (r < 0)
                return r;
        if (isempty(prompt) || strlen(prompt) > ASK_PROMPT_MAX || !g_utf8_validate(prompt, -1, NULL))
                return sd_bus_error_setf(error, SD_BUS_ERROR_INVALID_ARGS,
                                         "The prompt must be 1-%d bytes of UTF-8.", ASK_PROMPT_MAX);
        r = compare_providers(m, model, names, providers, error);
        if (r < 0)
                return r;
        r = check_calls(b, error);
        if (r < 0 || !apply)
                return r;

        c = bus_call_new(b, message);
        r = ask_start(&m->worker, model, (Provider *const *) providers->pdata, providers->len, prompt, on_ask_done, c, &c->ask);
        if (r < 0) {
                bus_call_free(c);
                return r;
        }
        return 1;
}

static int method_compare(sd_bus_message *message, void *userdata, sd_bus_error *error) {
        return verify_and_run(message, userdata, do_compare, error);
}

static void on_probe_done(Probe *p, const ProbeResult *res, void *userdata) {
        BusCall *c = userdata;
        g_autoptr(sd_bus_message) reply = NULL;
        int r;

        c->probe = NULL; /* it frees itself */
        r = sd_bus_message_new_method_return(c->message, &reply);
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'a', "{sv}");
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}", "provider", "s", res->provider);
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}", "model", "s", strempty(res->model));
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}", "passed", "b", res->passed);
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}", "ttfb_usec", "t",
                                          res->ttfb_usec == USEC_INFINITY ? (uint64_t) 0 : res->ttfb_usec);
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'e', "sv");
        if (r >= 0)
                r = sd_bus_message_append(reply, "s", "checks");
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'v', "a(sbs)");
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'a', "(sbs)");
        for (guint i = 0; r >= 0 && i < res->checks->len; i++) {
                const ProbeCheck *k = res->checks->pdata[i];
                r = sd_bus_message_append(reply, "(sbs)", k->name, k->ok, k->detail);
        }
        for (int j = 0; j < 4 && r >= 0; j++)
                r = sd_bus_message_close_container(reply);
        if (r >= 0)
                r = sd_bus_send(NULL, reply, NULL);
        if (r < 0)
                (void) sd_bus_reply_method_errno(c->message, r, NULL);
        bus_call_free(c);
}

static int do_probe(sd_bus_message *message, Bus *b, bool apply, sd_bus_error *error) {
        Manager *m = b->manager;
        const char *name;
        Provider *p;
        BusCall *c;
        int r;

        r = sd_bus_message_read(message, "s", &name);
        if (r < 0)
                return r;
        p = router_find(m->router, name);
        if (!p)
                return no_such_provider(m, name, error);
        if (p->config->kind != PROVIDER_KIND_OPENAI)
                return sd_bus_error_setf(error, SD_BUS_ERROR_NOT_SUPPORTED,
                                         "Provider '%s' answers locally: there is nothing to probe.", name);
        r = check_calls(b, error);
        if (r < 0 || !apply)
                return r;

        c = bus_call_new(b, message);
        r = probe_start(&m->worker, p, on_probe_done, c, &c->probe);
        if (r < 0) {
                bus_call_free(c);
                return r;
        }
        return 1;
}

static int method_probe(sd_bus_message *message, void *userdata, sd_bus_error *error) {
        return verify_and_run(message, userdata, do_probe, error);
}

/* In GetStats' "*" entry: per route arm, and per pair of compared providers. */
static int append_comparison_stats(sd_bus_message *reply, Manager *m) {
        CompareStore *store = m->worker.comparisons;
        const GPtrArray *pairs = compare_store_pairs(store);
        g_autofree const Route **routes = NULL;
        unsigned n;
        int r;

        r = sd_bus_message_append(reply, "{sv}", "mirrors_skipped", "t", compare_store_skipped(store));
        if (r >= 0)
                r = sd_bus_message_append(reply, "{sv}", "mirrors_running", "u", mirror_pool_running(m->worker.mirrors));
        if (r < 0)
                return r;

        r = sd_bus_message_open_container(reply, 'e', "sv");
        if (r >= 0)
                r = sd_bus_message_append(reply, "s", "routes");
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'v', "aa{sv}");
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'a', "a{sv}");
        routes = router_routes(m->router, &n);
        for (int i = -1; r >= 0 && i < (int) n; i++) {
                const Route *rt = i < 0 ? m->router->default_route : routes[i];
                for (unsigned j = 0; r >= 0 && rt && j < rt->n_arms; j++) {
                        const ProviderStats *s = rt->arms[j].stats;
                        r = sd_bus_message_open_container(reply, 'a', "{sv}");
                        if (r >= 0)
                                r = sd_bus_message_append(reply, "{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}",
                                                          "model", "s", rt->model,
                                                          "provider", "s", rt->arms[j].provider->name,
                                                          "weight", "u", rt->arms[j].weight,
                                                          "requests", "t", s->requests,
                                                          "errors", "t", s->errors,
                                                          "ttfb_p50_usec", "t", histogram_percentile(&s->ttfb, 0.5),
                                                          "ttfb_p99_usec", "t", histogram_percentile(&s->ttfb, 0.99),
                                                          "latency_p50_usec", "t", histogram_percentile(&s->latency, 0.5),
                                                          "latency_p99_usec", "t", histogram_percentile(&s->latency, 0.99),
                                                          "tokens_per_sec_p50", "d",
                                                          (double) histogram_percentile(&s->speed, 0.5) / 100.0,
                                                          "completion_tokens", "t", s->completion_tokens);
                        if (r >= 0)
                                r = sd_bus_message_close_container(reply);
                }
        }
        for (int j = 0; j < 3 && r >= 0; j++)
                r = sd_bus_message_close_container(reply);

        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'e', "sv");
        if (r >= 0)
                r = sd_bus_message_append(reply, "s", "comparisons");
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'v', "aa{sv}");
        if (r >= 0)
                r = sd_bus_message_open_container(reply, 'a', "a{sv}");
        for (guint i = 0; r >= 0 && i < pairs->len; i++) {
                const ComparePair *p = pairs->pdata[i];
                r = sd_bus_message_open_container(reply, 'a', "{sv}");
                if (r >= 0)
                        r = sd_bus_message_append(reply, "{sv}{sv}{sv}{sv}{sv}{sv}{sv}{sv}",
                                                  "primary", "s", p->primary,
                                                  "mirror", "s", p->mirror,
                                                  "count", "t", p->count,
                                                  "similarity_p50", "d", compare_pair_similarity_median(p),
                                                  "latency_delta_p50_usec", "x", compare_pair_latency_delta_median(p),
                                                  "ttfb_delta_p50_usec", "x", compare_pair_ttfb_delta_median(p),
                                                  "primary_error_rate", "d",
                                                  p->count ? (double) p->primary_errors / (double) p->count : 0.0,
                                                  "mirror_error_rate", "d",
                                                  p->count ? (double) p->mirror_errors / (double) p->count : 0.0);
                if (r >= 0)
                        r = sd_bus_message_close_container(reply);
        }
        for (int j = 0; j < 3 && r >= 0; j++)
                r = sd_bus_message_close_container(reply);
        return r;
}

static const sd_bus_vtable router_vtable[] = {
        SD_BUS_VTABLE_START(0),
        SD_BUS_PROPERTY("DefaultProvider", "s", property_get_default_provider, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("ModelMappings", "a{ss}", property_get_model_mappings, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Providers", "as", property_get_providers, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("ProviderStates", "a{ss}", property_get_provider_states, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_PROPERTY("Version", "s", property_get_version, 0, SD_BUS_VTABLE_PROPERTY_CONST),
        SD_BUS_METHOD_WITH_ARGS("SetDefaultProvider", SD_BUS_ARGS("s", provider), SD_BUS_NO_RESULT,
                                method_set_default_provider, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("SetModelMapping", SD_BUS_ARGS("s", model, "s", provider), SD_BUS_NO_RESULT,
                                method_set_model_mapping, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("RemoveModelMapping", SD_BUS_ARGS("s", model), SD_BUS_NO_RESULT,
                                method_remove_model_mapping, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetStats", SD_BUS_NO_ARGS, SD_BUS_RESULT("a{sa{sv}}", stats), method_get_stats,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Reload", SD_BUS_NO_ARGS, SD_BUS_NO_RESULT, method_reload, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_PROPERTY("ModelSplits", "a{sa(su)}", property_get_model_splits, 0, SD_BUS_VTABLE_PROPERTY_EMITS_CHANGE),
        SD_BUS_METHOD_WITH_ARGS("SetModelSplit", SD_BUS_ARGS("s", model, "a(su)", providers), SD_BUS_NO_RESULT,
                                method_set_model_split, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("GetComparisons", SD_BUS_ARGS("u", max), SD_BUS_RESULT("aa{sv}", comparisons),
                                method_get_comparisons, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Compare", SD_BUS_ARGS("s", model, "as", providers, "s", prompt),
                                SD_BUS_RESULT("aa{sv}", answers), method_compare, SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_METHOD_WITH_ARGS("Probe", SD_BUS_ARGS("s", provider), SD_BUS_RESULT("a{sv}", result), method_probe,
                                SD_BUS_VTABLE_UNPRIVILEGED),
        SD_BUS_VTABLE_END,
};

static int bus_on_emit(sd_event_source *source, void *userdata) {
        Bus *b = userdata;
        const char *names[6];
        size_t n = 0;
        int r;

        if (b->dirty & DIRTY_ROUTING) {
                names[n++] = "DefaultProvider";
                names[n++] = "ModelMappings";
                names[n++] = "ModelSplits";
        }
        if (b->dirty & DIRTY_PROVIDERS)
                names[n++] = "Providers";
        if (b->dirty & DIRTY_STATES)
                names[n++] = "ProviderStates";
        names[n] = NULL;
        b->dirty = 0;
        if (n == 0)
                return 0;
        r = sd_bus_emit_properties_changed_strv(b->bus, BUS_PATH, BUS_INTERFACE, (char **) names);
        if (r < 0)
                log_debug_errno(r, "Failed to emit PropertiesChanged, ignoring: %m");
        return 0;
}

static void bus_on_manager(Manager *m, ManagerEvent event, void *userdata) {
        Bus *b = userdata;

        switch (event) {
        case MANAGER_PROVIDER_STATES:
                b->dirty |= DIRTY_STATES;
                break;
        case MANAGER_ROUTING_CHANGED:
                b->dirty |= DIRTY_ROUTING;
                break;
        default:
                b->dirty |= DIRTY_ROUTING | DIRTY_PROVIDERS | DIRTY_STATES;
                break;
        }
        (void) sd_event_source_set_enabled(b->emit, SD_EVENT_ONESHOT);
}

int bus_new(Manager *m, Bus **ret) {
        g_autoptr(Bus) b = NULL;
        g_autoptr(sd_bus) bus = NULL;
        BusMode mode = m->options.bus_mode;
        int r;

        if (mode == BUS_MODE_NONE) {
                *ret = NULL;
                return 0;
        }

        r = mode == BUS_MODE_SYSTEM ? sd_bus_open_system(&bus) : sd_bus_open_user(&bus);
        if (r < 0)
                return log_error_errno(r, "Failed to connect to the %s bus: %m", bus_mode_to_string(mode));

        b = g_new0(Bus, 1);
        b->manager = m;

        r = sd_bus_add_object_vtable(bus, &b->object_slot, BUS_PATH, BUS_INTERFACE, router_vtable, b);
        if (r < 0)
                return log_error_errno(r, "Failed to register the D-Bus object: %m");

        r = sd_bus_attach_event(bus, m->event, SD_EVENT_PRIORITY_NORMAL);
        if (r < 0)
                return log_error_errno(r, "Failed to attach the bus to the event loop: %m");

        r = sd_event_add_defer(m->event, &b->emit, bus_on_emit, b);
        if (r < 0)
                return log_error_errno(r, "Failed to set up PropertiesChanged: %m");
        (void) sd_event_source_set_priority(b->emit, SD_EVENT_PRIORITY_IDLE);
        (void) sd_event_source_set_enabled(b->emit, SD_EVENT_OFF);
        (void) sd_event_source_set_description(b->emit, "bus-properties-changed");

        r = sd_bus_request_name(bus, BUS_NAME, 0);
        if (r < 0)
                return log_error_errno(r, "Failed to acquire the bus name " BUS_NAME " on the %s bus: %m",
                                       bus_mode_to_string(mode));

        /* If the bus goes away, so do we; systemd restarts the service. */
        (void) sd_bus_set_exit_on_disconnect(bus, true);

        b->bus = TAKE_PTR(bus);
        manager_add_listener(m, bus_on_manager, b);
        log_debug("Serving " BUS_NAME " on the %s bus.", bus_mode_to_string(mode));
        *ret = TAKE_PTR(b);
        return 0;
}

Bus *bus_free(Bus *b) {
        WaitingSave *w;

        if (!b)
                return NULL;
        /* The changes are made; the saved state is flushed on the way out. */
        while ((w = g_queue_pop_head(&b->waiting))) {
                bus_reply_done(b, w->message);
                sd_bus_message_unref(w->message);
                g_free(w);
        }
        g_list_free_full(b->pending, pending_auth_destroy);
        while (b->calls)
                bus_call_free(b->calls->data);
        sd_event_source_disable_unref(b->emit);
        sd_bus_slot_unref(b->object_slot);
        sd_bus_flush_close_unref(b->bus);
        g_free(b);
        return NULL;
}
