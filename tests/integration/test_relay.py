#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Relay exactly (issue 10): odd-but-legal and broken provider answers, TLS to providers, and an
egress proxy, against the odd provider of oddprovider.py (in this process) and a private PKI made
with openssl at test time (tlsutil.py).

Items covered: 1 (gzip), 2 (the client's headers), 3 (GET /v1/models relayed, merged, cached),
4 (the provider's own x-request-id), 5 (the DefaultModel= rewrite), 6 (a stream cut cleanly), 7
(comments before the first event), 9 (behind an egress proxy), 10 (CAFile=, client
certificates, Proxy=, checked up front), 11 (POST /v1/responses and any other endpoint, GET
/v1/models/{id}), plus '\\r\\n' and lone '\\r' SSE, HTTP/1.0 close-delimited and 'Connection:
close' answers. Item 8 (hang-ups) is in test_streaming.py, 12 in test_failover.py. A test that
fails on today's code is marked expectedFailure with '# issue 10.N: why'; the assertions say
what the router must do.

Compressed answers (item 1), the choice made here: the router asks libcurl to decode
(CURLOPT_ACCEPT_ENCODING) and relays the DECODED body with no Content-Encoding (and a
Content-Length, if any, of the decoded body). Why not relay the compressed bytes with their
header: the router must see the plain bytes anyway (usage totals, SSE event boundaries,
MaxResponseSize=), and it must be able to end a stream with an error event and to drop a half
event, which cannot be done inside a compressed stream without re-encoding it; a second, parallel
decoder only to look would cost as much as decoding and add a way for the two views to differ.
Decoding keeps one byte stream the router both inspects and relays, so "whole events only, then
an error event" holds for compressed providers too. The cost is compression on the client's leg,
which is loopback or a LAN for this router; a client is always free to receive identity (RFC 9110
§12.5.3: a server may ignore Accept-Encoding). The tests therefore assert: no Content-Encoding,
the body byte for byte what the provider compressed, usage counted, stream events as they come.
"""

import base64
import gzip
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (LOOPBACK, SLOW, Router, RouterTestCase, chat_body, dump_logs, http_request,  # noqa: E402
                     main, router_config, run_check_config, split_events, stream_request, wait_until)
from oddprovider import EgressProxy, OddProvider, OddProviderProcess, gzip_allowed  # noqa: E402
import tlsutil  # noqa: E402

# Every proxy variable libcurl reads, removed from the daemon's environment unless a test sets it.
PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
              "no_proxy", "NO_PROXY")


def proxy_env(http=None, https=None):
    """The daemon's environment: http_proxy (libcurl reads only the lower-case one for http://)
    and HTTPS_PROXY/https_proxy, nothing else that names a proxy."""
    env = {k: None for k in PROXY_VARS}
    if http:
        env["http_proxy"] = http
    if https:
        env["https_proxy"] = env["HTTPS_PROXY"] = https
    return env


def parse_metrics(text):
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def answer_of(record):
    """What the odd provider answered, before gzip and framing."""
    return base64.b64decode(record["answer_b64"])


def data_events(raw):
    """The events of a body that carry data, each as bytes without its blank line."""
    events, rest = split_events(raw)
    return [e for e in events if any(line.startswith(b"data:") for line in e.replace(b"\r", b"\n").split(b"\n"))]


class OddCase(RouterTestCase):
    """Odd providers, proxies and PKI for one test, stopped at its end."""

    def start_odd(self, name="odd", models=None, **kw):
        p = OddProvider(name, list(models or ["%s-model" % name]), **kw)
        self.addCleanup(p.close)
        return p

    def start_proxy(self):
        p = EgressProxy()
        self.addCleanup(p.close)
        return p

    def pki(self):
        if not tlsutil.OPENSSL:
            self.skipTest("no openssl command")
        return tlsutil.shared_pki()

    def router_over(self, providers, default=None, keys=None, env=None, mappings=None):
        base = {k: None for k in PROXY_VARS}
        base.update(env or {})
        return self.start_router(lambda port: router_config(port, providers, default=default, router=keys,
                                                            mappings=mappings), env=base)

    def metrics(self, router):
        r = router.request("GET", "/metrics")
        self.assertEqual(r.status, 200, r)
        return parse_metrics(r.body.decode())

    def stream_errors(self, router, name):
        return self.metrics(router).get('provider_router_errors_total{provider="%s",class="stream"}' % name, 0)

    def assert_no_proxy_headers(self, headers):
        for h in ("X-Odd-Proxy", "Proxy-Agent"):
            self.assertIsNone(headers.get(h), "the proxy's %s reached the client: %s" % (h, dict(headers.items())))

    def assert_events_spread(self, s, min_spread):
        times = [t for t, ev in s.events if b'"content": "' in ev]
        self.assertGreaterEqual(len(times), 3, s.raw)
        self.assertGreaterEqual(times[-1] - times[0], min_spread,
                                "events arrived together, not as sent: %s" % [round(t - s.started, 3) for t in times])


# --- the test provider itself ----------------------------------------------------------------------

class OddProviderSelfTest(OddCase):
    """The odd provider and the proxy do what their modes say (no router involved)."""

    def setUp(self):
        self.odd = self.start_odd()

    def raw(self, path, body=None, headers=None, method=None, port=None):
        """One request on a fresh socket; returns everything up to the close (the answer asks
        for no keep-alive)."""
        data = json.dumps(body).encode() if body is not None else b""
        h = {"Host": LOOPBACK, "Connection": "close", "Content-Length": str(len(data))}
        h.update(headers or {})
        head = "%s %s HTTP/1.1\r\n" % (method or ("POST" if body is not None else "GET"), path)
        head += "".join("%s: %s\r\n" % kv for kv in h.items()) + "\r\n"
        with socket.create_connection((LOOPBACK, port or self.odd.port), timeout=10) as s:
            s.sendall(head.encode() + data)
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return out
                out += chunk

    def test_modes(self):
        body = chat_body("one two", model="odd-model", stream=True)
        out = self.raw("/crlf,http10/v1/chat/completions", body)
        self.assertTrue(out.startswith(b"HTTP/1.0 200 OK\r\n"), out[:200])
        head, payload = out.split(b"\r\n\r\n", 1)
        self.assertNotIn(b"Content-Length", head)
        self.assertNotIn(b"chunked", head)
        self.assertIn(b"x-request-id: odd-odd-", head)
        self.assertTrue(payload.endswith(b"data: [DONE]\r\n\r\n"), payload[-100:])
        self.assertNotIn(b"\n\n", payload.replace(b"\r\n", b""))
        rec = self.odd.last_chat(10 * SLOW)
        self.assertEqual(rec["modes"], ["crlf", "http10"])
        self.assertEqual(answer_of(rec), payload)

        out = self.raw("/v1/chat/completions", dict(body, odd=["cr", "cut-mid-event"]))
        payload = out.split(b"\r\n\r\n", 1)[1]
        self.assertTrue(payload.endswith(b"0\r\n\r\n"), payload[-50:])
        plain = answer_of(self.odd.last_chat(10 * SLOW))
        self.assertNotIn(b"\n", plain)
        self.assertEqual(plain.count(b"\r\r"), 2, plain)
        self.assertFalse(plain.endswith(b"\r"), plain)

        out = self.raw("/v1/chat/completions", dict(body, odd={"modes": "pad,ping", "pings": 50, "ping_sec": 0.1}))
        plain = answer_of(self.odd.last_chat(10 * SLOW))
        self.assertEqual(plain.count(b": ping\n\n"), 50)
        pad = [e for e in plain.split(b"\n\n") if e.startswith(b": x")]
        self.assertEqual((len(pad), len(pad[0]) + 2), (40, 1024))

        out = self.raw("/v1/chat/completions", dict(body, odd="bogus"))
        self.assertTrue(out.startswith(b"HTTP/1.1 400"), out[:100])

    def test_gzip(self):
        body = chat_body("hi", model="odd-model", stream=True)
        out = self.raw("/gzip/v1/chat/completions", body)
        self.assertNotIn(b"Content-Encoding", out.split(b"\r\n\r\n")[0])
        c = http.client.HTTPConnection(LOOPBACK, self.odd.port, timeout=10)
        c.request("POST", "/gzip/v1/chat/completions", json.dumps(body), {"Accept-Encoding": "gzip;q=0.5"})
        r = c.getresponse()
        self.assertEqual(r.getheader("Content-Encoding"), "gzip")
        got = gzip.decompress(r.read())
        # The provider notes what it sent once the last chunk is out, which may be after we read it.
        wait_until(lambda: "answer_b64" in self.odd.chats()[-1], 10 * SLOW, what="the provider's record")
        self.assertEqual(got, answer_of(self.odd.last_chat(10 * SLOW)))
        c.request("POST", "/gzip-always/v1/chat/completions", json.dumps(chat_body("hi")),
                  {"Accept-Encoding": "identity"})
        r = c.getresponse()
        self.assertEqual(r.getheader("Content-Encoding"), "gzip")
        self.assertEqual(json.loads(gzip.decompress(r.read()))["choices"][0]["message"]["content"], "odd: hi")
        c.close()
        self.assertTrue(gzip_allowed("br, gzip"))
        self.assertFalse(gzip_allowed("gzip;q=0, br"))
        self.assertTrue(gzip_allowed("*"))
        self.assertFalse(gzip_allowed(None))

    def test_cut_and_probe_modes(self):
        body = chat_body("a b c", model="odd-model", stream=True, stream_options={"include_usage": True})
        for modes, check in (
                ("", lambda d: d[-1] == b"[DONE]" and b'"usage"' in d[-2]),
                ("no-done", lambda d: d[-1] != b"[DONE]" and b'"finish_reason": "stop"' in d[-2]),
                ("no-usage", lambda d: d[-1] == b"[DONE]" and not any(b'"usage"' in x for x in d)),
                ("cut", lambda d: len(d) == 2 and not any(b'"finish_reason": "' in x for x in d))):
            self.raw("/%s/v1/chat/completions" % modes if modes else "/v1/chat/completions", body)
            plain = answer_of(self.odd.last_chat(10 * SLOW))
            datas = [e[6:] for e in plain.split(b"\n\n") if e.startswith(b"data: ")]
            self.assertTrue(check(datas), (modes, plain))
        tools = chat_body("weather?", model="odd-model", stream=True,
                          tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}])
        for modes, n, indexed in (("", 4, True), ("tool-args-one-chunk", 1, True), ("tool-no-index", 4, False)):
            self.raw("/v1/chat/completions", dict(tools, odd=modes))
            chunks = [json.loads(e[6:]) for e in answer_of(self.odd.last_chat(10 * SLOW)).split(b"\n\n")
                      if e.startswith(b"data: {")]
            calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
                     if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
            self.assertEqual(len(calls), n, (modes, calls))
            self.assertEqual(all("index" in c for c in calls), indexed, (modes, calls))
            self.assertEqual(json.loads("".join(c["function"]["arguments"] for c in calls))["unit"], "celsius")

    def test_models(self):
        out = self.raw("/v1/models")
        entry = json.loads(out.split(b"\r\n\r\n", 1)[1])["data"][0]
        self.assertEqual(entry["id"], "odd-model")
        for k in ("created", "owned_by", "context_length", "meta"):
            self.assertIn(k, entry)
        out = self.raw("/models-401/v1/models")
        self.assertTrue(out.startswith(b"HTTP/1.1 401"), out[:100])
        self.assertEqual(json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"], "invalid_api_key")
        out = self.raw("/models-missing/v1/models")
        self.assertNotIn(b'"odd-model"', out)
        out = self.raw("/v1/models/odd-model")
        self.assertIn(b'"owned_by"', out)

    def test_records_and_process(self):
        self.raw("/v1/chat/completions", chat_body("x"), headers={"X-Custom": "Yes"})
        r = json.loads(self.raw("/_odd/requests").split(b"\r\n\r\n", 1)[1])
        self.assertEqual(r[-1]["method"], "POST")
        self.assertIn(["X-Custom", "Yes"], r[-1]["headers"])
        self.assertEqual(json.loads(r[-1]["body"])["messages"][0]["content"], "x")
        d = tempfile.mkdtemp(prefix="odd-process-")
        self.addCleanup(shutil.rmtree, d, True)
        p = OddProviderProcess(d, name="proc", modes=["no-done", "models-missing"])
        try:
            out = self.raw("/v1/models", port=p.port)
            self.assertIn(b"odd-unlisted-model", out)
        finally:
            self.assertEqual(p.stop(), 0, p.log())

    def test_tls_and_proxy(self):
        pki = self.pki()
        tls = self.start_odd("tls", tls=pki.server_tls(require_client_cert=True))
        proxy = self.start_proxy()
        ctx = ssl.create_default_context(cafile=pki.ca_cert)
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
        c = http.client.HTTPSConnection(LOOPBACK, proxy.port, timeout=10, context=ctx)
        c.set_tunnel(LOOPBACK, tls.port)
        c.request("GET", "/v1/models")
        r = c.getresponse()
        self.assertEqual(r.status, 200)
        r.read()
        # A stream through the tunnel, on the same connection, comes event by event. comes event by event.
        c.request("POST", "/v1/chat/completions", json.dumps(chat_body(stream=True, odd={"delay_ms": 200})))
        r = c.getresponse()
        times, buf = [], b""
        while True:
            chunk = r.read1(65536)
            if not chunk:
                break
            got, buf = split_events(buf + chunk)
            times += [time.monotonic()] * len(got)
        c.close()
        self.assertGreaterEqual(len(times), 5)
        self.assertGreaterEqual(times[2] - times[0], 0.3, times)
        self.assertEqual(proxy.connects(), ["%s:%d" % (LOOPBACK, tls.port)])
        self.assertEqual(tls.requests()[-1]["tls_client"]["commonName"], "provider-router test client")
        # Without a client certificate the handshake fails.
        bare = ssl.create_default_context(cafile=pki.ca_cert)
        with self.assertRaises((ssl.SSLError, ConnectionError)):
            c = http.client.HTTPSConnection(LOOPBACK, tls.port, timeout=10, context=bare)
            c.request("GET", "/v1/models")
            c.getresponse().read()
        c.close()
        # Plain forwarding.
        c = http.client.HTTPConnection(LOOPBACK, proxy.port, timeout=10)
        c.request("GET", self.odd.base_url + "/models")
        r = c.getresponse()
        self.assertEqual((r.status, r.getheader("Connection")), (200, "close"))
        r.read()
        c.close()
        self.assertEqual(proxy.forwards(), [self.odd.base_url + "/models"])


# --- relays through the router ---------------------------------------------------------------------

class RelayTest(OddCase):
    """One router over one odd provider for the whole class; each test picks its modes with the
    "odd" member of the body, which the router passes through untouched."""

    @classmethod
    def setUpClass(cls):
        cls.odd = OddProvider("odd", ["odd-model"])
        try:
            # First-byte deadline 5 s: the comment tests must finish well before it.
            cls.router = Router(lambda port: router_config(port, {"odd": {
                "BaseURL": cls.odd.base_url, "FirstByteTimeoutSec": "5", "StreamIdleTimeoutSec": "10",
                "RequestTimeoutSec": "30"}}, default="odd"), env={k: None for k in PROXY_VARS})
        except Exception:
            dump_logs()
            cls.odd.close()
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            cls.router.assert_clean_exit()
        finally:
            cls.odd.close()

    def setUp(self):
        self._procs.append(self.router)

    def chat(self, odd=None, content="hello there", stream=False, headers=None, **extra):
        body = chat_body(content, model="odd-model", stream=stream, **extra)
        if odd is not None:
            body["odd"] = odd
        if stream:
            return self.router.stream(body, headers=headers)
        return self.router.chat(body, headers=headers)

    def last(self):
        # The provider notes what it sent once its last byte is out, which may be just after the
        # client read it.
        return wait_until(lambda: (lambda c: c if c and "answer_b64" in c[-1] else None)(self.odd.chats()),
                          10 * SLOW, what="the provider's record of its answer")[-1]

    def provider_data_events(self):
        return data_events(answer_of(self.last()))

    # item 1 -------------------------------------------------------------------------------------

    def test_gzip_answer_decoded(self):
        before = self.metrics(self.router)
        r = self.chat("gzip-always")
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Content-Encoding"), r)
        self.assertEqual(r.body, answer_of(self.last()))
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "odd: hello there")
        after = self.metrics(self.router)
        key = 'provider_router_tokens_total{provider="odd",type="completion"}'
        self.assertEqual(after[key] - before.get(key, 0), r.json()["usage"]["completion_tokens"])

    def test_gzip_when_client_accepts_it(self):
        # The provider compresses only when asked: whatever the router asks, the client gets a
        # plain answer it can read.
        r = self.chat("gzip", headers={"Accept-Encoding": "gzip"})
        self.assertEqual(r.status, 200, r)
        self.assertIsNone(r.header("Content-Encoding"), r)
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "odd: hello there")
        s = self.chat("gzip", stream=True, headers={"Accept-Encoding": "gzip"})
        self.assertEqual((s.status, s.header("Content-Encoding")), (200, None), s.raw[:200])
        self.assertEqual(s.content(), "odd: hello there")
        self.assertTrue(s.done() and s.complete)

    def test_gzip_stream_decoded_event_by_event(self):
        before = self.metrics(self.router)
        s = self.chat({"modes": "gzip-always", "delay_ms": 300}, stream=True,
                      stream_options={"include_usage": True})
        self.assertEqual(s.status, 200, s.raw[:200])
        self.assertIsNone(s.header("Content-Encoding"))
        self.assertTrue(s.header("Content-Type").startswith("text/event-stream"))
        self.assertEqual(s.raw, answer_of(self.last()))
        self.assertEqual(s.content(), "odd: hello there")
        self.assertTrue(s.done() and s.complete)
        self.assert_events_spread(s, 0.4)
        after = self.metrics(self.router)
        key = 'provider_router_tokens_total{provider="odd",type="completion"}'
        self.assertEqual(after[key] - before.get(key, 0), s.json_chunks()[-1]["usage"]["completion_tokens"])

    def test_gzip_corrupt_answer_is_a_502(self):
        r = self.chat("gzip-corrupt")
        err = self.assert_error(r, 502, "connection_error", provider="odd")
        self.assertIn("odd", err["message"])
        self.assert_still_serves(self.router)

    def test_gzip_corrupt_stream_ends_with_error_event(self):
        before = self.stream_errors(self.router, "odd")
        s = self.chat({"modes": "gzip-corrupt", "delay_ms": 100}, stream=True)
        self.assertEqual(s.status, 200, s.raw[:300])
        self.assertIsNone(s.header("Content-Encoding"))
        got = data_events(s.raw)
        # The first event as sent, decoded; then the router's error event, never gzip bytes.
        self.assertEqual(got[0], self.provider_data_events()[0], s.raw)
        self.assertEqual(len(got), 2, s.raw)
        err = json.loads(got[1][5:])["error"]
        self.assertEqual(err.get("provider"), "odd", err)
        self.assertFalse(s.done())
        self.assertEqual(self.stream_errors(self.router, "odd") - before, 1)
        self.assert_still_serves(self.router)

    # item 6 -------------------------------------------------------------------------------------

    def assert_cut_reported(self, modes):
        before = self.stream_errors(self.router, "odd")
        s = self.chat(modes, stream=True)
        self.assertEqual((s.status, s.header("X-Provider")), (200, "odd"), s.raw)
        self.assertTrue(s.complete, "the client's chunked body must end properly")
        sent = self.provider_data_events()
        got = data_events(s.raw)
        # The two whole events as sent, then one error event; never half an event.
        self.assertEqual(got[:2], sent[:2], s.raw)
        self.assertEqual(len(got), 3, s.raw)
        self.assertTrue(got[2].startswith(b"data: {"), got[2])
        err = json.loads(got[2][5:])["error"]
        self.assertIsInstance(err.get("message"), str, err)
        self.assertIsInstance(err.get("type"), str, err)
        self.assertEqual(err.get("provider"), "odd", err)
        self.assertTrue(s.raw.endswith(b"\n\n"), s.raw[-80:])
        self.assertFalse(s.done())
        for ev in got:
            json.loads(ev[5:])  # whole JSON, every one
        # Counted as the provider's failure, and logged as one.
        self.assertEqual(self.stream_errors(self.router, "odd") - before, 1)
        rid = s.header("X-Request-Id")
        lines = [line for line in self.router.log(0).splitlines() if "id=%s" % rid in line]
        self.assertTrue(lines, "no log line for %s" % rid)
        self.assertIn("id=%s: " % rid, lines[-1], "logged as a success: %s" % lines[-1])
        self.assert_still_serves(self.router)

    def test_clean_cut_chunked(self):
        self.assert_cut_reported("cut")

    def test_clean_cut_mid_event_chunked(self):
        self.assert_cut_reported("cut-mid-event")

    def test_clean_cut_close_delimited(self):
        self.assert_cut_reported("cut,http10")

    def test_clean_cut_mid_event_close_delimited(self):
        self.assert_cut_reported("cut-mid-event,http10")

    def test_finished_stream_without_done_is_not_an_error(self):
        # A finish_reason ends the answer; a missing [DONE] is the provider's habit, not a cut.
        before = self.stream_errors(self.router, "odd")
        s = self.chat("no-done", stream=True)
        self.assertEqual(s.status, 200)
        self.assertEqual(s.raw, answer_of(self.last()))
        self.assertFalse(s.done())
        self.assertEqual(self.stream_errors(self.router, "odd"), before)

    # item 7 -------------------------------------------------------------------------------------

    def assert_comments_do_not_stall(self, odd, limit):
        start = time.monotonic()
        s = self.chat(odd, stream=True)
        elapsed = time.monotonic() - start
        self.assertEqual(s.status, 200, s.raw[:300])
        self.assertEqual(s.content(), "odd: hello there")
        self.assertTrue(s.done() and s.complete)
        self.assertEqual(data_events(s.raw), self.provider_data_events())
        self.assertLess(elapsed, limit, "stalled: %.1f s (first-byte deadline 5 s)" % elapsed)

    def test_padding_comments_do_not_stall(self):
        self.assert_comments_do_not_stall("pad", 2.5 * SLOW)

    def test_ping_comments_do_not_stall(self):
        self.assert_comments_do_not_stall("ping", 1.0 + 2.0 * SLOW)

    def test_few_comments_relayed(self):
        # Below the buffer: a few pings before the first event are fine today, and stay so.
        s = self.chat({"modes": "ping", "pings": 20, "ping_sec": 0.2}, stream=True)
        self.assertEqual(s.status, 200)
        self.assertEqual(data_events(s.raw), self.provider_data_events())

    # odd but legal ------------------------------------------------------------------------------

    def test_crlf_stream_relayed_byte_for_byte(self):
        s = self.chat({"modes": "crlf", "delay_ms": 200}, stream=True)
        self.assertEqual(s.status, 200)
        self.assertEqual(s.raw, answer_of(self.last()))
        self.assertIn(b"\r\n\r\n", s.raw)
        self.assert_events_spread(s, 0.25)

    def test_lone_cr_stream_relayed_byte_for_byte(self):
        s = self.chat({"modes": "cr", "delay_ms": 200}, stream=True)
        self.assertEqual(s.status, 200)
        self.assertEqual(s.raw, answer_of(self.last()))
        self.assertNotIn(b"\n", s.raw)
        self.assert_events_spread(s, 0.25)

    def test_close_delimited_answers_relayed_whole(self):
        for modes in ("http10", "eof", "close"):
            with self.subTest(modes=modes):
                r = self.chat(modes)
                self.assertEqual(r.status, 200, r)
                self.assertEqual(r.body, answer_of(self.last()))
                s = self.chat({"modes": modes, "delay_ms": 100}, stream=True)
                self.assertEqual(s.status, 200)
                self.assertEqual(s.raw, answer_of(self.last()))
                self.assertTrue(s.done() and s.complete)
                self.assertEqual(self.last()["modes"], [modes])
        self.assert_still_serves(self.router)

    def test_provider_request_id(self):
        for stream in (False, True):
            with self.subTest(stream=stream):
                r = self.chat(stream=stream)
                self.assertEqual(r.status, 200)
                self.assertEqual(r.header("X-Provider-Request-Id"), "odd-odd-%d" % self.last()["id"])
                self.assertTrue(r.header("X-Request-Id"))
                self.assertFalse(r.header("X-Request-Id").startswith("odd-"), r.header("X-Request-Id"))


    # item 2 -------------------------------------------------------------------------------------

    def raw_chat(self, header_lines, body):
        """POST /v1/chat/completions with exactly these header lines (duplicates and empty values
        included); returns (status, {lower-case name: value}, body)."""
        data = json.dumps(body).encode()
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\n" % (LOOPBACK, self.router.port)
        head += "".join("%s: %s\r\n" % kv for kv in header_lines)
        head += "Content-Length: %d\r\n\r\n" % len(data)
        with socket.create_connection((LOOPBACK, self.router.port), timeout=10 * SLOW) as sock:
            sock.sendall(head.encode() + data)
            f = sock.makefile("rb")
            r = http.client.HTTPResponse(sock)
            r.begin()
            payload = r.read()
            f.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, payload

    def received(self, record):
        return [(k.lower(), v) for k, v in record["headers"]]

    def test_client_headers_reach_provider(self):
        end_to_end = [
            ("User-Agent", "relay-client/1.0"), ("Accept", "application/json"), ("Accept-Language", "fr-CH"),
            ("OpenAI-Organization", "org-relay"), ("OpenAI-Project", "proj_relay"),
            ("OpenAI-Beta", "assistants=v2"), ("X-Title", "relay test"),
            ("HTTP-Referer", "https://example.invalid/app"), ("x-stainless-lang", "js"),
            ("X-Dup", "one"), ("X-Dup", "two"), ("X-Empty", ""),
            ("Content-Type", "application/json; charset=utf-8"), ("Authorization", "Bearer sk-client"),
        ]
        hop_or_router = [
            ("Connection", "keep-alive, X-Hop"), ("X-Hop", "named in Connection"), ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"), ("Trailer", "X-Checksum"), ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
            ("Proxy-Connection", "keep-alive"), ("Accept-Encoding", "x-unheard-of"), ("X-Provider", "odd"),
            ("X-Compare", "odd"), ("X-Request-Id", "client-chosen-id"),
        ]
        for stream in (False, True):
            with self.subTest(stream=stream):
                before = len(self.odd.chats())
                body = chat_body("headers", model="odd-model", stream=stream)
                status, headers, payload = self.raw_chat(end_to_end + hop_or_router, body)
                self.assertEqual(status, 200, payload[:300])
                self.last()
                # X-Compare made the router ask the provider a second time, on its own behalf:
                # the client's request is the one with its User-Agent.
                mine = [r for r in self.odd.chats()[before:]
                        if ("user-agent", "relay-client/1.0") in self.received(r)]
                self.assertEqual(len(mine), 1, self.odd.chats()[before:])
                got = self.received(mine[0])
                names = [k for k, _ in got]
                # Every end-to-end header as sent, in order, duplicates and empty values included.
                self.assertEqual([kv for kv in got if kv[0] in {k.lower() for k, _ in end_to_end}],
                                 [(k.lower(), v) for k, v in end_to_end], got)
                for name in ("x-hop", "keep-alive", "te", "trailer", "proxy-authorization", "proxy-connection",
                             "x-provider", "x-compare", "connection"):
                    self.assertNotIn(name, names, got)
                self.assertEqual(names.count("host"), 1)
                self.assertEqual(dict(got)["host"], "%s:%d" % (LOOPBACK, self.odd.port))
                self.assertNotEqual(dict(got).get("accept-encoding"), "x-unheard-of", got)
                self.assertIn("gzip", dict(got)["accept-encoding"])
                # The router's request id (which keeps a valid one of the client's).
                self.assertEqual([v for k, v in got if k == "x-request-id"], [headers["x-request-id"]])
        self.assert_still_serves(self.router)

    def test_router_defaults_when_client_sends_none(self):
        for stream, accept in ((False, "application/json"), (True, "text/event-stream")):
            with self.subTest(stream=stream):
                # Content-Type the client must send (issue 11.1: a POST that is not JSON is a 415).
                status, _, payload = self.raw_chat([("Content-Type", "application/json")],
                                                   chat_body("bare", model="odd-model", stream=stream))
                self.assertEqual(status, 200, payload[:300])
                got = dict(self.received(self.last()))
                self.assertTrue(got["user-agent"].startswith("provider-router/"), got)
                self.assertEqual(got["accept"], accept)
                self.assertEqual(got["content-type"], "application/json")
                self.assertNotIn("authorization", got)

    def test_many_client_headers(self):
        # As many as the router's head limit lets in: all of them arrive.
        lines = [("X-Many-%03d" % i, "v%d" % i) for i in range(300)]
        status, _, payload = self.raw_chat([("Content-Type", "application/json")] + lines,
                                           chat_body("many", model="odd-model"))
        self.assertEqual(status, 200, payload[:300])
        got = [kv for kv in self.received(self.last()) if kv[0].startswith("x-many-")]
        self.assertEqual(got, [(k.lower(), v) for k, v in lines])


class AnyEndpointTest(OddCase):
    """Item 11: every POST /v1/… whose body names a model is routed like chat."""

    @classmethod
    def setUpClass(cls):
        cls.odd = OddProvider("odd", ["odd-model"])
        try:
            cls.router = Router(lambda port: router_config(port, {"odd": cls.odd.base_url}, default="odd",
                                                           router={"MaxBodySize": "64K"}),
                                env={k: None for k in PROXY_VARS})
        except Exception:
            dump_logs()
            cls.odd.close()
            raise

    @classmethod
    def tearDownClass(cls):
        try:
            cls.router.assert_clean_exit()
        finally:
            cls.odd.close()

    def setUp(self):
        self._procs.append(self.router)

    def paths(self):
        return [r["path"] for r in self.odd.requests()]

    def test_responses(self):
        r = self.router.request("POST", "/v1/responses", body={"model": "odd-model", "input": "hi there"})
        self.assertEqual((r.status, r.header("X-Provider")), (200, "odd"), r)
        self.assertEqual(r.json()["output"][0]["content"][0]["text"], "odd: hi there")
        self.assertEqual(r.header("X-Provider-Request-Id"), "odd-odd-%d" % self.odd.requests()[-1]["id"])
        self.assertEqual(self.paths()[-1], "/v1/responses")

    def test_responses_stream_event_by_event(self):
        s = stream_request(self.router.port, "/v1/responses",
                           {"model": "odd-model", "input": "one two three four", "stream": True,
                            "odd": {"delay_ms": 250, "events": 4}})
        self.assertEqual((s.status, s.header("X-Provider")), (200, "odd"), s.raw[:300])
        self.assertTrue(s.header("Content-Type").startswith("text/event-stream"))
        self.assertTrue(s.complete)
        # Ends with response.completed, no [DONE], and that is a complete answer, not a cut one.
        self.assertIn(b"event: response.completed", s.events[-1][1])
        self.assertNotIn(b"[DONE]", s.raw)
        self.assertNotIn(b'"error"', s.raw)
        times = [t for t, ev in s.events if b"output_text.delta" in ev]
        self.assertGreaterEqual(len(times), 4, s.raw)
        self.assertGreaterEqual(times[-1] - times[0], 0.5, "events came together, not as sent")

    def test_other_paths_by_model(self):
        # Passed on under the provider's BaseURL, escaped again as it came.
        for path, sent in (("/v1/files/abc", "/v1/files/abc"), ("/v1/a%20b/c:d@e", "/v1/a%20b/c:d@e"),
                           ("/v1/audio/speech/", "/v1/audio/speech")):
            with self.subTest(path=path):
                r = self.router.request("POST", path, body={"model": "odd-model", "x": 1})
                # The odd provider has no such route: its own 404 comes back as it sent it.
                self.assertEqual((r.status, r.header("X-Provider")), (404, "odd"), r)
                self.assertIn("no route for POST", r.json()["error"]["message"])
                self.assertEqual(self.paths()[-1], sent)

    def test_unknown_paths_without_model_are_404(self):
        before = len(self.odd.requests())
        for method, path, body in (("POST", "/v1/responses", {"input": "no model"}),
                                   ("POST", "/v1/responses", b"{not json"),
                                   ("POST", "/v1/responses", {"model": None}),
                                   ("POST", "/v1/x", {"model": 42}),
                                   ("POST", "/v1/a/%2e%2e/b", {"model": "odd-model"}),
                                   ("POST", "/v1/a//b", {"model": "odd-model"}),
                                   ("POST", "/v1/./b", {"model": "odd-model"}),
                                   ("GET", "/v1/responses", None),
                                   ("POST", "/v2/responses", {"model": "odd-model"})):
            with self.subTest(method=method, path=path, body=body):
                r = self.router.request(method, path, body=body)
                self.assert_error(r, 404, "invalid_request_error", "Unknown path")
        self.assertEqual(len(self.odd.requests()), before, self.paths()[before:])
        self.assert_still_serves(self.router)

    def test_too_large_body_is_413(self):
        r = self.router.request("POST", "/v1/responses", body={"model": "odd-model", "input": "x" * 100000})
        self.assert_error(r, 413, "invalid_request_error", str(64 * 1024))
        self.assert_still_serves(self.router)


class ModelsTest(OddCase):
    """Item 3 (and the GET /v1/models/{id} of item 11): lists relayed as sent, merged without
    losing a field, HEAD without a fan-out, and a cache that keeps a few hundred providers from
    meaning a few hundred requests."""

    def direct(self, odd, path, headers=None):
        return http_request(odd.port, "GET", path, headers=headers)

    def test_one_provider_relayed_as_sent(self):
        odd, other = self.start_odd("odd", models=("odd-model", "shared")), self.start_odd("other")
        router = self.router_over({"odd": odd.base_url, "other": other.base_url}, mappings={"mapped": "odd"})
        r = router.request("GET", "/v1/models", headers={"X-Provider": "odd"})
        want = self.direct(odd, "/v1/models")
        self.assertEqual((r.status, r.header("X-Provider")), (200, "odd"), r)
        self.assertEqual(r.body, want.body)
        self.assertEqual(r.header("Content-Type"), want.header("Content-Type"))
        self.assertEqual(r.header("X-Odd-Provider"), "odd")
        # (the router's request was the first one the provider saw; the direct one the second)
        self.assertEqual(r.header("X-Provider-Request-Id"), "odd-odd-%d" % odd.requests()[0]["id"])
        # Nobody else was asked.
        self.assertEqual(other.requests(), [])
        # HEAD goes to that one provider as a HEAD.
        r = router.request("HEAD", "/v1/models", headers={"X-Provider": "odd"})
        self.assertEqual((r.status, r.body), (200, b""))
        self.assertEqual(odd.requests()[-1]["method"], "HEAD")
        self.assert_still_serves(router)

    def test_one_provider_errors(self):
        odd = self.start_odd("odd")
        closed = socket.socket()
        closed.bind((LOOPBACK, 0))
        port = closed.getsockname()[1]
        closed.close()
        router = self.router_over({"refusing": odd.url("models-401"), "gone": "http://%s:%d/v1" % (LOOPBACK, port)})
        r = router.request("GET", "/v1/models", headers={"X-Provider": "refusing"})
        want = self.direct(odd, "/models-401/v1/models")
        self.assertEqual((r.status, r.body), (401, want.body))
        self.assertEqual(r.json()["error"]["code"], "invalid_api_key")
        r = router.request("GET", "/v1/models", headers={"X-Provider": "gone"})
        self.assert_error(r, 502, "connection_error", provider="gone")
        r = router.request("GET", "/v1/models", headers={"X-Provider": "nobody"})
        self.assert_error(r, 400, "invalid_request_error", "nobody")
        self.assert_still_serves(router)

    def test_merged_keeps_every_field(self):
        first = self.start_odd("first", models=("first-model", "shared"))
        second = self.start_odd("second", models=("second-model", "shared"))
        router = self.router_over({"first": first.base_url, "second": {"BaseURL": second.base_url, "Models": "extra"}},
                                  mappings={"mapped": "second"}, keys={"ModelsCacheSec": "0"})
        r = router.request("GET", "/v1/models")
        self.assertEqual(r.status, 200, r)
        got = r.json()["data"]
        ids = [e["id"] for e in got]
        self.assertEqual(ids, ["first-model", "shared", "second-model", "extra", "echo", "mapped"])
        entries = {e["id"]: e for e in got}
        for odd, mid in ((first, "first-model"), (first, "shared"), (second, "second-model")):
            own = {e["id"]: e for e in self.direct(odd, "/v1/models").json()["data"]}[mid]
            self.assertEqual({k: v for k, v in entries[mid].items() if k != "provider"}, own)
            self.assertEqual(entries[mid]["provider"], odd.name)
        # The entries' bytes are the provider's: its spacing, its number formats.
        raw = self.direct(first, "/v1/models").body
        self.assertIn(raw[raw.index(b'{"id": "first-model"'):raw.index(b'}}', raw.index(b'first-model')) + 1], r.body)
        self.assertEqual(entries["extra"], {"id": "extra", "object": "model", "created": 0, "owned_by": "second",
                                            "provider": "second"})
        self.assertEqual(entries["mapped"]["provider"], "second")
        self.assert_still_serves(router)

    def test_head_merged_asks_nobody(self):
        odd = self.start_odd()
        router = self.router_over({"odd": odd.base_url}, keys={"ModelsCacheSec": "0"})
        r = router.request("HEAD", "/v1/models")
        self.assertEqual((r.status, r.body), (200, b""))
        self.assertTrue(r.header("Content-Type").startswith("application/json"))
        self.assertEqual(odd.requests(), [])
        self.assert_still_serves(router)

    def test_model_get(self):
        odd, other = self.start_odd("odd", models=("odd-model",)), self.start_odd("other", models=("other-model",))
        router = self.router_over({"odd": odd.base_url, "other": other.base_url}, default="odd",
                                  mappings={"other-model": "other"})
        # By the route of the model id, as the provider sent it.
        for path, provider, status in (("/v1/models/odd-model", "odd", 200), ("/v1/models/other-model", "other", 200),
                                       ("/v1/models/nope", "odd", 404), ("/v1/models/odd-model/", "odd", 200)):
            with self.subTest(path=path):
                r = router.request("GET", path)
                self.assertEqual((r.status, r.header("X-Provider")), (status, provider), r)
                prov = odd if provider == "odd" else other
                self.assertEqual(r.body, self.direct(prov, path.rstrip("/")).body)
        # X-Provider wins; the id is escaped again on the way.
        r = router.request("GET", "/v1/models/odd-model", headers={"X-Provider": "other"})
        self.assertEqual((r.status, r.header("X-Provider")), (404, "other"), r)
        r = router.request("GET", "/v1/models/a%20b:c%2Fd")
        self.assertEqual(r.status, 404, r)
        self.assertEqual(odd.requests()[-1]["path"], "/v1/models/a%20b:c/d")
        # Paths that would leave the provider's API never reach it.
        before = len(odd.requests())
        for path in ("/v1/models/a/../../admin", "/v1/models/.", "/v1/models/a//b"):
            r = router.request("GET", path)
            self.assert_error(r, 404, "invalid_request_error", "Unknown path")
        self.assertEqual(len(odd.requests()), before)
        r = router.request("GET", "/v1/models/x", headers={"X-Provider": "nobody"})
        self.assert_error(r, 400, "invalid_request_error", "nobody")
        self.assert_still_serves(router)


class ModelsCacheTest(OddCase):
    """Item 3: a few hundred providers on two servers; ModelsCacheSec=."""

    N = 300

    def providers(self, a, b, distinct=False, client_authorization=None):
        out = {}
        for i in range(self.N):
            odd = a if i % 2 == 0 else b
            # Distinct paths on the same server: nothing to share but the connections.
            out["p%03d" % i] = {"BaseURL": odd.url() if not distinct else "%s/p%03d/v1" % (odd.origin, i)}
            if client_authorization:
                out["p%03d" % i]["ClientAuthorization"] = client_authorization
        return out

    def list_requests(self, *odds):
        return [len([r for r in o.requests() if r["path"].endswith("/models")]) for o in odds]

    def test_same_server_asked_once_and_cached(self):
        a, b = self.start_odd("a", models=("a-model",)), self.start_odd("b", models=("b-model",))
        # The providers may be sent the client's key in the merged list (issue 11.2 forbids it
        # otherwise), to show what a client credential does to the cache.
        router = self.router_over(self.providers(a, b, client_authorization="always"), keys={"ModelsCacheSec": "30"})
        r = router.request("GET", "/v1/models")
        self.assertEqual(r.status, 200, r)
        self.assertEqual([e["id"] for e in r.json()["data"]][:2], ["a-model", "b-model"])
        # 300 providers, two answers: each server asked once.
        self.assertEqual(self.list_requests(a, b), [1, 1])
        # Then from the cache.
        r2 = router.request("GET", "/v1/models")
        self.assertEqual(r2.body, r.body)
        self.assertEqual(self.list_requests(a, b), [1, 1])
        # A list asked with the client's own credential is neither served from the cache nor kept.
        r3 = router.request("GET", "/v1/models", headers={"Authorization": "Bearer sk-client-own"})
        self.assertEqual(r3.status, 200, r3)
        self.assertEqual(self.list_requests(a, b), [2, 2])
        self.assertEqual(dict(map(tuple, a.requests()[-1]["headers"])).get("Authorization"), "Bearer sk-client-own")
        router.request("GET", "/v1/models")
        self.assertEqual(self.list_requests(a, b), [2, 2])
        # A reload empties it.
        router.send_signal(signal.SIGHUP)
        wait_until(lambda: "Configuration reloaded" in router.log(limit=None), 10 * SLOW, what="the reload")
        r4 = router.request("GET", "/v1/models")
        self.assertEqual(r4.body, r.body)
        self.assertEqual(self.list_requests(a, b), [3, 3])
        self.assert_still_serves(router)

    def test_distinct_lists_few_connections(self):
        a, b = self.start_odd("a", models=("a-model",)), self.start_odd("b", models=("b-model",))
        router = self.router_over(self.providers(a, b, distinct=True), keys={"ModelsCacheSec": "0"})
        for round in (1, 2):
            with self.subTest(round=round):
                a.reset()
                b.reset()
                r = router.request("GET", "/v1/models")
                self.assertEqual(r.status, 200, r)
                self.assertEqual(self.list_requests(a, b), [self.N // 2, self.N // 2])
                # 300 lists, at most 16 at a time, on connections that are kept and reused: a
                # handful of connections per server, not 150.
                for odd in (a, b):
                    c = odd.connections()
                    self.assertLessEqual(c["max_active"], 16, c)
                    self.assertLessEqual(c["accepted"], 16, c)
        self.assert_still_serves(router)

    def test_cache_expires(self):
        a = self.start_odd("a", models=("a-model",))
        router = self.router_over({"a": a.base_url}, keys={"ModelsCacheSec": "0.5"})
        router.request("GET", "/v1/models")
        router.request("GET", "/v1/models")
        self.assertEqual(self.list_requests(a), [1])
        time.sleep(0.7)
        router.request("GET", "/v1/models")
        self.assertEqual(self.list_requests(a), [2])

    def test_cache_off(self):
        a = self.start_odd("a", models=("a-model",))
        router = self.router_over({"a": a.base_url}, keys={"ModelsCacheSec": "0"})
        for _ in range(3):
            self.assertEqual(router.request("GET", "/v1/models").status, 200)
        self.assertEqual(self.list_requests(a), [3])

    def test_unanswered_lists_do_not_hold_up_every_request(self):
        a, hung = self.start_odd("a", models=("a-model",)), self.start_odd("hung")
        router = self.router_over({"a": a.base_url, "hung": {"BaseURL": hung.url("hang"), "RequestTimeoutSec": "1"}},
                                  keys={"ModelsCacheSec": "60"})
        r = router.request("GET", "/v1/models", timeout=30)
        self.assertEqual(r.status, 200, r)
        self.assertIn("a-model", [e["id"] for e in r.json()["data"]])
        start = time.monotonic()
        r = router.request("GET", "/v1/models")
        self.assertEqual(r.status, 200, r)
        self.assertLess(time.monotonic() - start, 1.0)
        self.assert_still_serves(router)


class ProviderRequestIdTest(OddCase):
    """Item 4: whose id the client gets when more than one provider was tried."""

    def test_id_of_the_provider_that_answered(self):
        first, second = self.start_odd("first"), self.start_odd("second")
        first.set_modes(options={"status": 503})
        router = self.router_over({"first": {"BaseURL": first.base_url, "Fallbacks": "second"},
                                   "second": second.base_url}, default="first")
        for stream in (False, True):
            with self.subTest(stream=stream):
                body = chat_body("which id", model="any", stream=stream)
                r = router.stream(body) if stream else router.chat(body)
                self.assertEqual((r.status, r.header("X-Provider"), r.header("X-Provider-Tried")),
                                 (200, "second", "first, second"))
                self.assertEqual(r.header("X-Provider-Request-Id"), "odd-second-%d" % second.chats()[-1]["id"])
                self.assertNotEqual(r.header("X-Request-Id"), r.header("X-Provider-Request-Id"))
        # The provider's own error, passed through, carries its id too.
        second.set_modes(options={"status": 429})
        r = router.chat(chat_body("which id", model="any"))
        self.assert_error(r, 429, "server_error")
        self.assertEqual(r.header("X-Provider-Request-Id"), "odd-second-%d" % second.chats()[-1]["id"])
        second.set_modes()
        self.assert_still_serves(router)

    def test_no_id_when_the_router_answers(self):
        hung = self.start_odd("hung")
        router = self.router_over({"hung": {"BaseURL": hung.url("hang"), "FirstByteTimeoutSec": "0.5"}},
                                  default="hung")
        r = router.chat(chat_body("x", model="any"))
        self.assert_error(r, 504, "timeout_error", provider="hung")
        self.assertIsNone(r.header("X-Provider-Request-Id"))
        self.assertTrue(r.header("X-Request-Id"))
        self.assert_still_serves(router)


class DefaultModelTest(OddCase):
    """Item 5: the DefaultModel= rewrite changes nothing but the model."""

    def test_model_inserted_byte_exact(self):
        odd = self.start_odd()
        router = self.router_over({"odd": {"BaseURL": odd.base_url, "DefaultModel": "odd-model"}}, default="odd")
        sent = (b'{ "messages" : [{"role":"user","content":"caf\\u00e9 \xc3\xa9"}],\n'
                b'  "seed":18446744073709551615, "temperature":0.7, "top_p":1e2, "n":1.0E0 }')
        for body, want in (
                (sent, b'{"model":"odd-model", "messages" : [{"role":"user","content":"caf\\u00e9 \xc3\xa9"}],\n'
                       b'  "seed":18446744073709551615, "temperature":0.7, "top_p":1e2, "n":1.0E0 }'),
                (b'{"model":null,"messages":[{"role":"user","content":"x"}],"t":0.70}',
                 b'{"model":"odd-model","messages":[{"role":"user","content":"x"}],"t":0.70}')):
            with self.subTest(body=body):
                r = http_request(router.port, "POST", "/v1/chat/completions", body=body,
                                 headers={"Content-Type": "application/json"})
                self.assertEqual(r.status, 200, r)
                self.assertEqual(base64.b64decode(odd.chats()[-1]["body_b64"]), want)
        # A client that names a model has its body passed untouched.
        body = b'{"model":"mine","messages":[],"seed":18446744073709551615}'
        r = http_request(router.port, "POST", "/v1/chat/completions", body=body,
                         headers={"Content-Type": "application/json"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(base64.b64decode(odd.chats()[-1]["body_b64"]), body)
        self.assert_still_serves(router)


# --- TLS and proxies ------------------------------------------------------------------------------

class TlsTest(OddCase):
    """Item 10: a provider behind a private CA, trusted only through CAFile=."""

    def setUp(self):
        self.pk = self.pki()
        self.tls = self.start_odd("tls", tls=self.pk.server_tls())

    def assert_tls_ok(self, router, provider="tls"):
        r = router.chat(chat_body("over tls", model="tls-model"))
        self.assertEqual((r.status, r.header("X-Provider")), (200, provider), r)
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "%s: over tls" % provider)
        s = router.stream(chat_body("over tls", model="tls-model", stream=True, odd={"delay_ms": 200}))
        self.assertEqual(s.status, 200, s.raw[:300])
        self.assertEqual(s.content(), "%s: over tls" % provider)
        self.assert_events_spread(s, 0.25)
        return r, s

    def test_untrusted_without_cafile_is_a_clear_502(self):
        router = self.router_over({"tls": self.tls.base_url})
        r = router.chat(chat_body())
        err = self.assert_error(r, 502, "connection_error", provider="tls")
        self.assertIn("certificate", err["message"].lower(), err)
        self.assertEqual(self.tls.chats(), [])
        self.assert_still_serves(router)

    def test_trusted_through_cafile(self):
        router = self.router_over({"tls": {"BaseURL": self.tls.base_url, "CAFile": self.pk.ca_cert}})
        self.assert_tls_ok(router)
        self.assertEqual(len(self.tls.chats()), 2)

    def test_cafile_of_another_ca_is_refused(self):
        router = self.router_over({"tls": {"BaseURL": self.tls.base_url, "CAFile": self.pk.other_ca_cert}})
        r = router.chat(chat_body())
        self.assert_error(r, 502, "connection_error", provider="tls")
        self.assertEqual(self.tls.chats(), [])
        self.assert_still_serves(router)

    def private_key_copy(self, mode=0o600):
        d = tempfile.mkdtemp(prefix="tls-key-")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "client.key")
        shutil.copyfile(self.pk.client_key, path)
        os.chmod(path, mode)
        return path

    def test_client_certificate_files(self):
        strict = self.start_odd("strict", tls=self.pk.server_tls(require_client_cert=True))
        router = self.router_over({"strict": {
            "BaseURL": strict.base_url, "CAFile": self.pk.ca_cert,
            "ClientCertificateFile": self.pk.client_cert, "ClientKeyFile": self.private_key_copy()}})
        self.assert_tls_ok(router, "strict")
        self.assertEqual(strict.chats()[-1]["tls_client"]["commonName"], "provider-router test client")

    def test_client_certificate_credentials(self):
        strict = self.start_odd("strict", tls=self.pk.server_tls(require_client_cert=True))
        creds = tempfile.mkdtemp(prefix="tls-creds-")
        self.addCleanup(shutil.rmtree, creds, True)
        shutil.copyfile(self.pk.client_cert, os.path.join(creds, "strict-cert"))
        shutil.copyfile(self.pk.client_key, os.path.join(creds, "strict-key"))
        os.chmod(os.path.join(creds, "strict-key"), 0o600)
        router = self.router_over({"strict": {
            "BaseURL": strict.base_url, "CAFile": self.pk.ca_cert,
            "ClientCertificateCredential": "strict-cert", "ClientKeyCredential": "strict-key"}},
            env={"CREDENTIALS_DIRECTORY": creds})
        self.assert_tls_ok(router, "strict")
        self.assertEqual(strict.chats()[-1]["tls_client"]["commonName"], "provider-router test client")

    def test_client_certificate_missing_is_a_502(self):
        strict = self.start_odd("strict", tls=self.pk.server_tls(require_client_cert=True))
        router = self.router_over({"strict": {"BaseURL": strict.base_url, "CAFile": self.pk.ca_cert}})
        r = router.chat(chat_body())
        self.assert_error(r, 502, "connection_error", provider="strict")
        self.assertEqual(strict.chats(), [])
        self.assert_still_serves(router)

    def test_per_provider_proxy_http(self):
        plain = self.start_odd("plain")
        proxy = self.start_proxy()
        router = self.router_over({"plain": {"BaseURL": plain.base_url, "Proxy": proxy.url}})
        self.assert_tls_ok(router, "plain")
        self.assertEqual(proxy.forwards(), [plain.base_url + "/chat/completions"] * 2)

    def test_per_provider_proxy_tls(self):
        proxy = self.start_proxy()
        router = self.router_over({"tls": {"BaseURL": self.tls.base_url, "CAFile": self.pk.ca_cert,
                                           "Proxy": proxy.url}})
        r, s = self.assert_tls_ok(router)
        self.assertEqual(set(proxy.connects()), {"%s:%d" % (LOOPBACK, self.tls.port)})
        self.assert_no_proxy_headers(r.headers)
        self.assert_no_proxy_headers(s.headers)

    def test_empty_proxy_overrides_environment(self):
        plain = self.start_odd("plain")
        proxy = self.start_proxy()
        router = self.router_over({"plain": {"BaseURL": plain.base_url, "Proxy": ""}},
                                  env=proxy_env(http=proxy.url))
        self.assert_tls_ok(router, "plain")
        self.assertEqual(proxy.log(), [])

    def check_config(self, spec):
        d = tempfile.mkdtemp(prefix="tls-config-")
        self.addCleanup(shutil.rmtree, d, True)
        path = os.path.join(d, "provider-router.conf")
        with open(path, "w") as f:
            f.write(router_config(8080, {"tls": dict({"BaseURL": self.tls.base_url}, **spec)}))
        return run_check_config(path)

    def test_check_config_refuses_bad_tls_keys(self):
        loose = self.private_key_copy(0o644)
        for key, value, needle in (
                ("CAFile", "/nonexistent/ca.pem", "/nonexistent/ca.pem"),
                ("Proxy", "not a url", "Proxy="),
                ("Proxy", "ftp://127.0.0.1:21", "Proxy="),
                ("ClientKeyFile", loose, "ClientKeyFile="),
                ("ClientCertificateFile", "/nonexistent/cert.pem", "/nonexistent/cert.pem")):
            with self.subTest(key=key, value=value):
                spec = {key: value}
                if key == "ClientKeyFile":
                    spec["ClientCertificateFile"] = self.pk.client_cert
                rc, out, err = self.check_config(spec)
                self.assertEqual(rc, 1, out + err)
                self.assertTrue(any(line.startswith("error:") and needle in line for line in err.splitlines()),
                                "%s not reported as an error:\n%s" % (needle, err))

    def test_check_config_accepts_tls_keys(self):
        rc, out, err = self.check_config({
            "CAFile": self.pk.ca_cert, "ClientCertificateFile": self.pk.client_cert,
            "ClientKeyFile": self.private_key_copy(), "Proxy": "http://127.0.0.1:3128"})
        self.assertEqual(rc, 0, out + err)
        self.assertNotIn("unknown key", err)
        rc, out, err = self.check_config({"Proxy": ""})
        self.assertEqual(rc, 0, out + err)
        self.assertNotIn("unknown key", err)


class EgressProxyTest(OddCase):
    """Item 9: the daemon behind an egress proxy named by its environment."""

    def setUp(self):
        self.proxy = self.start_proxy()

    def test_forward_proxy_stream_event_by_event(self):
        # http:// providers through http_proxy: the proxy forwards, no CONNECT is involved.
        odd = self.start_odd()
        router = self.router_over({"odd": odd.base_url}, env=proxy_env(http=self.proxy.url))
        s = router.stream(chat_body(model="odd-model", stream=True, odd={"delay_ms": 300}))
        self.assertEqual((s.status, s.header("X-Provider")), (200, "odd"), s.raw[:300])
        self.assertTrue(s.header("Content-Type").startswith("text/event-stream"))
        self.assertEqual(s.raw, answer_of(odd.last_chat(10 * SLOW)))
        self.assert_events_spread(s, 0.4)
        self.assertEqual(self.proxy.forwards(), [odd.base_url + "/chat/completions"])

    def test_connect_proxy_stream_event_by_event(self):
        pk = self.pki()
        tls = self.start_odd("tls", tls=pk.server_tls())
        router = self.router_over({"tls": {"BaseURL": tls.base_url, "CAFile": pk.ca_cert}},
                                  env=proxy_env(https=self.proxy.url))
        # 'close': the provider closes each connection, so each request opens a new tunnel (a
        # reused one has its CONNECT answer behind it).
        s = router.stream(chat_body(model="tls-model", stream=True, odd={"modes": "close", "delay_ms": 300}))
        self.assertEqual((s.status, s.header("X-Provider")), (200, "tls"), s.raw[:300])
        self.assertTrue(s.header("Content-Type").startswith("text/event-stream"), dict(s.headers.items()))
        self.assertEqual(s.header("X-Odd-Provider"), "tls")
        self.assert_no_proxy_headers(s.headers)
        self.assertEqual(s.raw, answer_of(tls.last_chat(10 * SLOW)))
        self.assert_events_spread(s, 0.4)
        r = router.chat(chat_body(model="tls-model", odd="close"))
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, answer_of(tls.last_chat(10 * SLOW)))
        self.assert_no_proxy_headers(r.headers)
        self.assertEqual(r.header("X-Odd-Provider"), "tls")
        self.assertEqual(self.proxy.connects(), ["%s:%d" % (LOOPBACK, tls.port)] * 2)

    def test_connect_proxy_first_byte_failover(self):
        pk = self.pki()
        tls = self.start_odd("tls", tls=pk.server_tls())
        plain = self.start_odd("plain")
        router = self.router_over({
            "tls": {"BaseURL": tls.url("hang"), "CAFile": pk.ca_cert, "Fallbacks": "plain",
                    "FirstByteTimeoutSec": "1", "RequestTimeoutSec": "6", "StreamIdleTimeoutSec": "6"},
            "plain": plain.base_url}, env=proxy_env(https=self.proxy.url))
        for stream in (False, True):
            with self.subTest(stream=stream):
                start = time.monotonic()
                body = chat_body(model="tls-model", stream=stream)
                r = router.stream(body) if stream else router.chat(body)
                elapsed = time.monotonic() - start
                self.assertEqual((r.status, r.header("X-Provider"), r.header("X-Provider-Tried")),
                                 (200, "plain", "tls, plain"))
                # The hung provider was reached through the tunnel, and given up after its
                # first-byte deadline, not its whole-request one.
                self.assertEqual(len(tls.chats()), 1 + stream)
                self.assertGreaterEqual(elapsed, 0.9)
                self.assertLess(elapsed, 1.0 + 2.0 * SLOW)
        self.assert_still_serves(router)


if __name__ == "__main__":
    main()
