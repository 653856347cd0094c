/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "http-server.h"
#include "log.h"

typedef struct Listener {
        HttpServer *server;
        struct MHD_Daemon *daemon;
        sd_event_source *io;
        int fd;
        bool owned;           /* bound here, not passed by systemd */
        bool loopback;        /* an IP socket on a loopback address */
        char *address;
} Listener;

/* A client connection, from accept to close. MHD's own timeout counts only silence, so a client
 * that trickles a byte now and then (slowloris) would hold its connection for ever: each request
 * must arrive whole, headers and body, within the connection timeout. */
typedef struct Connection {
        GList *link;            /* in HttpServer.connections */
        int fd;
        usec_t receiving_since; /* USEC_INFINITY while its request is being answered */
} Connection;

struct HttpServer {
        sd_event *event;
        GPtrArray *listeners;
        sd_event_source *timer;
        usec_t deadline;        /* of the armed timer, USEC_INFINITY if none */
        sd_event_source *wake;
        sd_event_source *sweep;
        GList *connections;     /* Connection* */
        usec_t request_timeout;
        MHD_AccessHandlerCallback handler;
        MHD_RequestCompletedCallback completed;
        void *userdata;
        unsigned n_connections;
        unsigned max_connections;
        bool socket_activated;
        bool quiesced;
};

#define HTTP_TIMER_ACCURACY (100 * USEC_PER_MSEC)

static void http_server_update_timer(HttpServer *s) {
        MHD_UNSIGNED_LONG_LONG t, min = ULLONG_MAX;

        for (guint i = 0; i < s->listeners->len; i++) {
                Listener *l = s->listeners->pdata[i];
                if (MHD_get_timeout(l->daemon, &t) == MHD_YES && t < min)
                        min = t;
        }
        if (min == ULLONG_MAX) {
                s->deadline = USEC_INFINITY;
                (void) sd_event_source_set_enabled(s->timer, SD_EVENT_OFF);
                return;
        }
        if (min == 0) {
                /* More to do at once: run again, with no timer to arm. */
                http_server_wake(s);
                return;
        }

        /* Otherwise these are connection timeouts, seconds away and restated after every run:
         * the timer is moved only when the deadline really changes. */
        usec_t deadline = now_usec(CLOCK_MONOTONIC) + (usec_t) min * USEC_PER_MSEC;
        if (s->deadline != USEC_INFINITY && deadline >= s->deadline && deadline - s->deadline < HTTP_TIMER_ACCURACY)
                return;
        s->deadline = deadline;
        (void) sd_event_source_set_time(s->timer, deadline);
        (void) sd_event_source_set_enabled(s->timer, SD_EVENT_ONESHOT);
}

/* MHD reads a connection once per run; a large body in flight means "more to do at once"
 * (a timeout of 0) after every run. Running again right here, a bounded number of times, saves a
 * trip through the event loop (two epoll_wait() calls) per chunk of the body. */
#define MHD_RUNS_PER_EVENT 8

static void listener_run(Listener *l) {
        MHD_UNSIGNED_LONG_LONG t;

        for (unsigned i = 0; i < MHD_RUNS_PER_EVENT; i++) {
                if (MHD_run(l->daemon) != MHD_YES) {
                        log_debug("MHD_run() failed, ignoring");
                        return;
                }
                if (MHD_get_timeout(l->daemon, &t) != MHD_YES || t > 0)
                        return;
        }
}

static int listener_on_io(sd_event_source *source, int fd, uint32_t revents, void *userdata) {
        Listener *l = userdata;

        listener_run(l);
        http_server_update_timer(l->server);
        return 0;
}

static void http_server_run(HttpServer *s) {
        for (guint i = 0; i < s->listeners->len; i++)
                listener_run(s->listeners->pdata[i]);
        http_server_update_timer(s);
}

static int http_server_on_timer(sd_event_source *source, uint64_t usec, void *userdata) {
        HttpServer *s = userdata;

        s->deadline = USEC_INFINITY; /* it was a one-shot */
        http_server_run(s);
        return 0;
}

static int http_server_on_wake(sd_event_source *source, void *userdata) {
        http_server_run(userdata);
        return 0;
}

void http_server_wake(HttpServer *s) {
        (void) sd_event_source_set_enabled(s->wake, SD_EVENT_ONESHOT);
}

void http_server_flush(HttpServer *s) {
        int enabled = SD_EVENT_OFF;

        (void) sd_event_source_get_enabled(s->wake, &enabled);
        if (enabled == SD_EVENT_OFF)
                return;
        (void) sd_event_source_set_enabled(s->wake, SD_EVENT_OFF);
        http_server_run(s);
}

