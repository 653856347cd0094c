/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "log.h"
#include "mirror.h"

/* A kept raw answer is cut here. */
#define MIRROR_BODY_MAX (1024 * 1024)

struct MirrorPool {
        sd_event *event;
        CurlGlue *curl;
        unsigned max;
        GList *running;            /* Mirror* */
        unsigned n_running;
};

struct Mirror {
        MirrorPool *pool;
        GList *link;
        ProviderSet *set;          /* ref: keeps the provider */
        Provider *provider;
        Upstream *upstream;
        char *body;
        char *url;
        bool stream;
        bool keep_body;
        GByteArray *raw;
        usec_t start;
        AnswerSummary summary;
        AnswerReader reader;
        MirrorDoneFunc done;
        void *userdata;
        GDestroyNotify destroy;
        SseEventFunc on_event;
        void *event_data;
        SseScanner events;         /* for on_event */
        GByteArray *event_buf;
};

static usec_t pool_now(const MirrorPool *p) {
        uint64_t t;

        if (sd_event_now(p->event, CLOCK_MONOTONIC, &t) < 0)
                return now_usec(CLOCK_MONOTONIC);
        return t;
}

static void mirror_free(Mirror *m) {
        MirrorPool *p = m->pool;

        p->running = g_list_delete_link(p->running, m->link);
        p->n_running--;
        upstream_free(m->upstream);
        provider_set_unref(m->set);
        g_free(m->body);
        g_free(m->url);
        if (m->raw)
                g_byte_array_unref(m->raw);
        if (m->event_buf)
                g_byte_array_unref(m->event_buf);
        answer_reader_clear(&m->reader);
        answer_summary_clear(&m->summary);
        if (m->destroy)
                m->destroy(m->userdata);
        g_free(m);
}

Mirror *mirror_cancel(Mirror *m) {
        if (m)
                mirror_free(m);
        return NULL;
}

const GByteArray *mirror_body(const Mirror *m) {
        return m->raw;
}

static void mirror_on_response(Upstream *u, void *userdata) {
        Mirror *m = userdata;
        const char *ct = upstream_content_type(u);

        m->summary.status = (unsigned) upstream_status(u);
        /* What the answer is, not what was asked for, decides how it is read. */
        m->stream = m->summary.status >= 200 && m->summary.status < 300 && ct &&
                    g_ascii_strncasecmp(ct, "text/event-stream", STRLEN("text/event-stream")) == 0;
        answer_reader_clear(&m->reader);
        answer_reader_init(&m->reader, &m->summary, m->stream);
        upstream_mark_first_byte(u);
}

static void on_event(const char *event, size_t size, void *userdata) {
        Mirror *m = userdata;
        m->on_event(event, size, m->event_data);
}

static size_t mirror_on_data(Upstream *u, const char *data, size_t size, void *userdata) {
        Mirror *m = userdata;

        if (m->summary.ttfb_usec == USEC_INFINITY)
                m->summary.ttfb_usec = pool_now(m->pool) - m->start;
        answer_reader_feed(&m->reader, data, size);
        if (m->keep_body && m->raw->len < MIRROR_BODY_MAX)
                g_byte_array_append(m->raw, (const guint8 *) data, (guint) MIN(size, MIRROR_BODY_MAX - m->raw->len));
        if (m->on_event && m->stream && m->event_buf->len + size <= MIRROR_BODY_MAX) {
                g_byte_array_append(m->event_buf, (const guint8 *) data, (guint) size);
                sse_scanner_scan(&m->events, (const char *) m->event_buf->data, m->event_buf->len, on_event, m);
                if (m->events.boundary > 0) {
                        size_t n = m->events.boundary;
                        g_byte_array_remove_range(m->event_buf, 0, (guint) n);
                        sse_scanner_consumed(&m->events, n);
                }
        }
        return size;
}

