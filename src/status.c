/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <inttypes.h>

#include "json-util.h"
#include "status.h"

/* GET /health and GET /metrics: what the router knows about itself and its providers. */

/* A URL as /health shows it: never with its user name and password. */
static char *url_without_userinfo(const char *url) {
        g_autoptr(CURLU) u = curl_url();
        char *s = NULL;
        g_autofree char *ret = NULL;

        if (!u || curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
            curl_url_set(u, CURLUPART_USER, NULL, 0) != CURLUE_OK ||
            curl_url_set(u, CURLUPART_PASSWORD, NULL, 0) != CURLUE_OK ||
            curl_url_set(u, CURLUPART_OPTIONS, NULL, 0) != CURLUE_OK ||
            curl_url_get(u, CURLUPART_URL, &s, 0) != CURLUE_OK)
                return NULL; /* not shown at all rather than shown whole */
        ret = g_strdup(s);
        curl_free(s);
        return TAKE_PTR(ret);
}

static void health_start(Request *r) {
        Worker *w = r->worker;
        g_autoptr(JsonBuilder) b = json_builder_new_immutable();
        usec_t now = worker_now(w);
        unsigned n = exchange_front_count(w->front);
        /* With client tokens, only a caller with one learns where providers are and why they
         * failed: errors may name hosts, paths and what they answered. */
        bool details = r->authorized;
        size_t size;
        char *json;

        json_builder_begin_object(b);
        json_builder_set_member_name(b, "status");
        json_builder_add_string_value(b, w->stopping ? "stopping" : "ok");
        json_builder_set_member_name(b, "version");
        json_builder_add_string_value(b, PACKAGE_VERSION);
        json_builder_set_member_name(b, "default_provider");
        json_builder_add_string_value(b, router_default_name(w->router));
        json_builder_set_member_name(b, "uptime_sec");
        json_builder_add_int_value(b, (gint64) ((now - w->started_usec) / USEC_PER_SEC));
        json_builder_set_member_name(b, "requests_in_flight");
        json_builder_add_int_value(b, n > 0 ? n - 1 : 0); /* not counting this one */
        json_builder_set_member_name(b, "providers");
        json_builder_begin_object(b);
        PROVIDER_SET_FOREACH(p, w->providers) {
                const ProviderConfig *pc = p->config;
                const ProviderStats *s = p->stats;
                const ProviderHealth *h = &p->health;
                usec_t retry_in = provider_is_echo(p) ? 0 : health_retry_in(h, now);

                json_builder_set_member_name(b, p->name);
                json_builder_begin_object(b);
                json_builder_set_member_name(b, "kind");
                json_builder_add_string_value(b, provider_kind_to_string(pc->kind));
                if (pc->base_url && details) {
                        g_autofree char *url = url_without_userinfo(pc->base_url);
                        if (url) {
                                json_builder_set_member_name(b, "base_url");
                                json_builder_add_string_value(b, url);
                        }
                }
                json_builder_set_member_name(b, "state");
                json_builder_add_string_value(b, health_state_to_string(provider_state(p)));
                if (h->consecutive_failures > 0) {
                        json_builder_set_member_name(b, "consecutive_failures");
                        json_builder_add_int_value(b, h->consecutive_failures);
                }
                if (h->last_error && h->state != HEALTH_UP && details) {
                        json_builder_set_member_name(b, "last_error");
                        json_builder_add_string_value(b, h->last_error);
                }
                if (retry_in > 0) {
                        json_builder_set_member_name(b, "retry_in_sec");
                        json_builder_add_int_value(b, (gint64) ((retry_in + USEC_PER_SEC - 1) / USEC_PER_SEC));
                }
                json_builder_set_member_name(b, "default");
                json_builder_add_boolean_value(b, streq(p->name, router_default_name(w->router)));
                json_builder_set_member_name(b, "in_flight");
                json_builder_add_int_value(b, s->in_flight);
                json_builder_set_member_name(b, "requests");
                json_builder_add_int_value(b, (gint64) s->requests);
                json_builder_set_member_name(b, "errors");
                json_builder_add_int_value(b, (gint64) s->errors);
                json_builder_end_object(b);
        }
        json_builder_end_object(b);
        json_builder_end_object(b);

        json = json_builder_to_string(b, &size);
        request_respond_json(r, w->stopping ? 503 : 200, json, size);
}

