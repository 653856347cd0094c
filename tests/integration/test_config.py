#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Configuration: --check-config, drop-ins and environment precedence, a run on environment
variables alone, a refused configuration."""

import os
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (PROVIDER_ROUTER, SHIPPED_CONFIG, SLOW, RouterTestCase, _base_env,  # noqa: E402
                     chat_body, free_port, main, router_config, run_check_config)

DEFAULT_CONFIG_FILE = "/etc/provider-router/provider-router.conf"
QWEN_KEY = "sk-qwen-from-environment-42"

BAD_CONFIG = """\
[Router]
Port=99999
DefaultProvider=nope
RequestTimeoutSec=-5
LogLevel=loud
MaxBodySize=lots
AllowProviderOverride=maybe

[Provider ftp]
BaseURL=ftp://127.0.0.1/v1

[Provider nourl]
DefaultModel=x

[Provider secret]
BaseURL=http://127.0.0.1:9/v1
APIKey=sk-must-not-be-printed

[ModelMappings]
some-model=ghost
"""


class CheckConfigTest(RouterTestCase):

    def write(self, text, name="provider-router.conf"):
        d = tempfile.mkdtemp(prefix="provider-router-conf-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", d]))
        path = os.path.join(d, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_shipped_config_is_valid(self):
        rc, out, err = run_check_config(SHIPPED_CONFIG)
        self.assertEqual(rc, 0, out + err)
        self.assertIn("Configuration OK", out)
        self.assertIn(SHIPPED_CONFIG, out)
        self.assertNotIn("error", err.lower())

    def test_every_error_listed(self):
        rc, out, err = run_check_config(self.write(BAD_CONFIG))
        self.assertEqual(rc, 1, out + err)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        for needle in ("Port='99999'", "RequestTimeoutSec='-5'", "LogLevel='loud'", "MaxBodySize='lots'",
                       "AllowProviderOverride='maybe'", "ftp://127.0.0.1/v1", "APIKey=",
                       "DefaultProvider='nope'", "'nourl' has no BaseURL", "'ghost'"):
            self.assertTrue(any(needle in line for line in errors), "%s not reported in:\n%s" % (needle, err))
        self.assertGreaterEqual(len(errors), 10, err)
        self.assertIn("%d error(s)" % len(errors), err)
        self.assertNotIn("sk-must-not-be-printed", out + err)

    def test_environment_errors_listed(self):
        rc, out, err = run_check_config(SHIPPED_CONFIG, env={
            "PORT": "abc", "MODEL_MAPPINGS": "no-colon", "REQUEST_TIMEOUT": "-1"})
        self.assertEqual(rc, 1, out + err)
        self.assertIn("PORT='abc'", err)
        self.assertIn("MODEL_MAPPINGS", err)
        self.assertIn("REQUEST_TIMEOUT", err)

    def test_missing_file_named_by_option(self):
        rc, out, err = run_check_config("/nonexistent/provider-router.conf")
        self.assertEqual(rc, 1, out + err)
        self.assertIn("/nonexistent/provider-router.conf", err)

    def test_daemon_refuses_bad_config(self):
        path = self.write(BAD_CONFIG)
        p = subprocess.run([PROVIDER_ROUTER, "--bus=none", "--config", path], env=_base_env(),
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30 * SLOW)
        err = p.stderr.decode()
        self.assertEqual(p.returncode, 1, err)
        self.assertIn("DefaultProvider='nope'", err)
        self.assertIn("'ghost'", err)
        self.assertNotIn("sk-must-not-be-printed", err)

    def test_version_and_help(self):
        p = subprocess.run([PROVIDER_ROUTER, "--version"], capture_output=True, timeout=30 * SLOW)
        self.assertEqual(p.returncode, 0)
        self.assertTrue(p.stdout.decode().startswith("provider-router "), p.stdout)
        p = subprocess.run([PROVIDER_ROUTER, "--help"], capture_output=True, timeout=30 * SLOW)
        self.assertEqual(p.returncode, 0)
        for opt in ("--config", "--check-config", "--bus"):
            self.assertIn(opt, p.stdout.decode())
        p = subprocess.run([PROVIDER_ROUTER, "--no-such-option"], capture_output=True, timeout=30 * SLOW)
        self.assertNotEqual(p.returncode, 0)


class PrecedenceTest(RouterTestCase):

    def setUp(self):
        self.alpha = self.start_mock("alpha", ["alpha-1"])
        self.beta = self.start_mock("beta", ["beta-1"])

    def served_by(self, router, **kw):
        r = router.chat(chat_body(**kw))
        self.assertEqual(r.status, 200, r)
        return r.header("X-Provider")

    def test_dropins_then_environment(self):
        providers = {"alpha": self.alpha.base_url, "beta": self.beta.base_url}
        dropins = {
            # Lexical order: 20 comes after 10 and wins.
            "20-default.conf": "[Router]\nDefaultProvider=beta\n",
            "10-default.conf": "[Router]\nDefaultProvider=echo\n",
            "30-map.conf": "[ModelMappings]\nmapped=alpha\n",
            "ignored.txt": "[Router]\nDefaultProvider=nope\n",
        }
        config = lambda port: router_config(port, providers, default="alpha")  # noqa: E731
        router = self.start_router(config, dropins=dropins)
        self.assertEqual(self.served_by(router), "beta")
        self.assertEqual(self.served_by(router, model="mapped"), "alpha")
        router.assert_clean_exit()

        # The plan's variables override files and drop-ins.
        router = self.start_router(config, dropins=dropins, env={"DEFAULT_PROVIDER": "alpha",
                                                                 "MODEL_MAPPINGS": "mapped:beta"})
        self.assertEqual(self.served_by(router), "alpha")
        self.assertEqual(self.served_by(router, model="mapped"), "beta")
        health = router.request("GET", "/health").json()
        self.assertEqual(health["default_provider"], "alpha")

    def test_provider_override_disabled(self):
        providers = {"alpha": self.alpha.base_url, "beta": self.beta.base_url}
        router = self.start_router(lambda port: router_config(
            port, providers, default="alpha", mappings={"m-beta": "beta"},
            router={"AllowProviderOverride": "false"}))
        # The header is not obeyed; mapping and default still are.
        r = router.chat(chat_body("x"), headers={"X-Provider": "beta"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("X-Provider"), "alpha")
        r = router.chat(chat_body("x", model="m-beta"), headers={"X-Provider": "alpha"})
        self.assertEqual(r.header("X-Provider"), "beta")
        self.assertEqual(self.beta.stats()["chat"], 1)

    def test_request_timeout_from_environment(self):
        providers = {"alpha": self.alpha.base_url}
        router = self.start_router(lambda port: router_config(port, providers),
                                   env={"REQUEST_TIMEOUT": "800"})
        r = router.chat(chat_body(mock={"hang": True}))
        self.assert_error(r, 504, "timeout_error", provider="alpha")
        self.assertLess(r.elapsed, 30 * SLOW)
        self.alpha.wait_stat("hangs_aborted", 1)
        self.assert_still_serves(router, self.alpha)

    @unittest.skipIf(os.path.exists(DEFAULT_CONFIG_FILE) or os.path.exists(DEFAULT_CONFIG_FILE + ".d"),
                     "%s exists on this machine: the run would not be environment-only" % DEFAULT_CONFIG_FILE)
    def test_environment_only(self):
        """No configuration file at all: the plan's defaults plus its environment variables."""
        gamma = self.start_mock("gamma")
        port = free_port()
        env = {
            "PORT": port,
            "HOST": "127.0.0.1",
            "DEFAULT_PROVIDER": "qwen-proxy",
            # As in the plan: without /v1, the router appends it.
            "QWEN_PROXY_BASE_URL": "http://127.0.0.1:%d" % self.alpha.port,
            "LM_STUDIO_BASE_URL": self.beta.base_url,
            "LM_STUDIO_DEFAULT_MODEL": "beta-default",
            # Never the real service from a test: qwen-direct is a third loopback mock.
            "QWEN_BASE_URL": gamma.base_url,
            "QWEN_API_KEY": QWEN_KEY,
            "MODEL_MAPPINGS": "coder:lm-studio,chat:qwen-proxy",
            "LOG_LEVEL": "debug",
        }
        router = self.start_router(None, env=env, port=port)
        r = router.chat(chat_body("hi"))
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header("X-Provider"), "qwen-proxy")
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "alpha: hi")
        self.assertEqual(self.alpha.stats()["last_request"]["path"], "/v1/chat/completions")

        r = router.chat(chat_body("hi", model="coder"))
        self.assertEqual(r.header("X-Provider"), "lm-studio")
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "beta: hi")

        # LM_STUDIO_DEFAULT_MODEL fills in a request that names no model.
        r = router.chat(chat_body("hi", model=None), headers={"X-Provider": "lm-studio"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["model"], "beta-default")

        health = router.request("GET", "/health").json()
        self.assertEqual(health["default_provider"], "qwen-proxy")
        for name in ("lm-studio", "qwen-proxy", "qwen-direct"):
            self.assertIn(name, health["providers"])

        # QWEN_API_KEY is what qwen-direct gets, whatever the client sent; it is never logged.
        r = router.chat(chat_body("key?"), headers={"X-Provider": "qwen-direct", "Authorization": "Bearer mine"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "gamma: key?")
        self.assertEqual(gamma.stats()["last_request"]["headers"].get("authorization"), "Bearer " + QWEN_KEY)
        self.assertNotIn(QWEN_KEY, router.log(limit=None))


if __name__ == "__main__":
    main()
