/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * ttfb: time to first streamed byte, measured from the client side.
 *
 *   ttfb BODY_FILE N PORT:PATH [PORT:PATH...]
 *
 * Sends the same streamed chat request N times to each target (127.0.0.1:PORT, one keep-alive
 * connection per target), round robin, one request at a time, so that drift on a shared
 * machine hits every target alike. For each request it prints one line:
 *
 *   TARGET_INDEX FIRST_BYTE_USEC FRAME_USEC
 *
 * FIRST_BYTE_USEC is the time from writing the request to the first byte of the answer;
 * FRAME_USEC the time to the first byte of the second SSE event, which the timed-frame mock
 * holds back for frame_delay_ms: it measures the relay of a frame that arrives on an idle
 * stream. Times are CLOCK_MONOTONIC around write() and read().
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_TARGETS 8
#define READ_SIZE 65536
#define MAX_ANSWER (16u * 1024u * 1024u)

typedef struct Target {
        unsigned port;
        const char *path;
        char *request;
        size_t request_size;
        int fd;
} Target;

static uint64_t now_usec(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
}

static int target_connect(Target *t) {
        struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons((uint16_t) t->port) };
        int one = 1;

        sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        t->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (t->fd < 0)
                return -errno;
        (void) setsockopt(t->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        if (connect(t->fd, (struct sockaddr *) &sin, sizeof(sin)) < 0) {
                int r = -errno;
                close(t->fd);
                t->fd = -1;
                return r;
        }
        return 0;
}

static void target_disconnect(Target *t) {
        if (t->fd >= 0)
                close(t->fd);
        t->fd = -1;
}

static int write_all(int fd, const char *p, size_t n) {
        while (n > 0) {
                ssize_t k = write(fd, p, n);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0)
                        return k < 0 ? -errno : -EPIPE;
                p += k;
                n -= (size_t) k;
        }
        return 0;
}

/* Incremental HTTP/1.1 response reader: headers, then a chunked or sized body, decoded as it
 * arrives so that the SSE events can be found wherever the chunk boundaries fall. */
typedef struct Answer {
        char *raw;
        size_t raw_size, parsed;
        bool headers_done, chunked, done, keep_alive;
        long status;
        uint64_t content_length;     /* when not chunked */
        uint64_t chunk_left;         /* bytes of the current chunk still to come */
        enum { CH_SIZE, CH_DATA, CH_DATA_END, CH_TRAILER } chunk_state;
        char *body;
        size_t body_size;
        size_t first_event_end;      /* 0 until the first "\n\n" is seen */
} Answer;

static void body_append(Answer *a, const char *p, size_t n) {
        memcpy(a->body + a->body_size, p, n);
        a->body_size += n;
        if (a->first_event_end == 0) {
                char *e = memmem(a->body, a->body_size, "\n\n", 2);
                if (e)
                        a->first_event_end = (size_t) (e - a->body) + 2;
        }
}

static int parse_headers(Answer *a) {
        char *end = memmem(a->raw, a->raw_size, "\r\n\r\n", 4), *line;

        if (!end)
                return 0;
        *end = 0;
        if (sscanf(a->raw, "HTTP/1.%*c %ld", &a->status) != 1)
                return -EBADMSG;
        a->keep_alive = true;
        a->content_length = UINT64_MAX;
        for (line = strstr(a->raw, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
                const char *h = line + 2;
                if (strncasecmp(h, "Transfer-Encoding:", 18) == 0 && strcasestr(h, "chunked"))
                        a->chunked = true;
                else if (strncasecmp(h, "Content-Length:", 15) == 0)
                        a->content_length = strtoull(h + 15, NULL, 10);
                else if (strncasecmp(h, "Connection:", 11) == 0 && strcasestr(h, "close"))
                        a->keep_alive = false;
        }
        a->parsed = (size_t) (end - a->raw) + 4;
        a->headers_done = true;
        return 1;
}

static int parse_body(Answer *a) {
        if (!a->chunked) {
                size_t n = a->raw_size - a->parsed;
                if (a->content_length != UINT64_MAX && n > a->content_length - a->body_size)
                        n = (size_t) (a->content_length - a->body_size);
                body_append(a, a->raw + a->parsed, n);
                a->parsed += n;
                if (a->content_length != UINT64_MAX && a->body_size >= a->content_length)
                        a->done = true;
                return 0;
        }

        while (a->parsed < a->raw_size && !a->done) {
                char *p = a->raw + a->parsed, *eol;
                size_t left = a->raw_size - a->parsed;

                switch (a->chunk_state) {
                case CH_SIZE:
                        eol = memmem(p, left, "\r\n", 2);
                        if (!eol)
                                return 0;
                        a->chunk_left = strtoull(p, NULL, 16);
                        a->parsed += (size_t) (eol - p) + 2;
                        a->chunk_state = a->chunk_left > 0 ? CH_DATA : CH_TRAILER;
                        break;
                case CH_DATA: {
                        size_t n = left < a->chunk_left ? left : (size_t) a->chunk_left;
                        body_append(a, p, n);
                        a->parsed += n;
                        a->chunk_left -= n;
                        if (a->chunk_left == 0)
                                a->chunk_state = CH_DATA_END;
                        break;
                }
                case CH_DATA_END:
                        if (left < 2)
                                return 0;
                        a->parsed += 2;
                        a->chunk_state = CH_SIZE;
                        break;
                case CH_TRAILER:
                        eol = memmem(p, left, "\r\n", 2);
                        if (!eol)
                                return 0;
                        a->parsed += (size_t) (eol - p) + 2;
                        if (eol == p)
                                a->done = true;
                        break;
                }
        }
        return 0;
}

/* One request on t; fills the two times. Returns 0, or -errno (the connection is then closed). */
static int measure(Target *t, char *raw, char *body, uint64_t *ret_first, uint64_t *ret_frame) {
        Answer a = { .raw = raw, .body = body };
        uint64_t start, first = 0, frame = 0;
        int r;

        if (t->fd < 0 && (r = target_connect(t)) < 0)
                return r;

        start = now_usec();
        r = write_all(t->fd, t->request, t->request_size);
        if (r < 0)
                goto fail;

        while (!a.done) {
                ssize_t k;

                if (a.raw_size + READ_SIZE > MAX_ANSWER) {
                        r = -EFBIG;
                        goto fail;
                }
                k = read(t->fd, a.raw + a.raw_size, READ_SIZE);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0) {
                        r = k < 0 ? -errno : -ECONNRESET;
                        goto fail;
                }
                if (first == 0)
                        first = now_usec();
                a.raw_size += (size_t) k;

                if (!a.headers_done) {
                        r = parse_headers(&a);
                        if (r < 0)
                                goto fail;
                        if (r == 0)
                                continue;
                }
                parse_body(&a);
                if (frame == 0 && a.first_event_end > 0 && a.body_size > a.first_event_end)
                        frame = now_usec();
        }

        if (a.status != 200) {
                r = -EPROTO;
                goto fail;
        }
        if (frame == 0) {
                r = -ENODATA; /* only one event: not a timed-frame stream */
                goto fail;
        }
        if (!a.keep_alive)
                target_disconnect(t);
        *ret_first = first - start;
        *ret_frame = frame - start;
        return 0;

fail:
        target_disconnect(t);
        return r;
}

