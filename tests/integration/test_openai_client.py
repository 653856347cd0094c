#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The official openai npm client (pinned in openai-client/package-lock.json) completes a normal
and a streamed chat through the router, against a mock provider and against the echo provider.

node_modules is installed with 'npm ci' when missing: into the build directory when meson says
where (OPENAI_CLIENT_WORKDIR), else next to package.json. Without node or npm, or when npm ci
fails (no network), the test is skipped, unless PR_REQUIRE_OPENAI_CLIENT=1 makes that a failure."""

import json
import os
import shutil
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SLOW, RouterTestCase, main, router_config  # noqa: E402

CLIENT_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openai-client")
CLIENT_FILES = ("package.json", "package-lock.json", "chat.mjs")
REQUIRED = os.environ.get("PR_REQUIRE_OPENAI_CLIENT") == "1"


def _unavailable(reason):
    if REQUIRED:
        raise AssertionError(reason)
    raise unittest.SkipTest(reason)


def _same_file(a, b):
    try:
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except OSError:
        return False


def prepare_client():
    """Returns the directory to run chat.mjs in, with its node_modules installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        _unavailable("node and npm are needed for the openai client test")
    if os.path.isdir(os.path.join(CLIENT_SOURCE, "node_modules", "openai")):
        return CLIENT_SOURCE
    workdir = os.environ.get("OPENAI_CLIENT_WORKDIR") or CLIENT_SOURCE
    if workdir != CLIENT_SOURCE:
        os.makedirs(workdir, exist_ok=True)
        stale = not _same_file(os.path.join(CLIENT_SOURCE, "package-lock.json"),
                               os.path.join(workdir, "package-lock.json"))
        for name in CLIENT_FILES:
            shutil.copyfile(os.path.join(CLIENT_SOURCE, name), os.path.join(workdir, name))
        if stale:
            shutil.rmtree(os.path.join(workdir, "node_modules"), ignore_errors=True)
    if not os.path.isdir(os.path.join(workdir, "node_modules", "openai")):
        sys.stderr.write("Installing the openai client with npm ci in %s\n" % workdir)
        try:
            p = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=workdir,
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
        except subprocess.TimeoutExpired:
            _unavailable("npm ci took longer than 300 s")
        if p.returncode != 0:
            _unavailable("npm ci failed (%d): %s" % (p.returncode, p.stderr.decode()[-2000:]))
    return workdir


class OpenAIClientTest(RouterTestCase):

    @classmethod
    def setUpClass(cls):
        cls.client_dir = prepare_client()

    def run_client(self, router, provider=None):
        argv = ["node", os.path.join(self.client_dir, "chat.mjs"), "http://127.0.0.1:%d/v1" % router.port]
        if provider:
            argv.append(provider)
        p = subprocess.run(argv, cwd=self.client_dir, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=120 * SLOW)
        self.assertEqual(p.returncode, 0, "node failed:\n%s\n%s" % (p.stdout.decode(), p.stderr.decode()))
        return json.loads(p.stdout.decode().strip().splitlines()[-1])

    def check(self, out, provider, content):
        self.assertEqual(out["chat"]["content"], content, out)
        self.assertEqual(out["chat"]["finish_reason"], "stop", out)
        self.assertEqual(out["chat"]["model"], "test-model", out)
        self.assertEqual(out["chat"]["x_provider"], provider, out)
        self.assertTrue(out["chat"]["x_request_id"], out)
        self.assertTrue(out["chat"]["usage"]["total_tokens"] > 0, out)

        self.assertEqual(out["stream"]["content"], content, out)
        self.assertEqual(out["stream"]["finish_reason"], "stop", out)
        self.assertGreaterEqual(out["stream"]["chunks"], 3, out)
        self.assertEqual(out["stream"]["x_provider"], provider, out)
        self.assertTrue(out["stream"]["content_type"].startswith("text/event-stream"), out)

        # The router's own errors reach the client as proper API errors.
        err = out["error"]
        self.assertTrue(err["thrown"] and err["is_api_error"], out)
        self.assertEqual(err["status"], 400, out)
        self.assertEqual(err["type"], "invalid_request_error", out)
        self.assertIn("no-such-provider", err["message"], out)

    def test_against_mock_provider(self):
        mock = self.start_mock("alpha")
        router = self.start_router(lambda port: router_config(port, {"alpha": mock.base_url}))
        out = self.run_client(router)
        self.check(out, "alpha", "alpha: Say hello to the router")
        stats = mock.stats()
        self.assertEqual(stats["chat"], 2, stats)
        self.assertEqual(stats["streams_completed"], 1, stats)
        # The client's key went through to a provider that has none of its own.
        self.assertEqual(stats["last_request"]["headers"].get("authorization"), "Bearer sk-test-not-a-real-key")

    def test_against_echo_provider(self):
        mock = self.start_mock("alpha")
        router = self.start_router(lambda port: router_config(port, {"alpha": mock.base_url}))
        out = self.run_client(router, provider="echo")
        self.check(out, "echo", "Say hello to the router")
        self.assertEqual(mock.stats()["chat"], 0)


if __name__ == "__main__":
    main()
