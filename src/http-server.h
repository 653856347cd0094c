/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include <microhttpd.h>

#include "util.h"

/* libmicrohttpd in external-epoll mode on sd-event: one MHD daemon per listening socket (those
 * systemd passed, or the ones bound here), each daemon's epoll fd one io source, and one timer
 * armed from MHD_get_timeout() after every run. */
typedef struct HttpServer HttpServer;

typedef struct HttpServerSettings {
        const char *host;             /* when no sockets are passed */
        uint16_t port;
        unsigned max_connections;
        unsigned connection_timeout_sec;
        size_t connection_memory_limit;
        MHD_AccessHandlerCallback handler;
        MHD_RequestCompletedCallback completed;
        void *userdata;
} HttpServerSettings;

int http_server_new(sd_event *event, const HttpServerSettings *settings, HttpServer **ret);
HttpServer *http_server_free(HttpServer *s);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(HttpServer, http_server_free)

/* Stop accepting: systemd keeps its sockets, so connections queue there for the next instance. */
/* In external-epoll mode MHD does not notice resumed connections by itself: this runs it again
 * once the current event has been handled. Call after MHD_resume_connection(). */
void http_server_wake(HttpServer *s);
/* Runs MHD now if http_server_wake() asked for a run, rather than in a loop iteration of its own.
 * For the end of another source's dispatch (curl's: its data just resumed a connection). Not
 * from inside an MHD callback. */
void http_server_flush(HttpServer *s);

void http_server_quiesce(HttpServer *s);
bool http_server_socket_activated(HttpServer *s);
/* Every listening socket (bound here or passed by systemd) is on a loopback address: only this
 * machine can connect. A UNIX socket does not count (a reverse proxy may stand in front). */
bool http_server_loopback_only(HttpServer *s);
/* "127.0.0.1:3001, [::1]:3001" */
char *http_server_describe(HttpServer *s);
