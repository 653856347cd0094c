/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* The request log: every client-controlled value capped and marked when cut, the journal entry
 * always well-formed (or replaced by a minimal one), and nothing a client sent reaching stderr
 * or MESSAGE as a control character. */

#include <sys/uio.h>

#include "log.h"
#include "test-util.h"

#define CUT "…[cut "

static char *repeat(char c, size_t n) {
        char *s = g_malloc(n + 1);
        memset(s, c, n);
        s[n] = 0;
        return s;
}

static RequestLogEntry entry(void) {
        return (RequestLogEntry) {
                .request_id = "req-0001",
                .method = "POST",
                .path = "/v1/chat/completions",
                .provider = "echo",
                .model = "m",
                .route = "header",
                .status = 200,
                .duration_usec = 1500,
                .ttfb_usec = 700,
                .bytes_in = 10,
                .bytes_out = 20,
                .prompt_tokens = UINT64_MAX,
                .attempts = 1,
        };
}

/* ---- the line ----------------------------------------------------------------------- */

static char *message(const RequestLogEntry *e) {
        char buf[LOG_MESSAGE_MAX + 1];
        size_t n = log_request_message(e, buf, sizeof(buf));

        ck_assert_uint_eq(n, strlen(buf));
        ck_assert_uint_lt(n, sizeof(buf) - 1); /* never cut by the end of the buffer */
        return g_strdup(buf);
}

static void assert_no_control(const char *s) {
        for (const char *c = s; *c; c++)
                ck_assert_msg((unsigned char) *c >= 0x20 && *c != 0x7f, "control character 0x%02x in '%s'",
                              (unsigned char) *c, s);
        ck_assert_msg(g_utf8_validate(s, -1, NULL), "not UTF-8: '%s'", s);
        ck_assert_msg(!strstr(s, "\xc2\x9b"), "a C1 control in '%s'", s);
}

START_TEST(test_message_plain) {
        RequestLogEntry e = entry();
        g_autofree char *m = message(&e);

        ck_assert_str_eq(m, "echo POST '/v1/chat/completions' model='m' stream=no route=header -> 200 in 1.50ms "
                            "(first byte 0.70ms) in=10B out=20B id=req-0001");
}
END_TEST

START_TEST(test_message_escapes_control_characters) {
        RequestLogEntry e = entry();
        g_autofree char *m = NULL;

        e.model = "a\nb\r\x1b[31mred\t'q'\\ é \xff \xc2\x9b \x7f";
        e.path = "/v1/chat/completions\r\nprovider-router: forged line";
        e.error_type = "invalid_request_error";
        e.error_message = "Unknown provider 'x\r\n\x1b]0;title\x07' in the X-Provider header.";
        e.status = 400;
        m = message(&e);
        assert_no_control(m);
        ck_assert_ptr_nonnull(strstr(m, "model='a\\nb\\r\\x1b[31mred\\t\\'q\\'\\\\ é \\xff \\xc2\\x9b \\x7f'"));
        ck_assert_ptr_nonnull(strstr(m, "'/v1/chat/completions\\r\\nprovider-router: forged line'"));
        ck_assert_ptr_nonnull(strstr(m, ": Unknown provider 'x\\r\\n\\x1b]0;title\\x07' in the X-Provider header."));
}
END_TEST

START_TEST(test_message_caps_long_values) {
        g_autofree char *model = repeat('m', 10000);
        g_autofree char *path = repeat('p', 9000);
        g_autofree char *error = repeat('e', 20000);
        g_autofree char *tried = repeat('t', 5000);
        g_autofree char *id = repeat('i', 3000);
        RequestLogEntry e = entry();
        g_autofree char *m = NULL;
        g_autofree char *model_part = NULL, *error_part = NULL;

        e.model = model;
        e.path = path;
        e.error_message = error;
        e.tried = tried;
        e.request_id = id;
        e.provider = model;
        e.method = path;
        e.route = tried;
        m = message(&e);

        model_part = g_strdup_printf("model='%.*s" CUT "%d bytes]'", LOG_MESSAGE_MODEL_MAX, model,
                                     10000 - LOG_MESSAGE_MODEL_MAX);
        ck_assert_ptr_nonnull(strstr(m, model_part));
        error_part = g_strdup_printf(": %.*s" CUT "%d bytes]", LOG_MESSAGE_ERROR_MAX, error,
                                     20000 - LOG_MESSAGE_ERROR_MAX);
        ck_assert(g_str_has_suffix(m, error_part));
        /* What follows the long values is all there. */
        ck_assert_ptr_nonnull(strstr(m, " -> 200 in 1.50ms (first byte 0.70ms) in=10B out=20B tried="));
        ck_assert_ptr_nonnull(strstr(m, " id=iiii"));
}
END_TEST

