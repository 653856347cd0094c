#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Comparing providers (issue 12): weighted A/B splits (sticky keys, live changes over D-Bus, a
down arm's share), per-arm statistics, mirrors that record both answers without touching the
client's, X-Compare, the one-shot Compare and the conformance Probe — through the real daemon on
a private session bus, driven by busctl and provider-routerctl."""

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (LOOPBACK, SLOW, Router, RouterTestCase, chat_body, closed_port, main,  # noqa: E402
                     router_config, wait_until)
from oddprovider import OddProviderProcess  # noqa: E402
from test_dbus import NAME, Clients, PrivateBus  # noqa: E402

NEEDS_TOOLS = unittest.skipIf([p for p in ("dbus-daemon", "busctl") if not shutil.which(p)],
                              "dbus-daemon and busctl are needed")


class Hanging:
    """A provider that accepts connections and never answers (bounded: closed at cleanup)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.base_url = "http://%s:%d/v1" % (LOOPBACK, self.port)
        self.conns = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.sock.settimeout(0.1)
        deadline = time.monotonic() + 600
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                c, _ = self.sock.accept()
                self.conns.append(c)
            except socket.timeout:
                continue
            except OSError:
                return

    def close(self):
        self.stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()


@NEEDS_TOOLS
class CompareTest(RouterTestCase):

    def setUp(self):
        super().setUp()
        self.workdir = tempfile.mkdtemp(prefix="provider-router-compare-")
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.bus = PrivateBus(self.workdir, "session")
        self._procs.append(self.bus)
        self.addCleanup(self.bus.shut_down)
        self.clients = Clients(self.bus)
        self.alpha = self.start_mock("alpha")
        self.beta = self.start_mock("beta")

    def start(self, text, env=None):
        env = dict({"DBUS_SESSION_BUS_ADDRESS": self.bus.address,
                    "STATE_DIRECTORY": os.path.join(self.workdir, "state")}, **(env or {}))
        router = self.start_router(text, env=env, args=["--bus=session"])
        wait_until(self.clients.has_owner, 10 * SLOW, interval=0.05, what="%s on the bus" % NAME)
        return router

    def config(self, extra, providers=None, router=None):
        providers = providers or {"alpha": self.alpha.base_url, "beta": self.beta.base_url}
        return lambda port: router_config(port, providers, default="alpha", router=router) + extra

    def served_by(self, router, n, model="m", headers=None, body=None):
        counts = {}
        for i in range(n):
            r = router.chat(body(i) if body else chat_body("q%d" % i, model=model), headers=headers)
            self.assertEqual(r.status, 200, r)
            who = r.header("X-Provider")
            counts[who] = counts.get(who, 0) + 1
        return counts

    def busctl_json(self, *args):
        r = self.clients.busctl("--json=short", *args)
        self.assertEqual(r.returncode, 0, r)
        return json.loads(r.stdout)["data"]

    def comparisons(self, n=0):
        return self.busctl_json("call", NAME, "/org/providerrouter/Router1", NAME, "GetComparisons", "u", str(n))[0]

    def total_stats(self):
        return self.clients.stats()["*"]

    # ---- splits -------------------------------------------------------------------------

    def test_split_80_20(self):
        router = self.start(self.config("\n[Route m]\nProviders=alpha:80 beta:20\n"))
        n = 10000
        counts = self.served_by(router, n)
        share = 100.0 * counts.get("alpha", 0) / n
        self.assertTrue(78.0 <= share <= 82.0, "alpha served %.2f%% of %d requests: %r" % (share, n, counts))
        self.assertEqual(counts.get("alpha", 0) + counts.get("beta", 0), n, counts)
        # The arms are in GetStats and /metrics.
        routes = {(e["model"]["data"], e["provider"]["data"]): e for e in self.total_stats()["routes"][1]}
        self.assertEqual(routes[("m", "alpha")]["requests"]["data"], counts["alpha"])
        self.assertEqual(routes[("m", "beta")]["requests"]["data"], counts["beta"])
        self.assertEqual(routes[("m", "alpha")]["weight"]["data"], 80)
        self.assertEqual(self.clients.prop("ModelSplits"), {"m": [["alpha", 80], ["beta", 20]]})
        metrics = router.request("GET", "/metrics").body.decode()
        self.assertIn('provider_router_route_requests_total{model="m",provider="alpha"} %d' % counts["alpha"], metrics)
        self.assert_still_serves(router)

    def test_sticky_keys(self):
        router = self.start(self.config("\n[Route m]\nProviders=alpha:50 beta:50\nStickyKey=user\n"
                                         "\n[Route h]\nProviders=alpha beta\nStickyKey=header:X-Session-Id\n"))
        arms = {}
        for u in range(60):
            for i in range(4):
                r = router.chat(chat_body("x", model="m", user="user-%d" % u))
                self.assertEqual(r.status, 200, r)
                arms.setdefault(u, set()).add(r.header("X-Provider"))
        self.assertTrue(all(len(a) == 1 for a in arms.values()), arms)
        both = {next(iter(a)) for a in arms.values()}
        self.assertEqual(both, {"alpha", "beta"}, "60 users all on one arm")
        for s in range(20):
            seen = {router.chat(chat_body("x", model="h"), headers={"X-Session-Id": "s%d" % s}).header("X-Provider")
                    for _ in range(3)}
            self.assertEqual(len(seen), 1, seen)

    def test_live_split_and_down_arm(self):
        gamma_url = "http://127.0.0.1:%d/v1" % closed_port()
        router = self.start(self.config("", providers={"alpha": self.alpha.base_url, "beta": self.beta.base_url,
                                                       "gamma": gamma_url},
                                        router={"FailureThreshold": "1", "CooldownSec": "60"}))
        self.assertEqual(self.served_by(router, 5), {"alpha": 5})
        r = self.clients.ctl("split", "m", "beta:1")
        self.assertEqual(r.returncode, 0, r)
        self.assertEqual(self.served_by(router, 5), {"beta": 5})
        r = self.clients.busctl("call", NAME, "/org/providerrouter/Router1", NAME, "SetModelSplit", "sa(su)", "m",
                                "2", "alpha", "1", "beta", "1")
        self.assertEqual(r.returncode, 0, r)
        counts = self.served_by(router, 200)
        self.assertTrue(counts.get("alpha", 0) > 50 and counts.get("beta", 0) > 50, counts)
        # An unknown provider or a zero weight changes nothing.
        r = self.clients.busctl("call", NAME, "/org/providerrouter/Router1", NAME, "SetModelSplit", "sa(su)", "m",
                                "1", "nope", "1")
        self.assertNotEqual(r.returncode, 0, r)
        self.assertIn("No provider 'nope' is configured", r.stderr)
        r = self.clients.busctl("call", NAME, "/org/providerrouter/Router1", NAME, "SetModelSplit", "sa(su)", "m",
                                "1", "alpha", "0")
        self.assertNotEqual(r.returncode, 0, r)
        self.assertEqual(self.clients.prop("ModelSplits"), {"m": [["alpha", 1], ["beta", 1]]})
        # A down arm gives its share to the others.
        r = self.clients.ctl("split", "d", "gamma:90", "beta:10")
        self.assertEqual(r.returncode, 0, r)
        bad = router.chat(chat_body("x", model="d"), headers={"X-Provider": "gamma"})
        self.assertEqual(bad.status, 502, bad)
        counts = self.served_by(router, 100, model="d")
        self.assertEqual(counts, {"beta": 100})
        self.assert_still_serves(router)

    def test_model_aliases(self):
        """One model, a name per provider: the body's "model" is rewritten in place (nothing else
        changes), the answer passes unchanged, and the log says both names."""
        router = self.start(self.config("\n[Route qwen3-coder]\nProviders=alpha beta\n"
                                        "[ModelAliases alpha]\nqwen3-coder=qwen2.5-coder-7b-instruct\n"
                                        "[ModelAliases beta]\nqwen3-coder=qwen3-coder-plus\n"))
        raw = b'{"model" : "qwen3-coder", "seed":18446744073709551615,"temperature":0.7,"n":1e0,' \
              b'"messages":[{"role":"user","content":"hi"}]}'
        want = {"alpha": "qwen2.5-coder-7b-instruct", "beta": "qwen3-coder-plus"}
        seen = set()
        for _ in range(40):
            r = router.request("POST", "/v1/chat/completions", raw, headers={"Content-Type": "application/json"})
            self.assertEqual(r.status, 200, r)
            who = r.header("X-Provider")
            seen.add(who)
            mock = self.alpha if who == "alpha" else self.beta
            got = mock.stats()["last_request"]["body"].encode()
            self.assertEqual(got, raw.replace(b'"qwen3-coder"', b'"%s"' % want[who].encode()))
            self.assertEqual(r.json()["model"], want[who])
        self.assertEqual(seen, {"alpha", "beta"})
        self.assertIn("model='qwen3-coder' as 'qwen2.5-coder-7b-instruct'", router.log())
        # Other models are not renamed.
        r = router.chat(chat_body("x", model="other"))
        self.assertEqual(r.json()["model"], "other")

    def test_server_timing(self):
        router = self.start(self.config(""))
        for stream in (False, True):
            body = chat_body("x", stream=stream, mock={"delay_ms": 150})
            if stream:
                s = router.stream(body)
                header = s.header("Server-Timing")
            else:
                r = router.chat(body)
                self.assertEqual(r.status, 200, r)
                header = r.header("Server-Timing")
            m = re.fullmatch(r'router;dur=([0-9.]+), provider;dur=([0-9.]+);desc="first byte"', header or "")
            self.assertTrue(m, header)
            router_ms, provider_ms = float(m.group(1)), float(m.group(2))
            self.assertGreaterEqual(provider_ms, 150.0, header)
            self.assertLess(router_ms, provider_ms, header)
        # The router's own answers say what they took too.
        r = router.request("GET", "/health")
        self.assertRegex(r.header("Server-Timing"), r"^router;dur=[0-9.]+$")
        r = router.chat(chat_body("x"), headers={"X-Provider": "nope"})
        self.assertRegex(r.header("Server-Timing"), r"^router;dur=[0-9.]+$")

    def test_split_survives_restart_until_reload(self):
        state = os.path.join(self.workdir, "state")
        conf = self.config("")
        router = self.start(conf)
        r = self.clients.ctl("split", "m", "alpha:3", "beta:1")
        self.assertEqual(r.returncode, 0, r)
        r = self.clients.ctl("split", "*", "beta:1", "alpha:1")
        self.assertEqual(r.returncode, 0, r)
        with open(os.path.join(state, "routing.state")) as f:
            saved = f.read()
        self.assertIn("m=alpha:3 beta:1", saved)
        self.assertIn("DefaultSplit=beta:1 alpha:1", saved)
        # A crash: the next process serves the splits it was given.
        router.proc.kill()
        router.proc.wait(timeout=10 * SLOW)
        router.returncode = 0  # killed on purpose: not a failed exit
        wait_until(lambda: not self.clients.has_owner(), 10 * SLOW, interval=0.05, what="the name to go")
        router = self.start(conf)
        self.assertEqual(self.clients.prop("ModelSplits"), {"m": [["alpha", 3], ["beta", 1]],
                                                            "*": [["beta", 1], ["alpha", 1]]})
        counts = self.served_by(router, 200)
        self.assertTrue(counts.get("alpha", 0) > 100 and counts.get("beta", 0) > 20, counts)
        # A reload returns to the files.
        r = self.clients.ctl("reload")
        self.assertEqual(r.returncode, 0, r)
        self.assertEqual(self.clients.prop("ModelSplits"), {})
        self.assertFalse(os.path.exists(os.path.join(state, "routing.state")))
        self.assertEqual(self.served_by(router, 5), {"alpha": 5})

    # ---- mirrors and comparisons ---------------------------------------------------------

    def test_mirror_records_both_answers(self):
        router = self.start(self.config("\n[ModelMappings]\nm=alpha\n[Route m]\nMirror=beta\n"))
        r = router.chat(chat_body("hello there", model="m"))
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("X-Provider"), "alpha")
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "alpha: hello there")
        rid = r.header("X-Request-Id")
        wait_until(lambda: self.comparisons(), 10 * SLOW, what="a comparison")
        c = self.comparisons(1)[0]
        get = {k: v["data"] for k, v in c.items()}
        self.assertEqual(get["request_id"], rid)
        self.assertEqual(get["model"], "m")
        self.assertEqual(get["origin"], "mirror")
        self.assertEqual((get["primary_provider"], get["mirror_provider"]), ("alpha", "beta"))
        self.assertEqual((get["primary_status"], get["mirror_status"]), (200, 200))
        for side in ("primary_", "mirror_"):
            for key in ("ttfb_usec", "duration_usec", "prompt_tokens", "completion_tokens", "tokens_per_sec",
                        "finish_reason", "tool_calls", "answer_length", "error"):
                self.assertIn(side + key, get)
        self.assertEqual(get["primary_finish_reason"], "stop")
        self.assertEqual(get["mirror_answer_length"], len("beta: hello there"))
        self.assertEqual(get["primary_error"], "")
        # {alpha, hello, there, alpha hello, hello there} vs {beta, …}: 3 of 7 in common.
        self.assertAlmostEqual(get["similarity"], 3 / 7, places=3)
        pairs = {(e["primary"]["data"], e["mirror"]["data"]): e for e in self.total_stats()["comparisons"][1]}
        self.assertEqual(pairs[("alpha", "beta")]["count"]["data"], 1)
        r = self.clients.ctl("comparisons", "--no-pager")
        self.assertEqual(r.returncode, 0, r)
        self.assertIn("alpha", r.stdout)
        self.assertIn("beta", r.stdout)

    def test_mirror_never_touches_the_primary(self):
        hang = Hanging()
        self.addCleanup(hang.close)
        providers = {"alpha": self.alpha.base_url, "beta": self.beta.base_url, "hang": hang.base_url,
                     "dead": "http://127.0.0.1:%d/v1" % closed_port()}
        router = self.start(self.config("\n[ModelMappings]\nplain=alpha\nm=alpha\nd=alpha\n"
                                        "[Route m]\nMirror=hang\n[Route d]\nMirror=dead\n",
                                        providers=providers, router={"MirrorMaxConcurrent": "2"}))

        def ttfb(model, stream):
            t = time.monotonic()
            if stream:
                s = router.stream(chat_body("same words", model=model, stream=True))
                return s.status, s.raw, s.started - t
            r = router.chat(chat_body("same words", model=model))
            return r.status, r.body, r.elapsed
        for stream in (False, True):
            base = [ttfb("plain", stream) for _ in range(5)]
            for model in ("d", "m"):
                got = [ttfb(model, stream) for _ in range(5)]
                for (s0, b0, _), (s1, b1, _) in zip(base, got):
                    self.assertEqual(s1, s0)
                    # The same answer but for the model's name the mock echoes.
                    self.assertEqual(b1.replace(b'"model":"%s"' % model.encode(), b'"model":"plain"'), b0)
                slow = sorted(t for _, _, t in got)[2]
                fast = sorted(t for _, _, t in base)[2]
                self.assertLess(slow, fast + 0.25 * SLOW, "median first byte with a %s mirror" % model)
        # At most two hanging mirrors at once: the rest were skipped, none queued.
        stats = self.total_stats()
        self.assertEqual(stats["mirrors_running"][1], 2)
        self.assertGreaterEqual(stats["mirrors_skipped"][1], 8)
        # The failed mirrors were recorded as comparisons with their error.
        dead = [c for c in self.comparisons() if c["mirror_provider"]["data"] == "dead"]
        self.assertTrue(dead and all(c["mirror_error"]["data"] for c in dead), dead)
        self.assert_still_serves(router)

    def test_x_compare(self):
        providers = {"alpha": self.alpha.base_url, "beta": self.beta.base_url, "gamma": self.start_mock("gamma").base_url}
        router = self.start(self.config("", providers=providers))
        r = router.chat(chat_body("compare me"), headers={"X-Compare": "beta, gamma"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("X-Provider"), "alpha")
        wait_until(lambda: len(self.comparisons()) >= 2, 10 * SLOW, what="two comparisons")
        got = sorted((c["mirror_provider"]["data"], c["origin"]["data"]) for c in self.comparisons())
        self.assertEqual(got, [("beta", "x-compare"), ("gamma", "x-compare")])
        r = router.chat(chat_body("x"), headers={"X-Compare": "beta,nope"})
        self.assert_error(r, 400, "invalid_request_error", "Unknown provider 'nope' in the X-Compare header")
        self.assert_still_serves(router)

    def test_echo_primary_recorded(self):
        # The built-in echo provider's answer is produced, not relayed: the comparison still has it.
        router = self.start(self.config(""))
        for stream in (False, True):
            body = chat_body("compare me", stream=stream)
            headers = {"X-Provider": "echo", "X-Compare": "beta"}
            if stream:
                s = router.stream(body, headers=headers)
                self.assertEqual((s.status, s.header("X-Provider")), (200, "echo"), s.raw[:300])
            else:
                r = router.chat(body, headers=headers)
                self.assertEqual((r.status, r.header("X-Provider")), (200, "echo"), r)
                self.assertEqual(r.json()["choices"][0]["message"]["content"], "compare me")
            wait_until(lambda: len(self.comparisons()) >= (2 if stream else 1), 10 * SLOW, what="a comparison")
            get = {k: v["data"] for k, v in self.comparisons(1)[0].items()}
            self.assertEqual((get["primary_provider"], get["mirror_provider"]), ("echo", "beta"))
            self.assertEqual(get["primary_answer_length"], len("compare me"))
            self.assertEqual(get["primary_finish_reason"], "stop")
            self.assertEqual(get["primary_error"], "")
            # {compare, me, compare me} vs {beta, compare, me, beta compare, compare me}: 3 of 5.
            self.assertAlmostEqual(get["similarity"], 3 / 5, places=3)
        self.assert_still_serves(router)

    def test_x_compare_needs_override(self):
        router = self.start(self.config("", router={"AllowProviderOverride": "false"}))
        r = router.chat(chat_body("x"), headers={"X-Compare": "beta"})
        self.assertEqual(r.status, 200, r)
        time.sleep(0.3)
        self.assertEqual(self.comparisons(), [])
        self.assertEqual(self.beta.stats()["chat"], 0)

    def test_compare_and_probe(self):
        odd = OddProviderProcess(self.workdir, name="odd", models=("odd-model",))
        self.addCleanup(odd.stop)
        bad = OddProviderProcess(self.workdir, name="bad", models=("bad-model",),
                                 modes=("no-done", "no-usage", "tool-no-index", "models-missing"))
        self.addCleanup(bad.stop)
        providers = {"alpha": self.alpha.base_url, "beta": self.beta.base_url,
                     "odd": {"BaseURL": odd.base_url, "DefaultModel": "odd-model"},
                     "bad": {"BaseURL": bad.base_url, "DefaultModel": "bad-model"}}
        router = self.start(self.config("", providers=providers))
        r = self.clients.ctl("--no-pager", "compare", "--providers=alpha,beta", "m", "Say hi")
        self.assertEqual(r.returncode, 0, r)
        self.assertIn("alpha: Say hi", r.stdout)
        self.assertIn("beta: Say hi", r.stdout)
        self.assertEqual(self.comparisons(1)[0]["origin"]["data"], "compare")

        for name in ("alpha", "odd"):
            r = self.clients.ctl("--no-pager", "probe", name)
            self.assertEqual(r.returncode, 0, r)
        r = self.clients.ctl("--no-pager", "probe", "bad")
        self.assertEqual(r.returncode, 1, r)
        out = r.stdout
        for check in ("models", "stream", "usage", "tool-args"):
            self.assertRegex(out, r"(?m)^.*✗.*%s" % check if "✗" in out else r"(?m)%s" % check)
        self.assertIn("no [DONE]", out)
        self.assertIn("no usage chunk", out)
        self.assertIn("have no index", out)
        self.assertIn("does not list", out)
        self.assert_still_serves(router)


if __name__ == "__main__":
    main()
