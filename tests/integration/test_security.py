#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Safe by default (issue 11), tried as an attacker would: a web page using the router behind the
user's back (CORS, simple POSTs, DNS rebinding), the client's key sent where it was not meant to
go, one request stalling the loop, memory sized by clients, secrets in /health, request
smuggling shapes. Each test asserts the status and body answered, that nothing already accepted
was lost, and that the daemon still serves the next request. The D-Bus items are in
test_dbus.py (they need a private bus)."""

import http.client
import json
import os
import shutil
import socket
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (LOOPBACK, SLOW, RouterTestCase, chat_body, http_request, main,  # noqa: E402
                     router_config, stream_request)

# What the echo provider echoes at most (README, provider-router.conf(5)).
ECHO_REPLY_MAX = 64 * 1024
# Under AddressSanitizer (meson sets the slow factor for sanitized builds) RSS holds the
# allocator's quarantine of freed memory and its shadow: the memory bounds are not checked there.
SANITIZED = SLOW > 1


class LoopProbe(threading.Thread):
    """Asks GET /health over and over on one kept-alive connection while a test runs; the longest
    answer time is an upper bound of the loop's longest stall meanwhile."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.worst = 0.0
        self.count = 0
        self.stopping = False
        self.error = None
        self.start()

    def run(self):
        try:
            c = http.client.HTTPConnection(LOOPBACK, self.port, timeout=120 * SLOW)
            while not self.stopping:
                t = time.monotonic()
                c.request("GET", "/health")
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    raise AssertionError("GET /health answered %d" % r.status)
                self.worst = max(self.worst, time.monotonic() - t)
                self.count += 1
                time.sleep(0.002)
            c.close()
        except Exception as e:  # reported by stop()
            self.error = e

    def stop(self):
        self.stopping = True
        self.join(130 * SLOW)
        if self.error:
            raise AssertionError("the /health probe failed: %r" % self.error)
        return self.worst