START_TEST(test_escaped_cap_counts_escapes) {
        /* Escapes take room: a model of 1,000 ESC bytes shows 64 of them (\x1b is 4 bytes). */
        g_autofree char *model = repeat('\x1b', 1000);
        RequestLogEntry e = entry();
        g_autofree char *m = NULL;
        g_autofree char *expected = NULL;
        g_autoptr(GString) escaped = g_string_new(NULL);

        e.model = model;
        m = message(&e);
        for (int i = 0; i < LOG_MESSAGE_MODEL_MAX / 4; i++)
                g_string_append(escaped, "\\x1b");
        expected = g_strdup_printf("model='%s" CUT "%d bytes]'", escaped->str, 1000 - LOG_MESSAGE_MODEL_MAX / 4);
        ck_assert_ptr_nonnull(strstr(m, expected));
}
END_TEST

/* ---- the journal fields ---------------------------------------------------------------- */

/* What journald accepts of a field: NAME=value with NAME of A-Z, 0-9 and '_', not starting with a
 * digit or '_' (those are trusted fields), at most 64 characters. */
static bool field_is_valid(const struct iovec *v) {
        const char *p = v->iov_base, *eq = memchr(p, '=', v->iov_len);
        size_t name_len;

        if (!eq)
                return false;
        name_len = (size_t) (eq - p);
        if (name_len == 0 || name_len > 64 || g_ascii_isdigit(p[0]) || p[0] == '_')
                return false;
        for (size_t i = 0; i < name_len; i++)
                if (!g_ascii_isupper(p[i]) && !g_ascii_isdigit(p[i]) && p[i] != '_')
                        return false;
        return true;
}

/* The value of NAME in the iovecs (not NUL-terminated in them), or NULL. */
static char *field_value(const struct iovec *iov, size_t n, const char *name) {
        size_t l = strlen(name);

        for (size_t i = 0; i < n; i++)
                if (iov[i].iov_len > l && memcmp(iov[i].iov_base, name, l) == 0 &&
                    ((const char *) iov[i].iov_base)[l] == '=')
                        return g_strndup((const char *) iov[i].iov_base + l + 1, iov[i].iov_len - l - 1);
        return NULL;
}

static void assert_entry_valid(const struct iovec *iov, size_t n) {
        ck_assert_uint_gt(n, 0);
        for (size_t i = 0; i < n; i++)
                ck_assert_msg(field_is_valid(&iov[i]), "field %zu ('%.*s') would make journald refuse the entry", i,
                              (int) MIN(iov[i].iov_len, (size_t) 40), (const char *) iov[i].iov_base);
}

typedef struct Built {
        char buf[LOG_JOURNAL_ENTRY_MAX];
        struct iovec iov[LOG_JOURNAL_FIELDS_MAX];
        size_t n;
} Built;

static Built *build(const RequestLogEntry *e) {
        Built *b = g_new0(Built, 1);
        char m[LOG_MESSAGE_MAX + 1];
        size_t used = 0;

        (void) log_request_message(e, m, sizeof(m));
        b->n = log_request_fields(e, LOG_INFO, m, b->buf, sizeof(b->buf), b->iov);
        assert_entry_valid(b->iov, b->n);
        for (size_t i = 0; i < b->n; i++)
                used += b->iov[i].iov_len + 1;
        ck_assert_msg(used < sizeof(b->buf) - 1, "the entry filled its buffer (%zu bytes)", used);
        return b;
}

START_TEST(test_fields_provider_request_id) {
        RequestLogEntry e = entry();
        g_autofree Built *none = build(&e);
        g_autofree char *absent = field_value(none->iov, none->n, "PROVIDER_REQUEST_ID");
        g_autofree Built *b = NULL;
        g_autofree char *id = NULL, *ours = NULL;

        ck_assert_ptr_null(absent);
        e.provider_request_id = "req_abc123";
        b = build(&e);
        id = field_value(b->iov, b->n, "PROVIDER_REQUEST_ID");
        ours = field_value(b->iov, b->n, "REQUEST_ID");
        ck_assert_str_eq(id, "req_abc123");
        ck_assert_str_eq(ours, "req-0001");
}
END_TEST