static void mhd_logger(void *cls, const char *fmt, va_list ap) {
        char buf[512];
        size_t n;

        if (log_get_max_level() < LOG_DEBUG)
                return;
        (void) vsnprintf(buf, sizeof(buf), fmt, ap);
        n = strlen(buf);
        while (n > 0 && buf[n - 1] == '\n')
                buf[--n] = 0;
        log_debug("http: %s", buf);
}

static void mhd_notify_connection(void *cls, struct MHD_Connection *connection, void **socket_context,
                                  enum MHD_ConnectionNotificationCode toe) {
        HttpServer *s = cls;
        Connection *c = *socket_context;

        if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
                const union MHD_ConnectionInfo *ci = MHD_get_connection_info(connection, MHD_CONNECTION_INFO_CONNECTION_FD);

                s->n_connections++;
                c = g_new0(Connection, 1);
                c->fd = ci ? ci->connect_fd : -1;
                c->receiving_since = now_usec(CLOCK_MONOTONIC);
                s->connections = g_list_prepend(s->connections, c);
                c->link = s->connections;
                *socket_context = c;
                (void) sd_event_source_set_enabled(s->sweep, SD_EVENT_ON);
                return;
        }
        if (s->n_connections > 0)
                s->n_connections--;
        /* At its limit MHD takes its listening socket out of its epoll set, and puts it back
         * only in its next run: make that run happen now, or connections waiting in the
         * backlog wait for some unrelated event. */
        if (s->n_connections + 1 >= s->max_connections)
                http_server_wake(s);
        if (c) {
                s->connections = g_list_delete_link(s->connections, c->link);
                g_free(c);
                *socket_context = NULL;
        }
}

static void connection_set_receiving(struct MHD_Connection *connection, bool receiving) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(connection, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
        Connection *c = ci ? ci->socket_context : NULL;

        if (c)
                c->receiving_since = receiving ? now_usec(CLOCK_MONOTONIC) : USEC_INFINITY;
}

static enum MHD_Result http_server_on_request(void *cls, struct MHD_Connection *connection, const char *url,
                                              const char *method, const char *version, const char *upload_data,
                                              size_t *upload_data_size, void **con_cls) {
        HttpServer *s = cls;

        /* Called again with no data once the whole request is in: from here on it is ours to
         * answer, however long that takes. */
        if (*con_cls && *upload_data_size == 0)
                connection_set_receiving(connection, false);
        return s->handler(s->userdata, connection, url, method, version, upload_data, upload_data_size, con_cls);
}

static void http_server_on_completed(void *cls, struct MHD_Connection *connection, void **con_cls,
                                     enum MHD_RequestTerminationCode toe) {
        HttpServer *s = cls;

        /* Kept alive: the next request's time starts now. */
        connection_set_receiving(connection, true);
        s->completed(s->userdata, connection, con_cls, toe);
}

static int http_server_on_sweep(sd_event_source *source, uint64_t usec, void *userdata) {
        HttpServer *s = userdata;
        usec_t now = now_usec(CLOCK_MONOTONIC);

        for (GList *i = s->connections; i; i = i->next) {
                Connection *c = i->data;

                if (c->fd < 0 || c->receiving_since == USEC_INFINITY || now - c->receiving_since < s->request_timeout)
                        continue;
                /* MHD sees the connection end and cleans up as if the client had hung up. */
                log_debug("Client connection sent no complete request within %.0f s, closing it.",
                          (double) s->request_timeout / USEC_PER_SEC);
                (void) shutdown(c->fd, SHUT_RDWR);
                c->receiving_since = USEC_INFINITY;
        }
        (void) sd_event_source_set_time_relative(source, USEC_PER_SEC);
        (void) sd_event_source_set_enabled(source, s->connections ? SD_EVENT_ON : SD_EVENT_OFF);
        return 0;
}

static void listener_free(Listener *l) {
        if (!l)
                return;
        sd_event_source_disable_unref(l->io);
        if (l->daemon)
                MHD_stop_daemon(l->daemon);
        /* MHD closes a listen socket it was given, unless quiesce handed it back to us. */
        if (l->fd >= 0)
                close(l->fd);
        g_free(l->address);
        g_free(l);
}

static char *socket_address(int fd) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);
        char host[INET6_ADDRSTRLEN], serv[16];

        if (getsockname(fd, (struct sockaddr *) &ss, &len) < 0)
                return g_strdup("?");
        if (ss.ss_family == AF_UNIX)
                return g_strdup("unix socket");
        if (getnameinfo((struct sockaddr *) &ss, len, host, sizeof(host), serv, sizeof(serv),
                        NI_NUMERICHOST | NI_NUMERICSERV) != 0)
                return g_strdup("?");
        return ss.ss_family == AF_INET6 ? g_strdup_printf("[%s]:%s", host, serv) : g_strdup_printf("%s:%s", host, serv);
}