def raw_request(port, data, timeout=10.0):
    """Sends data on a fresh connection; reads one answer. Returns (status, headers, body, closed):
    closed says the router closed the connection right after the answer."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout * SLOW) as s:
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise AssertionError("connection closed before an answer: %r" % buf)
            buf += chunk
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        n = int(headers.get("content-length", "0"))
        while len(rest) < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
        body, extra = rest[:n], rest[n:]
        # Whatever follows must be nothing: a second answer would mean the rest of the bytes
        # were read as another request.
        s.settimeout(2 * SLOW)
        try:
            more = s.recv(65536)
            closed = more == b""
            extra += more
        except socket.timeout:
            closed = False
        except ConnectionResetError:
            closed = True
        return status, headers, body, closed, extra


def head_bytes(method, path, headers, body=b""):
    lines = ["%s %s HTTP/1.1" % (method, path)] + ["%s: %s" % kv for kv in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class SecurityCase(RouterTestCase):

    def router_with_mock(self, keys=None, providers=None, **kwargs):
        self.alpha = self.start_mock("alpha")
        p = {"alpha": self.alpha.base_url}
        p.update(providers or {})
        return self.start_router(lambda port: router_config(port, p, router=keys), **kwargs)

    def assert_raw_error(self, status_headers_body, status, error_type, message_part=None):
        status_, headers, body = status_headers_body[:3]
        self.assertEqual(status_, status, status_headers_body)
        self.assertTrue(headers.get("content-type", "").startswith("application/json"), status_headers_body)
        self.assertTrue(headers.get("x-request-id"), status_headers_body)
        err = json.loads(body)["error"]
        self.assertEqual(err["type"], error_type, body)
        if message_part:
            self.assertIn(message_part, err["message"], body)
        return err


# --- 1. a web page using the router behind the user's back ----------------------------------------

class DriveByTest(SecurityCase):

    def test_no_cors_by_default(self):
        router = self.router_with_mock()
        # A page's preflight is answered, but without any Access-Control header: the browser
        # does not send the request.
        r = router.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-provider"})
        self.assertEqual(r.status, 204, r)
        for h in r.headers.keys():
            self.assertFalse(h.lower().startswith("access-control-"), r)
        # Nor may the page read an answer.
        r = router.chat(chat_body("read me"), headers={"Origin": "http://evil.example"})
        self.assertEqual(r.status, 200, r)
        for h in r.headers.keys():
            self.assertFalse(h.lower().startswith("access-control-"), r)
        self.assert_still_serves(router)

    def test_cors_when_configured(self):
        router = self.router_with_mock(keys={"CORSAllowOrigin": "http://app.example http://other.example"})
        r = router.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        self.assertEqual(r.status, 204, r)
        self.assertEqual(r.header("Access-Control-Allow-Origin"), "http://app.example", r)
        self.assertIn("Origin", r.header("Vary") or "", r)
        r = router.chat(chat_body(), headers={"Origin": "http://other.example"})
        self.assertEqual(r.header("Access-Control-Allow-Origin"), "http://other.example", r)
        # An origin not listed gets no CORS header at all.
        r = router.chat(chat_body(), headers={"Origin": "http://evil.example"})
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Access-Control-Allow-Origin"), r)
        self.assertIn("Origin", r.header("Vary") or "", r)
        self.assert_still_serves(router)

    def test_simple_post_refused(self):
        """A page may POST text/plain or a form without a preflight: 415, and nothing reaches a
        provider."""
        router = self.router_with_mock()
        body = json.dumps(chat_body("spend the key")).encode()
        for ctype in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                      "multipart/form-data; boundary=x", "application/jsonp", "application/json-seq", None):
            with self.subTest(ctype=ctype):
                headers = {"X-Provider": "alpha", "Origin": "http://evil.example"}
                if ctype:
                    headers["Content-Type"] = ctype
                status, h, b, _, _ = raw_request(router.port, head_bytes(
                    "POST", "/v1/chat/completions",
                    [("Host", "127.0.0.1:%d" % router.port), ("Content-Length", str(len(body)))] +
                    list(headers.items()), body))
                self.assert_raw_error((status, h, b), 415, "invalid_request_error", "application/json")
        self.assertEqual(self.alpha.stats()["chat"], 0)
        # JSON in any spelling passes.
        for ctype in ("application/json", "Application/JSON", "application/json; charset=utf-8",
                      "application/json;charset=UTF-8"):
            r = router.chat(chat_body("ok"), headers={"Content-Type": ctype})
            self.assertEqual(r.status, 200, (ctype, r))
        self.assertEqual(self.alpha.stats()["chat"], 4)
        self.assert_still_serves(router)

    def test_rebinding_host_refused(self):
        """DNS rebinding: a page's own name, pointed at 127.0.0.1, arrives in Host:."""
        router = self.router_with_mock()
        port = router.port
        for host in ("evil.example:%d" % port, "evil.example", "127.0.0.1.evil.example",
                     "localhost.evil.example", "10.0.0.1:%d" % port, "[::2]:%d" % port, "", "a b"):
            with self.subTest(host=host):
                r = router.chat(chat_body("rebound"), headers={"Host": host, "X-Provider": "alpha"})
                err = self.assert_error(r, 403, "invalid_request_error", "Host not allowed")
                self.assertIn("AllowedHosts=", err["message"], r)
                self.assertIn("'%s'" % host, err["message"], r)
                # /health and /v1/models tell a page just as much.
                r = router.request("GET", "/health", headers={"Host": host})
                self.assertEqual(r.status, 403, r)
        self.assertEqual(self.alpha.stats()["chat"], 0)
        for host in ("localhost", "localhost:%d" % port, "LocalHost.:%d" % port, "app.localhost:%d" % port,
                     "127.0.0.1", "127.0.0.1:%d" % port, "127.1.2.3:%d" % port, "[::1]:%d" % port, "[::1]"):
            with self.subTest(host=host):
                r = router.chat(chat_body("local"), headers={"Host": host})
                self.assertEqual(r.status, 200, (host, r))
        self.assert_still_serves(router)

    def test_allowed_hosts(self):
        router = self.router_with_mock(keys={"AllowedHosts": "my-box.lan [fd00::1] My-Other.Example."})
        for host in ("my-box.lan", "my-box.lan:%d" % router.port, "MY-BOX.LAN", "[fd00::1]:80",
                     "my-other.example", "localhost"):
            r = router.chat(chat_body(), headers={"Host": host})
            self.assertEqual(r.status, 200, (host, r))
        r = router.chat(chat_body(), headers={"Host": "evil.example"})
        self.assert_error(r, 403, "invalid_request_error", "Host not allowed")
        self.assert_still_serves(router)
        # '*' turns the check off.
        star = self.start_router(lambda port: router_config(port, {"alpha": self.alpha.base_url},
                                                            router={"AllowedHosts": "*"}))
        r = star.chat(chat_body(), headers={"Host": "anything.example"})
        self.assertEqual(r.status, 200, r)
        self.assert_still_serves(star)

    @unittest.skipUnless(shutil.which("systemd-socket-activate"), "systemd-socket-activate not installed")
    def test_rebinding_host_refused_on_passed_socket(self):
        router = self.router_with_mock(socket_activated=True)
        r = router.chat(chat_body(), headers={"Host": "evil.example:%d" % router.port})
        self.assert_error(r, 403, "invalid_request_error", "Host not allowed")
        self.assertEqual(self.alpha.stats()["chat"], 0)
        self.assert_still_serves(router)

    def test_http11_without_host(self):
        router = self.router_with_mock()
        body = json.dumps(chat_body("no host")).encode()
        res = raw_request(router.port, head_bytes("POST", "/v1/chat/completions", [
            ("Content-Type", "application/json"), ("Content-Length", str(len(body)))], body))
        self.assert_raw_error(res, 400, "invalid_request_error", "Host")
        res = raw_request(router.port, head_bytes("GET", "/health", []))
        self.assert_raw_error(res, 400, "invalid_request_error", "Host")
        self.assertEqual(self.alpha.stats()["chat"], 0)
        # HTTP/1.0 has no Host: served.
        res = raw_request(router.port, b"GET /health HTTP/1.0\r\n\r\n")
        self.assertEqual(res[0], 200, res)
        self.assert_still_serves(router)