START_TEST(test_fields_plain) {
        RequestLogEntry e = entry();
        g_autofree Built *b = build(&e);
        g_autofree char *model = field_value(b->iov, b->n, "MODEL");
        g_autofree char *status = field_value(b->iov, b->n, "STATUS");
        g_autofree char *id = field_value(b->iov, b->n, "REQUEST_ID");
        g_autofree char *msg = field_value(b->iov, b->n, "MESSAGE");

        ck_assert_str_eq(model, "m");
        ck_assert_str_eq(status, "200");
        ck_assert_str_eq(id, "req-0001");
        ck_assert(g_str_has_prefix(msg, "echo POST '/v1/chat/completions'"));
}
END_TEST

/* A 7 KB model name once filled the 8 KiB field buffer: later fields went empty and journald
 * refused the whole entry, so a client could keep its requests out of the journal. */
START_TEST(test_fields_every_value_huge) {
        g_autofree char *model = repeat('m', 10240);
        g_autofree char *huge = repeat('x', 100000);
        RequestLogEntry e = entry();
        g_autofree Built *b = NULL;
        g_autofree char *v_model = NULL, *v_path = NULL, *v_status = NULL, *v_id = NULL, *v_provider = NULL,
                        *v_body = NULL, *v_msg = NULL, *v_attempts = NULL, *v_tokens = NULL;
        g_autofree char *expected = NULL;

        e.model = model;
        e.path = e.provider = e.method = e.route = e.error_type = e.error_message = e.remote = e.tried = huge;
        e.request_id = huge;
        e.response_body = huge;
        e.response_body_size = strlen(huge);
        e.prompt_tokens = 1;
        e.completion_tokens = 2;
        e.attempts = 3;
        e.status = 502;
        b = build(&e);

        v_model = field_value(b->iov, b->n, "MODEL");
        expected = g_strdup_printf("%.*s" CUT "%d bytes]", LOG_FIELD_MAX, model, 10240 - LOG_FIELD_MAX);
        ck_assert_str_eq(v_model, expected);
        v_path = field_value(b->iov, b->n, "PATH");
        ck_assert(g_str_has_suffix(v_path, CUT "97952 bytes]"));
        v_provider = field_value(b->iov, b->n, "PROVIDER");
        ck_assert_uint_le(strlen(v_provider), LOG_FIELD_SHORT_MAX + 40);
        v_body = field_value(b->iov, b->n, "RESPONSE_BODY");
        ck_assert(g_str_has_suffix(v_body, CUT "95904 bytes]"));
        v_status = field_value(b->iov, b->n, "STATUS");
        ck_assert_str_eq(v_status, "502");
        v_id = field_value(b->iov, b->n, "REQUEST_ID");
        ck_assert(g_str_has_suffix(v_id, " bytes]"));
        v_msg = field_value(b->iov, b->n, "MESSAGE");
        ck_assert_ptr_nonnull(strstr(v_msg, " -> 502 in "));
        v_attempts = field_value(b->iov, b->n, "ATTEMPTS");
        ck_assert_str_eq(v_attempts, "3");
        v_tokens = field_value(b->iov, b->n, "COMPLETION_TOKENS");
        ck_assert_str_eq(v_tokens, "2");
}
END_TEST

START_TEST(test_fields_cut_at_character_boundary) {
        g_autoptr(GString) model = g_string_new("x"); /* odd offset: a 2-byte character straddles the cap */
        RequestLogEntry e = entry();
        g_autofree Built *b = NULL;
        g_autofree char *v = NULL;
        const char *cut;

        for (int i = 0; i < 3000; i++)
                g_string_append(model, "é");
        e.model = model->str;
        b = build(&e);
        v = field_value(b->iov, b->n, "MODEL");
        cut = strstr(v, CUT);
        ck_assert_ptr_nonnull(cut);
        ck_assert(g_utf8_validate(v, cut - v, NULL));
        ck_assert_uint_eq((size_t) (cut - v), LOG_FIELD_MAX - 1);
        ck_assert(g_str_has_suffix(v, CUT "3954 bytes]"));
}
END_TEST

