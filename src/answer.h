/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "sse.h"
#include "util.h"

/* What a comparison keeps of one provider's answer: read from its bytes (a JSON answer, or an SSE
 * stream of chunks) in the chat completions, completions and Responses API shapes, as they arrive
 * and in bounded memory. Used for comparisons only, never on the plain relay path. */

#define ANSWER_TEXT_MAX (64 * 1024)
#define ANSWER_TOOL_CALLS_MAX 32

typedef struct AnswerSummary {
        char *provider;
        unsigned status;             /* 0 if no answer came */
        usec_t ttfb_usec;            /* USEC_INFINITY if no byte came */
        usec_t duration_usec;
        uint64_t prompt_tokens;      /* UINT64_MAX if not reported */
        uint64_t completion_tokens;
        char *finish_reason;         /* NULL if none */
        GPtrArray *tool_calls;       /* names (char*), in order */
        GString *text;               /* the answer's text, its first ANSWER_TEXT_MAX bytes */
        uint64_t answer_length;      /* bytes of text in all */
        char *error;                 /* NULL when the provider answered 2xx in full */
} AnswerSummary;

void answer_summary_init(AnswerSummary *s, const char *provider);
void answer_summary_clear(AnswerSummary *s);
void answer_summary_copy(AnswerSummary *dst, const AnswerSummary *src);
/* Completion tokens per second after the first byte; 0 if it cannot be told. */
double answer_summary_tokens_per_sec(const AnswerSummary *s);
void answer_summary_set_error(AnswerSummary *s, const char *format, ...) _printf_(2, 3);
/* An answer whose text is known without reading its bytes (the built-in echo provider's). */
void answer_summary_set_answer(AnswerSummary *s, const char *text, const char *finish_reason);

/* Reads an answer's body. For a stream, feed whole SSE events (answer_reader_event()) or raw
 * bytes (answer_reader_feed(), which finds the events); otherwise raw bytes, read at the end. */
typedef struct AnswerReader {
        AnswerSummary *summary;      /* borrowed */
        bool stream;
        SseScanner sse;
        GByteArray *buf;             /* a stream's unfinished event, or a whole answer (bounded) */
        bool too_large;
} AnswerReader;

void answer_reader_init(AnswerReader *r, AnswerSummary *summary, bool stream);
void answer_reader_clear(AnswerReader *r);
void answer_reader_feed(AnswerReader *r, const char *data, size_t size);
void answer_reader_event(AnswerReader *r, const char *event, size_t size);
/* The body is complete: a whole answer is read now. */
void answer_reader_finish(AnswerReader *r);