/* The request path is kept as the client sent it, escapes and all: a "%00" decoded would cut
 * the path short (and the front door refuses it), "%2F" would make another path of it, and a
 * proxy forwards paths as they came anyway. */
static size_t mhd_unescape_nothing(void *cls, struct MHD_Connection *c, char *s) {
        return strlen(s);
}

static bool socket_is_loopback(int fd) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof(ss);

        if (getsockname(fd, (struct sockaddr *) &ss, &len) < 0)
                return false;
        if (ss.ss_family == AF_INET) {
                const struct sockaddr_in *sin = (const struct sockaddr_in *) &ss;
                return (ntohl(sin->sin_addr.s_addr) >> 24) == 127;
        }
        if (ss.ss_family == AF_INET6) {
                const struct in6_addr *a = &((const struct sockaddr_in6 *) &ss)->sin6_addr;
                return IN6_IS_ADDR_LOOPBACK(a) || (IN6_IS_ADDR_V4MAPPED(a) && a->s6_addr[12] == 127);
        }
        return false;
}

static int listener_start(HttpServer *s, const HttpServerSettings *st, int fd, bool owned) {
        Listener *l = g_new0(Listener, 1);
        const union MHD_DaemonInfo *info;
        int r;

        l->server = s;
        l->fd = -1;
        l->owned = owned;
        l->address = socket_address(fd);
        l->loopback = socket_is_loopback(fd);

        l->daemon = MHD_start_daemon(MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG,
                                     0, NULL, NULL, http_server_on_request, s,
                                     MHD_OPTION_EXTERNAL_LOGGER, mhd_logger, NULL,
                                     MHD_OPTION_LISTEN_SOCKET, fd,
                                     MHD_OPTION_CONNECTION_LIMIT, st->max_connections,
                                     MHD_OPTION_CONNECTION_TIMEOUT, st->connection_timeout_sec,
                                     MHD_OPTION_CONNECTION_MEMORY_LIMIT, st->connection_memory_limit,
                                     MHD_OPTION_NOTIFY_COMPLETED, http_server_on_completed, s,
                                     MHD_OPTION_NOTIFY_CONNECTION, mhd_notify_connection, s,
                                     MHD_OPTION_UNESCAPE_CALLBACK, mhd_unescape_nothing, NULL,
                                     MHD_OPTION_END);
        if (!l->daemon) {
                log_debug("MHD_start_daemon() failed for %s", l->address);
                listener_free(l);
                return -EIO;
        }

        info = MHD_get_daemon_info(l->daemon, MHD_DAEMON_INFO_EPOLL_FD);
        if (!info) {
                listener_free(l);
                return -EIO;
        }
        r = sd_event_add_io(s->event, &l->io, info->epoll_fd, EPOLLIN, listener_on_io, l);
        if (r < 0) {
                listener_free(l);
                return r;
        }
        (void) sd_event_source_set_description(l->io, "http-listener");
        g_ptr_array_add(s->listeners, l);
        return 0;
}

static int bind_address(const char *host, uint16_t port, GArray *fds) {
        struct addrinfo hints = {
                .ai_family = AF_UNSPEC,
                .ai_socktype = SOCK_STREAM,
                .ai_flags = AI_PASSIVE | AI_ADDRCONFIG,
        };
        struct addrinfo *res = NULL;
        char serv[8];
        int r, last_error = 0;

        (void) snprintf(serv, sizeof(serv), "%u", port);
        r = getaddrinfo(host, serv, &hints, &res);
        if (r != 0) {
                /* Loopback-only machines have no "configured" address: try without. */
                hints.ai_flags = AI_PASSIVE;
                r = getaddrinfo(host, serv, &hints, &res);
        }
        if (r != 0)
                return log_error_errno(EADDRNOTAVAIL, "Cannot resolve listen address '%s': %s", host, gai_strerror(r));

        for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
                int fd, one = 1;

                fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
                if (fd < 0) {
                        last_error = errno;
                        continue;
                }
                (void) setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
                if (ai->ai_family == AF_INET6)
                        (void) setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
                if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, SOMAXCONN) < 0) {
                        last_error = errno;
                        close(fd);
                        continue;
                }
                g_array_append_val(fds, fd);
        }
        freeaddrinfo(res);

        if (fds->len == 0)
                return log_error_errno(last_error ?: EADDRNOTAVAIL, "Failed to listen on '%s' port %u: %m", host, port);
        return 0;
}

