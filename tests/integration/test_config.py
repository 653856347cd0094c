#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Configuration: --check-config, drop-ins and environment precedence, a run on environment
variables alone, a refused configuration, and values that cannot be read: each is an error, for
--check-config and for a reload, never a silently kept default."""

import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (PROVIDER_ROUTER, SHIPPED_CONFIG, SLOW, RouterTestCase, _base_env,  # noqa: E402
                     chat_body, free_port, main, router_config, run_check_config, wait_until)

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


class UnreadableValueTest(RouterTestCase):
    """Every configuration value that cannot be read is an error. Each case: --check-config exits
    1 naming the file, group and key; a running daemon refuses the same file on reload (SIGHUP),
    says why, and keeps serving with the configuration it had."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="provider-router-unreadable-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", self.dir]))
        self.tokens = self.secret_file("client-tokens", b"# the router's clients\ngood-token\n")

    def secret_file(self, name, data):
        path = os.path.join(self.dir, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def fifo(self, name):
        path = os.path.join(self.dir, name)
        os.mkfifo(path, 0o600)
        return path

    @staticmethod
    def good_config(port, tokens):
        return router_config(port, {}, default="echo", router={"ClientTokensFile": tokens})

    def write_conf(self, data, name="check.conf"):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def check_config_refuses(self, data, *needles, env=None):
        """--check-config on the text (bytes) exits 1, promptly, with every needle in one error line."""
        path = self.write_conf(data)
        start = time.monotonic()
        rc, out, err = run_check_config(path, env=env, timeout=20)
        self.assertLess(time.monotonic() - start, 10 * SLOW, "--check-config took too long")
        self.assertEqual(rc, 1, out + err)
        self.assertNotIn("Configuration OK", out)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        self.assertTrue(any(all(n in line for n in needles) for line in errors),
                        "no error line with %r in:\n%s" % (needles, err))
        self.assertIn("%d error(s)" % len(errors), err)
        return err

    def start_with_tokens(self):
        router = self.start_router(lambda port: self.good_config(port, self.tokens))
        self.assert_tokens_enforced(router)
        return router

    def assert_tokens_enforced(self, router):
        r = router.chat(chat_body("hi"), headers={"X-Provider": "echo"})
        self.assert_error(r, 401, "authentication_error")
        r = router.chat(chat_body("still there?"), headers={"X-Provider": "echo",
                                                            "Authorization": "Bearer good-token"})
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "still there?", r)

    def reload_refused(self, router, data, *needles):
        """Replaces the daemon's file with data, sends SIGHUP, and waits for the refusal."""
        before = router.log(limit=None).count("Keeping the previous configuration.")
        with open(router.config_path, "wb") as f:
            f.write(data)
        router.send_signal(signal.SIGHUP)
        wait_until(lambda: router.log(limit=None).count("Keeping the previous configuration.") > before,
                   10 * SLOW, what="the reload to be refused")
        log = router.log(limit=None)
        self.assertTrue(any(all(n in line for n in needles) for line in log.splitlines()),
                        "no log line with %r in:\n%s" % (needles, log[-3000:]))
        self.assertNotIn("Configuration reloaded", log)
        # Still the old configuration: client tokens enforced, echo answers.
        self.assert_tokens_enforced(router)

    def bad_router_line(self, port, line):
        text = self.good_config(port, self.tokens).encode()
        return text.replace(b"[Router]\n", b"[Router]\n" + line + b"\n", 1)

    def test_client_tokens_file_not_utf8(self):
        # Skipped until now: authentication off, and --check-config said OK.
        line = b"ClientTokensFile=" + self.tokens.encode() + b"\xe9"
        needles = ("[Router] ClientTokensFile= is not valid UTF-8",)
        err = self.check_config_refuses(b"[Router]\n" + line + b"\n", "check.conf:", *needles)
        self.assertNotIn("\xe9", err)
        router = self.start_with_tokens()
        # A later ClientTokensFile= line in the same group wins in GLib's key file: put it last.
        text = self.good_config(router.port, self.tokens).encode() + b"[Router]\n" + line + b"\n"
        self.reload_refused(router, text, *needles)

    def test_cors_origin_not_utf8(self):
        line = b"CORSAllowOrigin=https://caf\xe9.example"
        needles = ("[Router] CORSAllowOrigin= is not valid UTF-8",)
        self.check_config_refuses(b"[Router]\n" + line + b"\n", *needles)
        router = self.start_with_tokens()
        self.reload_refused(router, self.bad_router_line(router.port, line), *needles)

    def test_invalid_escape_and_control_characters(self):
        self.check_config_refuses(b"[Router]\nCORSAllowOrigin=a\\qb\n", "CORSAllowOrigin=", "escape sequence")
        line = b"CORSAllowOrigin=https://a.example\\r\\nSet-Cookie: x=1"
        needles = ("CORSAllowOrigin= contains a control character (0x0d)",)
        self.check_config_refuses(b"[Router]\n" + line + b"\n", *needles)
        router = self.start_with_tokens()
        self.reload_refused(router, self.bad_router_line(router.port, line), *needles)

    def test_nul_byte_in_file(self):
        needles = ("contains a NUL byte",)
        self.check_config_refuses(b"[Router]\nDefaultProvider=echo\x00ignored\n", "check.conf", *needles)
        router = self.start_with_tokens()
        self.reload_refused(router, self.bad_router_line(router.port, b"Port=1\x00"), *needles)

    def test_api_key_file_fifo(self):
        # open() of a FIFO without O_NONBLOCK waits for a writer: --check-config hung, and a
        # reload froze the daemon.
        key = self.fifo("key-fifo")
        provider = b"[Provider keyed]\nBaseURL=http://127.0.0.1:9/v1\nAPIKeyFile=" + key.encode() + b"\n"
        needles = ("provider 'keyed': cannot read APIKeyFile='%s': it is not a regular file" % key,)
        self.check_config_refuses(b"[Router]\nDefaultProvider=keyed\n" + provider, *needles)
        router = self.start_with_tokens()
        text = self.good_config(router.port, self.tokens).encode() + provider
        self.reload_refused(router, text, *needles)

    def test_client_tokens_file_fifo(self):
        tokens_fifo = self.fifo("tokens-fifo")
        line = b"ClientTokensFile=" + tokens_fifo.encode()
        needles = ("ClientTokensFile= '%s'" % tokens_fifo, "not a regular file")
        self.check_config_refuses(b"[Router]\n" + line + b"\n", *needles)
        router = self.start_with_tokens()
        text = self.good_config(router.port, self.tokens).encode() + b"[Router]\n" + line + b"\n"
        self.reload_refused(router, text, *needles)

    def test_config_dropin_fifo(self):
        router = self.start_with_tokens()
        dropins = router.config_path + ".d"
        os.makedirs(dropins, exist_ok=True)
        fifo = os.path.join(dropins, "50-fifo.conf")
        os.mkfifo(fifo, 0o600)
        needles = (fifo, "not a regular file")
        rc, out, err = run_check_config(router.config_path, timeout=20)
        self.assertEqual(rc, 1, out + err)
        self.assertIn("error: %s: cannot read the file: it is not a regular file" % fifo, err)
        with open(router.config_path, "rb") as f:
            text = f.read()
        self.reload_refused(router, text, *needles)

    def test_api_key_with_line_break(self):
        key = self.secret_file("key", b"sk-abc\r\nX-Injected: yes\n")
        provider = b"[Provider keyed]\nBaseURL=http://127.0.0.1:9/v1\nAPIKeyFile=" + key.encode() + b"\n"
        needles = ("provider 'keyed': the API key from file '%s' contains a line break" % key, "inject a header")
        err = self.check_config_refuses(b"[Router]\nDefaultProvider=keyed\n" + provider, *needles)
        self.assertNotIn("sk-abc", err)
        router = self.start_with_tokens()
        text = self.good_config(router.port, self.tokens).encode() + provider
        self.reload_refused(router, text, *needles)
        self.assertNotIn("sk-abc", router.log(limit=None))

    def test_api_key_from_environment_with_line_break(self):
        needles = ("provider 'qwen-direct': the API key from environment variable QWEN_API_KEY contains a line break",)
        err = self.check_config_refuses(b"[Router]\nDefaultProvider=qwen-direct\n", *needles,
                                        env={"QWEN_API_KEY": "sk-env\nX-Injected: yes"})
        self.assertNotIn("sk-env", err)
        # The daemon refuses to start on it, too.
        path = self.write_conf(b"[Router]\nDefaultProvider=qwen-direct\n", "start.conf")
        p = subprocess.run([PROVIDER_ROUTER, "--bus=none", "--config", path],
                           env=_base_env({"QWEN_API_KEY": "sk-env\r\nX-Injected: yes"}),
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30 * SLOW)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn(needles[0], p.stderr.decode())
        self.assertNotIn("sk-env", p.stderr.decode())

    def test_environment_not_utf8(self):
        self.check_config_refuses(b"", "environment: DEFAULT_PROVIDER is not valid UTF-8",
                                  env={"DEFAULT_PROVIDER": os.fsdecode(b"caf\xe9")})


if __name__ == "__main__":
    main()
