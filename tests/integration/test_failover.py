#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Failover along Fallbacks=, same-provider retries (MaxRetries=, back-off, Retry-After), the
"nothing sent yet" rule, X-Provider / X-Provider-Tried, the circuit breaker and its probe,
MaxConcurrent=, client bearer tokens, and /metrics against the requests really sent.

Failures that must hit one provider and not its fallback come from ScriptedProvider, a loopback
server in this process: the mock provider takes its orders from the request body, which the
router forwards unchanged to every provider of the chain. Every failure case asserts what the
client saw and that the daemon still serves afterwards."""

import json
import os
import re
import select
import signal
import socket
import stat
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (LOOPBACK, SLOW, RouterTestCase, chat_body, closed_port, http_request,  # noqa: E402
                     main, router_config, wait_until)

# Longest a scripted connection may live: a test never needs more, and a lost thread never
# outlives its test by much.
SCRIPT_MAX_SEC = 60.0 * SLOW


class ScriptedProvider:
    """An OpenAI-compatible provider on a loopback port, one thread per connection, whose
    behaviour the test sets: behave(kind, ...) for every chat request from now on, or
    script([...]) for the next ones. Kinds:

      ok                     200, a completion (or a stream when the request asks for one)
      status  code body headers   that answer (body: str or JSON value)
      close                  close the connection without a byte
      hang                   never answer; wait for the client to give up
      comments interval      SSE headers, then ': keep-alive' comments only, never data
      events n then          SSE headers, n data events, then 'reset' (RST), 'hang' or 'end'
      burst sizes tail       SSE headers, one event per size (content of that many bytes) and
                             [DONE] (or else the bytes tail, and the end), all in one write
      partial                headers with Content-Length 1000, 10 body bytes, then hang
      garbage_http           bytes that are not HTTP at all
      garbage_body           200 application/json whose body is not JSON
      delay ms               wait, then as 'ok'

    GET .../models answers 200 unless models_fail is set (the breaker's probe)."""

    def __init__(self, name):
        self.name = name
        self.lock = threading.Lock()
        self.default = ("ok", {})
        self.queue = []
        self.models_fail = False
        self.requests = []          # (monotonic time, method, path, headers, body)
        self.aborted = 0            # hangs the client gave up on
        self.stopping = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.base_url = "http://%s:%d/v1" % (LOOPBACK, self.port)
        self.threads = []
        self.acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self.acceptor.start()

    # --- control ---------------------------------------------------------------------------

    def behave(self, kind, **kw):
        with self.lock:
            self.default = (kind, kw)
            self.queue = []

    def script(self, steps, then=("ok", {})):
        with self.lock:
            self.queue = [s if isinstance(s, tuple) else (s, {}) for s in steps]
            self.default = then

    def chats(self):
        with self.lock:
            return [r for r in self.requests if r[2].endswith("/chat/completions")]

    def probes(self):
        with self.lock:
            return [r for r in self.requests if r[2].endswith("/models")]

    def close(self):
        self.stopping.set()
        self.acceptor.join(5)
        for t in list(self.threads):
            t.join(5)
        self.sock.close()

    # --- server ----------------------------------------------------------------------------

    def _accept_loop(self):
        deadline = time.monotonic() + 30 * 60
        while not self.stopping.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _read_request(self, conn):
        conn.settimeout(10)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buf += chunk
            if len(buf) > 1 << 20:
                return None
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, path = lines[0].split()[:2]
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length") or 0)
        while len(body) < n:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            body += chunk
        return method, path, headers, body[:n]

    def _wait_peer_gone(self, conn, limit):
        """Sleeps until the peer closes the connection, we stop, or limit seconds pass.
        Returns True if the peer went away."""
        end = time.monotonic() + limit
        while time.monotonic() < end and not self.stopping.is_set():
            r, _, _ = select.select([conn], [], [], 0.05)
            if r:
                try:
                    if not conn.recv(4096, socket.MSG_PEEK):
                        return True
                except OSError:
                    return True
                time.sleep(0.05)
        return False

    def _serve(self, conn):
        try:
            req = self._read_request(conn)
            if not req:
                return
            method, path, headers, body = req
            with self.lock:
                self.requests.append((time.monotonic(), method, path, headers, body))
                if path.endswith("/models"):
                    step = ("models", {})
                elif self.queue:
                    step = self.queue.pop(0)
                else:
                    step = self.default
            try:
                stream = bool(json.loads(body or b"{}").get("stream"))
            except ValueError:
                stream = False
            self._act(conn, step, stream)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _head(self, status, ctype, extra=None, length=None):
        h = "HTTP/1.1 %d X\r\nContent-Type: %s\r\nConnection: close\r\nX-Scripted: %s\r\n" % (
            status, ctype, self.name)
        for k, v in (extra or {}).items():
            h += "%s: %s\r\n" % (k, v)
        if length is not None:
            h += "Content-Length: %d\r\n" % length
        return (h + "\r\n").encode()

    def completion(self):
        return json.dumps({
            "id": "chatcmpl-scripted", "object": "chat.completion", "created": 1700000000,
            "model": "scripted", "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": "%s: ok" % self.name}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()

    def event(self, i, content=None):
        return ("data: " + json.dumps({
            "id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "scripted", "choices": [{"index": 0, "finish_reason": None, "delta": {
                "content": "%s-%d " % (self.name, i) if content is None else content}}]}) + "\n\n").encode()

    def _act(self, conn, step, stream):
        kind, kw = step
        if kind == "models":
            if self.models_fail:
                body = b'{"error":{"message":"still broken"}}'
                conn.sendall(self._head(503, "application/json", length=len(body)) + body)
            else:
                body = json.dumps({"object": "list", "data": [{"id": "%s-model" % self.name, "object": "model"}]}).encode()
                conn.sendall(self._head(200, "application/json", length=len(body)) + body)
            return
        if kind == "delay":
            time.sleep(kw.get("ms", 0) / 1000.0)
            kind = "ok"
        if kind == "ok":
            if stream:
                conn.sendall(self._head(200, "text/event-stream"))
                for i in range(3):
                    conn.sendall(self.event(i))
                conn.sendall(b"data: [DONE]\n\n")
            else:
                body = self.completion()
                conn.sendall(self._head(200, "application/json", length=len(body)) + body)
        elif kind == "status":
            body = kw.get("body")
            if body is None:
                body = {"error": {"message": "scripted %d" % kw["code"], "type": "server_error"}}
            body = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            conn.sendall(self._head(kw["code"], "application/json", kw.get("headers"), len(body)) + body)
        elif kind == "close":
            return
        elif kind == "hang":
            if self._wait_peer_gone(conn, SCRIPT_MAX_SEC):
                with self.lock:
                    self.aborted += 1
        elif kind == "comments":
            conn.sendall(self._head(200, "text/event-stream"))
            end = time.monotonic() + SCRIPT_MAX_SEC
            while time.monotonic() < end and not self.stopping.is_set():
                conn.sendall(b": keep-alive\n\n")
                if self._wait_peer_gone(conn, kw.get("interval", 0.1)):
                    with self.lock:
                        self.aborted += 1
                    return
        elif kind == "events":
            conn.sendall(self._head(200, "text/event-stream"))
            for i in range(kw.get("n", 2)):
                conn.sendall(self.event(i))
                time.sleep(0.02)
            then = kw.get("then", "reset")
            if then == "reset":
                time.sleep(0.1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            elif then == "hang":
                if self._wait_peer_gone(conn, SCRIPT_MAX_SEC):
                    with self.lock:
                        self.aborted += 1
            elif then == "end":
                conn.sendall(b"data: [DONE]\n\n")
        elif kind == "burst":
            conn.sendall(self._head(200, "text/event-stream") +
                         b"".join(self.event(i, "%d:" % i + "x" * n) for i, n in enumerate(kw["sizes"])) +
                         kw.get("tail", b"data: [DONE]\n\n"))
        elif kind == "partial":
            conn.sendall(self._head(200, "application/json", length=1000) + b'{"id":"cha')
            if self._wait_peer_gone(conn, SCRIPT_MAX_SEC):
                with self.lock:
                    self.aborted += 1
        elif kind == "garbage_http":
            conn.sendall(b"\x00\x01 this is not HTTP at all \xff\xfe\r\n\r\n")
        elif kind == "garbage_body":
            body = b"<html><body>502 Bad Gateway: this is not JSON</body></html>"
            conn.sendall(self._head(200, "application/json", length=len(body)) + body)
        else:
            raise AssertionError("unknown scripted behaviour %r" % kind)


def parse_metrics(text):
    """Prometheus text → {'name{labels}': float}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


class FailoverCase(RouterTestCase):
    """Helpers: scripted providers stopped at the end of the test, a router over them."""

    def start_scripted(self, name):
        p = ScriptedProvider(name)
        self.addCleanup(p.close)
        return p

    def start_chain(self, providers, default=None, keys=None):
        return self.start_router(lambda port: router_config(port, providers, default=default, router=keys))

    def health(self, router):
        r = router.request("GET", "/health")
        self.assertEqual(r.status, 200, r)
        return r.json()

    def state(self, router, name):
        return self.health(router)["providers"][name]["state"]

    def metrics(self, router):
        r = router.request("GET", "/metrics")
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.header("Content-Type").startswith("text/plain"), r)
        return parse_metrics(r.body.decode())

    def assert_ok_from(self, r, name, content=None):
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("X-Provider"), name, r)
        if content is not None:
            self.assertEqual(r.json()["choices"][0]["message"]["content"], content, r)

    def assert_mock_ok(self, r, mock, tried=None, text="hello"):
        self.assert_ok_from(r, mock.name, "%s: %s" % (mock.name, text))
        self.assertEqual(r.header("X-Mock-Name"), mock.name, r)
        self.assertEqual(r.header("X-Provider-Tried"), tried, r)


class FailoverTest(FailoverCase):
    """Each way a provider can fail before anything went to the client moves the request on."""

    def setUp(self):
        self.beta = self.start_mock("beta")
        self.flaky = self.start_scripted("flaky")

    def chain(self, primary=None, keys=None, **primary_keys):
        spec = {"BaseURL": primary or self.flaky.base_url, "Fallbacks": "beta"}
        spec.update(primary_keys)
        return self.start_chain({"flaky": spec, "beta": self.beta.base_url}, default="flaky", keys=keys)

    def test_refused_goes_to_fallback(self):
        router = self.chain(primary="http://127.0.0.1:%d/v1" % closed_port())
        r = router.chat(chat_body())
        self.assert_mock_ok(r, self.beta, tried="flaky, beta")
        self.assertTrue(r.header("X-Request-Id"), r)
        self.assertEqual(self.beta.stats()["chat"], 1)
        s = router.stream(chat_body(stream=True))
        self.assertEqual(s.status, 200)
        self.assertEqual(s.header("X-Provider"), "beta")
        self.assertEqual(s.header("X-Provider-Tried"), "flaky, beta")
        self.assertTrue(s.done() and s.complete)
        self.assertEqual(s.content(), "beta: hello")
        self.assert_still_serves(router)
        self.assert_still_serves(router, self.beta)

    def test_closed_without_answer_goes_to_fallback(self):
        self.flaky.behave("close")
        router = self.chain()
        r = router.chat(chat_body())
        self.assert_mock_ok(r, self.beta, tried="flaky, beta")
        self.assertEqual(len(self.flaky.chats()), 1)
        self.assert_still_serves(router)

    def test_hang_before_headers_goes_to_fallback(self):
        self.flaky.behave("hang")
        router = self.chain(FirstByteTimeoutSec="1")
        start = time.monotonic()
        r = router.chat(chat_body())
        elapsed = time.monotonic() - start
        self.assert_mock_ok(r, self.beta, tried="flaky, beta")
        self.assertGreaterEqual(elapsed, 0.9, r)
        self.assertLess(elapsed, 10 * SLOW, r)
        # The router let go of the hung transfer.
        wait_until(lambda: self.flaky.aborted >= 1, 5 * SLOW, what="the hung transfer to be closed")
        self.assert_still_serves(router)

    def test_5xx_goes_to_fallback(self):
        for code in (500, 502, 503, 504):
            with self.subTest(code=code):
                self.flaky.behave("status", code=code)
                router = self.chain()
                r = router.chat(chat_body())
                self.assert_mock_ok(r, self.beta, tried="flaky, beta")
                self.assert_still_serves(router)
                router.cleanup()

    def test_429_goes_to_fallback(self):
        self.flaky.behave("status", code=429, body={"error": {"message": "slow down", "type": "rate_limit"}})
        router = self.chain()
        r = router.chat(chat_body())
        self.assert_mock_ok(r, self.beta, tried="flaky, beta")
        self.assert_still_serves(router)

    def test_4xx_is_an_answer(self):
        """A 400 is about the request: passed to the client, no failover."""
        self.flaky.behave("status", code=400, body={"error": {"message": "bad model", "type": "invalid_request_error"}})
        router = self.chain()
        r = router.chat(chat_body())
        self.assertEqual(r.status, 400, r)
        self.assertEqual(r.header("X-Provider"), "flaky", r)
        self.assertEqual(r.json()["error"]["message"], "bad model", r)
        self.assertIsNone(r.header("X-Provider-Tried"), r)
        self.assertEqual(self.beta.stats()["chat"], 0)
        self.assert_still_serves(router)

    def test_all_fail_last_answer_passed_through(self):
        self.flaky.behave("status", code=503)
        other = self.start_scripted("other")
        other.behave("status", code=502, body={"error": {"message": "other is broken too"}})
        router = self.start_chain({"flaky": {"BaseURL": self.flaky.base_url, "Fallbacks": "other"},
                                   "other": other.base_url}, default="flaky")
        r = router.chat(chat_body())
        self.assertEqual(r.status, 502, r)
        self.assertEqual(r.header("X-Provider"), "other", r)
        self.assertEqual(r.header("X-Provider-Tried"), "flaky, other", r)
        self.assertEqual(r.json()["error"]["message"], "other is broken too", r)
        self.assertEqual((len(self.flaky.chats()), len(other.chats())), (1, 1))
        self.assert_still_serves(router)

    def test_all_refuse_502(self):
        router = self.start_chain({
            "a": {"BaseURL": "http://127.0.0.1:%d/v1" % closed_port(), "Fallbacks": "b"},
            "b": "http://127.0.0.1:%d/v1" % closed_port()}, default="a")
        r = router.chat(chat_body())
        self.assert_error(r, 502, "connection_error", "unreachable", provider="b")
        self.assertEqual(r.header("X-Provider-Tried"), "a, b", r)
        self.assert_still_serves(router)

    def test_stream_without_first_event_goes_to_fallback(self):
        """Keep-alive comments are not an answer: a provider that sends only those until
        FirstByteTimeoutSec is left, and none of its bytes reach the client."""
        self.flaky.behave("comments", interval=0.1)
        router = self.chain(FirstByteTimeoutSec="1")
        start = time.monotonic()
        s = router.stream(chat_body(stream=True))
        elapsed = time.monotonic() - start
        self.assertEqual(s.status, 200)
        self.assertEqual(s.header("X-Provider"), "beta")
        self.assertEqual(s.header("X-Provider-Tried"), "flaky, beta")
        self.assertTrue(s.complete and s.done(), s.raw)
        self.assertEqual(s.content(), "beta: hello")
        self.assertNotIn(b"keep-alive", s.raw)
        self.assertGreaterEqual(elapsed, 0.9)
        wait_until(lambda: self.flaky.aborted >= 1, 5 * SLOW, what="the silent stream to be closed")
        self.assert_still_serves(router)

    def test_stream_hang_before_headers_goes_to_fallback(self):
        self.flaky.behave("hang")
        router = self.chain(FirstByteTimeoutSec="1")
        s = router.stream(chat_body(stream=True))
        self.assertEqual((s.status, s.header("X-Provider"), s.header("X-Provider-Tried")), (200, "beta", "flaky, beta"))
        self.assertTrue(s.done())
        self.assert_still_serves(router)

    def test_failure_after_bytes_went_out_is_an_error_event(self):
        """Once the client has events, the stream cannot move: it ends with an SSE error event
        (no [DONE], no fake clean end), and the fallback is not asked."""
        for then, key in (("reset", {}), ("hang", {"StreamIdleTimeoutSec": "1"})):
            with self.subTest(then=then):
                self.flaky.behave("events", n=2, then=then)
                router = self.chain(**key)
                start = time.monotonic()
                s = router.stream(chat_body(stream=True))
                # The idle timeout ends a silent stream, not the first-byte deadline armed
                # before the stream began (RequestTimeoutSec=120 here).
                self.assertLess(time.monotonic() - start, 10 * SLOW)
                self.assertEqual(s.status, 200)
                self.assertEqual(s.header("X-Provider"), "flaky")
                self.assertIsNone(s.header("X-Provider-Tried"))
                data = s.data()
                self.assertEqual(len(data), 3, s.raw)
                self.assertEqual([json.loads(d)["choices"][0]["delta"]["content"] for d in data[:2]],
                                 ["flaky-0 ", "flaky-1 "])
                err = json.loads(data[2])["error"]
                self.assertEqual(err["provider"], "flaky", err)
                self.assertEqual(err["type"], "connection_error" if then == "reset" else "timeout_error", err)
                self.assertFalse(s.done())
                # The chunked body itself ends properly: the error is the stream's last word.
                self.assertTrue(s.complete, s.raw)
                self.assertEqual(self.beta.stats()["chat"], 0)
                self.assert_still_serves(router)
                router.cleanup()

    def test_header_routed_request_fails_over_too(self):
        router = self.chain(primary="http://127.0.0.1:%d/v1" % closed_port())
        r = router.chat(chat_body(), headers={"X-Provider": "flaky"})
        self.assert_mock_ok(r, self.beta, tried="flaky, beta")


class RetryTest(FailoverCase):
    """MaxRetries=: the same provider again, after a back-off that honours Retry-After."""

    def setUp(self):
        self.flaky = self.start_scripted("flaky")

    def test_retry_after_honoured_on_same_provider(self):
        self.flaky.script([("status", {"code": 429, "headers": {"Retry-After": "1"}})])
        router = self.start_chain({"flaky": {"BaseURL": self.flaky.base_url, "MaxRetries": "2"}},
                                  keys={"RetryBackoffSec": "0.05"})
        start = time.monotonic()
        r = router.chat(chat_body())
        elapsed = time.monotonic() - start
        self.assert_ok_from(r, "flaky", "flaky: ok")
        self.assertEqual(r.header("X-Provider-Tried"), "flaky, flaky", r)
        chats = self.flaky.chats()
        self.assertEqual(len(chats), 2)
        # At least the second asked for, not the 50 ms back-off.
        self.assertGreaterEqual(chats[1][0] - chats[0][0], 0.95)
        self.assertGreaterEqual(elapsed, 0.95)
        self.assert_still_serves(router)

    def test_retry_after_too_long_is_not_waited_for(self):
        """A Retry-After past MaxRetryWaitSec= is not waited out: the client gets the 429 and
        its Retry-After at once."""
        self.flaky.behave("status", code=429, headers={"Retry-After": "30"},
                          body={"error": {"message": "come back later", "type": "rate_limit"}})
        router = self.start_chain({"flaky": {"BaseURL": self.flaky.base_url, "MaxRetries": "2"}},
                                  keys={"MaxRetryWaitSec": "2"})
        start = time.monotonic()
        r = router.chat(chat_body())
        self.assertLess(time.monotonic() - start, 2 * SLOW)
        self.assertEqual(r.status, 429, r)
        self.assertEqual(r.header("Retry-After"), "30", r)
        self.assertEqual(r.json()["error"]["message"], "come back later")
        self.assertEqual(len(self.flaky.chats()), 1)
        self.assert_still_serves(router)

    def test_retries_are_bounded_and_back_off(self):
        self.flaky.behave("status", code=503, body={"error": {"message": "always down"}})
        router = self.start_chain({"flaky": {"BaseURL": self.flaky.base_url, "MaxRetries": "3"}},
                                  keys={"RetryBackoffSec": "0.1"})
        r = router.chat(chat_body())
        self.assertEqual(r.status, 503, r)
        self.assertEqual(r.json()["error"]["message"], "always down", r)
        self.assertEqual(r.header("X-Provider-Tried"), "flaky, flaky, flaky, flaky", r)
        times = [c[0] for c in self.flaky.chats()]
        self.assertEqual(len(times), 4)
        gaps = [b - a for a, b in zip(times, times[1:])]
        # 0.1, 0.2, 0.4 s (plus up to 20 % jitter): each wait longer than the one before.
        for gap, want in zip(gaps, (0.1, 0.2, 0.4)):
            self.assertGreaterEqual(gap, want * 0.95, gaps)
        self.assertGreater(gaps[2], gaps[0], gaps)
        self.assert_still_serves(router)

    def test_no_retries_by_default(self):
        self.flaky.behave("status", code=503)
        router = self.start_chain({"flaky": self.flaky.base_url})
        r = router.chat(chat_body())
        self.assertEqual(r.status, 503, r)
        self.assertIsNone(r.header("X-Provider-Tried"), r)
        self.assertEqual(len(self.flaky.chats()), 1)

    def test_provider_inside_retry_after_is_skipped(self):
        beta = self.start_mock("beta")
        self.flaky.behave("status", code=429, headers={"Retry-After": "30"})
        router = self.start_chain({"flaky": {"BaseURL": self.flaky.base_url, "Fallbacks": "beta"},
                                   "beta": beta.base_url}, default="flaky")
        r = router.chat(chat_body())
        self.assert_mock_ok(r, beta, tried="flaky, beta")
        # Within the 30 s it asked for, the provider is not asked again.
        for _ in range(3):
            r = router.chat(chat_body())
            self.assert_ok_from(r, "beta", "beta: hello")
            self.assertTrue(r.header("X-Provider-Tried").startswith("flaky ("), r)
        self.assertEqual(len(self.flaky.chats()), 1)
        self.assertEqual(beta.stats()["chat"], 4)
        h = self.health(router)["providers"]["flaky"]
        self.assertGreater(h.get("retry_in_sec", 0), 20, h)
        self.assert_still_serves(router)


class BreakerTest(FailoverCase):
    """FailureThreshold= failures in a row mark a provider down; after CooldownSec= a probe
    (GET BaseURL/models) decides when traffic returns."""

    keys = {"FailureThreshold": "2", "CooldownSec": "1", "MaxCooldownSec": "2"}

    def setUp(self):
        self.flaky = self.start_scripted("flaky")

    def test_trip_probe_recover(self):
        beta = self.start_mock("beta")
        router = self.start_chain({"flaky": {"BaseURL": self.flaky.base_url, "Fallbacks": "beta"},
                                   "beta": beta.base_url}, default="flaky", keys=self.keys)
        self.assertEqual(self.state(router, "flaky"), "unknown")
        r = router.chat(chat_body())
        self.assert_ok_from(r, "flaky", "flaky: ok")
        self.assertEqual(self.state(router, "flaky"), "up")

        self.flaky.behave("status", code=503)
        self.flaky.models_fail = True
        for i in range(2):
            r = router.chat(chat_body())
            self.assert_mock_ok(r, beta, tried="flaky, beta")
        h = self.health(router)["providers"]["flaky"]
        self.assertIn(h["state"], ("down", "probing"), h)
        self.assertEqual(h["consecutive_failures"], 2, h)
        self.assertIn("last_error", h)
        wait_until(lambda: "Provider 'flaky' is down after 2 failure(s)" in router.log(), 5 * SLOW,
                   what="the notice that flaky is down")

        # Down: not asked at all, the fallback serves at once, and the response says why.
        n = len(self.flaky.chats())
        r = router.chat(chat_body())
        self.assert_ok_from(r, "beta", "beta: hello")
        self.assertRegex(r.header("X-Provider-Tried"), r"^flaky \((down|probing)\), beta$")
        self.assertEqual(len(self.flaky.chats()), n)

        # The probe fails while it is still broken: down again, for a longer cool-down.
        wait_until(lambda: len(self.flaky.probes()) >= 1, 5 * SLOW, what="the first probe")
        wait_until(lambda: self.state(router, "flaky") == "down", 5 * SLOW, what="flaky down after a failed probe")
        self.assertEqual(len(self.flaky.chats()), n)

        # Fixed: the next probe brings it back, and traffic returns.
        self.flaky.behave("ok")
        self.flaky.models_fail = False
        fixed = time.monotonic()
        wait_until(lambda: self.state(router, "flaky") == "up", 10 * SLOW, interval=0.05, what="flaky up")
        self.assertLess(time.monotonic() - fixed, 2.0 + 5.0 * SLOW)  # MaxCooldownSec=2, probe timeout 5
        self.assertIn("Provider 'flaky' answered its probe (HTTP 200) and is up again.", router.log())
        r = router.chat(chat_body())
        self.assert_ok_from(r, "flaky", "flaky: ok")
        self.assertIsNone(r.header("X-Provider-Tried"), r)
        self.assert_still_serves(router)
        self.assert_still_serves(router, beta)

    def test_down_without_fallback_503_retry_after(self):
        self.flaky.behave("status", code=502)
        self.flaky.models_fail = True
        router = self.start_chain({"flaky": self.flaky.base_url}, keys=dict(self.keys, CooldownSec="5",
                                                                            MaxCooldownSec="5"))
        for _ in range(2):
            r = router.chat(chat_body())
            self.assertEqual(r.status, 502, r)
        self.assertEqual(self.state(router, "flaky"), "down")
        r = router.chat(chat_body())
        err = self.assert_error(r, 503, "provider_unavailable", "down", provider="flaky")
        retry_after = int(r.header("Retry-After"))
        self.assertTrue(1 <= retry_after <= 5, r)
        self.assertIn("probed again", err["message"])
        self.assertEqual(len(self.flaky.chats()), 2)
        m = self.metrics(router)
        self.assertEqual(m['provider_router_rejected_total'], 1)
        self.assert_still_serves(router)

    def test_500_does_not_trip(self):
        """A 500 is about one request: it fails over but does not mark the provider down."""
        beta = self.start_mock("beta")
        self.flaky.behave("status", code=500)
        router = self.start_chain({"flaky": {"BaseURL": self.flaky.base_url, "Fallbacks": "beta"},
                                   "beta": beta.base_url}, default="flaky", keys=self.keys)
        for _ in range(4):
            self.assert_mock_ok(router.chat(chat_body()), beta, tried="flaky, beta")
        # It answered, so it is not down (500s neither count for nor against it).
        self.assertIn(self.state(router, "flaky"), ("unknown", "up"))
        self.assertEqual(len(self.flaky.chats()), 4)

    def test_too_large_answers_do_not_trip(self):
        """The router's own MaxResponseSize= refusal is about the answer, not the provider: many
        in a row do not mark it down, and the provider keeps serving answers that fit."""
        big = self.start_mock("big")
        router = self.start_chain({"big": big.base_url}, default="big",
                                  keys=dict(self.keys, MaxResponseSize="4K"))
        for i in range(4):
            r = router.chat(chat_body("large", mock={"size": 20000}))
            self.assert_error(r, 502, "provider_error", "4096", provider="big")
            s = router.stream(chat_body("large", stream=True, mock={"size": 20000, "frames": 2}))
            self.assertEqual(s.status, 200, s.raw[:200])
            self.assertIn(b"larger than 4096 bytes", s.raw)
            self.assertNotIn(b"[DONE]", s.raw)
            h = self.health(router)["providers"]["big"]
            self.assertEqual(h.get("consecutive_failures", 0), 0, h)
            self.assertNotIn(h["state"], ("down", "probing"), h)
        self.assertEqual(big.stats()["chat"], 8)
        r = router.chat(chat_body("small"))
        self.assert_ok_from(r, "big", "big: small")
        self.assert_still_serves(router)

    def test_refused_trips_and_recovers(self):
        """A provider that is not there at all: down after the threshold, up once it listens."""
        port = closed_port()
        # Under AddressSanitizer freed memory is overwritten, so a message read from a freed
        # transfer shows (glib's fortified printf is not checked by ASan itself).
        asan = (os.environ.get("ASAN_OPTIONS") or "") + ":max_free_fill_size=4096"
        router = self.start_router(lambda p: router_config(p, {"gone": "http://127.0.0.1:%d/v1" % port},
                                                           default="gone", router=self.keys),
                                   env={"ASAN_OPTIONS": asan})
        for _ in range(2):
            r = router.chat(chat_body())
            self.assert_error(r, 502, "connection_error", provider="gone")
        self.assertIn(self.state(router, "gone"), ("down", "probing"))
        r = router.chat(chat_body())
        self.assert_error(r, 503, "provider_unavailable", provider="gone")
        self.assert_still_serves(router)
        # A probe finds it still refusing, and says why (curl's message, which must be read
        # before the transfer goes).
        wait_until(lambda: "(probe failed: " in router.log(), 10 * SLOW, what="a failed probe")
        self.assertRegex(router.log(), r"Provider 'gone' is down after \d+ failure\(s\) in a row "
                                       r"\(probe failed: [^)]*[Cc]onnect[^)]*\)")
        wait_until(lambda: self.state(router, "gone") == "down", 5 * SLOW, what="gone down again")
        # Now something listens there: the probe finds it.
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind((LOOPBACK, port))
        except OSError:
            srv.close()
            self.skipTest("port %d was taken meanwhile" % port)
        srv.listen(8)
        srv.settimeout(0.1)
        stop = threading.Event()

        def answer():
            deadline = time.monotonic() + 30 * SLOW
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    c, _ = srv.accept()
                except socket.timeout:
                    continue
                except OSError:
                    return
                try:
                    c.settimeout(5)
                    c.recv(65536)
                    body = b'{"object":"list","data":[]}'
                    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                              b"Content-Length: %d\r\n\r\n" % len(body) + body)
                except OSError:
                    pass
                finally:
                    c.close()
        t = threading.Thread(target=answer, daemon=True)
        t.start()
        try:
            wait_until(lambda: self.state(router, "gone") == "up", 10 * SLOW, interval=0.05, what="gone up")
        finally:
            stop.set()
            t.join(5)
            srv.close()
        self.assertIn("Provider 'gone' answered its probe", router.log())

    def reload(self, router, text):
        before = router.log(limit=0).count("Configuration reloaded")
        with open(router.config_path + ".tmp", "w") as f:
            f.write(text)
        os.rename(router.config_path + ".tmp", router.config_path)
        router.send_signal(signal.SIGHUP)
        wait_until(lambda: router.log(limit=0).count("Configuration reloaded") > before, 10 * SLOW,
                   what="the reload")

    def test_health_follows_the_provider_across_reloads(self):
        """A provider's health belongs to it: removed by a reload it is forgotten — even when a
        request to it ends after the reload — added back it starts afresh (neither down nor
        waiting for a probe that never comes), moved to a new address it is tried there at once,
        and kept at the same address it keeps its state."""
        beta, gamma = self.start_mock("beta"), self.start_mock("gamma")
        keys = dict(self.keys, CooldownSec="60", MaxCooldownSec="60")
        gone = "http://127.0.0.1:%d/v1" % closed_port()
        to_gamma = {"X-Provider": "gamma"}

        def conf(port, gamma_url=None):
            providers = {"beta": beta.base_url}
            if gamma_url:
                providers["gamma"] = gamma_url
            return router_config(port, providers, default="beta", router=keys)
        router = self.start_router(lambda port: conf(port, gamma.base_url))

        # One failure, then a second one that ends after gamma was removed by a reload.
        r = router.chat(chat_body(mock={"status": 502}), headers=to_gamma)
        self.assertEqual(r.status, 502, r)
        slow = {}
        t = threading.Thread(target=lambda: slow.setdefault(
                "r", router.chat(chat_body(mock={"status": 502, "delay_ms": 1000}), headers=to_gamma)))
        t.start()
        gamma.wait_stat("in_flight", 1)
        self.reload(router, conf(router.port))
        t.join(30)
        self.assertEqual(slow["r"].status, 502, slow["r"])
        self.assertNotIn("gamma", self.health(router)["providers"])

        # Added back: a fresh start, served at once.
        self.reload(router, conf(router.port, gamma.base_url))
        self.assertEqual(self.state(router, "gamma"), "unknown")
        self.assert_mock_ok(router.chat(chat_body(), headers=to_gamma), gamma)
        self.assertEqual(self.state(router, "gamma"), "up")

        # Down at a dead address; kept there by a reload, it stays down.
        self.reload(router, conf(router.port, gone))
        for _ in range(2):
            self.assert_error(router.chat(chat_body(), headers=to_gamma), 502, "connection_error", provider="gamma")
        self.assertEqual(self.state(router, "gamma"), "down")
        self.reload(router, conf(router.port, gone))
        self.assertEqual(self.state(router, "gamma"), "down")
        self.assert_error(router.chat(chat_body(), headers=to_gamma), 503, "provider_unavailable", provider="gamma")

        # Moved to a live address while down: the new address is tried at once.
        self.reload(router, conf(router.port, gamma.base_url))
        self.assert_mock_ok(router.chat(chat_body(), headers=to_gamma), gamma)
        self.assert_still_serves(router)


class ConcurrencyTest(FailoverCase):
    """MaxConcurrent=: past it, a fallback with room, else 429 with Retry-After."""

    def test_max_concurrent_429(self):
        busy = self.start_scripted("busy")
        busy.behave("hang")
        router = self.start_chain({"busy": {"BaseURL": busy.base_url, "MaxConcurrent": "1",
                                            "FirstByteTimeoutSec": str(int(3 * SLOW))}}, default="busy")
        results = {}

        def first():
            results["first"] = router.chat(chat_body(), timeout=30)
        t = threading.Thread(target=first)
        t.start()
        try:
            wait_until(lambda: len(busy.chats()) == 1, 5 * SLOW, what="the first request at the provider")
            r = router.chat(chat_body())
            err = self.assert_error(r, 429, "rate_limit_error", "MaxConcurrent=1", provider="busy")
            self.assertEqual(r.header("Retry-After"), "1", r)
            self.assertIn("busy", err["message"])
            self.assertEqual(len(busy.chats()), 1)
            self.assert_still_serves(router)
            # The one in flight is not disturbed; let it go and the provider takes requests again.
            busy.behave("ok")
        finally:
            t.join(40 * SLOW)
        self.assertEqual(results["first"].status, 504, results["first"])
        r = router.chat(chat_body())
        self.assert_ok_from(r, "busy", "busy: ok")

    def test_max_concurrent_fallback_with_room(self):
        busy = self.start_scripted("busy")
        beta = self.start_mock("beta")
        busy.behave("delay", ms=1500)
        router = self.start_chain({"busy": {"BaseURL": busy.base_url, "MaxConcurrent": "1", "Fallbacks": "beta"},
                                   "beta": beta.base_url}, default="busy")
        results = {}

        def first():
            results["first"] = router.chat(chat_body(), timeout=30)
        t = threading.Thread(target=first)
        t.start()
        try:
            wait_until(lambda: len(busy.chats()) == 1, 5 * SLOW, what="the first request at the provider")
            r = router.chat(chat_body())
            self.assert_ok_from(r, "beta", "beta: hello")
            # busy's first request has not finished: its state is still unknown.
            self.assertRegex(r.header("X-Provider-Tried"), r"^busy \((unknown|up)\), beta$", r)
        finally:
            t.join(30 * SLOW)
        self.assert_ok_from(results["first"], "busy", "busy: ok")
        self.assertEqual(len(busy.chats()), 1)


class ClientTokenTest(FailoverCase):
    TOKEN = "client-token-0123456789abcdef"
    KEY = "sk-provider-own-key-42"

    def setUp(self):
        fd, self.tokens = tempfile.mkstemp(prefix="client-tokens-")
        os.write(fd, ("# tokens\n\nsecond-token-xyz\n%s\n" % self.TOKEN).encode())
        os.close(fd)
        os.chmod(self.tokens, stat.S_IRUSR | stat.S_IWUSR)
        self.addCleanup(os.unlink, self.tokens)
        self.alpha = self.start_mock("alpha")
        self.beta = self.start_mock("beta")
        self.router = self.start_router(
            lambda port: router_config(port, {"alpha": self.alpha.base_url,
                                              "beta": {"BaseURL": self.beta.base_url, "APIKeyEnv": "BETA_KEY"}},
                                       router={"ClientTokensFile": self.tokens}),
            env={"BETA_KEY": self.KEY})

    def auth(self, token):
        return {"Authorization": "Bearer " + token}

    def test_401_without_or_with_wrong_token(self):
        for headers in ({}, self.auth("wrong"), self.auth(self.TOKEN + "x"), self.auth(""),
                        {"Authorization": "Basic " + self.TOKEN}, {"Authorization": self.TOKEN}):
            with self.subTest(headers=headers):
                r = self.router.chat(chat_body(), headers=headers)
                err = self.assert_error(r, 401, "authentication_error")
                self.assertEqual(err.get("code"), "invalid_api_key", r)
                self.assertIn("Bearer", r.header("WWW-Authenticate") or "", r)
                r = self.router.request("GET", "/v1/models", headers=headers)
                self.assertEqual(r.status, 401, r)
                r = self.router.request("GET", "/metrics", headers=headers)
                self.assertEqual(r.status, 401, r)
        self.assertEqual(self.alpha.stats()["requests"], 0)
        self.assertEqual(self.beta.stats()["requests"], 0)
        # /health stays open for load balancers and probes.
        self.assertEqual(self.router.request("GET", "/health").status, 200)
        r = self.router.chat(chat_body(), headers=dict(self.auth(self.TOKEN), **{"X-Provider": "echo"}))
        self.assert_ok_from(r, "echo", "hello")

    def test_right_token_and_no_forwarding(self):
        for token in (self.TOKEN, "second-token-xyz"):
            r = self.router.chat(chat_body(), headers=self.auth(token))
            self.assert_ok_from(r, "alpha", "alpha: hello")
            # The router's own client token is never sent on to a provider.
            self.assertNotIn("authorization", self.alpha.stats()["last_request"]["headers"])
        r = self.router.chat(chat_body(), headers=dict(self.auth(self.TOKEN), **{"X-Provider": "beta"}))
        self.assert_ok_from(r, "beta", "beta: hello")
        # A provider with its own key sees that key, never the client's.
        sent = self.beta.stats()["last_request"]["headers"]
        self.assertEqual(sent.get("authorization"), "Bearer " + self.KEY, sent)
        self.assertNotIn(self.TOKEN, json.dumps(self.beta.stats()))
        s = self.router.stream(chat_body(stream=True), headers=self.auth(self.TOKEN))
        self.assertEqual(s.status, 200)
        self.assertTrue(s.done())
        # Neither token appears in the log.
        self.assertNotIn(self.TOKEN, self.router.log())
        self.assertNotIn(self.KEY, self.router.log())

    def test_models_listing_does_not_forward_the_client_token(self):
        r = self.router.request("GET", "/v1/models", headers=self.auth(self.TOKEN))
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.alpha.stats()["last_request"]["path"], "/v1/models")
        self.assertNotIn("authorization", self.alpha.stats()["last_request"]["headers"])
        sent = self.beta.stats()["last_request"]["headers"]
        self.assertEqual(sent.get("authorization"), "Bearer " + self.KEY, sent)
        self.assert_ok_from(self.router.chat(chat_body(), headers=self.auth(self.TOKEN)), "alpha", "alpha: hello")


class ForwardingTest(FailoverCase):
    def test_client_key_not_sent_to_provider_with_own_key(self):
        """Without client tokens a client's Authorization goes to providers that have no key of
        their own (the plan's pass-through), never to one that has, and not along a failover."""
        key = "sk-beta-own"
        alpha, beta = self.start_mock("alpha"), self.start_mock("beta")
        router = self.start_router(
            lambda port: router_config(port, {
                "alpha": alpha.base_url,
                "beta": {"BaseURL": beta.base_url, "APIKeyEnv": "BETA_KEY"},
                "gone": {"BaseURL": "http://127.0.0.1:%d/v1" % closed_port(), "Fallbacks": "beta"}}),
            env={"BETA_KEY": key})
        client = {"Authorization": "Bearer sk-client-key"}
        r = router.chat(chat_body(), headers=dict(client, **{"X-Provider": "alpha"}))
        self.assert_ok_from(r, "alpha")
        self.assertEqual(alpha.stats()["last_request"]["headers"].get("authorization"), "Bearer sk-client-key")
        r = router.chat(chat_body(), headers=dict(client, **{"X-Provider": "beta"}))
        self.assert_ok_from(r, "beta")
        self.assertEqual(beta.stats()["last_request"]["headers"].get("authorization"), "Bearer " + key)
        r = router.chat(chat_body(), headers=dict(client, **{"X-Provider": "gone"}))
        self.assert_ok_from(r, "beta")
        self.assertEqual(r.header("X-Provider-Tried"), "gone, beta")
        self.assertEqual(beta.stats()["last_request"]["headers"].get("authorization"), "Bearer " + key)


class MetricsTest(FailoverCase):
    def test_metrics_match_requests_sent(self):
        alpha = self.start_mock("alpha")
        flaky = self.start_scripted("flaky")
        flaky.behave("status", code=503)
        router = self.start_chain({"alpha": alpha.base_url,
                                   "flaky": {"BaseURL": flaky.base_url, "Fallbacks": "alpha"},
                                   "gone": "http://127.0.0.1:%d/v1" % closed_port()}, default="alpha")
        http_before = self.metrics(router)['provider_router_http_requests_total']
        for i in range(5):
            self.assert_ok_from(router.chat(chat_body()), "alpha")
        for i in range(3):
            s = router.stream(chat_body(stream=True))
            self.assertTrue(s.done())
        for i in range(2):
            self.assert_ok_from(router.chat(chat_body(), headers={"X-Provider": "flaky"}), "alpha")
        for i in range(4):
            self.assertEqual(router.chat(chat_body(), headers={"X-Provider": "gone"}).status, 502)
        self.assertEqual(router.chat(b"{not json").status, 400)
        self.assertEqual(router.chat(chat_body(), headers={"X-Provider": "nope"}).status, 400)

        m = self.metrics(router)
        # Every attempt counts for its provider: 5 + 3 + 2 (after flaky) at alpha.
        self.assertEqual(m['provider_router_requests_total{provider="alpha"}'], 10)
        self.assertEqual(alpha.stats()["chat"], 10)
        self.assertEqual(m['provider_router_streams_total{provider="alpha"}'], 3)
        self.assertEqual(m['provider_router_requests_total{provider="flaky"}'], 2)
        self.assertEqual(len(flaky.chats()), 2)
        self.assertEqual(m['provider_router_errors_total{provider="flaky",class="provider_5xx"}'], 2)
        self.assertEqual(m['provider_router_requests_total{provider="gone"}'], 4)
        self.assertEqual(m['provider_router_errors_total{provider="gone",class="connect"}'], 4)
        self.assertEqual(m['provider_router_errors_total{provider="alpha",class="connect"}'], 0)
        self.assertEqual(m['provider_router_rejected_total'], 2)
        for p in ("alpha", "flaky", "gone", "echo"):
            self.assertEqual(m['provider_router_in_flight{provider="%s"}' % p], 0)
        self.assertEqual(m['provider_router_request_duration_seconds_count{provider="alpha"}'], 10)
        self.assertGreater(m['provider_router_response_bytes_total{provider="alpha"}'], 0)
        # 5 + 3 + 2 + 4 + 2 requests and this /metrics one.
        self.assertEqual(m['provider_router_http_requests_total'] - http_before, 17)
        # /health says the same.
        h = self.health(router)["providers"]
        self.assertEqual((h["alpha"]["requests"], h["flaky"]["requests"], h["gone"]["requests"]), (10, 2, 4))
        self.assertEqual(h["gone"]["errors"], 4)
        # And HELP/TYPE lines are there for every family.
        text = router.request("GET", "/metrics").body.decode()
        for family in set(re.findall(r"^(provider_router_[a-z_]+?)(?:_sum|_count)?[{ ]", text, re.M)):
            self.assertIn("# TYPE %s " % family, text)
        self.assert_still_serves(router)


if __name__ == "__main__":
    main()
