#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Fault suite: providers that refuse, hang before headers or mid-body, reset mid-stream,
answer garbage or too much; clients that trickle (slowloris), pipeline, hang up mid-stream or
open more connections than allowed; configuration reloads under load. Each case asserts what the
client saw and that the daemon still serves afterwards, with and without a healthy fallback.

With PROVIDER_ROUTER_FAULT_REPORT=FILE set, each case also writes what the client saw and how
many requests were lost, for the table in docs/RELIABILITY.md."""

import json
import os
import signal
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (LOOPBACK, SLOW, RawClient, chat_body, closed_port, main,  # noqa: E402
                     router_config, wait_until)
from test_failover import FailoverCase, ScriptedProvider  # noqa: E402

REPORT = {}


def record(fault, fallback, saw, lost, total=1):
    REPORT["%s | %s" % (fault, "fallback" if fallback else "no fallback")] = {
        "fault": fault, "fallback": fallback, "client_saw": saw, "lost": lost, "total": total}


def write_report():
    path = os.environ.get("PROVIDER_ROUTER_FAULT_REPORT")
    if path and REPORT:
        with open(path, "w") as f:
            json.dump(REPORT, f, indent=1, sort_keys=True)


class ProviderFaultTest(FailoverCase):
    """One broken provider 'bad', and a healthy mock 'beta' as its fallback or not at all."""

    def setUp(self):
        self.beta = self.start_mock("beta")
        self.bad = self.start_scripted("bad")

    def routers(self, url=None, keys=None, **bad_keys):
        """Two routers over the same providers: 'bad' alone, and 'bad' with Fallbacks=beta."""
        out = []
        for fallback in (False, True):
            spec = {"BaseURL": url or self.bad.base_url}
            spec.update(bad_keys)
            if fallback:
                spec["Fallbacks"] = "beta"
            out.append(self.start_chain({"bad": spec, "beta": self.beta.base_url}, default="bad", keys=keys))
        return out

    def check_fallback(self, router, fault, stream=False):
        """With a healthy fallback nothing is lost: beta answers, and says who was tried."""
        if stream:
            s = router.stream(chat_body(stream=True))
            self.assertEqual((s.status, s.header("X-Provider"), s.header("X-Provider-Tried")), (200, "beta", "bad, beta"))
            self.assertTrue(s.complete and s.done(), s.raw)
            self.assertEqual(s.content(), "beta: hello")
            saw = "200, complete stream from the fallback"
        else:
            r = router.chat(chat_body())
            self.assert_mock_ok(r, self.beta, tried="bad, beta")
            saw = "200 from the fallback (X-Provider-Tried: bad, beta)"
        record(fault, True, saw, 0)
        self.assert_still_serves(router)
        self.assert_still_serves(router, self.beta)

    def test_refuses(self):
        alone, chained = self.routers(url="http://127.0.0.1:%d/v1" % closed_port())
        r = alone.chat(chat_body())
        self.assert_error(r, 502, "connection_error", "unreachable", provider="bad")
        s = alone.chat(chat_body(stream=True))
        self.assert_error(s, 502, "connection_error", provider="bad")
        record("provider refuses the connection", False, "502 connection_error (stream too: a status, not a broken stream)", 1)
        self.assert_still_serves(alone)
        self.check_fallback(chained, "provider refuses the connection")
        self.check_fallback(chained, "provider refuses the connection (stream)", stream=True)

    def test_hangs_before_headers(self):
        self.bad.behave("hang")
        alone, chained = self.routers(FirstByteTimeoutSec="1")
        start = time.monotonic()
        r = alone.chat(chat_body())
        self.assertGreaterEqual(time.monotonic() - start, 0.9)
        self.assert_error(r, 504, "timeout_error", "timed out", provider="bad")
        r = alone.chat(chat_body(stream=True))
        self.assert_error(r, 504, "timeout_error", provider="bad")
        record("provider hangs before headers", False, "504 timeout_error after FirstByteTimeoutSec", 1)
        self.assert_still_serves(alone)
        self.check_fallback(chained, "provider hangs before headers")
        self.check_fallback(chained, "provider hangs before headers (stream)", stream=True)
        wait_until(lambda: self.bad.aborted >= 4, 5 * SLOW, what="every hung transfer to be closed")

    def test_hangs_mid_body(self):
        # Not streamed: the answer is whole or not at all, so nothing went out yet.
        self.bad.behave("partial")
        alone, chained = self.routers(RequestTimeoutSec="1")
        r = alone.chat(chat_body())
        self.assert_error(r, 504, "timeout_error", "not complete", provider="bad")
        record("provider hangs mid-body", False, "504 timeout_error after RequestTimeoutSec", 1)
        self.assert_still_serves(alone)
        self.check_fallback(chained, "provider hangs mid-body")

    def test_hangs_mid_stream(self):
        self.bad.behave("events", n=2, then="hang")
        for router in self.routers(StreamIdleTimeoutSec="1"):
            start = time.monotonic()
            s = router.stream(chat_body(stream=True))
            self.assertLess(time.monotonic() - start, 10 * SLOW)
            self.assert_stream_error(s, "timeout_error", "silent")
            self.assertEqual(self.beta.stats()["chat"], 0)
            self.assert_still_serves(router)
        saw = "200, the events sent so far, then an SSE error event (timeout_error), no [DONE]"
        record("provider hangs mid-stream", False, saw, 1)
        record("provider hangs mid-stream", True, saw + "; bytes had gone out, so no failover", 1)

    def assert_stream_error(self, s, error_type, message_part):
        self.assertEqual((s.status, s.header("X-Provider")), (200, "bad"))
        data = s.data()
        self.assertEqual(len(data), 3, s.raw)
        self.assertEqual(json.loads(data[1])["choices"][0]["delta"]["content"], "bad-1 ")
        err = json.loads(data[2])["error"]
        self.assertEqual((err["type"], err["provider"]), (error_type, "bad"), err)
        self.assertIn(message_part, err["message"])
        self.assertFalse(s.done())
        self.assertTrue(s.complete, "the chunked body must end properly after the error event")

    def test_resets_mid_stream(self):
        self.bad.behave("events", n=2, then="reset")
        for router in self.routers():
            s = router.stream(chat_body(stream=True))
            self.assert_stream_error(s, "connection_error", "failed during the stream")
            self.assertEqual(self.beta.stats()["chat"], 0)
            self.assert_still_serves(router)
        saw = "200, the events sent so far, then an SSE error event (connection_error), no [DONE]"
        record("provider resets mid-stream", False, saw, 1)
        record("provider resets mid-stream", True, saw + "; bytes had gone out, so no failover", 1)

    def test_resets_before_first_event(self):
        self.bad.behave("events", n=0, then="reset")
        alone, chained = self.routers()
        r = alone.chat(chat_body(stream=True))
        self.assertEqual(r.status, 502, r)
        self.assertIn(r.json()["error"]["type"], ("connection_error",), r)
        record("provider resets a stream before its first event", False, "502 connection_error", 1)
        self.assert_still_serves(alone)
        self.check_fallback(chained, "provider resets a stream before its first event", stream=True)

    def test_garbage_not_http(self):
        self.bad.behave("garbage_http")
        alone, chained = self.routers()
        r = alone.chat(chat_body())
        self.assert_error(r, 502, "connection_error", provider="bad")
        record("provider answers garbage (not HTTP)", False, "502 connection_error", 1)
        self.assert_still_serves(alone)
        self.check_fallback(chained, "provider answers garbage (not HTTP)")

    def test_garbage_body(self):
        """A 200 whose body is not JSON is the provider's answer: the router forwards bodies
        untouched and does not judge them; no failover."""
        self.bad.behave("garbage_body")
        for router in self.routers():
            r = router.chat(chat_body())
            self.assertEqual((r.status, r.header("X-Provider")), (200, "bad"), r)
            self.assertEqual(r.body, b"<html><body>502 Bad Gateway: this is not JSON</body></html>")
            self.assert_still_serves(router)
        self.assertEqual(self.beta.stats()["chat"], 0)
        saw = "200 with the provider's non-JSON body, unchanged (answers are relayed, not judged)"
        record("provider answers garbage (HTTP 200, body not JSON)", False, saw, 1)
        record("provider answers garbage (HTTP 200, body not JSON)", True, saw, 1)

    def test_stream_burst_relayed_whole(self):
        """A provider that sends many events in one go: curl hands them over in 16K pieces, the
        router pauses it while the client catches up, and every byte arrives, however the
        pieces fall. A small MaxResponseSize= limits single events, not such a piece."""
        sizes = [1000 + 37 * i for i in range(120)]
        self.bad.behave("burst", sizes=sizes)
        router = self.start_chain({"bad": self.bad.base_url}, default="bad",
                                  keys={"MaxResponseSize": "16K", "StreamBufferSize": "4K",
                                        "StreamIdleTimeoutSec": "30"})
        want = "".join("%d:" % i + "x" * n for i, n in enumerate(sizes))
        for i in range(10):
            s = router.stream(chat_body(stream=True), timeout=20)
            self.assertEqual(s.status, 200)
            self.assertTrue(s.done() and s.complete, s.raw[-300:])
            self.assertEqual(s.content(), want)
        self.assert_still_serves(router)

    def test_oversized_event_in_burst(self):
        """One event past MaxResponseSize= in a burst, after the router had to pause the
        provider: the stream ends at once with an error event, never silently short."""
        router = self.start_chain({"bad": self.bad.base_url}, default="bad",
                                  keys={"MaxResponseSize": "16K", "StreamBufferSize": "4K",
                                        "StreamIdleTimeoutSec": "30"})
        # With 3 small events first, the large one is still incomplete when the router pauses
        # the provider, and grows past the limit with what the resume hands over.
        # Last, the answer ends inside the large event: the transfer is over when the refusal
        # of its last bytes is noticed, and must still not look like a success.
        for small, sizes, tail in ((40, [60000, 1000, 1000], None), (3, [60000, 1000, 1000], None),
                                   (3, [], b"data: " + b"y" * 21000)):
            self.bad.behave("burst", sizes=[1000] * small + sizes, **({"tail": tail} if tail else {}))
            for i in range(3):
                start = time.monotonic()
                s = router.stream(chat_body(stream=True), timeout=20)
                self.assertLess(time.monotonic() - start, 5 * SLOW)
                self.assertEqual(s.status, 200)
                chunks = s.data()
                self.assertEqual(len(chunks), small + 1, [c[:40] for c in chunks])
                self.assertEqual(s.content(), "".join("%d:" % i + "x" * 1000 for i in range(small)))
                err = json.loads(chunks[-1])["error"]
                self.assertIn("larger than 16384 bytes", err["message"])
                self.assertFalse(s.done())
                self.assertTrue(s.complete)
        self.assert_still_serves(router)

    def test_oversized_answer(self):
        keys = {"MaxResponseSize": "16K", "StreamBufferSize": "4K"}
        alpha = self.start_mock("alpha")
        router = self.start_chain({"alpha": {"BaseURL": alpha.base_url, "Fallbacks": "beta"},
                                   "beta": self.beta.base_url}, default="alpha", keys=keys)
        r = router.chat(chat_body(mock={"size": 100000}))
        self.assert_error(r, 502, "provider_error", "larger than 16384 bytes", provider="alpha")
        # Not a provider failure: it answered; a fallback would answer the same request alike.
        self.assertIsNone(r.header("X-Provider-Tried"), r)
        self.assertEqual(self.beta.stats()["chat"], 0)
        # Streamed: the role event went out, then one event larger than the limit.
        s = router.stream(chat_body(stream=True, mock={"size": 100000, "frames": 1}))
        self.assertEqual((s.status, s.header("X-Provider")), (200, "alpha"))
        data = s.data()
        self.assertEqual(json.loads(data[0])["choices"][0]["delta"]["role"], "assistant")
        err = json.loads(data[-1])["error"]
        self.assertIn("larger than 16384 bytes", err["message"])
        self.assertFalse(s.done())
        self.assertTrue(s.complete)
        # Below the limit, and a large stream made of small events, pass.
        self.assert_ok_from(router.chat(chat_body(mock={"size": 8000})), "alpha")
        s = router.stream(chat_body(stream=True, mock={"size": 200000, "frames": 100}))
        self.assertTrue(s.done() and s.complete)
        self.assertEqual(len(s.content()), 200000)
        saw = "502 provider_error (stream: SSE error event); the answer is the request's, so not retried"
        record("provider answers an oversized body", False, saw, 1)
        record("provider answers an oversized body", True, saw, 1)
        self.assert_still_serves(router)
        self.assert_still_serves(router, alpha)


class ClientFaultTest(FailoverCase):

    def setUp(self):
        self.alpha = self.start_mock("alpha")

    def test_slowloris(self):
        """Clients that trickle their headers or body: the others are served meanwhile, and each
        slow one is dropped once ClientTimeoutSec has passed without a whole request."""
        # The raw requests name the host 'x': allowed explicitly (a loopback router answers only
        # loopback names by default).
        router = self.start_chain({"alpha": self.alpha.base_url}, keys={"ClientTimeoutSec": "2", "AllowedHosts": "x"})
        body = json.dumps(chat_body("x" * 200)).encode()
        head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\n\r\n" % len(body)).encode()
        slow = []
        for i in range(20):
            s = socket.create_connection((LOOPBACK, router.port), timeout=5)
            s.setblocking(False)
            # Half trickle the headers, half send the headers and trickle the body:
            # [socket, bytes to trickle, bytes sent, seconds until the router closed it].
            if i % 2:
                s.sendall(head)
                slow.append([s, head + body, len(head), None])
            else:
                slow.append([s, head[:-4] + b"\r\nX-Pad: " + b"p" * 4000, 0, None])
        start = time.monotonic()
        served = 0
        try:
            deadline = start + 15 * SLOW
            while time.monotonic() < deadline and any(c[3] is None for c in slow):
                for c in slow:
                    if c[3] is not None:
                        continue
                    try:
                        if c[0].recv(4096) == b"":
                            c[3] = time.monotonic() - start
                            continue
                    except BlockingIOError:
                        pass
                    except OSError:
                        c[3] = time.monotonic() - start
                        continue
                    if c[2] < len(c[1]) - 1:  # never the last byte
                        try:
                            c[0].send(c[1][c[2]:c[2] + 1])
                            c[2] += 1
                        except OSError:
                            c[3] = time.monotonic() - start
                # Meanwhile everyone else is served at once.
                t = time.monotonic()
                self.assert_ok_from(router.chat(chat_body(), timeout=5), "alpha", "alpha: hello")
                self.assertLess(time.monotonic() - t, 2.0 * SLOW)
                served += 1
                time.sleep(0.2)
        finally:
            for c in slow:
                c[0].close()
        closed_after = [c[3] for c in slow]
        self.assertTrue(all(t is not None for t in closed_after), closed_after)
        # ClientTimeoutSec=2, checked every second: closed after 2 to 3 s (plus scheduling).
        self.assertGreaterEqual(min(closed_after), 1.9, closed_after)
        self.assertLess(max(closed_after), 5 * SLOW, closed_after)
        self.assertGreaterEqual(served, 8)
        # Nothing half-received reached a provider.
        self.assertEqual(self.alpha.stats()["chat"], served)
        record("client sends slowly (slowloris: 20 connections trickling headers or body)", False,
               "dropped (connection closed) %.1f-%.1f s after connecting with ClientTimeoutSec=2; %d other requests "
               "served meanwhile" % (min(closed_after), max(closed_after), served), 0, served)
        self.assert_still_serves(router)

    def test_idle_connection_closed(self):
        router = self.start_chain({"alpha": self.alpha.base_url}, keys={"ClientTimeoutSec": "1"})
        c = RawClient(router.port)
        start = time.monotonic()
        self.assertEqual(c.sock.recv(100), b"")
        self.assertLess(time.monotonic() - start, 3 * SLOW)
        c.close()
        self.assert_still_serves(router)

    def test_slow_answer_is_not_cut(self):
        """The request timeout is for receiving the request: a long answer or a long stream is
        the provider's time, bounded by the provider timeouts, never by ClientTimeoutSec."""
        router = self.start_chain({"alpha": self.alpha.base_url}, keys={"ClientTimeoutSec": "1"})
        r = router.chat(chat_body(mock={"delay_ms": 2500}))
        self.assert_ok_from(r, "alpha", "alpha: hello")
        s = router.stream(chat_body("a b c d e f", stream=True, mock={"frame_delay_ms": 500}))
        self.assertTrue(s.done() and s.complete)
        self.assertEqual(s.content(), "alpha: a b c d e f")
        # Keep-alive: a second request on the same connection after a pause shorter than the
        # timeout is served.
        c = RawClient(router.port)
        try:
            for i in range(3):
                c.send_request("POST", "/v1/chat/completions", chat_body("k%d" % i))
                status, headers = c.read_head()
                self.assertEqual(status, 200)
                n = int(headers["content-length"])
                while len(c.buf) < n:
                    c._fill()
                self.assertIn(b"alpha: k%d" % i, c.buf[:n])
                c.buf = c.buf[n:]
                time.sleep(0.5)
        finally:
            c.close()

    def test_pipelining(self):
        router = self.start_chain({"alpha": self.alpha.base_url}, keys={"AllowedHosts": "x"})
        reqs = []
        for i, mock in enumerate(({"delay_ms": 300}, None, None)):
            b = json.dumps(chat_body("p%d" % i, mock=mock)).encode()
            reqs.append(("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         "Content-Length: %d\r\n\r\n" % len(b)).encode() + b)
        health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        c = RawClient(router.port)
        try:
            c.sock.sendall(reqs[0] + reqs[1] + health + reqs[2])
            got = []
            for i in range(4):
                status, headers = c.read_head()
                n = int(headers["content-length"])
                while len(c.buf) < n:
                    c._fill()
                got.append((status, c.buf[:n]))
                c.buf = c.buf[n:]
        finally:
            c.close()
        self.assertEqual([g[0] for g in got], [200, 200, 200, 200])
        # In order, each its own answer, the slow first one included.
        self.assertIn(b"alpha: p0", got[0][1])
        self.assertIn(b"alpha: p1", got[1][1])
        self.assertEqual(json.loads(got[2][1])["status"], "ok")
        self.assertIn(b"alpha: p2", got[3][1])
        self.assertEqual(self.alpha.stats()["chat"], 3)
        record("client pipelines (4 requests in one write, keep-alive)", False,
               "4 answers, in order, each 200 and its own", 0, 4)
        self.assert_still_serves(router)

    def test_client_aborts_mid_stream(self):
        router = self.start_chain({"alpha": self.alpha.base_url})
        for reset in (False, True):
            c = RawClient(router.port)
            c.send_request("POST", "/v1/chat/completions",
                           chat_body(stream=True, mock={"frames": 100, "frame_delay_ms": 30}))
            status, headers = c.read_head()
            self.assertEqual(status, 200)
            # A few events are in: the stream is under way.
            for _ in range(100):
                if c.buf.count(b"data:") >= 4:
                    break
                c._fill()
            c.close(reset=reset)
            # The provider's transfer is stopped too, and nothing stays in flight.
            self.alpha.wait_stat("streams_aborted", 1 + int(reset), timeout=5)
            wait_until(lambda: self.alpha.stats()["in_flight"] == 0, 5 * SLOW, what="mock in_flight 0")
            wait_until(lambda: self.metrics(router)['provider_router_in_flight{provider="alpha"}'] == 0,
                       5 * SLOW, what="router in_flight 0")
            self.assert_still_serves(router)
        m = self.metrics(router)
        self.assertEqual(m['provider_router_errors_total{provider="alpha",class="client_abort"}'], 2)
        self.assertEqual(self.alpha.stats()["streams_completed"], 0)
        record("client aborts mid-stream (FIN and RST)", False,
               "(gone) upstream transfer cancelled at once, counted as client_abort", 0, 0)
        self.assert_still_serves(router, self.alpha)

    def test_connections_past_max(self):
        """Past MaxConnections= the router accepts no more: a new connection waits in the
        listen backlog (nothing is dropped or half-answered) and is served when a slot frees."""
        limit = 4
        router = self.start_chain({"alpha": self.alpha.base_url},
                                  keys={"MaxConnections": str(limit), "ClientTimeoutSec": "30"})
        held = [RawClient(router.port) for _ in range(limit)]
        try:
            # Each held connection is really accepted: it gets answers.
            for c in held:
                c.send_request("GET", "/health")
                self.assertEqual(c.read_head()[0], 200)
                c.buf = b""
            extra = RawClient(router.port, timeout=10)
            extra.send_request("POST", "/v1/chat/completions", chat_body("waiting"))
            extra.sock.settimeout(0.5)
            with self.assertRaises(socket.timeout):
                extra.sock.recv(100)
            # Held ones keep working.
            held[0].send_request("POST", "/v1/chat/completions", chat_body("held"))
            self.assertEqual(held[0].read_head()[0], 200)
            held[0].buf = b""
            t = time.monotonic()
            held.pop().close()
            extra.sock.settimeout(10 * SLOW)
            status, headers = extra.read_head()
            waited = time.monotonic() - t
            self.assertEqual(status, 200)
            extra.read_until(b"alpha: waiting")
            extra.close()
            self.assertLess(waited, 2 * SLOW)
        finally:
            for c in held:
                c.close()
        record("connections past MaxConnections", False,
               "the extra connection waits in the listen backlog and is served (200) as soon as a slot frees",
               0, 1)
        wait_until(lambda: router.request("GET", "/health").status == 200, 5 * SLOW, what="health")
        self.assert_still_serves(router)
        self.assert_still_serves(router, self.alpha)


class ReloadUnderLoadTest(FailoverCase):
    """SIGHUP with a changed configuration while requests run: every request is answered, by
    the provider the configuration named when it arrived, and none is lost."""

    @staticmethod
    def reloads_seen(router):
        log = router.log(limit=0)
        return log.count("Configuration reloaded") + log.count("Keeping the previous configuration.")

    def test_reload_under_load(self):
        alpha, beta, gamma = self.start_mock("alpha"), self.start_mock("beta"), self.start_mock("gamma")
        providers = {"alpha": alpha.base_url, "beta": beta.base_url, "gamma": gamma.base_url}

        def conf(port, default, with_gamma=True):
            p = dict(providers)
            if not with_gamma:
                del p["gamma"]
            return router_config(port, p, default=default)
        router = self.start_router(lambda port: conf(port, "alpha"))

        # One slow request to gamma stays in flight while gamma is removed by a reload.
        slow = {}

        def slow_request():
            slow["r"] = router.chat(chat_body("slow", mock={"delay_ms": 1500}), headers={"X-Provider": "gamma"})
        slow_thread = threading.Thread(target=slow_request)
        slow_thread.start()
        gamma.wait_stat("in_flight", 1)

        # Requests run until the reloads are over, at most max_per_thread per thread.
        threads, max_per_thread = 4, 2000
        results = [[] for _ in range(threads)]
        errors = []
        stop = threading.Event()

        def worker(k):
            try:
                for i in range(max_per_thread):
                    if stop.is_set():
                        break
                    stream = i % 3 == 0
                    if stream:
                        s = router.stream(chat_body("w%d-%d" % (k, i), stream=True), timeout=30)
                        ok = s.status == 200 and s.done() and s.complete
                        who = s.header("X-Provider")
                        good = ok and s.content() == "%s: w%d-%d" % (who, k, i)
                    else:
                        r = router.chat(chat_body("w%d-%d" % (k, i)), timeout=30)
                        who = r.header("X-Provider")
                        good = r.status == 200 and r.json()["choices"][0]["message"]["content"] == \
                            "%s: w%d-%d" % (who, k, i)
                    results[k].append((good, who))
            except Exception as e:  # noqa: BLE001 - counted as a lost request
                errors.append(repr(e))
        pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        for t in pool:
            t.start()
        reloads = 0
        try:
            for i in range(10):
                time.sleep(0.15)
                if i == 5:
                    text = "[Router\nthis is not a key file\n"  # a broken file: kept the old one
                else:
                    text = conf(router.port, "beta" if i % 2 == 0 else "alpha", with_gamma=i < 2)
                with open(router.config_path + ".tmp", "w") as f:
                    f.write(text)
                os.rename(router.config_path + ".tmp", router.config_path)
                router.send_signal(signal.SIGHUP)
                reloads += 1
                # Signals sent close together may merge: one reload at a time.
                wait_until(lambda: self.reloads_seen(router) == reloads, 10 * SLOW, what="reload %d" % reloads)
        finally:
            stop.set()
            for t in pool:
                t.join(120 * SLOW)
            slow_thread.join(30 * SLOW)
        total = sum(len(r) for r in results)
        good = sum(1 for r in results for g, _ in r if g)
        self.assertEqual(errors, [])
        self.assertEqual(good, total, results)
        self.assertGreater(total, 40)
        who = [w for r in results for _, w in r]
        self.assertEqual(alpha.stats()["chat"] + beta.stats()["chat"], total)
        self.assertEqual(who.count("alpha"), alpha.stats()["chat"])
        self.assertGreater(who.count("beta"), 0)
        self.assertGreater(who.count("alpha"), 0)
        # The request in flight to the removed provider finished as it began.
        self.assert_ok_from(slow["r"], "gamma", "gamma: slow")
        self.assertEqual(router.log(limit=0).count("Configuration reloaded"), reloads - 1)
        self.assertEqual(router.log(limit=0).count("Keeping the previous configuration."), 1)
        # The last good file said default alpha, no gamma.
        h = self.health(router)
        self.assertEqual(h["default_provider"], "alpha")
        self.assertNotIn("gamma", h["providers"])
        r = router.chat(chat_body(), headers={"X-Provider": "gamma"})
        self.assert_error(r, 400, "invalid_request_error", "gamma")
        record("configuration reload (SIGHUP, 10 times, one file broken) under load", False,
               "every request answered 200 by the provider named when it arrived; the broken file was refused "
               "and the previous configuration kept; a request in flight to a removed provider completed",
               0, total + 1)
        self.assert_still_serves(router)


if __name__ == "__main__":
    try:
        main()
    finally:
        write_report()
