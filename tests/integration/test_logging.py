#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The request log cannot be blinded or forged by a client: a request with a 10 KB model name
gets its entry (the name cut and marked), and control characters in the model, the path or the
X-Provider header are escaped, never written as they are. Under the harness the daemon logs to
stderr; the journal entry itself is checked by tests/unit/test-log.c and tests/system/inside.sh."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SLOW, RouterTestCase, chat_body, main, router_config, wait_until  # noqa: E402


class RequestLogTest(RouterTestCase):

    def setUp(self):
        self.alpha = self.start_mock("alpha")
        self.router = self.start_router(lambda port: router_config(port, {"alpha": self.alpha.base_url}))

    def entry(self, request_id):
        """The request's log line, once the daemon has written it."""
        needle = " id=%s" % request_id
        found = []

        def logged():
            found[:] = [line for line in self.router.log(limit=None).splitlines() if needle in line]
            return bool(found)
        wait_until(logged, 10 * SLOW, what="the log line of request %s" % request_id)
        self.assertEqual(len(found), 1, found)
        return found[0]

    def assert_no_control_characters(self):
        log = self.router.log(limit=None)
        for ch in log:
            self.assertFalse(ord(ch) < 0x20 and ch != "\n" or ord(ch) == 0x7f,
                             "control character %r in the log" % ch)

    def test_ten_kilobyte_model_is_logged(self):
        model = "m" * 10240
        r = self.router.chat(chat_body("long model", model=model))
        self.assertEqual(r.status, 200, r)
        line = self.entry(r.header("X-Request-Id"))
        self.assertIn("model='%s…[cut %d bytes]'" % ("m" * 256, 10240 - 256), line)
        self.assertIn(" -> 200 in ", line)
        self.assertTrue(line.startswith("alpha POST '/v1/chat/completions' "), line)
        # The next request is logged as usual.
        r = self.router.chat(chat_body("next", model="short"))
        self.assertEqual(r.status, 200, r)
        self.assertIn("model='short'", self.entry(r.header("X-Request-Id")))
        self.assert_still_serves(self.router, self.alpha)

    def test_error_with_huge_model_is_logged(self):
        # An error entry carries the error text after the fields: it must not be pushed out.
        model = "x" * 20000
        r = self.router.chat(chat_body("to nowhere", model=model), headers={"X-Provider": "nobody"})
        self.assert_error(r, 400, "invalid_request_error")
        line = self.entry(r.header("X-Request-Id"))
        self.assertIn("…[cut %d bytes]'" % (20000 - 256), line)
        self.assertIn(" -> 400 in ", line)
        self.assertIn("Unknown provider 'nobody'", line)
        self.assert_still_serves(self.router)

    def test_control_characters_in_model_are_escaped(self):
        model = "evil\nalpha POST '/v1/chat/completions' model='forged' -> 200\r\x1b[2J\x1b]0;title\x07"
        r = self.router.chat(chat_body("x", model=model))
        self.assertEqual(r.status, 200, r)
        line = self.entry(r.header("X-Request-Id"))
        self.assertIn("model='evil\\nalpha POST \\'/v1/chat/completions\\' model=\\'forged\\' -> 200"
                      "\\r\\x1b[2J\\x1b]0;title\\x07'", line)
        log = self.router.log(limit=None)
        self.assertNotIn("\nalpha POST '/v1/chat/completions' model='forged'", log)
        self.assert_no_control_characters()
        self.assert_still_serves(self.router, self.alpha)

    def test_control_characters_in_x_provider_are_escaped(self):
        r = self.router.chat(chat_body("x"), headers={"X-Provider": "no\x1b[31mbody\x7f"})
        self.assert_error(r, 400, "invalid_request_error")
        line = self.entry(r.header("X-Request-Id"))
        self.assertIn("Unknown provider 'no\\x1b[31mbody\\x7f'", line)
        self.assert_no_control_characters()
        self.assert_still_serves(self.router)


if __name__ == "__main__":
    main()