# --- 2. the client's key only where the client sent it -------------------------------------------

class ClientKeyTest(SecurityCase):
    KEY = "Bearer sk-client-own-key"

    def setUp(self):
        self.alpha = self.start_mock("alpha")
        self.beta = self.start_mock("beta")
        self.gamma = self.start_mock("gamma")
        gone = "http://127.0.0.1:1/v1"
        self.router = self.start_router(lambda port: router_config(port, {
            "alpha": self.alpha.base_url,
            "beta": {"BaseURL": self.beta.base_url, "ClientAuthorization": "always"},
            "gamma": {"BaseURL": self.gamma.base_url, "ClientAuthorization": "never"},
            "gone": {"BaseURL": gone, "Fallbacks": "alpha"},
            "gone-to-beta": {"BaseURL": gone, "Fallbacks": "beta"}}, default="alpha"))

    def sent(self, mock):
        return mock.stats()["last_request"]["headers"].get("authorization")

    def test_routed_provider_gets_the_key(self):
        r = self.router.chat(chat_body(), headers={"Authorization": self.KEY})
        self.assertEqual((r.status, r.header("X-Provider")), (200, "alpha"), r)
        self.assertEqual(self.sent(self.alpha), self.KEY)
        r = self.router.chat(chat_body(), headers={"Authorization": self.KEY, "X-Provider": "alpha"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.sent(self.alpha), self.KEY)
        # ClientAuthorization=never: not even when routed there.
        r = self.router.chat(chat_body(), headers={"Authorization": self.KEY, "X-Provider": "gamma"})
        self.assertEqual((r.status, r.header("X-Provider")), (200, "gamma"), r)
        self.assertIsNone(self.sent(self.gamma))
        self.assert_still_serves(self.router)

    def test_fallback_does_not_get_the_key(self):
        r = self.router.chat(chat_body("to gone"), headers={"Authorization": self.KEY, "X-Provider": "gone"})
        self.assertEqual((r.status, r.header("X-Provider"), r.header("X-Provider-Tried")), (200, "alpha", "gone, alpha"), r)
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "alpha: to gone")
        self.assertIsNone(self.sent(self.alpha))
        s = self.router.stream(chat_body("streamed", stream=True), headers={"Authorization": self.KEY, "X-Provider": "gone"})
        self.assertTrue(s.done() and s.complete)
        self.assertEqual(s.content(), "alpha: streamed")
        self.assertIsNone(self.sent(self.alpha))
        # Unless the fallback says it may have it.
        r = self.router.chat(chat_body(), headers={"Authorization": self.KEY, "X-Provider": "gone-to-beta"})
        self.assertEqual((r.status, r.header("X-Provider")), (200, "beta"), r)
        self.assertEqual(self.sent(self.beta), self.KEY)
        self.assert_still_serves(self.router, self.alpha)

    def test_merged_models_do_not_get_the_key(self):
        r = self.router.request("GET", "/v1/models", headers={"Authorization": self.KEY})
        self.assertEqual(r.status, 200, r)
        ids = [m["id"] for m in r.json()["data"]]
        self.assertIn("echo", ids)
        self.assertEqual(self.alpha.stats()["models"], 1)
        self.assertIsNone(self.sent(self.alpha))
        self.assertIsNone(self.sent(self.gamma))
        self.assertEqual(self.sent(self.beta), self.KEY)
        # Asked of one provider, the request is routed there.
        r = self.router.request("GET", "/v1/models", headers={"Authorization": self.KEY, "X-Provider": "alpha"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(self.alpha.stats()["models"], 2)
        self.assertEqual(self.sent(self.alpha), self.KEY)
        self.assert_still_serves(self.router)


# --- 4. one request stalling the loop ------------------------------------------------------------

class EchoTest(SecurityCase):
    # An 8 MB body of one-letter words: once a 724 MB answer built on the loop in 29 s.
    WORDS = 3_990_000

    def big_body(self, stream):
        return chat_body("a " * self.WORDS, model="echo", stream=stream,
                         **({"stream_options": {"include_usage": True}} if stream else {}))

    def test_large_echo_does_not_stall_the_loop(self):
        router = self.router_with_mock()
        body = json.dumps(self.big_body(True)).encode()
        self.assertLess(len(body), 8 * 1024 * 1024)
        results = {}

        def one(i):
            results[i] = stream_request(router.port, "/v1/chat/completions", body,
                                        headers={"X-Provider": "echo"}, timeout=120)

        probe = LoopProbe(router.port)
        time.sleep(0.2)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        # Meanwhile an ordinary request is served as usual.
        r = router.chat(chat_body("meanwhile"), headers={"X-Provider": "alpha"})
        for t in threads:
            t.join(180 * SLOW)
        worst = probe.stop()
        rss = router.rss_kib()

        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "alpha: meanwhile")
        for i in range(2):
            s = results[i]
            self.assertEqual(s.status, 200)
            self.assertTrue(s.complete and s.done(), s.raw[-300:])
            # Bounded: 64 KiB of the message, one event per word, finish_reason "length".
            self.assertEqual(s.content(), "a " * (ECHO_REPLY_MAX // 2))
            chunks = s.json_chunks()
            finish = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
            self.assertEqual(finish[-1], "length")
            self.assertEqual(chunks[-1]["usage"], {"prompt_tokens": self.WORDS, "completion_tokens": ECHO_REPLY_MAX // 2,
                                                   "total_tokens": self.WORDS + ECHO_REPLY_MAX // 2})
            self.assertLess(len(s.raw), 8 * 1024 * 1024)
        # The loop answered /health all along (the watchdog is 30 s; one slice is a few ms).
        self.assertGreater(probe.count, 10)
        self.assertLess(worst, 0.5 * SLOW, "the loop stalled for %.3f s" % worst)
        if not SANITIZED:
            self.assertLess(rss, 200 * 1024, "RSS %d KiB" % rss)
        print("\n    two 8 MB echo streams at once: longest /health answer %.1f ms over %d probes, RSS %d KiB"
              % (worst * 1000, probe.count, rss), file=sys.stderr)
        self.assert_still_serves(router)

    def test_large_echo_whole_answer_bounded(self):
        router = self.router_with_mock()
        probe = LoopProbe(router.port)
        r = router.chat(self.big_body(False), headers={"X-Provider": "echo"}, timeout=120)
        worst = probe.stop()
        self.assertEqual(r.status, 200, r)
        doc = r.json()
        self.assertEqual(doc["choices"][0]["message"]["content"], "a " * (ECHO_REPLY_MAX // 2))
        self.assertEqual(doc["choices"][0]["finish_reason"], "length")
        self.assertEqual(doc["usage"]["prompt_tokens"], self.WORDS)
        self.assertLess(worst, 0.5 * SLOW, "the loop stalled for %.3f s" % worst)
        self.assert_still_serves(router)

    def test_echo_cut_at_a_character(self):
        router = self.router_with_mock()
        text = "é" * ECHO_REPLY_MAX  # two bytes each: the cut falls inside none of them
        r = router.chat(chat_body(text, model="echo"), headers={"X-Provider": "echo"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "é" * (ECHO_REPLY_MAX // 2))
        s = router.stream(chat_body(text, model="echo", stream=True), headers={"X-Provider": "echo"})
        self.assertTrue(s.done() and s.complete)
        self.assertEqual(s.content(), "é" * (ECHO_REPLY_MAX // 2))
        # Below the bound nothing changes: "stop", the whole text.
        s = router.stream(chat_body("one two  three", model="echo", stream=True), headers={"X-Provider": "echo"})
        self.assertEqual(s.content(), "one two  three")
        self.assertEqual(s.json_chunks()[-1]["choices"][0]["finish_reason"], "stop")
        self.assert_still_serves(router)

    def test_client_leaving_mid_echo_stream(self):
        router = self.router_with_mock()
        body = json.dumps(self.big_body(True)).encode()
        from harness import RawClient
        c = RawClient(router.port, rcvbuf=4096)
        c.send_request("POST", "/v1/chat/completions", body, headers={"X-Provider": "echo"})
        status, _ = c.read_head()
        self.assertEqual(status, 200)
        c.read_until(b"data: ")
        c.close(reset=True)
        self.assert_still_serves(router)


# --- 5. memory sized by clients and providers ------------------------------------------------------

class EndlessProvider(threading.Thread):
    """Answers every request with 200, application/json and a body that never ends (64 KiB writes
    until the reader goes away, or 60 s); the first answer only once `together` requests are in
    (or after 10 s)."""

    def __init__(self, together=1):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self.requests = 0
        self.together = together
        self.all_in = threading.Event()
        self.threads = []
        self.start()

    @property
    def base_url(self):
        return "http://%s:%d/v1" % (LOOPBACK, self.port)

    def run(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t = threading.Thread(target=self.serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def serve(self, conn):
        conn.settimeout(10)
        deadline = time.monotonic() + 60
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(65536)
            head, body = buf.split(b"\r\n\r\n", 1)
            n = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":")[1])
            while len(body) < n:
                body += conn.recv(65536)
            self.requests += 1
            if self.requests >= self.together:
                self.all_in.set()
            self.all_in.wait(10)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
            block = b"x" * 65536
            while not self.stopping and time.monotonic() < deadline:
                conn.sendall(block)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stopping = True
        self.sock.close()
        self.join(5)
        for t in self.threads:
            t.join(15)


class RssSampler(threading.Thread):
    def __init__(self, router, interval=0.02):
        super().__init__(daemon=True)
        self.router = router
        self.interval = interval
        self.peak = 0
        self.stopping = False
        self.start()

    def run(self):
        while not self.stopping:
            try:
                self.peak = max(self.peak, self.router.rss_kib())
            except (OSError, AssertionError):
                return
            time.sleep(self.interval)

    def stop(self):
        self.stopping = True
        self.join(5)
        return self.peak


class MemoryTest(SecurityCase):
    MIB = 1024 * 1024

    def assert_busy(self, status_headers_body):
        err = self.assert_raw_error(status_headers_body, 503, "overloaded_error", "MaxBufferedSize=")
        self.assertTrue(status_headers_body[1].get("retry-after"), status_headers_body)
        return err

    def test_slow_large_bodies_bounded(self):
        """200 connections announce 8 MiB bodies and send them slowly: once 1.66 GB. Those past
        MaxBufferedSize= get 503 before a byte of their body is read; the others are served."""
        budget = 64
        router = self.router_with_mock(keys={"MaxBufferedSize": "%dM" % budget})
        baseline = router.rss_kib()
        text = "a " * ((8 * self.MIB - 200) // 2)
        body = json.dumps(chat_body(text, model="echo")).encode()
        self.assertLess(len(body), 8 * self.MIB)
        head = head_bytes("POST", "/v1/chat/completions", [
            ("Host", "127.0.0.1:%d" % router.port), ("Content-Type", "application/json"),
            ("X-Provider", "echo"), ("Content-Length", str(len(body)))])
        sampler = RssSampler(router)
        socks = []
        try:
            for i in range(200):
                c = socket.create_connection((LOOPBACK, router.port), timeout=30 * SLOW)
                c.sendall(head)
                socks.append(c)
            # Who was refused answers at once; the others wait for their bodies.
            time.sleep(1.0 * SLOW)
            refused, admitted = [], []
            for c in socks:
                c.setblocking(False)
                try:
                    data = c.recv(65536)
                except BlockingIOError:
                    admitted.append(c)
                    continue
                refused.append((c, data))
            # The admitted ones send their bodies slowly: 512 KiB each, in turn.
            sent = {id(c): 0 for c in admitted}
            step = 512 * 1024
            while any(sent[id(c)] < len(body) for c in admitted):
                for c in admitted:
                    k = sent[id(c)]
                    if k < len(body):
                        c.setblocking(True)
                        c.sendall(body[k:k + step])
                        sent[id(c)] = k + step
                time.sleep(0.02)
            answers = []
            for c in admitted:
                c.setblocking(True)
                c.settimeout(60 * SLOW)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = c.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                answers.append(buf)
        finally:
            peak = sampler.stop()
            for c in socks:
                c.close()

        print("\n    200 x 8 MiB announced, MaxBufferedSize=%dM: %d admitted, %d refused, RSS %d -> peak %d KiB"
              % (budget, len(admitted), len(refused), baseline, peak), file=sys.stderr)
        # The budget takes 7 of them (64 MiB / 8 MiB, less what else is held), the rest is refused.
        self.assertGreaterEqual(len(admitted), 1)
        self.assertLessEqual(len(admitted), budget // 8)
        self.assertEqual(len(admitted) + len(refused), 200)
        for c, data in refused:
            status, headers, rest = data.split(b"\r\n", 1)[0], None, None
            h, b = data.split(b"\r\n\r\n", 1)
            lines = h.decode().split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
            self.assert_busy((int(lines[0].split()[1]), headers, b))
        # Nothing accepted is lost: every admitted body was answered in full.
        for a in answers:
            self.assertTrue(a.startswith(b"HTTP/1.1 200"), a[:200])
        if not SANITIZED:
            self.assertLess(peak - baseline, (budget + 48) * 1024, "RSS grew from %d to %d KiB" % (baseline, peak))
        self.assert_still_serves(router)

    def test_endless_answers_bounded(self):
        """20 providers' answers that never end (not SSE): once 781 MB. They pause at the budget
        until their own timeout; new work is refused with 503 meanwhile; then all is served."""
        budget = 32
        endless = EndlessProvider(together=20)
        self.addCleanup(endless.close)
        router = self.router_with_mock(
            keys={"MaxBufferedSize": "%dM" % budget},
            providers={"endless": {"BaseURL": endless.base_url, "RequestTimeoutSec": "4"}})
        baseline = router.rss_kib()
        sampler = RssSampler(router)
        results = [None] * 20

        def one(i):
            results[i] = router.chat(chat_body("never ending"), headers={"X-Provider": "endless"}, timeout=60)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        endless.all_in.wait(10 * SLOW)
        # The answers fill the budget within a moment.
        time.sleep(1.0)
        busy = router.chat(chat_body("and me?"), headers={"X-Provider": "alpha"})
        for t in threads:
            t.join(60 * SLOW)
        peak = sampler.stop()
        print("\n    20 endless answers, MaxBufferedSize=%dM: RSS %d -> peak %d KiB" % (budget, baseline, peak),
              file=sys.stderr)

        self.assertEqual(endless.requests, 20)
        self.assertEqual(busy.status, 503, busy)
        self.assert_busy((busy.status, {k.lower(): v for k, v in busy.headers.items()}, busy.body))
        self.assertEqual(self.alpha.stats()["chat"], 0)
        # Each accepted request got its answer: the provider's own timeout, as always.
        for r in results:
            self.assert_error(r, 504, "timeout_error", "endless", provider="endless")
        # The budget, and what the allocator keeps of buffers that grew and moved.
        if not SANITIZED:
            self.assertLess(peak - baseline, (2 * budget + 32) * 1024, "RSS grew from %d to %d KiB" % (baseline, peak))
        self.assert_still_serves(router)
        self.assert_still_serves(router, self.alpha)


# --- 7. what /health shows --------------------------------------------------------------------------

class HealthTest(SecurityCase):
    TOKEN = "health-test-client-token"

    def start(self, tokens=False):
        self.alpha = self.start_mock("alpha")
        url = self.alpha.base_url.replace("http://", "http://someone:pa55word@")
        keys = {"FailureThreshold": "1", "CooldownSec": "300"}
        if tokens:
            d = self.router_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), "pr-tokens-%d" % os.getpid())
            os.makedirs(d, exist_ok=True)
            self.addCleanup(shutil.rmtree, d, True)
            path = os.path.join(d, "tokens")
            with open(path, "w") as f:
                f.write(self.TOKEN + "\n")
            os.chmod(path, 0o600)
            keys["ClientTokensFile"] = path
        router = self.start_router(lambda port: router_config(port, {
            "alpha": url, "gone": "http://user:gone-secret@127.0.0.1:1/v1"}, default="alpha", router=keys))
        # gone fails once and is marked down, with its error.
        auth = {"Authorization": "Bearer " + self.TOKEN} if tokens else {}
        r = router.chat(chat_body(), headers=dict(auth, **{"X-Provider": "gone"}))
        self.assert_error(r, 502, "connection_error", provider="gone")
        return router, auth

    def test_health_never_shows_userinfo(self):
        router, _ = self.start()
        r = router.request("GET", "/health")
        self.assertEqual(r.status, 200, r)
        self.assertNotIn(b"pa55word", r.body)
        self.assertNotIn(b"someone", r.body)
        self.assertNotIn(b"gone-secret", r.body)
        doc = r.json()
        self.assertEqual(doc["providers"]["alpha"]["base_url"], self.alpha.base_url)
        self.assertEqual(doc["providers"]["gone"]["base_url"], "http://127.0.0.1:1/v1")
        # Without client tokens, errors are shown as before.
        self.assertEqual(doc["providers"]["gone"]["state"], "down")
        self.assertIn("last_error", doc["providers"]["gone"])
        self.assert_still_serves(router)

    def test_health_details_need_a_token(self):
        router, auth = self.start(tokens=True)
        r = router.request("GET", "/health")
        self.assertEqual(r.status, 200, r)
        doc = r.json()
        gone = doc["providers"]["gone"]
        self.assertEqual(gone["state"], "down", doc)
        self.assertNotIn("last_error", gone)
        self.assertNotIn("base_url", gone)
        self.assertNotIn("base_url", doc["providers"]["alpha"])
        self.assertNotIn(b"127.0.0.1:1", r.body)
        # A wrong token is no token.
        r = router.request("GET", "/health", headers={"Authorization": "Bearer wrong"})
        self.assertNotIn("last_error", r.json()["providers"]["gone"])
        # With the token: where, and why, but still no user name or password.
        r = router.request("GET", "/health", headers=auth)
        gone = r.json()["providers"]["gone"]
        self.assertIn("last_error", gone)
        self.assertEqual(gone["base_url"], "http://127.0.0.1:1/v1")
        self.assertNotIn(b"gone-secret", r.body)
        self.assertNotIn(b"pa55word", r.body)
        r = router.chat(chat_body("still there?"), headers=dict(auth, **{"X-Provider": "alpha"}))
        self.assertEqual(r.status, 200, r)


# --- 8. request smuggling shapes --------------------------------------------------------------------

class SmugglingTest(SecurityCase):

    def setUp(self):
        self.router = self.router_with_mock()
        self.host = ("Host", "127.0.0.1:%d" % self.router.port)
        self.body = json.dumps(chat_body("smuggled?", model="m")).encode()
        # What a front proxy would take for the next request, hidden in the body.
        self.hidden = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(self.body) + self.body)

    def refused(self, data, status, message_part):
        """One raw request: answered with status at once, the connection closed after it, and
        nothing more answered (no second request read from the same bytes)."""
        started = time.monotonic()
        res = raw_request(self.router.port, data)
        self.assertLess(time.monotonic() - started, 5 * SLOW, "not answered at once")
        self.assert_raw_error(res, status, "invalid_request_error", message_part)
        self.assertEqual(res[1].get("connection"), "close", res)
        self.assertTrue(res[3], "the connection stayed open: %r" % (res,))
        self.assertNotIn(b"HTTP/1.1", res[4], "a second answer followed: %r" % (res,))
        return res

    def post(self, headers, body):
        return head_bytes("POST", "/v1/chat/completions",
                          [self.host, ("Content-Type", "application/json")] + headers, body)

    def test_two_content_lengths(self):
        self.refused(self.post([("Content-Length", str(len(self.body))), ("Content-Length", "5")],
                               self.body + self.hidden), 400, "Content-Length headers that differ")
        self.assertEqual(self.alpha.stats()["chat"], 0)
        self.assert_still_serves(self.router)

    def test_content_length_and_chunked(self):
        chunked = b"%x\r\n" % len(self.body) + self.body + b"\r\n0\r\n\r\n"
        for te in ("chunked", "Chunked"):
            with self.subTest(te=te):
                self.refused(self.post([("Content-Length", str(len(chunked))), ("Transfer-Encoding", te)],
                                       chunked + self.hidden), 400, "both Content-Length and Transfer-Encoding")
        self.assertEqual(self.alpha.stats()["chat"], 0)
        self.assert_still_serves(self.router)

    def test_transfer_encodings_not_supported(self):
        for te in ("identity", "gzip", "x-unknown", "gzip, chunked", "chunked, identity"):
            with self.subTest(te=te):
                res = self.refused(self.post([("Transfer-Encoding", te)], self.body), 501, "only 'chunked'")
                self.assertIn("'%s'" % te, json.loads(res[2])["error"]["message"])
        # Two Transfer-Encoding headers are one list: refused as well.
        self.refused(self.post([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "identity")], self.body),
                     501, "only 'chunked'")
        self.assertEqual(self.alpha.stats()["chat"], 0)
        # Plain chunked is fine.
        chunked = b"%x\r\n" % len(self.body) + self.body + b"\r\n0\r\n\r\n"
        status, headers, body, _, _ = raw_request(self.router.port, self.post([("Transfer-Encoding", "chunked")], chunked))
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body)["choices"][0]["message"]["content"], "alpha: smuggled?")
        # So are two equal Content-Lengths.
        status, _, body, _, _ = raw_request(self.router.port, self.post(
            [("Content-Length", str(len(self.body))), ("Content-Length", str(len(self.body)))], self.body))
        self.assertEqual(status, 200, body)
        self.assert_still_serves(self.router)

    def test_nul_in_path(self):
        for path in ("/health%00/x", "/v1/chat/completions%00.json", "/v1/chat/completions%00"):
            with self.subTest(path=path):
                data = head_bytes("POST", path, [self.host, ("Content-Type", "application/json"),
                                                 ("Content-Length", str(len(self.body)))], self.body)
                self.refused(data, 400, "encoded NUL")
        self.refused(b"GET /v1/chat/completions\x00/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "NUL byte")
        self.refused(b"GET /health\x00x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "NUL byte")
        self.assertEqual(self.alpha.stats()["chat"], 0)
        # The path is taken as sent: escapes are not decoded into another path.
        status, _, body, _, _ = raw_request(self.router.port, head_bytes("GET", "/%68ealth", [self.host]))
        self.assertEqual(status, 404, body)
        status, _, body, _, _ = raw_request(self.router.port, head_bytes("GET", "/health?x=%00", [self.host]))
        self.assertEqual(status, 200, body)
        self.assert_still_serves(self.router)

    def test_nul_in_header_value(self):
        for name, value in (("Authorization", b"Bearer sk-abc\x00def"), ("X-Provider", b"alpha\x00beta"),
                            ("Content-Type", b"application/json\x00; x")):
            with self.subTest(name=name):
                data = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" +
                        (b"Content-Type: application/json\r\n" if name != "Content-Type" else b"") +
                        name.encode() + b": " + value + b"\r\nContent-Length: %d\r\n\r\n" % len(self.body) + self.body)
                self.refused(data, 400, "NUL byte")
        self.assertEqual(self.alpha.stats()["chat"], 0)
        # Whitespace around values, tabs, bare LF line ends, a query: all fine.
        status, _, body, _, _ = raw_request(self.router.port, b"GET /health?a=1&b HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                               b"X-Sp:   v  \r\nX-Tab:\tv\nX-Empty:\r\n\r\n")
        self.assertEqual(status, 200, body)
        self.assert_still_serves(self.router)


if __name__ == "__main__":
    main()