static void metric_header(GString *s, const char *name, const char *type, const char *help) {
        g_string_append_printf(s, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A label value: backslash, double quote and newline escaped, as the text format says. */
static void append_label(GString *s, const char *value) {
        for (const char *p = value; *p; p++) {
                if (*p == '\\' || *p == '"')
                        g_string_append_c(s, '\\');
                if (*p == '\n')
                        g_string_append(s, "\\n");
                else
                        g_string_append_c(s, *p);
        }
}

static void route_labels(GString *s, const char *name, const Route *rt, const RouteArm *a) {
        g_string_append_printf(s, "%s{model=\"", name);
        append_label(s, rt->model);
        g_string_append_printf(s, "\",provider=\"%s\"}", a->provider->name);
}

/* Per (model, provider) arm of each route. */
static void metrics_routes(GString *s, Worker *w) {
        g_autofree const Route **routes = NULL;
        unsigned n;

        routes = router_routes(w->router, &n);
#define FOR_EACH_ARM(rt, a)                                                                            \
        for (int _i = -1; _i < (int) n; _i++)                                                          \
                for (const Route *rt = _i < 0 ? w->router->default_route : routes[_i]; rt; rt = NULL)   \
                        for (unsigned _j = 0; _j < rt->n_arms; _j++)                                    \
                                for (const RouteArm *a = &rt->arms[_j]; a; a = NULL)

        metric_header(s, "provider_router_route_requests_total", "counter", "Requests routed by each arm of a route.");
        FOR_EACH_ARM(rt, a) {
                route_labels(s, "provider_router_route_requests_total", rt, a);
                g_string_append_printf(s, " %" PRIu64 "\n", a->stats->requests);
        }
        metric_header(s, "provider_router_route_errors_total", "counter", "Failed requests of each arm of a route.");
        FOR_EACH_ARM(rt, a) {
                route_labels(s, "provider_router_route_errors_total", rt, a);
                g_string_append_printf(s, " %" PRIu64 "\n", a->stats->errors);
        }
        metric_header(s, "provider_router_route_weight", "gauge", "The weight of each arm of a route.");
        FOR_EACH_ARM(rt, a) {
                route_labels(s, "provider_router_route_weight", rt, a);
                g_string_append_printf(s, " %u\n", a->weight);
        }
        metric_header(s, "provider_router_route_first_byte_seconds_p50", "gauge", "Median time to first byte per arm.");
        FOR_EACH_ARM(rt, a) {
                route_labels(s, "provider_router_route_first_byte_seconds_p50", rt, a);
                g_string_append_printf(s, " %.6f\n", (double) histogram_percentile(&a->stats->ttfb, 0.5) / USEC_PER_SEC);
        }
        metric_header(s, "provider_router_route_duration_seconds_p50", "gauge", "Median request duration per arm.");
        FOR_EACH_ARM(rt, a) {
                route_labels(s, "provider_router_route_duration_seconds_p50", rt, a);
                g_string_append_printf(s, " %.6f\n", (double) histogram_percentile(&a->stats->latency, 0.5) / USEC_PER_SEC);
        }
        metric_header(s, "provider_router_route_tokens_per_second_p50", "gauge",
                      "Median completion tokens per second after the first byte, per arm.");
        FOR_EACH_ARM(rt, a) {
                route_labels(s, "provider_router_route_tokens_per_second_p50", rt, a);
                g_string_append_printf(s, " %.2f\n", (double) histogram_percentile(&a->stats->speed, 0.5) / 100.0);
        }
#undef FOR_EACH_ARM
}

/* Per (primary, mirror) pair of compared providers. */
static void metrics_comparisons(GString *s, Worker *w) {
        const GPtrArray *pairs = compare_store_pairs(w->comparisons);

        metric_header(s, "provider_router_comparisons_total", "counter", "Comparisons recorded per pair of providers.");
        for (guint i = 0; i < pairs->len; i++) {
                const ComparePair *p = pairs->pdata[i];
                g_string_append_printf(s, "provider_router_comparisons_total{primary=\"%s\",mirror=\"%s\"} %" PRIu64 "\n",
                                       p->primary, p->mirror, p->count);
        }
        metric_header(s, "provider_router_comparison_similarity_p50", "gauge",
                      "Median similarity of the two answers' texts (0-1) over the pair's last comparisons.");
        for (guint i = 0; i < pairs->len; i++) {
                const ComparePair *p = pairs->pdata[i];
                g_string_append_printf(s, "provider_router_comparison_similarity_p50{primary=\"%s\",mirror=\"%s\"} %.4f\n",
                                       p->primary, p->mirror, compare_pair_similarity_median(p));
        }
        metric_header(s, "provider_router_comparison_duration_delta_seconds_p50", "gauge",
                      "Median of the mirror's duration minus the primary's.");
        for (guint i = 0; i < pairs->len; i++) {
                const ComparePair *p = pairs->pdata[i];
                g_string_append_printf(s, "provider_router_comparison_duration_delta_seconds_p50{primary=\"%s\",mirror=\"%s\"} %.6f\n",
                                       p->primary, p->mirror, (double) compare_pair_latency_delta_median(p) / USEC_PER_SEC);
        }
        metric_header(s, "provider_router_comparison_errors_total", "counter", "Failed answers in comparisons, by side.");
        for (guint i = 0; i < pairs->len; i++) {
                const ComparePair *p = pairs->pdata[i];
                g_string_append_printf(s, "provider_router_comparison_errors_total{primary=\"%s\",mirror=\"%s\",side=\"primary\"} %" PRIu64 "\n",
                                       p->primary, p->mirror, p->primary_errors);
                g_string_append_printf(s, "provider_router_comparison_errors_total{primary=\"%s\",mirror=\"%s\",side=\"mirror\"} %" PRIu64 "\n",
                                       p->primary, p->mirror, p->mirror_errors);
        }
        metric_header(s, "provider_router_mirrors_skipped_total", "counter",
                      "Mirrors skipped because MirrorMaxConcurrent= of them were running, or their provider could not take them.");
        g_string_append_printf(s, "provider_router_mirrors_skipped_total %" PRIu64 "\n", compare_store_skipped(w->comparisons));
}

static void metrics_start(Request *r) {
        Worker *w = r->worker;
        GString *s = g_string_sized_new(4096);
        size_t size;

        /* The same figures as GetStats(), in the Prometheus text format. */
#define FOR_EACH_PROVIDER(p, st)                                                                      \
        PROVIDER_SET_FOREACH(p, w->providers)                                                         \
                for (const ProviderStats *st = p->stats; st; st = NULL)

        metric_header(s, "provider_router_requests_total", "counter", "Requests routed to the provider.");
        FOR_EACH_PROVIDER(p, st)
                g_string_append_printf(s, "provider_router_requests_total{provider=\"%s\"} %" PRIu64 "\n", p->name, st->requests);
        metric_header(s, "provider_router_streams_total", "counter", "Streamed requests routed to the provider.");
        FOR_EACH_PROVIDER(p, st)
                g_string_append_printf(s, "provider_router_streams_total{provider=\"%s\"} %" PRIu64 "\n", p->name, st->streams);
        metric_header(s, "provider_router_errors_total", "counter", "Failed requests by class.");
        FOR_EACH_PROVIDER(p, st)
                for (int c = 0; c < _ERROR_CLASS_MAX; c++)
                        g_string_append_printf(s, "provider_router_errors_total{provider=\"%s\",class=\"%s\"} %" PRIu64 "\n",
                                               p->name, error_class_to_string(c), st->errors_by_class[c]);
        metric_header(s, "provider_router_in_flight", "gauge", "Requests being served by the provider now.");
        FOR_EACH_PROVIDER(p, st)
                g_string_append_printf(s, "provider_router_in_flight{provider=\"%s\"} %u\n", p->name, st->in_flight);
        metric_header(s, "provider_router_request_duration_seconds", "summary", "Whole request duration.");
        FOR_EACH_PROVIDER(p, st) {
                g_string_append_printf(s, "provider_router_request_duration_seconds{provider=\"%s\",quantile=\"0.5\"} %.6f\n",
                                       p->name, (double) histogram_percentile(&st->latency, 0.5) / USEC_PER_SEC);
                g_string_append_printf(s, "provider_router_request_duration_seconds{provider=\"%s\",quantile=\"0.99\"} %.6f\n",
                                       p->name, (double) histogram_percentile(&st->latency, 0.99) / USEC_PER_SEC);
                g_string_append_printf(s, "provider_router_request_duration_seconds_sum{provider=\"%s\"} %.6f\n",
                                       p->name, (double) st->latency.sum / USEC_PER_SEC);
                g_string_append_printf(s, "provider_router_request_duration_seconds_count{provider=\"%s\"} %" PRIu64 "\n",
                                       p->name, st->latency.count);
        }
        metric_header(s, "provider_router_first_byte_seconds", "summary", "Time until the provider's first byte.");
        FOR_EACH_PROVIDER(p, st) {
                g_string_append_printf(s, "provider_router_first_byte_seconds{provider=\"%s\",quantile=\"0.5\"} %.6f\n",
                                       p->name, (double) histogram_percentile(&st->ttfb, 0.5) / USEC_PER_SEC);
                g_string_append_printf(s, "provider_router_first_byte_seconds{provider=\"%s\",quantile=\"0.99\"} %.6f\n",
                                       p->name, (double) histogram_percentile(&st->ttfb, 0.99) / USEC_PER_SEC);
                g_string_append_printf(s, "provider_router_first_byte_seconds_sum{provider=\"%s\"} %.6f\n",
                                       p->name, (double) st->ttfb.sum / USEC_PER_SEC);
                g_string_append_printf(s, "provider_router_first_byte_seconds_count{provider=\"%s\"} %" PRIu64 "\n",
                                       p->name, st->ttfb.count);
        }
        metric_header(s, "provider_router_request_bytes_total", "counter", "Request bytes sent to the provider.");
        FOR_EACH_PROVIDER(p, st)
                g_string_append_printf(s, "provider_router_request_bytes_total{provider=\"%s\"} %" PRIu64 "\n", p->name, st->bytes_in);
        metric_header(s, "provider_router_response_bytes_total", "counter", "Answer bytes relayed to clients.");
        FOR_EACH_PROVIDER(p, st)
                g_string_append_printf(s, "provider_router_response_bytes_total{provider=\"%s\"} %" PRIu64 "\n", p->name, st->bytes_out);
        metric_header(s, "provider_router_tokens_total", "counter", "Tokens reported by the provider.");
        FOR_EACH_PROVIDER(p, st) {
                g_string_append_printf(s, "provider_router_tokens_total{provider=\"%s\",type=\"prompt\"} %" PRIu64 "\n",
                                       p->name, st->prompt_tokens);
                g_string_append_printf(s, "provider_router_tokens_total{provider=\"%s\",type=\"completion\"} %" PRIu64 "\n",
                                       p->name, st->completion_tokens);
        }
        metric_header(s, "provider_router_rejected_total", "counter", "Requests refused before a provider was chosen.");
        g_string_append_printf(s, "provider_router_rejected_total %" PRIu64 "\n", w->stats.rejected);
        metric_header(s, "provider_router_http_requests_total", "counter", "HTTP requests of any kind.");
        g_string_append_printf(s, "provider_router_http_requests_total %" PRIu64 "\n", w->stats.http_requests);
#undef FOR_EACH_PROVIDER
        metrics_routes(s, w);
        metrics_comparisons(s, w);

        size = s->len;
        exchange_add_header(r->exchange, "Content-Type", "text/plain; version=0.0.4; charset=utf-8");
        request_respond(r, 200, g_string_free(s, FALSE), size);
}

const Handler health_handler = {
        .name = "health",
        .start = health_start,
};

const Handler metrics_handler = {
        .name = "metrics",
        .start = metrics_start,
};