static void mirror_on_done(Upstream *u, UpstreamError error, const char *message, void *userdata) {
        Mirror *m = userdata;

        m->summary.duration_usec = pool_now(m->pool) - m->start;
        answer_reader_finish(&m->reader);
        if (error != UPSTREAM_OK)
                answer_summary_set_error(&m->summary, "%s", strna(message));
        else if (m->summary.status < 200 || m->summary.status >= 300)
                answer_summary_set_error(&m->summary, "answered HTTP %u", m->summary.status);
        m->upstream = upstream_free(u);
        m->done(m, &m->summary, m->userdata);
        mirror_free(m);
}

static const UpstreamOps mirror_ops = {
        .on_response = mirror_on_response,
        .on_data = mirror_on_data,
        .on_done = mirror_on_done,
};

MirrorPool *mirror_pool_new(sd_event *event, CurlGlue *curl, unsigned max) {
        MirrorPool *p = g_new0(MirrorPool, 1);

        p->event = sd_event_ref(event);
        p->curl = curl;
        p->max = max;
        return p;
}

MirrorPool *mirror_pool_free(MirrorPool *p) {
        if (!p)
                return NULL;
        while (p->running)
                mirror_free(p->running->data);
        sd_event_unref(p->event);
        g_free(p);
        return NULL;
}

void mirror_pool_set_max(MirrorPool *p, unsigned max) {
        p->max = max;
}

unsigned mirror_pool_running(const MirrorPool *p) {
        return p->n_running;
}

int mirror_pool_start(MirrorPool *p, const MirrorRequest *req, bool bounded, MirrorDoneFunc done, void *userdata,
                      GDestroyNotify destroy, Mirror **ret) {
        const ProviderConfig *pc = req->provider->config;
        g_autofree char *url = NULL;
        Mirror *m;
        int r;

        if (bounded && p->n_running >= p->max)
                return -EBUSY;
        if (pc->kind != PROVIDER_KIND_OPENAI)
                return -EOPNOTSUPP;

        m = g_new0(Mirror, 1);
        m->pool = p;
        p->running = g_list_prepend(p->running, m);
        m->link = p->running;
        p->n_running++;
        m->set = provider_set_ref(req->provider->set);
        m->provider = req->provider;
        m->body = req->get ? NULL : g_memdup2(req->body, req->body_size);
        m->stream = req->stream;
        m->keep_body = req->keep_body;
        if (m->keep_body)
                m->raw = g_byte_array_new();
        m->on_event = req->on_event;
        m->event_data = req->event_data;
        if (m->on_event)
                m->event_buf = g_byte_array_new();
        m->done = done;
        m->userdata = userdata;
        m->destroy = destroy;
        m->start = pool_now(p);
        answer_summary_init(&m->summary, req->provider->name);
        answer_reader_init(&m->reader, &m->summary, req->stream);

        const char *u = provider_url(req->provider, req->suffix, &url);
        m->url = g_strdup(u);
        UpstreamRequest ur = {
                .url = m->url,
                .post = !req->get,
                .body = m->body,
                .body_size = req->get ? 0 : req->body_size,
                .api_key = pc->api_key,
                .request_id = req->request_id,
                .stream = req->stream,
                .connect_timeout = req->timeout > 0 ? MIN(pc->connect_timeout_usec, req->timeout) : pc->connect_timeout_usec,
                .first_byte_timeout = req->timeout > 0 ? MIN(pc->first_byte_timeout_usec, req->timeout)
                                                       : pc->first_byte_timeout_usec,
                .total_timeout = req->timeout > 0 ? MIN(pc->request_timeout_usec, req->timeout) : pc->request_timeout_usec,
                .idle_timeout = req->timeout > 0 ? MIN(pc->idle_timeout_usec, req->timeout) : pc->idle_timeout_usec,
                .provider = pc,
        };
        r = upstream_start(p->curl, p->event, &ur, &mirror_ops, m, &m->upstream);
        if (r < 0) {
                m->destroy = NULL; /* the caller keeps userdata on failure */
                mirror_free(m);
                return log_debug_errno(r, "Failed to start a request to provider '%s': %m", req->provider->name);
        }
        if (ret)
                *ret = m;
        return 0;
}