int http_server_new(sd_event *event, const HttpServerSettings *st, HttpServer **ret) {
        g_autoptr(HttpServer) s = g_new0(HttpServer, 1);
        g_autoptr(GArray) fds = g_array_new(FALSE, FALSE, sizeof(int));
        int n, r;

        s->event = sd_event_ref(event);
        s->listeners = g_ptr_array_new_with_free_func((GDestroyNotify) listener_free);
        s->handler = st->handler;
        s->completed = st->completed;
        s->userdata = st->userdata;
        s->max_connections = st->max_connections;
        s->request_timeout = (usec_t) MAX(st->connection_timeout_sec, 1u) * USEC_PER_SEC;

        s->deadline = USEC_INFINITY;
        r = sd_event_add_time(event, &s->timer, CLOCK_MONOTONIC, USEC_INFINITY, HTTP_TIMER_ACCURACY,
                              http_server_on_timer, s);
        if (r < 0)
                return r;
        (void) sd_event_source_set_enabled(s->timer, SD_EVENT_OFF);
        (void) sd_event_source_set_description(s->timer, "http-timer");

        r = sd_event_add_defer(event, &s->wake, http_server_on_wake, s);
        if (r < 0)
                return r;
        (void) sd_event_source_set_enabled(s->wake, SD_EVENT_OFF);
        (void) sd_event_source_set_description(s->wake, "http-wake");

        r = sd_event_add_time_relative(event, &s->sweep, CLOCK_MONOTONIC, USEC_PER_SEC, 100 * USEC_PER_MSEC,
                                       http_server_on_sweep, s);
        if (r < 0)
                return r;
        (void) sd_event_source_set_enabled(s->sweep, SD_EVENT_OFF);
        (void) sd_event_source_set_description(s->sweep, "http-request-timeout");

        n = sd_listen_fds(true);
        if (n < 0)
                return log_error_errno(n, "Failed to read sockets passed by systemd: %m");
        for (int fd = SD_LISTEN_FDS_START; fd < SD_LISTEN_FDS_START + n; fd++) {
                int flags;

                if (sd_is_socket(fd, AF_UNSPEC, SOCK_STREAM, 1) <= 0) {
                        log_warning("Passed fd %i is not a listening stream socket, ignoring", fd);
                        continue;
                }
                /* We run one loop: a blocking accept() would stall everything. */
                flags = fcntl(fd, F_GETFL);
                if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0 ||
                    fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
                        return log_error_errno(errno, "Failed to set up passed socket %i: %m", fd);
                g_array_append_val(fds, fd);
                s->socket_activated = true;
        }

        if (fds->len == 0) {
                r = bind_address(st->host, st->port, fds);
                if (r < 0)
                        return r;
        }

        for (guint i = 0; i < fds->len; i++) {
                int fd = g_array_index(fds, int, i);
                r = listener_start(s, st, fd, !s->socket_activated);
                if (r < 0) {
                        for (guint j = i; j < fds->len; j++)
                                close(g_array_index(fds, int, j));
                        return log_error_errno(r, "Failed to start the HTTP server: %m");
                }
        }

        http_server_update_timer(s);
        *ret = TAKE_PTR(s);
        return 0;
}

HttpServer *http_server_free(HttpServer *s) {
        if (!s)
                return NULL;
        if (s->listeners)
                g_ptr_array_unref(s->listeners);
        /* Stopping MHD closes every connection; anything left was never reported closed. */
        g_list_free_full(s->connections, g_free);
        sd_event_source_disable_unref(s->timer);
        sd_event_source_disable_unref(s->wake);
        sd_event_source_disable_unref(s->sweep);
        sd_event_unref(s->event);
        g_free(s);
        return NULL;
}

void http_server_quiesce(HttpServer *s) {
        if (s->quiesced)
                return;
        s->quiesced = true;
        for (guint i = 0; i < s->listeners->len; i++) {
                Listener *l = s->listeners->pdata[i];
                MHD_socket fd = MHD_quiesce_daemon(l->daemon);
                /* Ours to close now; systemd still holds its copy of a passed socket. */
                if (fd != MHD_INVALID_SOCKET)
                        l->fd = fd;
                if (l->fd >= 0) {
                        close(l->fd);
                        l->fd = -1;
                }
        }
}

bool http_server_loopback_only(HttpServer *s) {
        for (guint i = 0; i < s->listeners->len; i++) {
                Listener *l = s->listeners->pdata[i];
                if (!l->loopback)
                        return false;
        }
        return s->listeners->len > 0;
}

bool http_server_socket_activated(HttpServer *s) {
        return s->socket_activated;
}

char *http_server_describe(HttpServer *s) {
        g_autoptr(GString) str = g_string_new(NULL);
        for (guint i = 0; i < s->listeners->len; i++) {
                Listener *l = s->listeners->pdata[i];
                if (i > 0)
                        g_string_append(str, ", ");
                g_string_append(str, l->address);
        }
        return g_string_free(g_steal_pointer(&str), FALSE);
}
