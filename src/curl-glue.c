/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <sys/epoll.h>
#include <unistd.h>

#include "curl-glue.h"
#include "log.h"

#define POOL_MAX 256

/* What the epoll set knows of one of curl's sockets. curl stops watching a connection's socket
 * when its transfer ends (CURL_POLL_REMOVE) and watches it again when the next transfer reuses
 * the connection: taking it out of the set and putting it back costs two epoll_ctl() calls per
 * request. So a socket curl stops watching stays in the set, parked; it is taken out only if it
 * reports something while parked (the provider closed an idle connection), and is back without
 * a syscall when curl wants it again for the same events. */
typedef struct CurlSocket {
        uint32_t events;          /* registered in the epoll set; 0 if not in it */
        bool watched;             /* curl wants to hear about it */
} CurlSocket;

struct CurlGlue {
        sd_event *event;
        CURLM *multi;
        /* curl's sockets live in a private epoll set, one sd-event source for all of them:
         * sd-event dispatches one source per loop iteration and polls again before the next, so
         * a source per socket costs O(n²) at n busy connections. */
        int epoll_fd;
        sd_event_source *epoll_source;
        sd_event_source *timer;
        sd_event_source *defer;   /* curl asked to be called again at once */
        usec_t deadline;          /* of the armed timer, USEC_INFINITY if none */
        GPtrArray *pool;          /* idle CurlHandle*, least recently used first */
        CurlSocket *sockets;      /* by fd */
        size_t n_sockets;
        void (*after)(void *userdata);
        void *after_userdata;
};

#define CURL_TIMER_ACCURACY USEC_PER_MSEC

static void curl_handle_free(CurlHandle *h);

static CurlSocket *curl_glue_socket(CurlGlue *g, int fd, bool grow) {
        if (fd < 0)
                return NULL;
        if ((size_t) fd >= g->n_sockets) {
                size_t n;

                if (!grow)
                        return NULL;
                n = MAX((size_t) fd + 1, MAX(g->n_sockets * 2, (size_t) 64));
                g->sockets = g_renew(CurlSocket, g->sockets, n);
                memset(g->sockets + g->n_sockets, 0, (n - g->n_sockets) * sizeof(CurlSocket));
                g->n_sockets = n;
        }
        return &g->sockets[fd];
}

static void curl_glue_check_finished(CurlGlue *g) {
        CURLMsg *msg;
        int left;

        while ((msg = curl_multi_info_read(g->multi, &left))) {
                CurlSlot *slot = NULL;
                CURL *easy;
                CURLcode code;

                if (msg->msg != CURLMSG_DONE)
                        continue;
                easy = msg->easy_handle;
                code = msg->data.result;
                if (curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **) &slot) != CURLE_OK || !slot)
                        continue;
                /* The callback owns the handle from here and usually releases it. */
                curl_multi_remove_handle(g->multi, easy);
                slot->done(easy, code, slot->userdata);
        }
}

static int curl_glue_on_epoll(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        CurlGlue *g = userdata;
        struct epoll_event events[64];
        int running;

        /* Everything ready now, in one go; bounded so that other sources get their turn. */
        for (unsigned round = 0; round < 8; round++) {
                int n = epoll_wait(g->epoll_fd, events, (int) ELEMENTSOF(events), 0);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        log_debug_errno(errno, "epoll_wait() on curl's sockets failed, ignoring: %m");
                        break;
                }
                for (int i = 0; i < n; i++) {
                        uint32_t ev = events[i].events;
                        int action = 0, sfd = events[i].data.fd;
                        CurlSocket *cs = curl_glue_socket(g, sfd, false);

                        if (cs && !cs->watched) {
                                /* A parked idle connection spoke (most likely the provider closed
                                 * it): out of the set, or it would be reported again and again.
                                 * curl finds out for itself before it reuses the connection. */
                                if (cs->events != 0)
                                        (void) epoll_ctl(g->epoll_fd, EPOLL_CTL_DEL, sfd, NULL);
                                cs->events = 0;
                                continue;
                        }
                        if (ev & (EPOLLIN | EPOLLHUP))
                                action |= CURL_CSELECT_IN;
                        if (ev & EPOLLOUT)
                                action |= CURL_CSELECT_OUT;
                        if (ev & EPOLLERR)
                                action |= CURL_CSELECT_ERR;
                        if (curl_multi_socket_action(g->multi, sfd, action, &running) != CURLM_OK)
                                log_debug("curl_multi_socket_action() failed for fd %i, ignoring", sfd);
                }
                curl_glue_check_finished(g);
                if (n < (int) ELEMENTSOF(events))
                        break;
        }
        if (g->after)
                g->after(g->after_userdata);
        return 0;
}