START_TEST(test_fields_raw_values_kept) {
        /* The fields keep what the client sent (journald stores any bytes); MESSAGE is escaped. */
        RequestLogEntry e = entry();
        g_autofree Built *b = NULL;
        g_autofree char *v_model = NULL, *v_msg = NULL;

        e.model = "a\nb\x1b";
        b = build(&e);
        v_model = field_value(b->iov, b->n, "MODEL");
        ck_assert_str_eq(v_model, "a\nb\x1b");
        v_msg = field_value(b->iov, b->n, "MESSAGE");
        assert_no_control(v_msg);
        ck_assert_ptr_nonnull(strstr(v_msg, "model='a\\nb\\x1b'"));
}
END_TEST

/* ---- log_request(): the journal, its refusal, stderr ------------------------------------ */

static unsigned sends;
static int fail_sends;           /* this many sends fail with -EINVAL */
static GPtrArray *sent;          /* one string per send: the fields, one per line */

static int fake_sendv(const struct iovec *iov, int n) {
        GString *s = g_string_new(NULL);

        sends++;
        for (int i = 0; i < n; i++) {
                g_string_append_len(s, iov[i].iov_base, (gssize) iov[i].iov_len);
                g_string_append_c(s, '\n');
        }
        g_ptr_array_add(sent, g_string_free(s, FALSE));
        for (int i = 0; i < n; i++)
                if (!field_is_valid(&iov[i]))
                        return -EINVAL;
        if (fail_sends > 0) {
                fail_sends--;
                return -ENOBUFS;
        }
        return 0;
}

static void journal_setup(void) {
        sends = 0;
        fail_sends = 0;
        sent = g_ptr_array_new_with_free_func(g_free);
        log_set_max_level(LOG_DEBUG);
        log_set_target(LOG_TARGET_JOURNAL);
        log_set_journal_sendv(fake_sendv);
}

static void journal_teardown(void) {
        log_set_journal_sendv(NULL);
        log_set_target(LOG_TARGET_STDERR);
        g_clear_pointer(&sent, g_ptr_array_unref);
}

/* Runs f with stderr in a file; returns what was written. */
static char *capture_stderr(void (*f)(void *), void *userdata) {
        char path[] = "/tmp/provider-router-test-stderr-XXXXXX";
        int fd = mkstemp(path), saved;
        char *out = NULL;

        ck_assert_int_ge(fd, 0);
        (void) fflush(stderr);
        saved = dup(STDERR_FILENO);
        ck_assert_int_ge(saved, 0);
        ck_assert_int_ge(dup2(fd, STDERR_FILENO), 0);
        f(userdata);
        (void) fflush(stderr);
        ck_assert_int_ge(dup2(saved, STDERR_FILENO), 0);
        close(saved);
        close(fd);
        ck_assert(g_file_get_contents(path, &out, NULL, NULL));
        (void) unlink(path);
        return out;
}

static void do_log_request(void *userdata) {
        log_request(userdata, LOG_INFO);
}

START_TEST(test_journal_entry_sent) {
        g_autofree char *model = repeat('m', 10240);
        RequestLogEntry e = entry();
        g_autofree char *out = NULL;

        e.model = model;
        out = capture_stderr(do_log_request, &e);
        ck_assert_uint_eq(sends, 1);
        ck_assert_str_eq(out, "");
        ck_assert_ptr_nonnull(strstr(sent->pdata[0], "\nMODEL=mmmm"));
        ck_assert_ptr_nonnull(strstr(sent->pdata[0], CUT "8192 bytes]\n"));
        ck_assert_ptr_nonnull(strstr(sent->pdata[0], "\nREQUEST_ID=req-0001\n"));
}
END_TEST

START_TEST(test_journal_refused_minimal_entry) {
        RequestLogEntry e = entry();
        g_autofree char *out = NULL;
        const char *minimal;

        e.provider = "qwen-direct";
        e.status = 504;
        fail_sends = 1;
        out = capture_stderr(do_log_request, &e);
        ck_assert_uint_eq(sends, 2);
        ck_assert_str_eq(out, "");
        minimal = sent->pdata[1];
        ck_assert_str_eq(minimal,
                         "MESSAGE=qwen-direct request id=req-0001 -> 504 (the full log entry was refused: "
                         "No buffer space available)\n"
                         "PRIORITY=6\nSYSLOG_IDENTIFIER=provider-router\nREQUEST_ID=req-0001\nSTATUS=504\n"
                         "PROVIDER=qwen-direct\n");
}
END_TEST

