#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Failures: every one answers with the right status and error body, carries X-Request-Id, and
leaves the daemon serving the next request."""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (SLOW, RawClient, SharedRouterTestCase, chat_body, closed_port,  # noqa: E402
                     main, wait_until)

MAX_BODY = 4096
DOWN_URL = "http://127.0.0.1:%d/v1" % closed_port()


class ErrorsTest(SharedRouterTestCase):
    router_keys = {"MaxBodySize": str(MAX_BODY)}

    @classmethod
    def extra_providers(cls):
        return {
            "down": {"BaseURL": DOWN_URL, "ConnectTimeoutSec": "5"},
            # The same mock as alpha, with a short total timeout.
            "slow": {"BaseURL": cls.alpha.base_url, "RequestTimeoutSec": "1"},
        }

    # --- provider unreachable / too slow ----------------------------------------------------

    def test_upstream_down_502(self):
        r = self.router.chat(chat_body(), headers={"X-Provider": "down"})
        self.assert_error(r, 502, "connection_error", "down", provider="down")
        self.assert_still_serves(self.router)
        self.assert_still_serves(self.router, self.alpha)

    def test_upstream_down_stream_502(self):
        # Nothing was sent yet, so even a stream gets a proper status, not a broken SSE answer.
        r = self.router.chat(chat_body(stream=True), headers={"X-Provider": "down"})
        self.assert_error(r, 502, "connection_error", provider="down")
        self.assert_still_serves(self.router)

    def test_hung_provider_504(self):
        start = time.monotonic()
        r = self.router.chat(chat_body(mock={"hang": True}), headers={"X-Provider": "slow"})
        elapsed = time.monotonic() - start
        self.assert_error(r, 504, "timeout_error", "slow", provider="slow")
        # RequestTimeoutSec=1: not before, and well before the default of 120 s.
        self.assertGreaterEqual(elapsed, 0.9, r)
        self.assertLess(elapsed, 30 * SLOW, r)
        # The router gave up the transfer: the mock sees its client go.
        self.alpha.wait_stat("hangs_aborted", 1)
        self.assert_still_serves(self.router)
        self.assert_still_serves(self.router, self.alpha)

    def test_hung_provider_stream_504(self):
        r = self.router.chat(chat_body(stream=True, mock={"hang": True}), headers={"X-Provider": "slow"})
        self.assert_error(r, 504, "timeout_error", provider="slow")
        self.alpha.wait_stat("hangs_aborted", 1)
        self.assert_still_serves(self.router)

    def test_slow_but_in_time(self):
        r = self.router.chat(chat_body(mock={"delay_ms": 300}), headers={"X-Provider": "slow"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("X-Provider"), "slow")

    def test_client_disconnect_while_provider_hangs(self):
        c = RawClient(self.router.port)
        c.send_request("POST", "/v1/chat/completions", chat_body(mock={"hang": True}))
        self.alpha.wait_stat("hangs", 1)
        self.assertEqual(self.alpha.stats()["hangs_aborted"], 0)
        hung_up = time.monotonic()
        c.close()
        self.alpha.wait_stat("hangs_aborted", 1, timeout=5)
        # Promptly: well before any timeout of the router (120 s here) would have fired.
        self.assertLess(time.monotonic() - hung_up, 5 * SLOW)
        wait_until(lambda: self.alpha.stats()["in_flight"] == 0, 5 * SLOW, what="mock in_flight == 0")
        self.assert_still_serves(self.router)
        self.assert_still_serves(self.router, self.alpha)

    def test_models_with_a_provider_down(self):
        r = self.router.request("GET", "/v1/models")
        self.assertEqual(r.status, 200, r)
        ids = [m["id"] for m in r.json()["data"]]
        self.assertIn("alpha-1", ids)
        self.assertIn("beta-1", ids)
        self.assert_still_serves(self.router)

    # --- bad requests ---------------------------------------------------------------------

    def test_body_too_large_content_length(self):
        body = chat_body("x" * (MAX_BODY * 2))
        r = self.router.chat(body)
        self.assert_error(r, 413, "invalid_request_error", str(MAX_BODY))
        self.assertEqual(self.alpha.stats()["chat"], 0)
        self.assert_still_serves(self.router)

    def test_body_too_large_chunked(self):
        c = RawClient(self.router.port)
        try:
            c.send_request("POST", "/v1/chat/completions", chat_body("y" * (MAX_BODY * 16)), chunked=True)
            status, headers = c.read_head()
            self.assertEqual(status, 413)
            self.assertTrue(headers.get("x-request-id"), headers)
            if headers.get("transfer-encoding") == "chunked":
                body, _ = c.read_chunked_body()
            else:
                n = int(headers["content-length"])
                while len(c.buf) < n:
                    c._fill()
                body = c.buf[:n]
            self.assertIn(b'"invalid_request_error"', body)
        finally:
            c.close()
        self.assertEqual(self.alpha.stats()["chat"], 0)
        self.assert_still_serves(self.router)

    def test_body_at_limit_is_fine(self):
        body = chat_body("")
        import json
        raw = json.dumps(body).encode()
        pad = MAX_BODY - len(raw) - len(', "pad": ""')
        body["pad"] = "p" * pad
        data = json.dumps(body).encode()
        self.assertEqual(len(data), MAX_BODY)
        r = self.router.chat(data)
        self.assertEqual(r.status, 200, r)

    def test_malformed_json_400(self):
        for bad in (b"{not json", b"", b"[1, 2, 3]", b'{"model": 42, "messages": []}',
                    b'{"model":"m","stream":"yes"}'):
            r = self.router.chat(bad)
            self.assert_error(r, 400, "invalid_request_error")
        self.assertEqual(self.alpha.stats()["chat"], 0)
        self.assert_still_serves(self.router)

    def test_unknown_provider_400(self):
        r = self.router.chat(chat_body(), headers={"X-Provider": "no-such-provider"})
        err = self.assert_error(r, 400, "invalid_request_error", "no-such-provider")
        for name in ("alpha", "beta", "down", "slow", "echo"):
            self.assertIn(name, err["message"])
        self.assertEqual(self.alpha.stats()["chat"] + self.beta.stats()["chat"], 0)
        self.assert_still_serves(self.router)

    def test_unknown_path_404(self):
        r = self.router.request("POST", "/v2/chat", body=chat_body())
        self.assert_error(r, 404, "invalid_request_error")
        self.assert_still_serves(self.router)

    # --- the provider's own errors ------------------------------------------------------------

    def test_provider_429_passed_through(self):
        body = '{"error":{"message":"Rate limit reached for requests","type":"requests","code":"rate_limit_exceeded"}}'
        r = self.router.chat(chat_body(mock={"status": 429, "body": body, "retry_after": 7}))
        self.assertEqual(r.status, 429, r)
        self.assertEqual(r.body, body.encode())
        self.assertEqual(r.header("X-Provider"), "alpha")
        self.assertTrue(r.header("X-Request-Id"))
        self.assertEqual(r.header("Retry-After"), "7")
        self.assert_still_serves(self.router, self.alpha)

    def test_provider_500_passed_through(self):
        body = {"error": {"message": "internal failure in the model server", "type": "server_error"}}
        r = self.router.chat(chat_body(mock={"status": 500, "body": body}), headers={"X-Provider": "beta"})
        self.assertEqual(r.status, 500, r)
        self.assertEqual(r.json(), body)
        self.assertEqual(r.header("X-Provider"), "beta")
        self.assertTrue(r.header("X-Request-Id"))
        self.assert_still_serves(self.router, self.beta)

    def test_provider_error_on_stream_passed_through(self):
        body = {"error": {"message": "model not loaded", "type": "invalid_request_error"}}
        r = self.router.chat(chat_body(stream=True, mock={"status": 404, "body": body}))
        self.assertEqual(r.status, 404, r)
        self.assertEqual(r.json(), body)
        self.assertEqual(r.header("X-Provider"), "alpha")
        self.assert_still_serves(self.router, self.alpha)

    def test_provider_plain_text_error(self):
        r = self.router.chat(chat_body(mock={"status": 503, "body": "upstream overloaded",
                                              "content_type": "text/plain"}))
        self.assertEqual(r.status, 503, r)
        self.assertEqual(r.body, b"upstream overloaded")
        self.assertTrue((r.header("Content-Type") or "").startswith("text/plain"), r)
        self.assert_still_serves(self.router)

    def test_provider_garbage_200(self):
        # Pass-through: the router does not rewrite a provider's 200, even one that is not JSON;
        # what matters is that it stays up.
        r = self.router.chat(chat_body(mock={"garbage": True}))
        self.assertIn(r.status, (200, 502), r)
        self.assertTrue(r.header("X-Request-Id"))
        self.assert_still_serves(self.router, self.alpha)

    def test_large_answer(self):
        r = self.router.chat(chat_body(mock={"size": 3 * 1024 * 1024}))
        self.assertEqual(r.status, 200, r)
        content = r.json()["choices"][0]["message"]["content"]
        self.assertGreaterEqual(len(content), 3 * 1024 * 1024)
        self.assertTrue(content.startswith("alpha: hello"))


if __name__ == "__main__":
    main()