static int curl_glue_socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp) {
        CurlGlue *g = userp;
        struct epoll_event ev = { .data.fd = s };
        CurlSocket *cs;

        if (what == CURL_POLL_REMOVE) {
                /* Parked, see CurlSocket; the socket may be closed already, which took it out of
                 * the set (curl_glue_close_socket() forgets it). */
                cs = curl_glue_socket(g, s, false);
                if (cs)
                        cs->watched = false;
                return 0;
        }

        cs = curl_glue_socket(g, s, true);
        if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
                ev.events |= EPOLLIN;
        if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
                ev.events |= EPOLLOUT;

        cs->watched = true;
        if (cs->events == ev.events)
                return 0;
        if (epoll_ctl(g->epoll_fd, cs->events != 0 ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, s, &ev) < 0) {
                log_debug_errno(errno, "Failed to watch curl socket %i: %m", s);
                cs->watched = false;
                return -1;
        }
        cs->events = ev.events;
        return 0;
}

static void curl_glue_run_timeout(CurlGlue *g) {
        int running;

        if (curl_multi_socket_action(g->multi, CURL_SOCKET_TIMEOUT, 0, &running) != CURLM_OK)
                log_debug("curl_multi_socket_action() failed for a timeout, ignoring");
        curl_glue_check_finished(g);
}

static int curl_glue_on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        CurlGlue *g = userdata;

        g->deadline = USEC_INFINITY;
        curl_glue_run_timeout(g);
        if (g->after)
                g->after(g->after_userdata);
        return 0;
}

static int curl_glue_on_defer(sd_event_source *s, void *userdata) {
        CurlGlue *g = userdata;

        curl_glue_run_timeout(g);
        if (g->after)
                g->after(g->after_userdata);
        return 0;
}

static int curl_glue_timer_cb(CURLM *multi, long timeout_ms, void *userp) {
        CurlGlue *g = userp;
        usec_t deadline;

        if (timeout_ms < 0) {
                g->deadline = USEC_INFINITY;
                (void) sd_event_source_set_enabled(g->timer, SD_EVENT_OFF);
                return 0;
        }
        if (timeout_ms == 0) {
                /* "Now": no timer to arm (a timerfd_settime() each time), just run once more. */
                return sd_event_source_set_enabled(g->defer, SD_EVENT_ONESHOT) < 0 ? -1 : 0;
        }

        deadline = now_usec(CLOCK_MONOTONIC) + (usec_t) timeout_ms * USEC_PER_MSEC;
        /* curl re-states much the same timeout over and over: leave the timer alone then. */
        if (g->deadline != USEC_INFINITY && deadline >= g->deadline && deadline - g->deadline < CURL_TIMER_ACCURACY)
                return 0;
        g->deadline = deadline;
        if (sd_event_source_set_time(g->timer, deadline) < 0)
                return -1;
        return sd_event_source_set_enabled(g->timer, SD_EVENT_ONESHOT) < 0 ? -1 : 0;
}

static int curl_glue_close_socket(void *clientp, curl_socket_t s) {
        CurlGlue *g = clientp;

        CurlSocket *cs = curl_glue_socket(g, s, false);

        /* Parked or watched: out of the set before the number can be reused. (close() would
         * take it out too, unless another process holds a copy of the socket.) */
        if (cs) {
                if (cs->events != 0)
                        (void) epoll_ctl(g->epoll_fd, EPOLL_CTL_DEL, s, NULL);
                *cs = (CurlSocket) {};
        }
        return close(s);
}