START_TEST(test_journal_unavailable_falls_back_to_stderr) {
        RequestLogEntry e = entry();
        g_autofree char *out = NULL;

        e.model = "evil\nmodel";
        fail_sends = 2;
        out = capture_stderr(do_log_request, &e);
        ck_assert_uint_eq(sends, 2);
        ck_assert_str_eq(out, "echo POST '/v1/chat/completions' model='evil\\nmodel' stream=no route=header -> 200 "
                              "in 1.50ms (first byte 0.70ms) in=10B out=20B id=req-0001\n");
}
END_TEST

/* ---- stderr ----------------------------------------------------------------------------- */

static void stderr_setup(void) {
        log_set_max_level(LOG_DEBUG);
        log_set_target(LOG_TARGET_STDERR);
        log_set_journal_sendv(NULL);
}

START_TEST(test_stderr_one_line_per_request) {
        g_autofree char *model = repeat('m', 10240);
        RequestLogEntry e = entry();
        g_autofree char *out = NULL;
        g_auto(GStrv) lines = NULL;

        e.model = model;
        e.path = "/v1/chat/completions\nprovider-router: forged";
        e.response_body = "{\"a\":\n\"\x1b[2J\"}";
        e.response_body_size = strlen(e.response_body);
        out = capture_stderr(do_log_request, &e);
        lines = g_strsplit(out, "\n", -1);
        ck_assert_uint_eq(g_strv_length(lines), 3); /* the request, the response, "" */
        assert_no_control(lines[0]);
        assert_no_control(lines[1]);
        ck_assert(g_str_has_suffix(lines[0], " id=req-0001"));
        ck_assert_ptr_nonnull(strstr(lines[0], "'/v1/chat/completions\\nprovider-router: forged'"));
        ck_assert_ptr_nonnull(strstr(lines[0], CUT "9984 bytes]'"));
        ck_assert_str_eq(lines[1], "  response: {\"a\":\\n\"\\x1b[2J\"}");
        ck_assert_str_eq(lines[2], "");
}
END_TEST

static void do_log_error(void *userdata) {
        log_error("Unknown provider '%s'.", (const char *) userdata);
}

START_TEST(test_stderr_messages_escaped) {
        g_autofree char *out = capture_stderr(do_log_error, (void *) "x\r\nforged\x1b[0m");

        ck_assert_str_eq(out, "Unknown provider 'x\\r\\nforged\\x1b[0m'.\n");
}
END_TEST

static Suite *log_suite(void) {
        Suite *s = suite_create("log");
        TCase *tc;

        tc = tcase_create("message");
        tcase_add_test(tc, test_message_plain);
        tcase_add_test(tc, test_message_escapes_control_characters);
        tcase_add_test(tc, test_message_caps_long_values);
        tcase_add_test(tc, test_escaped_cap_counts_escapes);
        suite_add_tcase(s, tc);

        tc = tcase_create("fields");
        tcase_add_test(tc, test_fields_plain);
        tcase_add_test(tc, test_fields_provider_request_id);
        tcase_add_test(tc, test_fields_every_value_huge);
        tcase_add_test(tc, test_fields_cut_at_character_boundary);
        tcase_add_test(tc, test_fields_raw_values_kept);
        suite_add_tcase(s, tc);

        tc = tcase_create("journal");
        tcase_add_checked_fixture(tc, journal_setup, journal_teardown);
        tcase_add_test(tc, test_journal_entry_sent);
        tcase_add_test(tc, test_journal_refused_minimal_entry);
        tcase_add_test(tc, test_journal_unavailable_falls_back_to_stderr);
        suite_add_tcase(s, tc);

        tc = tcase_create("stderr");
        tcase_add_checked_fixture(tc, stderr_setup, NULL);
        tcase_add_test(tc, test_stderr_one_line_per_request);
        tcase_add_test(tc, test_stderr_messages_escaped);
        suite_add_tcase(s, tc);

        return s;
}

int main(void) {
        return test_run_suite(log_suite());
}
