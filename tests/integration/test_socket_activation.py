#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The daemon under systemd-socket-activate: it serves on the socket it was handed (through
sd_listen_fds()) and binds nothing of its own."""

import os
import shutil
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (RawClient, RouterTestCase, _port_open, chat_body, free_port, main,  # noqa: E402
                     router_config)


@unittest.skipUnless(shutil.which("systemd-socket-activate"), "systemd-socket-activate not installed")
class SocketActivationTest(RouterTestCase):

    def test_socket_activated(self):
        alpha = self.start_mock("alpha")
        beta = self.start_mock("beta")
        config_port = free_port()
        # The file names another port: with a socket handed in, it must not be bound.
        config = router_config(config_port, {"alpha": alpha.base_url, "beta": beta.base_url})
        router = self.start_router(config, socket_activated=True)
        self.assertNotEqual(router.port, config_port)

        r = router.chat(chat_body("over the passed socket"))
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("X-Provider"), "alpha")
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "alpha: over the passed socket")

        s = router.stream(chat_body("streamed", stream=True, mock={"frames": 3, "frame_delay_ms": 50}),
                          headers={"X-Provider": "beta"})
        self.assertEqual(s.status, 200)
        self.assertTrue(s.done())
        self.assertEqual(s.content(), "beta: streamed")

        r = router.chat(chat_body(), headers={"X-Provider": "nope"})
        self.assert_error(r, 400, "invalid_request_error", "nope")
        self.assert_still_serves(router)

        # Several connections at once on the one passed socket.
        clients = [RawClient(router.port) for _ in range(4)]
        for i, c in enumerate(clients):
            c.send_request("POST", "/v1/chat/completions", chat_body("c%d" % i), headers={"Connection": "close"})
        for i, c in enumerate(clients):
            status, headers = c.read_head()
            self.assertEqual(status, 200)
            n = int(headers["content-length"])
            while len(c.buf) < n:
                c._fill()
            self.assertIn(b"alpha: c%d" % i, c.buf)
            c.close()

        self.assertFalse(_port_open(config_port), "the daemon bound Port= although a socket was passed")
        log = router.log()
        self.assertIn("socket activated", log)
        self.assertEqual(alpha.stats()["chat"], 5)


if __name__ == "__main__":
    main()