int curl_glue_new(sd_event *event, CurlGlue **ret) {
        g_autoptr(CurlGlue) g = g_new0(CurlGlue, 1);
        int r;

        g->event = sd_event_ref(event);
        g->pool = g_ptr_array_new();
        g->deadline = USEC_INFINITY;
        g->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
        if (g->epoll_fd < 0)
                return negative_errno();
        g->multi = curl_multi_init();
        if (!g->multi)
                return -ENOMEM;

        r = sd_event_add_io(event, &g->epoll_source, g->epoll_fd, EPOLLIN, curl_glue_on_epoll, g);
        if (r < 0)
                return r;
        (void) sd_event_source_set_description(g->epoll_source, "curl-epoll");

        r = sd_event_add_time(event, &g->timer, CLOCK_MONOTONIC, USEC_INFINITY, CURL_TIMER_ACCURACY,
                              curl_glue_on_timer, g);
        if (r < 0)
                return r;
        (void) sd_event_source_set_enabled(g->timer, SD_EVENT_OFF);
        (void) sd_event_source_set_description(g->timer, "curl-timer");

        r = sd_event_add_defer(event, &g->defer, curl_glue_on_defer, g);
        if (r < 0)
                return r;
        (void) sd_event_source_set_enabled(g->defer, SD_EVENT_OFF);
        (void) sd_event_source_set_description(g->defer, "curl-now");

        if (curl_multi_setopt(g->multi, CURLMOPT_SOCKETFUNCTION, curl_glue_socket_cb) != CURLM_OK ||
            curl_multi_setopt(g->multi, CURLMOPT_SOCKETDATA, g) != CURLM_OK ||
            curl_multi_setopt(g->multi, CURLMOPT_TIMERFUNCTION, curl_glue_timer_cb) != CURLM_OK ||
            curl_multi_setopt(g->multi, CURLMOPT_TIMERDATA, g) != CURLM_OK)
                return -EIO;

        /* Keep plenty of idle connections to providers: reconnecting costs far more than a fd. */
        (void) curl_multi_setopt(g->multi, CURLMOPT_MAXCONNECTS, 1024L);
        /* One request per connection at a time. With HTTP/2 multiplexing on (libcurl's default)
         * every new transfer scans the whole connection cache for a connection to share; at
         * 1,000 connections that scan cost ~28k instructions per request (bench/profile). */
        (void) curl_multi_setopt(g->multi, CURLMOPT_PIPELINING, (long) CURLPIPE_NOTHING);

        *ret = TAKE_PTR(g);
        return 0;
}

CurlGlue *curl_glue_free(CurlGlue *g) {
        if (!g)
                return NULL;
        for (guint i = 0; i < g->pool->len; i++)
                curl_handle_free(g->pool->pdata[i]);
        g_ptr_array_unref(g->pool);
        if (g->multi)
                curl_multi_cleanup(g->multi); /* closes its connections through curl_glue_close_socket() */
        g_free(g->sockets);
        sd_event_source_disable_unref(g->epoll_source);
        sd_event_source_disable_unref(g->timer);
        sd_event_source_disable_unref(g->defer);
        if (g->epoll_fd >= 0)
                close(g->epoll_fd);
        sd_event_unref(g->event);
        g_free(g);
        return NULL;
}

static void curl_handle_forget_key(CurlHandle *h) {
        if (h->key && h->key_unref)
                h->key_unref(h->key);
        h->key = NULL;
        h->key_unref = NULL;
}

static void curl_handle_free(CurlHandle *h) {
        if (!h)
                return;
        curl_easy_cleanup(h->easy);
        curl_handle_forget_key(h);
        if (h->url)
                curl_url_cleanup(h->url);
        g_free(h->url_string);
        g_free(h);
}

/* Back to the state of a new handle, but for our close callback. */
static void curl_handle_reset(CurlGlue *g, CurlHandle *h) {
        curl_easy_reset(h->easy);
        curl_easy_setopt(h->easy, CURLOPT_CLOSESOCKETFUNCTION, curl_glue_close_socket);
        curl_easy_setopt(h->easy, CURLOPT_CLOSESOCKETDATA, g);
        curl_handle_forget_key(h);
        /* The CURLU stays ours, to be set again if the next URL is the same. */
        h->url_set = false;
}