static char *read_file(const char *path, size_t *ret_size) {
        FILE *f = fopen(path, "rbe");
        char *buf = NULL;
        size_t size = 0, alloc = 0, k;

        if (!f)
                return NULL;
        do {
                if (size + 65536 > alloc) {
                        alloc = (size + 65536) * 2;
                        buf = realloc(buf, alloc);
                        if (!buf) {
                                fclose(f);
                                return NULL;
                        }
                }
                k = fread(buf + size, 1, 65536, f);
                size += k;
        } while (k > 0);
        fclose(f);
        *ret_size = size;
        return buf;
}

int main(int argc, char *argv[]) {
        Target targets[MAX_TARGETS] = {};
        size_t body_size, n_targets;
        char *body, *raw, *decoded;
        long n;
        unsigned failures = 0;

        if (argc < 4 || (size_t) (argc - 3) > MAX_TARGETS) {
                fprintf(stderr, "usage: %s BODY_FILE N PORT:PATH [PORT:PATH...]\n", argv[0]);
                return 2;
        }
        body = read_file(argv[1], &body_size);
        if (!body) {
                fprintf(stderr, "ttfb: cannot read '%s': %m\n", argv[1]);
                return 1;
        }
        n = strtol(argv[2], NULL, 10);
        if (n <= 0 || n > 1000000) {
                fprintf(stderr, "ttfb: N must be between 1 and 1000000\n");
                return 2;
        }
        n_targets = (size_t) argc - 3;
        for (size_t i = 0; i < n_targets; i++) {
                Target *t = targets + i;
                char *colon = strchr(argv[3 + i], ':');
                int k;

                if (!colon || colon[1] != '/') {
                        fprintf(stderr, "ttfb: target '%s' is not PORT:/PATH\n", argv[3 + i]);
                        return 2;
                }
                t->port = (unsigned) strtoul(argv[3 + i], NULL, 10);
                t->path = colon + 1;
                t->fd = -1;
                k = asprintf(&t->request,
                             "POST %s HTTP/1.1\r\nHost: 127.0.0.1:%u\r\nContent-Type: application/json\r\n"
                             "Accept: text/event-stream\r\nContent-Length: %zu\r\n\r\n",
                             t->path, t->port, body_size);
                if (k < 0)
                        return 1;
                t->request = realloc(t->request, (size_t) k + body_size);
                if (!t->request)
                        return 1;
                memcpy(t->request + k, body, body_size);
                t->request_size = (size_t) k + body_size;
        }

        raw = malloc(MAX_ANSWER);
        decoded = malloc(MAX_ANSWER);
        if (!raw || !decoded)
                return 1;

        for (long i = 0; i < n; i++)
                for (size_t j = 0; j < n_targets; j++) {
                        uint64_t first = 0, frame = 0;
                        int r = measure(targets + j, raw, decoded, &first, &frame);
                        if (r < 0) {
                                if (++failures > 10 + (unsigned) (n * n_targets) / 100) {
                                        fprintf(stderr, "ttfb: too many failures, last on port %u: %s\n",
                                                targets[j].port, strerror(-r));
                                        return 1;
                                }
                                continue;
                        }
                        printf("%zu %llu %llu\n", j, (unsigned long long) first, (unsigned long long) frame);
                }

        for (size_t j = 0; j < n_targets; j++)
                target_disconnect(targets + j);
        if (failures > 0)
                fprintf(stderr, "ttfb: %u failed request(s)\n", failures);
        return 0;
}
