#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Streaming: frames relayed as they come, bytes untouched, mid-stream failures, client
disconnects that cancel the upstream transfer, and back-pressure from a slow client."""

import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (SLOW, RawClient, SharedRouterTestCase, chat_body, main,  # noqa: E402
                     router_config, stream_request, wait_until)


class StreamingTest(SharedRouterTestCase):

    @classmethod
    def extra_providers(cls):
        return {
            # alpha again, with short timeouts: a silent stream is cut after 1 s, an answer
            # that has not started after 1 s too; a stream that keeps talking never is.
            "idle": {"BaseURL": cls.alpha.base_url, "StreamIdleTimeoutSec": "1", "RequestTimeoutSec": "1"},
        }

    def assert_stream_headers(self, s, provider):
        self.assertEqual(s.status, 200)
        self.assertTrue((s.header("Content-Type") or "").startswith("text/event-stream"), s.headers)
        self.assertEqual(s.header("X-Provider"), provider)
        self.assertTrue(s.header("X-Request-Id"))
        self.assertEqual(s.header("X-Accel-Buffering"), "no")

    def test_frames_arrive_before_upstream_finishes(self):
        frames, delay_ms = 6, 250
        seen = {}

        def on_event(t, ev):
            # When the first content frame is here, the provider is still producing: ordering,
            # not timing.
            if b'"content":"' in ev and b'"content":""' not in ev and "first" not in seen:
                seen["first"] = self.alpha.stats()
        s = self.router.stream(chat_body("one two three four five six", stream=True,
                                         mock={"frames": frames, "frame_delay_ms": delay_ms}),
                               on_event=on_event)
        self.assertEqual(seen["first"]["streams_completed"], 0, seen)
        self.assertEqual(seen["first"]["in_flight"], 1, seen)
        self.assert_stream_headers(s, "alpha")
        self.assertTrue(s.complete)
        self.assertTrue(s.done())
        self.assertEqual(s.content(), "alpha: one two three four five six")
        content_times = [t for t, ev in s.events if b'"content":"' in ev and b'"content":""' not in ev]
        self.assertEqual(len(content_times), frames, s.events)
        # The upstream needs about 1.5 s; the first frame must not wait for the last. Generous
        # bound: 0.5 s apart at least (nominally 1.25 s).
        self.assertGreaterEqual(content_times[-1] - content_times[0], 0.5,
                                [round(t - s.started, 3) for t in content_times])
        # And they trickle in: at least half of the gaps are visible.
        gaps = [b - a for a, b in zip(content_times, content_times[1:])]
        self.assertGreaterEqual(sum(1 for g in gaps if g >= 0.08), len(gaps) // 2, gaps)
        # The role delta came before the first content frame was even produced.
        first_event = s.events[0][0]
        self.assertLess(first_event, content_times[0], "role delta not before the first content")
        self.assertEqual(self.alpha.stats()["streams_completed"], 1)

    def test_stream_bytes_identical(self):
        """What the router relays is exactly what the provider sent, tool-call deltas included."""
        for mock in ({"tool_calls": True, "frame_delay_ms": 20}, {"frames": 7}, {"frames": 3, "size": 200000}):
            body = chat_body("weather in Z\u00fcrich?", stream=True, mock=mock)
            direct = stream_request(self.alpha.port, "/v1/chat/completions", body)
            relayed = self.router.stream(body)
            self.assertEqual(direct.status, 200)
            self.assert_stream_headers(relayed, "alpha")
            self.assertTrue(direct.complete and relayed.complete)
            self.assertEqual(relayed.raw, direct.raw, "stream differs for %s" % mock)

        # The tool call assembles as the mock sent it.
        relayed_tool = self.router.stream(chat_body("weather?", stream=True, mock={"tool_calls": True}))
        args, name, finish = "", None, None
        for c in relayed_tool.json_chunks():
            for ch in c["choices"]:
                for tc in (ch.get("delta") or {}).get("tool_calls") or []:
                    name = (tc.get("function") or {}).get("name") or name
                    args += (tc.get("function") or {}).get("arguments") or ""
                finish = ch.get("finish_reason") or finish
        self.assertEqual(name, "get_weather")
        self.assertEqual(json.loads(args), {"location": "Z\u00fcrich, CH", "unit": "celsius"})
        self.assertEqual(finish, "tool_calls")
        self.assertTrue(relayed_tool.done())

    def test_stream_through_mapping_and_header(self):
        s = self.router.stream(chat_body("hey", stream=True), headers={"X-Provider": "beta"})
        self.assert_stream_headers(s, "beta")
        self.assertEqual(s.content(), "beta: hey")
        s = self.router.stream(chat_body("hey", stream=True), headers={"X-Provider": "echo"})
        self.assertEqual(s.status, 200)
        self.assertEqual(s.header("X-Provider"), "echo")
        self.assertTrue(s.done())
        self.assertEqual(s.content(), "hey")

    def test_usage_chunk_relayed(self):
        s = self.router.stream(chat_body("count me", stream=True, stream_options={"include_usage": True}))
        usage = [c["usage"] for c in s.json_chunks() if c.get("usage")]
        self.assertEqual(len(usage), 1, s.raw)
        self.assertTrue(s.done())

    def test_midstream_drop_ends_with_error_event(self):
        s = self.router.stream(chat_body("a b c d e f", stream=True,
                                         mock={"frames": 6, "drop_after": 2, "frame_delay_ms": 50}))
        self.assert_stream_headers(s, "alpha")
        self.assertFalse(s.done(), "a stream that broke must not end with [DONE]: %r" % s.raw)
        data = s.data()
        self.assertGreaterEqual(len(data), 4, s.raw)
        # Whole events only: role, two content frames, then the error.
        chunks = [json.loads(d) for d in data]
        self.assertEqual(chunks[0]["choices"][0]["delta"].get("role"), "assistant")
        self.assertEqual(len([c for c in chunks if "choices" in c and c["choices"][0]["delta"].get("content")]), 2)
        err = chunks[-1].get("error")
        self.assertIsInstance(err, dict, s.raw)
        self.assertIn(err.get("type"), ("connection_error", "provider_error"), err)
        self.assertEqual(err.get("provider"), "alpha", err)
        self.assertTrue(err.get("message"), err)
        self.assertEqual(self.alpha.stats()["streams_dropped"], 1)
        self.assert_still_serves(self.router)
        self.assert_still_serves(self.router, self.alpha)

    def test_silent_stream_cut_by_idle_timeout(self):
        s = self.router.stream(chat_body("a b c", stream=True, mock={"frames": 3, "frame_delay_ms": 4000}),
                               headers={"X-Provider": "idle"})
        self.assert_stream_headers(s, "idle")
        self.assertFalse(s.done(), s.raw)
        err = s.json_chunks()[-1].get("error")
        self.assertIsInstance(err, dict, s.raw)
        self.assertEqual(err.get("type"), "timeout_error", err)
        self.assertEqual(err.get("provider"), "idle", err)
        # Cut after about a second of silence, long before the 12 s the provider would take.
        self.assertLess(s.ended - s.started, 8 * SLOW)
        self.alpha.wait_stat("streams_aborted", 1)
        self.assert_still_serves(self.router)

    def test_long_healthy_stream_not_cut(self):
        # 8 frames 0.4 s apart: 3.2 s in all, well past RequestTimeoutSec=1 and
        # StreamIdleTimeoutSec=1, but never silent for 1 s.
        s = self.router.stream(chat_body("one two three four five six seven eight", stream=True,
                                         mock={"frames": 8, "frame_delay_ms": 400}),
                               headers={"X-Provider": "idle"})
        self.assert_stream_headers(s, "idle")
        self.assertTrue(s.done(), s.raw)
        self.assertTrue(s.complete)
        self.assertEqual(s.content(), "alpha: one two three four five six seven eight")
        self.assertGreaterEqual(s.ended - s.started, 2.5)
        self.assertEqual(self.alpha.stats()["streams_completed"], 1)

    def test_concurrent_streams_do_not_mix(self):
        import threading
        results, errors = {}, []

        def one(i):
            provider = "alpha" if i % 2 == 0 else "beta"
            try:
                results[i] = (provider, self.router.stream(
                    chat_body("stream number %d" % i, stream=True, mock={"frames": 5, "frame_delay_ms": 60}),
                    headers={"X-Provider": provider}))
            except Exception as e:  # reported below
                errors.append(e)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60 * SLOW)
        self.assertEqual(errors, [])
        self.assertEqual(len(results), 8)
        for i, (provider, s) in results.items():
            self.assert_stream_headers(s, provider)
            self.assertTrue(s.done())
            self.assertEqual(s.content(), "%s: stream number %d" % (provider, i))
        self.assertEqual(self.alpha.stats()["streams_completed"], 4)
        self.assertEqual(self.beta.stats()["streams_completed"], 4)

    def test_client_disconnect_cancels_upstream(self):
        frames, delay_ms = 100, 100  # 10 s if left alone
        c = RawClient(self.router.port)
        c.send_request("POST", "/v1/chat/completions",
                       chat_body("go", stream=True, mock={"frames": frames, "frame_delay_ms": delay_ms}))
        status, headers = c.read_head()
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("x-provider"), "alpha")
        c.read_until(b'"content":"')
        self.assertEqual(self.alpha.stats()["streams_started"], 1)
        hung_up = time.monotonic()
        c.close()
        stats = self.alpha.wait_stat("streams_aborted", 1, timeout=5)
        self.assertLess(time.monotonic() - hung_up, 5 * SLOW)
        self.assertEqual(stats["streams_completed"], 0, stats)
        wait_until(lambda: self.alpha.stats()["in_flight"] == 0, 5 * SLOW, what="mock in_flight == 0")
        self.assert_still_serves(self.router)
        self.assert_still_serves(self.router, self.alpha)

    def test_client_reset_cancels_upstream(self):
        c = RawClient(self.router.port)
        c.send_request("POST", "/v1/chat/completions",
                       chat_body("go", stream=True, mock={"frames": 100, "frame_delay_ms": 100}))
        c.read_head()
        c.read_until(b'"content":"')
        c.close(reset=True)
        stats = self.alpha.wait_stat("streams_aborted", 1, timeout=5)
        self.assertEqual(stats["streams_completed"], 0, stats)
        self.assert_still_serves(self.router, self.alpha)

    def test_client_disconnect_before_first_frame(self):
        # The provider is slow to start: the client gives up while the router waits for headers.
        c = RawClient(self.router.port)
        c.send_request("POST", "/v1/chat/completions",
                       chat_body("go", stream=True, mock={"delay_ms": 10000}))
        wait_until(lambda: self.alpha.stats()["in_flight"] == 1, 5 * SLOW, what="mock in_flight == 1")
        c.close()
        wait_until(lambda: self.alpha.stats()["in_flight"] == 0, 5 * SLOW, what="mock in_flight == 0")
        self.assertEqual(self.alpha.stats()["streams_started"], 0)
        self.assert_still_serves(self.router, self.alpha)

    def test_slow_client_back_pressure(self):
        """A client that reads nothing must not make the router buffer the answer."""
        size = 48 * 1024 * 1024
        frames = 768                               # 64 KiB of content per frame
        baseline = self.router.rss_kib()
        c = RawClient(self.router.port, rcvbuf=64 * 1024, timeout=60)
        c.send_request("POST", "/v1/chat/completions",
                       chat_body("big", stream=True, mock={"frames": frames, "size": size}))
        self.alpha.wait_stat("streams_started", 1)
        # Read nothing for a while, sampling the router's memory.
        peak = baseline
        stall_end = time.monotonic() + 2.0 * SLOW
        while time.monotonic() < stall_end:
            peak = max(peak, self.router.rss_kib())
            time.sleep(0.05)
        stats = self.alpha.stats()
        # The provider is held back too: it has not been able to finish.
        self.assertEqual(stats["streams_completed"], 0, stats)
        growth_mib = (peak - baseline) / 1024.0
        sys.stderr.write("router RSS: %d KiB before, peak %d KiB while the client did not read\n" % (baseline, peak))
        self.assertLess(growth_mib, 16, "router RSS grew by %.1f MiB for a %d MiB answer nobody read"
                        % (growth_mib, size >> 20))

        # Now read it all: nothing was lost.
        status, headers = c.read_head()
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("x-provider"), "alpha")
        body, complete = c.read_chunked_body()
        c.close()
        self.assertTrue(complete)
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"), body[-200:])
        self.assertGreater(len(body), size)
        self.assertEqual(body.count(b'"content":"'), frames + 1)  # the role delta has content ""
        self.alpha.wait_stat("streams_completed", 1)
        self.assert_still_serves(self.router)

    def test_sigterm_lets_a_stream_finish(self):
        """Stopping waits for a stream in flight, then exits cleanly (checked at teardown)."""
        mock = self.start_mock("gamma")
        router = self.start_router(lambda port: router_config(port, {"gamma": mock.base_url}))
        c = RawClient(router.port)
        c.send_request("POST", "/v1/chat/completions",
                       chat_body("bye", stream=True, mock={"frames": 8, "frame_delay_ms": 100}))
        c.read_head()
        c.read_until(b'"content":"')
        router.send_signal(15)
        body, complete = c.read_chunked_body()
        c.close()
        self.assertTrue(complete)
        self.assertIn(b"data: [DONE]", body)
        wait_until(lambda: not router.alive(), 15 * SLOW, what="router to exit after the stream")


class HangUpTest(SharedRouterTestCase):
    """Issue 10.8: a client that half-closes its sending side (shutdown(SHUT_WR), as 'nc -N'
    does) still gets its whole answer; a client that leaves has its upstream transfer stopped
    promptly, before the answer and between two events alike."""

    # How soon after the client leaves the mock must see its transfer aborted: the router's
    # reaction plus the mock's own 50 ms poll.
    PROMPT = 0.15 * SLOW

    def half_closed(self, body):
        """Sends body, shuts down the sending side, reads to the end; returns (interim statuses,
        status, headers, body bytes, complete)."""
        c = RawClient(self.router.port)
        self.addCleanup(c.close)
        c.send_request("POST", "/v1/chat/completions", body)
        c.sock.shutdown(socket.SHUT_WR)
        interim = []
        while True:
            status, headers = c.read_head()
            if status >= 200:
                break
            interim.append(status)
        if headers.get("transfer-encoding") == "chunked":
            data, complete = c.read_chunked_body()
        else:
            n = int(headers.get("content-length", "0"))
            while len(c.buf) < n:
                c._fill()
            data, complete = c.buf[:n], True
        return interim, status, headers, data, complete

    def test_half_closed_gets_whole_answer(self):
        interim, status, headers, data, complete = self.half_closed(
            chat_body("patience please", mock={"delay_ms": 1500}))
        self.assertEqual((status, headers.get("x-provider")), (200, "alpha"))
        self.assertTrue(complete)
        self.assertEqual(json.loads(data)["choices"][0]["message"]["content"], "alpha: patience please")
        # The router probed the connection before the answer with an interim answer, which
        # HTTP/1.1 clients skip.
        self.assertLessEqual(set(interim), {100})
        self.assert_still_serves(self.router, self.alpha)

    def test_half_closed_gets_whole_stream(self):
        for mock in ({"delay_ms": 1200, "frames": 3}, {"frames": 4, "frame_delay_ms": 400}):
            with self.subTest(mock=mock):
                interim, status, headers, data, complete = self.half_closed(
                    chat_body("one two three four", stream=True, mock=mock))
                self.assertEqual(status, 200)
                self.assertTrue(complete, data[-200:])
                self.assertTrue(data.endswith(b"data: [DONE]\n\n"), data[-200:])
                text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                               for line in data.split(b"\n") if line.startswith(b"data: {"))
                self.assertEqual(text, "alpha: one two three four")
        self.assert_still_serves(self.router, self.alpha)

    def test_half_closed_mid_stream_gets_the_rest(self):
        c = RawClient(self.router.port)
        self.addCleanup(c.close)
        c.send_request("POST", "/v1/chat/completions",
                       chat_body("a b c d e", stream=True, mock={"frames": 5, "frame_delay_ms": 300}))
        status, _ = c.read_head()
        self.assertEqual(status, 200)
        c.read_until(b'"content":"')
        time.sleep(0.1)
        c.sock.shutdown(socket.SHUT_WR)
        data, complete = c.read_chunked_body()
        self.assertTrue(complete)
        self.assertTrue(data.endswith(b"data: [DONE]\n\n"), data[-200:])
        # Every event whole; what the router sent to probe the connection is an SSE comment
        # between two of them, which event-stream readers skip.
        events = data.split(b"\n\n")
        self.assertTrue(all(e.startswith(b"data: ") or e in (b":", b"") for e in events), data)
        self.assertEqual(self.alpha.stats()["streams_completed"], 1)
        self.assert_still_serves(self.router, self.alpha)

    def test_leaving_mid_stream_aborts_at_once(self):
        c = RawClient(self.router.port)
        c.send_request("POST", "/v1/chat/completions",
                       chat_body("go", stream=True, mock={"frames": 40, "frame_delay_ms": 500}))
        status, _ = c.read_head()
        self.assertEqual(status, 200)
        # A few events in (the router watches a parked connection after its first pause), then
        # away in the middle of a pause.
        for n in range(1, 4):
            c.read_until(b'"content":"' * 1)
            c.buf = c.buf[c.buf.index(b'"content":"') + 11:]
        time.sleep(0.2)
        left = time.monotonic()
        c.close()
        self.alpha.wait_stat("streams_aborted", 1, timeout=5)
        elapsed = time.monotonic() - left
        self.assertLess(elapsed, self.PROMPT, "upstream stopped %.3f s after the client left" % elapsed)
        self.assertEqual(self.alpha.stats()["streams_completed"], 0)
        self.assert_still_serves(self.router, self.alpha)

    def test_leaving_before_the_answer_aborts_at_once(self):
        for wait in (0.6, 0.05):
            with self.subTest(wait=wait):
                self.alpha.reset()
                c = RawClient(self.router.port)
                c.send_request("POST", "/v1/chat/completions", chat_body("go", mock={"hang": True}))
                self.alpha.wait_stat("hangs", 1)
                time.sleep(wait)
                left = time.monotonic()
                c.close()
                self.alpha.wait_stat("hangs_aborted", 1, timeout=5)
                elapsed = time.monotonic() - left
                # Watched from the first pause on; one that leaves sooner is seen when the
                # watch begins (250 ms after the request parked).
                limit = self.PROMPT if wait > 0.3 else 0.25 * SLOW + self.PROMPT
                self.assertLess(elapsed, limit, "upstream stopped %.3f s after the client left" % elapsed)
        self.assert_still_serves(self.router, self.alpha)


if __name__ == "__main__":
    main()
