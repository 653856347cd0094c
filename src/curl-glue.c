/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <sys/epoll.h>

#include "curl-glue.h"
#include "log.h"

#define POOL_MAX 256

struct CurlGlue {
        sd_event *event;
        CURLM *multi;
        sd_event_source *timer;
        GPtrArray *pool;       /* idle easy handles */
        unsigned n_running;
};

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
                g->n_running--;
                slot->done(easy, code, slot->userdata);
        }
}

static int curl_glue_on_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        CurlGlue *g = userdata;
        int action = 0, running;

        if (revents & (EPOLLIN | EPOLLHUP))
                action |= CURL_CSELECT_IN;
        if (revents & EPOLLOUT)
                action |= CURL_CSELECT_OUT;
        if (revents & EPOLLERR)
                action |= CURL_CSELECT_ERR;

        if (curl_multi_socket_action(g->multi, fd, action, &running) != CURLM_OK)
                log_debug("curl_multi_socket_action() failed for fd %i, ignoring", fd);

        curl_glue_check_finished(g);
        return 0;
}

static int curl_glue_socket_cb(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp) {
        CurlGlue *g = userp;
        sd_event_source *io = socketp;
        uint32_t events = 0;
        int r;

        if (what == CURL_POLL_REMOVE) {
                if (io) {
                        (void) sd_event_source_set_enabled(io, SD_EVENT_OFF);
                        sd_event_source_unref(io);
                        (void) curl_multi_assign(g->multi, s, NULL);
                }
                return 0;
        }

        if (what == CURL_POLL_IN || what == CURL_POLL_INOUT)
                events |= EPOLLIN;
        if (what == CURL_POLL_OUT || what == CURL_POLL_INOUT)
                events |= EPOLLOUT;

        if (io) {
                r = sd_event_source_set_io_events(io, events);
                if (r < 0)
                        return -1;
                r = sd_event_source_set_enabled(io, SD_EVENT_ON);
                if (r < 0)
                        return -1;
                return 0;
        }

        r = sd_event_add_io(g->event, &io, s, events, curl_glue_on_io, g);
        if (r < 0) {
                log_debug_errno(r, "Failed to watch curl socket: %m");
                return -1;
        }
        (void) sd_event_source_set_description(io, "curl-io");
        if (curl_multi_assign(g->multi, s, io) != CURLM_OK) {
                sd_event_source_unref(io);
                return -1;
        }
        return 0;
}

static int curl_glue_on_timer(sd_event_source *s, uint64_t usec, void *userdata) {
        CurlGlue *g = userdata;
        int running;

        if (curl_multi_socket_action(g->multi, CURL_SOCKET_TIMEOUT, 0, &running) != CURLM_OK)
                log_debug("curl_multi_socket_action() failed for a timeout, ignoring");
        curl_glue_check_finished(g);
        return 0;
}

static int curl_glue_timer_cb(CURLM *multi, long timeout_ms, void *userp) {
        CurlGlue *g = userp;
        int r;

        if (timeout_ms < 0)
                return sd_event_source_set_enabled(g->timer, SD_EVENT_OFF) < 0 ? -1 : 0;

        r = sd_event_source_set_time_relative(g->timer, (usec_t) timeout_ms * USEC_PER_MSEC);
        if (r < 0)
                return -1;
        r = sd_event_source_set_enabled(g->timer, SD_EVENT_ONESHOT);
        return r < 0 ? -1 : 0;
}

int curl_glue_new(sd_event *event, CurlGlue **ret) {
        g_autoptr(CurlGlue) g = g_new0(CurlGlue, 1);
        int r;

        g->event = sd_event_ref(event);
        g->pool = g_ptr_array_new();
        g->multi = curl_multi_init();
        if (!g->multi)
                return -ENOMEM;

        r = sd_event_add_time(event, &g->timer, CLOCK_MONOTONIC, USEC_INFINITY, 1, curl_glue_on_timer, g);
        if (r < 0)
                return r;
        (void) sd_event_source_set_enabled(g->timer, SD_EVENT_OFF);
        (void) sd_event_source_set_description(g->timer, "curl-timer");

        if (curl_multi_setopt(g->multi, CURLMOPT_SOCKETFUNCTION, curl_glue_socket_cb) != CURLM_OK ||
            curl_multi_setopt(g->multi, CURLMOPT_SOCKETDATA, g) != CURLM_OK ||
            curl_multi_setopt(g->multi, CURLMOPT_TIMERFUNCTION, curl_glue_timer_cb) != CURLM_OK ||
            curl_multi_setopt(g->multi, CURLMOPT_TIMERDATA, g) != CURLM_OK)
                return -EIO;

        /* Keep plenty of idle connections to providers: reconnecting costs far more than a fd.
         * HTTP/2 providers multiplex requests on one connection. */
        (void) curl_multi_setopt(g->multi, CURLMOPT_MAXCONNECTS, 1024L);
        (void) curl_multi_setopt(g->multi, CURLMOPT_PIPELINING, (long) CURLPIPE_MULTIPLEX);

        *ret = TAKE_PTR(g);
        return 0;
}

CurlGlue *curl_glue_free(CurlGlue *g) {
        if (!g)
                return NULL;
        for (guint i = 0; i < g->pool->len; i++)
                curl_easy_cleanup(g->pool->pdata[i]);
        g_ptr_array_unref(g->pool);
        if (g->multi)
                curl_multi_cleanup(g->multi);
        sd_event_source_disable_unref(g->timer);
        sd_event_unref(g->event);
        g_free(g);
        return NULL;
}

CURL *curl_glue_acquire(CurlGlue *g) {
        if (g->pool->len > 0)
                return g_ptr_array_steal_index_fast(g->pool, g->pool->len - 1);
        return curl_easy_init();
}

void curl_glue_release(CurlGlue *g, CURL *easy) {
        if (!easy)
                return;
        if (g->pool->len >= POOL_MAX) {
                curl_easy_cleanup(easy);
                return;
        }
        curl_easy_reset(easy);
        g_ptr_array_add(g->pool, easy);
}

int curl_glue_add(CurlGlue *g, CURL *easy, CurlSlot *slot) {
        if (curl_easy_setopt(easy, CURLOPT_PRIVATE, slot) != CURLE_OK)
                return -EIO;
        if (curl_multi_add_handle(g->multi, easy) != CURLM_OK)
                return -EIO;
        g->n_running++;
        return 0;
}

void curl_glue_remove(CurlGlue *g, CURL *easy) {
        if (curl_multi_remove_handle(g->multi, easy) == CURLM_OK)
                g->n_running--;
}

unsigned curl_glue_n_running(CurlGlue *g) {
        return g->n_running;
}
