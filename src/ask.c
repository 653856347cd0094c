/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <json-glib/json-glib.h>

#include "ask.h"
#include "json-util.h"
#include "log.h"

typedef struct AskPart {
        Ask *ask;
        unsigned index;
        Mirror *mirror;
} AskPart;

struct Ask {
        Worker *worker;
        char request_id[72];
        char *model;
        GPtrArray *answers;          /* AnswerSummary*, one per provider */
        AskPart *parts;
        unsigned n;
        unsigned pending;
        sd_event_source *defer;      /* nothing to wait for: finish from the loop */
        AskDoneFunc done;
        void *userdata;
};

static void answer_destroy(gpointer p) {
        answer_summary_clear(p);
        g_free(p);
}

static char *ask_body(const char *model, const char *prompt) {
        g_autoptr(JsonBuilder) b = json_builder_new_immutable();

        json_builder_begin_object(b);
        json_builder_add_chat(b, model, prompt);
        json_builder_end_object(b);
        return json_builder_to_string(b, NULL);
}

static void ask_free(Ask *a) {
        for (unsigned i = 0; i < a->n; i++)
                a->parts[i].mirror = mirror_cancel(a->parts[i].mirror);
        sd_event_source_disable_unref(a->defer);
        g_ptr_array_unref(a->answers);
        g_free(a->parts);
        g_free(a->model);
        g_free(a);
}

Ask *ask_cancel(Ask *a) {
        if (a)
                ask_free(a);
        return NULL;
}

static void ask_finish(Ask *a) {
        const AnswerSummary *first = a->answers->pdata[0];

        /* The first provider against each of the others, as comparisons of their own. */
        for (guint i = 1; i < a->answers->len; i++) {
                g_autoptr(CompareJob) j = compare_job_new(a->worker->comparisons, a->request_id, a->model,
                                                          COMPARISON_COMPARE);
                compare_job_primary_done(j, first);
                compare_job_mirror_done(j, a->answers->pdata[i]);
        }
        a->done(a, a->answers, a->userdata);
        ask_free(a);
}

static void ask_on_done(Mirror *m, const AnswerSummary *summary, void *userdata) {
        AskPart *part = userdata;
        Ask *a = part->ask;
        AnswerSummary *s = a->answers->pdata[part->index];

        answer_summary_clear(s);
        answer_summary_copy(s, summary);
        part->mirror = NULL;
        g_assert(a->pending > 0);
        if (--a->pending == 0)
                ask_finish(a);
}

static int ask_on_defer(sd_event_source *s, void *userdata) {
        ask_finish(userdata);
        return 0;
}

int ask_start(Worker *w, const char *model, Provider *const *providers, unsigned n, const char *prompt,
              AskDoneFunc done, void *userdata, Ask **ret) {
        Ask *a;
        int r;

        if (n == 0 || n > ASK_PROVIDERS_MAX || strlen(prompt) > ASK_PROMPT_MAX)
                return -EINVAL;

        a = g_new0(Ask, 1);
        a->worker = w;
        a->model = g_strdup(model);
        a->answers = g_ptr_array_new_with_free_func(answer_destroy);
        a->parts = g_new0(AskPart, n);
        a->n = n;
        a->done = done;
        a->userdata = userdata;
        worker_next_request_id(w, a->request_id, sizeof(a->request_id));

        for (unsigned i = 0; i < n; i++) {
                AnswerSummary *s = g_new0(AnswerSummary, 1);
                answer_summary_init(s, providers[i]->name);
                g_ptr_array_add(a->answers, s);
        }
        /* Every transfer is started before any can finish: the loop runs none of them meanwhile. */
        for (unsigned i = 0; i < n; i++) {
                Provider *p = providers[i];
                g_autofree char *body = ask_body(provider_model_name(p, model), prompt);
                AskPart *part = &a->parts[i];

                part->ask = a;
                part->index = i;
                if (provider_is_echo(p)) {
                        answer_summary_set_error(a->answers->pdata[i], "provider '%s' answers locally, not compared", p->name);
                        continue;
                }
                MirrorRequest req = {
                        .provider = p,
                        .suffix = "/chat/completions",
                        .body = body,
                        .body_size = strlen(body),
                        .request_id = a->request_id,
                        .timeout = ASK_TIMEOUT_USEC,
                };
                r = mirror_pool_start(w->mirrors, &req, false, ask_on_done, part, NULL, &part->mirror);
                if (r < 0) {
                        answer_summary_set_error(a->answers->pdata[i], "could not be asked: %s", g_strerror(-r));
                        continue;
                }
                a->pending++;
        }
        log_info("%s: comparing %u provider(s) on model '%s'.", a->request_id, n, model);
        if (a->pending == 0) {
                /* Nothing to wait for: answered from the loop all the same, never from here. */
                r = sd_event_add_defer(w->event, &a->defer, ask_on_defer, a);
                if (r < 0) {
                        ask_free(a);
                        return r;
                }
        }
        *ret = a;
        return 0;
}