CurlHandle *curl_glue_acquire(CurlGlue *g, const void *key) {
        CurlHandle *h;

        /* The most recently released first: with a few providers, a match is near the end. */
        for (guint i = g->pool->len; i > 0; i--) {
                h = g->pool->pdata[i - 1];
                if (h->key == key && key)
                        return g_ptr_array_steal_index(g->pool, i - 1);
        }
        /* None set up for key: a fresh one, or the least recently used, reset. */
        if (g->pool->len > 0 && (g->pool->len >= POOL_MAX / 2 || !((CurlHandle *) g->pool->pdata[0])->key)) {
                h = g_ptr_array_steal_index(g->pool, 0);
                if (h->key)
                        curl_handle_reset(g, h);
                return h;
        }
        h = g_new0(CurlHandle, 1);
        h->easy = curl_easy_init();
        if (!h->easy) {
                g_free(h);
                return NULL;
        }
        curl_easy_setopt(h->easy, CURLOPT_CLOSESOCKETFUNCTION, curl_glue_close_socket);
        curl_easy_setopt(h->easy, CURLOPT_CLOSESOCKETDATA, g);
        return h;
}

void curl_glue_release(CurlGlue *g, CurlHandle *h, bool clean) {
        if (!h)
                return;
        if (g->pool->len >= POOL_MAX) {
                /* Full: the least recently used goes. */
                curl_handle_free(g_ptr_array_steal_index(g->pool, 0));
        }
        if (clean && h->key) {
                /* What pointed into the transfer's owner, which is going away. */
                curl_easy_setopt(h->easy, CURLOPT_HTTPHEADER, NULL);
                curl_easy_setopt(h->easy, CURLOPT_ERRORBUFFER, NULL);
                curl_easy_setopt(h->easy, CURLOPT_PRIVATE, NULL);
                curl_easy_setopt(h->easy, CURLOPT_HEADERDATA, NULL);
                curl_easy_setopt(h->easy, CURLOPT_WRITEDATA, NULL);
                curl_easy_setopt(h->easy, CURLOPT_POSTFIELDS, NULL);
        } else
                /* An aborted or failed transfer may leave state behind (a pause, held data). */
                curl_handle_reset(g, h);
        g_ptr_array_add(g->pool, h);
}

int curl_glue_set_url(CurlHandle *h, const char *url) {
        if (!h->url || !streq(h->url_string, url)) {
                CURLU *u = curl_url();

                if (!u)
                        return -ENOMEM;
                /* Parsed as libcurl parses CURLOPT_URL. One it cannot parse is left to libcurl,
                 * which then fails the transfer as it always did. */
                if (curl_url_set(u, CURLUPART_URL, url, CURLU_GUESS_SCHEME | CURLU_NON_SUPPORT_SCHEME) != CURLUE_OK) {
                        curl_url_cleanup(u);
                        if (h->url)
                                (void) curl_easy_setopt(h->easy, CURLOPT_CURLU, NULL);
                        g_clear_pointer(&h->url, curl_url_cleanup);
                        g_clear_pointer(&h->url_string, g_free);
                        h->url_set = false;
                        return curl_easy_setopt(h->easy, CURLOPT_URL, url) == CURLE_OK ? 0 : -EIO;
                }
                if (h->url)
                        curl_url_cleanup(h->url);
                h->url = u;
                g_free(h->url_string);
                h->url_string = g_strdup(url);
                h->url_set = false;
        }
        if (h->url_set)
                return 0;
        /* Both: libcurl takes the parsed form for the transfer (a copy of it, without parsing the
         * string again) and the string for what it reports. */
        if (curl_easy_setopt(h->easy, CURLOPT_URL, url) != CURLE_OK ||
            curl_easy_setopt(h->easy, CURLOPT_CURLU, h->url) != CURLE_OK)
                return -EIO;
        h->url_set = true;
        return 0;
}

void curl_glue_set_after(CurlGlue *g, void (*func)(void *userdata), void *userdata) {
        g->after = func;
        g->after_userdata = userdata;
}

int curl_glue_add(CurlGlue *g, CURL *easy, CurlSlot *slot) {
        if (curl_easy_setopt(easy, CURLOPT_PRIVATE, slot) != CURLE_OK)
                return -EIO;
        if (curl_multi_add_handle(g->multi, easy) != CURLM_OK)
                return -EIO;
        return 0;
}

void curl_glue_remove(CurlGlue *g, CURL *easy) {
        (void) curl_multi_remove_handle(g->multi, easy);
}
