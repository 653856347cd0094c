#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The router against OpenAI-compatible software nobody on this project wrote: can a provider or a
client tell going through it from going direct?

Providers: @copilotkit/aimock and @dwmkerr/mock-llm, two mock servers from npm, each scripted to
answer plain, streamed and tool-call chats, usage chunks, 401/429/500, model lists and the
Responses API (interop/fixtures/). Clients: the official `openai` package, the Vercel AI SDK with
`@ai-sdk/openai-compatible`, and `@langchain/openai` (interop/client.mjs). Versions are pinned in
interop/package-lock.json.

Every scenario runs twice, once against the provider and once through a real router that has
both providers behind it, and the two are compared:
  - per client: what the client saw (text, tool calls, usage, error class, status and body, the
    headers a client acts on), after dropping only the request ids;
  - raw HTTP: status, the body's bytes (after replacing only the ids the server makes up anew on
    each request) and the response headers, except those that describe one connection;
  - what the provider received: the request headers (aimock keeps a journal; mock-llm is made to
    echo them in its answer).

A case that fails on today's code is marked expectedFailure with the item of issue 10 that it
shows; remove the mark when the fix lands (an unexpected success fails the run).

node_modules is installed with 'npm ci' when missing: into the build directory when meson says
where (INTEROP_WORKDIR), else next to package.json. Without node or npm, or when npm ci fails (no
network), the test is skipped, unless PR_REQUIRE_OPENAI_CLIENT=1 makes that a failure."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (LOOPBACK, SLOW, Router, RouterTestCase, _base_env, _Process, dump_logs,  # noqa: E402
                     http_request, main, router_config, wait_until)

INTEROP_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "interop")
INTEROP_FILES = ("package.json", "package-lock.json", "client.mjs", "serve-aimock.mjs", "serve-mock-llm.mjs",
                 "fixtures/aimock.json", "fixtures/mock-llm.yaml")
# Installed packages whose presence says node_modules is complete.
INTEROP_PACKAGES = ("openai", "ai", "@ai-sdk/openai-compatible", "@langchain/openai", "@copilotkit/aimock",
                    "@dwmkerr/mock-llm")
REQUIRED = os.environ.get("PR_REQUIRE_OPENAI_CLIENT") == "1"
# @copilotkit/aimock's engines field; the clients need 18 or 20.
NODE_MIN = (20, 15)


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


def _installed(workdir):
    return all(os.path.isdir(os.path.join(workdir, "node_modules", p)) for p in INTEROP_PACKAGES)


def prepare_interop():
    """Returns the directory to run the node scripts in, with its node_modules installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        _unavailable("node and npm are needed for the interop test")
    version = subprocess.run([node, "--version"], capture_output=True, timeout=30).stdout.decode().strip()
    m = re.match(r"v(\d+)\.(\d+)", version)
    if not m or (int(m.group(1)), int(m.group(2))) < NODE_MIN:
        _unavailable("Node.js %d.%d or later is needed for the interop test (aimock), not '%s'"
                     % (NODE_MIN + (version,)))
    if _installed(INTEROP_SOURCE):
        return INTEROP_SOURCE
    workdir = os.environ.get("INTEROP_WORKDIR") or INTEROP_SOURCE
    if workdir != INTEROP_SOURCE:
        os.makedirs(os.path.join(workdir, "fixtures"), exist_ok=True)
        stale = not _same_file(os.path.join(INTEROP_SOURCE, "package-lock.json"),
                               os.path.join(workdir, "package-lock.json"))
        for name in INTEROP_FILES:
            shutil.copyfile(os.path.join(INTEROP_SOURCE, name), os.path.join(workdir, name))
        if stale:
            shutil.rmtree(os.path.join(workdir, "node_modules"), ignore_errors=True)
    if not _installed(workdir):
        sys.stderr.write("Installing the interop servers and clients with npm ci in %s\n" % workdir)
        try:
            p = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=workdir,
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
        except subprocess.TimeoutExpired:
            _unavailable("npm ci took longer than 600 s")
        if p.returncode != 0:
            _unavailable("npm ci failed (%d): %s" % (p.returncode, p.stderr.decode()[-2000:]))
    return workdir


class NodeServer(_Process):
    """A third-party mock server (interop/serve-*.mjs) on a kernel-chosen loopback port."""

    label = "node mock server"

    def __init__(self, name, script, config, workdir, node_dir):
        self.name = name
        port_file = os.path.join(workdir, "%s.port" % name)
        argv = ["node", os.path.join(node_dir, script), port_file, os.path.join(node_dir, config)]
        # Node finds the packages next to the script, whatever the working directory.
        super().__init__(argv, _base_env(), workdir, "%s.log" % name)

        def port_ready():
            if not self.alive():
                raise AssertionError("%s exited: %s" % (name, self.log()))
            try:
                with open(port_file) as f:
                    return int(f.read().strip() or 0)
            except (OSError, ValueError):
                return 0

        self.port = wait_until(port_ready, 30 * SLOW, what="%s to listen" % name)
        self.base_url = "http://%s:%d/v1" % (LOOPBACK, self.port)


# --- what is compared ------------------------------------------------------------------------

CLIENTS = ("openai", "ai-sdk", "langchain")
PROVIDERS = ("aimock", "mockllm")
# Through the router, the model name picks the provider ([ModelMappings]).
MODEL = {"aimock": "interop-aimock", "mockllm": "interop-mockllm"}
# What each client's API offers at all (client.mjs answers "unsupported" for the rest).
CLIENT_KINDS = {
    "openai": {"chat", "stream", "tools", "models", "model_get", "responses"},
    "ai-sdk": {"chat", "stream", "tools"},
    "langchain": {"chat", "stream", "tools", "responses"},
}
# Headers a client sends of its own accord, or is told to by its user: all end-to-end.
USER_HEADERS = {"OpenAI-Beta": "assistants=v2", "Accept-Language": "fr-CH", "X-Title": "interop test",
                "HTTP-Referer": "https://example.invalid/app"}

# name: (providers it applies to, scenario for client.mjs without model)
SCENARIOS = {
    "chat": (PROVIDERS, {"kind": "chat", "message": "interop-plain"}),
    "stream": (PROVIDERS, {"kind": "stream", "message": "interop-plain"}),
    # mock-llm has no usage chunk: only aimock answers stream_options.include_usage.
    "stream_usage": (("aimock",), {"kind": "stream", "message": "interop-plain", "include_usage": True}),
    "tools": (PROVIDERS, {"kind": "tools", "message": "interop-tools"}),
    # mock-llm streams text only.
    "tools_stream": (("aimock",), {"kind": "tools", "message": "interop-tools", "stream": True,
                                   "include_usage": True}),
    "error_401": (PROVIDERS, {"kind": "chat", "message": "interop-401"}),
    "error_429": (PROVIDERS, {"kind": "chat", "message": "interop-429"}),
    "error_500": (PROVIDERS, {"kind": "chat", "message": "interop-500"}),
    # aimock answers a streamed request's error with the status; mock-llm with a 200 stream whose
    # one event is the error.
    "error_429_stream": (PROVIDERS, {"kind": "stream", "message": "interop-429"}),
    "responses": (PROVIDERS, {"kind": "responses", "message": "interop-plain"}),
    # mock-llm streams chat completions only.
    "responses_stream": (("aimock",), {"kind": "responses", "message": "interop-plain", "stream": True}),
    "models_one_provider": (PROVIDERS, {"kind": "models", "xprovider": True}),
    "model_get": (("mockllm",), {"kind": "model_get", "id": "mockllm-large", "xprovider": True}),
    "model_get_404": (PROVIDERS, {"kind": "model_get", "id": "no-such-model", "xprovider": True}),
    # The provider refuses the key: the router has the same key configured for 'mockllm-revoked'.
    "models_401": (("mockllm",), {"kind": "models", "xprovider": "mockllm-revoked", "api_key": "sk-revoked"}),
    "request_headers": (PROVIDERS, {"kind": "chat", "message": "interop-headers", "organization": "org-interop",
                                    "project": "proj_interop", "headers": USER_HEADERS}),
}

# Request headers that describe the connection or the body's framing, or that the router sets as
# its own by design, and are not expected to reach the provider unchanged. Accept-Encoding is
# left out: whether it is passed on is tied to passing Content-Encoding back (issue 10.1).
REQUEST_HEADERS_NOT_COMPARED = {"host", "connection", "keep-alive", "content-length", "transfer-encoding", "te",
                                "expect", "accept-encoding", "x-request-id", "x-provider"}
# Response headers that describe one connection, the router's own (X-Request-Id is the router's id;
# the provider's moves to X-Provider-Request-Id), and CORS, which is the router's policy.
RESPONSE_HEADERS_NOT_COMPARED = {"date", "connection", "keep-alive", "transfer-encoding", "content-length",
                                 "x-request-id", "x-provider", "x-provider-request-id", "server-timing",
                                 "access-control-allow-origin", "access-control-allow-methods",
                                 "access-control-allow-headers", "access-control-expose-headers",
                                 "access-control-allow-credentials", "access-control-max-age", "vary"}
# Response headers the router adds of its own (besides X-Provider, X-Request-Id and the others
# above): X-Accel-Buffering keeps a reverse proxy in front of it from holding a stream back.
ROUTER_OWN_RESPONSE_HEADERS = {"x-accel-buffering"}
# Ids a server makes up anew on every request: aimock's Responses API item ids, "msg-" and 12
# random bytes in base64url, which may begin or end with "-" or "_" (so no \b around them).
RANDOM_IDS = re.compile(rb"(?<![A-Za-z0-9_-])msg-[A-Za-z0-9_-]{16}(?![A-Za-z0-9_-])")
# In a client's result: the request ids, which differ on every request whatever the path.
CLIENT_HEADERS_NOT_COMPARED = {"x-request-id", "x-provider-request-id", "x-provider"}

# Generated tests (test_client_<scenario>_<client>_<provider>, test_raw_<scenario>_<provider>,
# test_request_headers_<client>_<provider>) that fail on today's code, each with its reason. Remove
# an entry when the fix lands: an unexpected success fails the run.
KNOWN_FAILURES = {
    # none left: every case of issue 10 passes
}


def scenario_plan(client, provider, target):
    """client.mjs's plan for one client and provider; target is 'direct' or 'router'."""
    plan = []
    for name, (providers, spec) in SCENARIOS.items():
        if provider not in providers or spec["kind"] not in CLIENT_KINDS[client]:
            continue
        s = {k: v for k, v in spec.items() if k != "xprovider"}
        s["name"] = name
        s["model"] = MODEL[provider]
        xprovider = spec.get("xprovider")
        if xprovider:
            s["headers"] = dict(s.get("headers") or {}, **{"X-Provider": xprovider if isinstance(xprovider, str)
                                                              else provider})
        if name == "request_headers":
            # Tells the provider's journal entries apart.
            s["message"] = "interop-headers %s %s %s" % (client, provider, target)
        plan.append(s)
    return plan


def normalise_client_result(result):
    """A client's result without the request ids (they differ on every request) and without what
    the provider echoed of the request's headers (compared on their own)."""
    if isinstance(result, list):
        return [normalise_client_result(v) for v in result]
    if not isinstance(result, dict):
        return result
    out = {}
    for k, v in result.items():
        if k == "received_headers":
            continue
        if k == "headers" and isinstance(v, dict):
            v = {h: x for h, x in v.items() if h not in CLIENT_HEADERS_NOT_COMPARED}
        out[k] = normalise_client_result(v)
    return out


def compared_response_headers(headers):
    """{lower-case name: value} of the response headers a client may rely on."""
    out = {}
    for name, value in headers.items():
        n = name.lower()
        if n in RESPONSE_HEADERS_NOT_COMPARED:
            continue
        out[n] = out[n] + ", " + value if n in out else value
    return out


def compared_request_headers(headers):
    return {k.lower(): v for k, v in headers.items() if k.lower() not in REQUEST_HEADERS_NOT_COMPARED}


# --- the test --------------------------------------------------------------------------------

class InteropTest(RouterTestCase):
    """One router with both third-party providers behind it, shared by every test (they only
    read); client results are computed once per (client, provider, direct|router)."""

    maxDiff = None

    @classmethod
    def setUpClass(cls):
        cls.node_dir = prepare_interop()
        cls.workdir = tempfile.mkdtemp(prefix="provider-router-interop-")
        cls.servers = []
        cls.router = None
        cls.results = {}
        try:
            cls.aimock = NodeServer("aimock", "serve-aimock.mjs", "fixtures/aimock.json", cls.workdir, cls.node_dir)
            cls.servers.append(cls.aimock)
            cls.mockllm = NodeServer("mockllm", "serve-mock-llm.mjs", "fixtures/mock-llm.yaml", cls.workdir,
                                     cls.node_dir)
            cls.servers.append(cls.mockllm)
            cls.provider = {"aimock": cls.aimock, "mockllm": cls.mockllm}
            providers = {
                "aimock": cls.aimock.base_url,
                "mockllm": cls.mockllm.base_url,
                # The same server, with a key of the router's own that the server refuses.
                "mockllm-revoked": {"BaseURL": cls.mockllm.base_url, "APIKeyEnv": "INTEROP_REVOKED_KEY"},
            }
            mappings = {MODEL[p]: p for p in PROVIDERS}
            # No cache of the merged list: each test sees the providers as they are.
            cls.router = Router(lambda port: router_config(port, providers, default="aimock", mappings=mappings,
                                                           router={"ModelsCacheSec": "0"}),
                                env={"INTEROP_REVOKED_KEY": "sk-revoked"}, workdir=cls.workdir)
        except Exception:
            dump_logs()
            cls._stop_all()
            raise

    @classmethod
    def _stop_all(cls):
        errors = []
        for p in [cls.router] + cls.servers:
            if p is None:
                continue
            try:
                p.assert_clean_exit()
            except AssertionError as e:
                errors.append(str(e))
        shutil.rmtree(cls.workdir, ignore_errors=True)
        return errors

    @classmethod
    def tearDownClass(cls):
        errors = cls._stop_all()
        if errors:
            raise AssertionError("\n\n".join(errors))

    # helpers

    def base_url(self, provider, target):
        return self.provider[provider].base_url if target == "direct" else \
            "http://%s:%d/v1" % (LOOPBACK, self.router.port)

    def client_results(self, client, provider, target):
        """{scenario: result} of client.mjs, run once per (client, provider, target)."""
        key = (client, provider, target)
        if key not in self.results:
            plan = scenario_plan(client, provider, target)
            plan_path = os.path.join(self.workdir, "plan-%s-%s-%s.json" % key)
            with open(plan_path, "w") as f:
                json.dump(plan, f)
            argv = ["node", os.path.join(self.node_dir, "client.mjs"), client, self.base_url(provider, target),
                    plan_path]
            p = subprocess.run(argv, cwd=self.node_dir, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=300 * SLOW)
            out = p.stdout.decode().strip().splitlines()
            self.assertEqual(p.returncode, 0, "%s failed:\n%s\n%s" % (" ".join(argv), p.stdout.decode(),
                                                                       p.stderr.decode()))
            self.results[key] = json.loads(out[-1])
        return self.results[key]

    def check_direct(self, scenario, client, provider, direct):
        """The scenario did what it is scripted to do when going direct (else the comparison
        would prove nothing)."""
        if scenario.startswith("error_") or scenario in ("model_get_404", "models_401"):
            self.assertTrue("error" in direct or "exception" in direct, direct)
            if "error" in direct and scenario != "error_429_stream":
                want = {"error_401": 401, "error_429": 429, "error_500": 500, "model_get_404": 404,
                        "models_401": 401}[scenario]
                self.assertEqual(direct["error"]["status"], want, direct)
            return
        self.assertNotIn("error", direct)
        self.assertNotIn("exception", direct)
        if scenario in ("chat", "stream", "stream_usage", "responses", "responses_stream"):
            self.assertIn("answer", direct["text"].lower(), direct)
        if scenario.startswith("tools"):
            self.assertEqual([c["name"] for c in direct["tool_calls"]], ["get_weather"], direct)
        if scenario == "stream_usage":
            self.assertTrue(direct["usage"], direct)
        if scenario.startswith("models"):
            self.assertTrue(direct["models"], direct)

    def compare_client(self, scenario, client, provider):
        direct = self.client_results(client, provider, "direct")[scenario]
        routed = self.client_results(client, provider, "router")[scenario]
        self.check_direct(scenario, client, provider, direct)
        self.assertEqual(normalise_client_result(routed), normalise_client_result(direct),
                         "%s, %s, %s: through the router (first) differs from direct (second)" % (
                             scenario, client, provider))

    def received_headers(self, client, provider, target):
        """The request headers the provider received for the request_headers scenario."""
        if provider == "mockllm":
            result = self.client_results(client, provider, target)["request_headers"]
            self.assertIn("received_headers", result, result)
            return result["received_headers"]
        self.client_results(client, provider, target)
        tag = "interop-headers %s %s %s" % (client, provider, target)
        r = http_request(self.aimock.port, "GET", "/__aimock/journal")
        self.assertEqual(r.status, 200, r)
        for entry in r.json():
            if tag in json.dumps(entry.get("body")):
                return entry["headers"]
        raise AssertionError("no request '%s' in aimock's journal" % tag)

    def compare_request_headers(self, client, provider):
        direct = compared_request_headers(self.received_headers(client, provider, "direct"))
        routed = compared_request_headers(self.received_headers(client, provider, "router"))
        # Every header the client sent must reach the provider as sent; the router may add its own.
        missing = {k: v for k, v in direct.items() if routed.get(k) != v}
        self.assertEqual(missing, {}, "headers that did not reach the provider as the client sent them "
                         "(through the router: %s)" % json.dumps({k: routed.get(k) for k in missing}))

    # raw HTTP

    def raw(self, provider, target, method, path, body=None, headers=None):
        port = self.provider[provider].port if target == "direct" else self.router.port
        h = {"User-Agent": "interop-raw/1", "Authorization": "Bearer sk-test-not-a-real-key"}
        h.update(headers or {})
        return http_request(port, method, path, body=body, headers=h)

    def compare_raw(self, provider, method, path, body=None, headers=None):
        direct = self.raw(provider, "direct", method, path, body, headers)
        routed = self.raw(provider, "router", method, path, body, headers)
        self.assertEqual(routed.status, direct.status, "status: %r vs %r" % (routed, direct))
        self.assertEqual(RANDOM_IDS.sub(b"msg-<id>", routed.body), RANDOM_IDS.sub(b"msg-<id>", direct.body),
                         "body bytes through the router (first) and direct (second)")
        # Every header the provider sent reaches the client as sent; the router adds only its own.
        want = compared_response_headers(direct.headers)
        got = {k: v for k, v in compared_response_headers(routed.headers).items()
               if k not in ROUTER_OWN_RESPONSE_HEADERS or k in want}
        self.assertEqual(got, want, "response headers through the router (first) and direct (second)")
        return direct, routed

    # hand-written cases

    def journal(self, path=None):
        r = http_request(self.aimock.port, "GET", "/__aimock/journal")
        self.assertEqual(r.status, 200, r)
        return [e for e in r.json() if path is None or e.get("path") == path]

    def journal_entry(self, tag):
        for entry in reversed(self.journal()):
            if tag in json.dumps(entry.get("body")):
                return entry
        raise AssertionError("no request '%s' in aimock's journal" % tag)

    def test_models_merged_keeps_every_field(self):
        """Without X-Provider the merged list has every provider's entries, each with every field
        the provider sent (the router may add fields, never drop or change one)."""
        r = self.router.request("GET", "/v1/models")
        self.assertEqual(r.status, 200, r)
        merged = {m["id"]: m for m in r.json()["data"]}
        for provider in PROVIDERS:
            own = http_request(self.provider[provider].port, "GET", "/v1/models").json()["data"]
            for entry in own:
                self.assertIn(entry["id"], merged, "%s's model missing from %r" % (provider, r.body))
                got = merged[entry["id"]]
                changed = {k: (got.get(k), v) for k, v in entry.items() if got.get(k) != v}
                self.assertEqual(changed, {}, "%s's entry %s: field: (through the router, as the provider "
                                 "sent it)" % (provider, entry["id"]))

    def test_head_models_does_not_fan_out(self):
        """HEAD /v1/models is answered without asking every provider for its list. (aimock does not
        journal /v1/models and mock-llm counts nothing: tests/mock/mock-provider counts.)"""
        alpha, beta = self.start_mock("alpha", ["alpha-1"]), self.start_mock("beta", ["beta-1"])
        router = self.start_router(lambda port: router_config(port, {"alpha": alpha.base_url, "beta": beta.base_url},
                                                              router={"ModelsCacheSec": "0"}))
        r = router.request("HEAD", "/v1/models")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, b"")
        self.assertEqual((alpha.stats()["models"], beta.stats()["models"]), (0, 0),
                         "HEAD /v1/models reached the providers")

    def check_provider_request_id(self, routed, tag):
        entry = self.journal_entry(tag)
        provider_id = entry["headers"].get("x-request-id")
        self.assertTrue(provider_id, entry)
        self.assertEqual(routed.header("X-Provider-Request-Id"), provider_id,
                         "X-Provider-Request-Id must carry aimock's x-request-id: %r" % routed)
        self.assertTrue(routed.header("X-Request-Id"), routed)

    def test_provider_request_id_chat(self):
        """The provider's own x-request-id reaches the client as X-Provider-Request-Id, beside the
        router's X-Request-Id."""
        tag = "interop-plain provider-request-id chat"
        routed = self.router.request("POST", "/v1/chat/completions", body=_chat("aimock", tag))
        self.assertEqual(routed.status, 200, routed)
        self.check_provider_request_id(routed, tag)

    def test_provider_request_id_stream(self):
        tag = "interop-plain provider-request-id stream"
        routed = self.router.request("POST", "/v1/chat/completions", body=_chat("aimock", tag, stream=True))
        self.assertEqual(routed.status, 200, routed)
        self.assertTrue(routed.body.endswith(b"data: [DONE]\n\n"), routed)
        self.check_provider_request_id(routed, tag)

    def test_provider_request_id_error(self):
        tag = "interop-429 provider-request-id error"
        routed = self.router.request("POST", "/v1/chat/completions", body=_chat("aimock", tag))
        self.assertEqual(routed.status, 429, routed)
        self.check_provider_request_id(routed, tag)

    def test_provider_request_id_openai_client(self):
        """What the openai client shows its user: both ids."""
        result = self.client_results("openai", "aimock", "router")["chat"]
        provider_id = result["headers"].get("x-provider-request-id")
        self.assertTrue(provider_id, result)
        self.assertTrue(result["headers"].get("x-request-id"), result)
        ids = [e["headers"].get("x-request-id") for e in self.journal("/v1/chat/completions")]
        self.assertIn(provider_id, ids)

    def test_provider_request_id_absent_when_provider_sends_none(self):
        """mock-llm sends no x-request-id: the router makes none up."""
        routed = self.router.request("POST", "/v1/chat/completions", body=_chat("mockllm", "interop-plain"))
        self.assertEqual(routed.status, 200, routed)
        self.assertIsNone(routed.header("X-Provider-Request-Id"), routed)
        self.assertTrue(routed.header("X-Request-Id"), routed)

    def test_still_serves(self):
        """After all of it, the router still answers (run last: names sort after test_s…)."""
        for provider in PROVIDERS:
            r = self.router.request("POST", "/v1/chat/completions", body=_chat(provider, "interop-plain"))
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.header("X-Provider"), provider, r)


def _chat(provider, message, **extra):
    body = {"model": MODEL[provider], "messages": [{"role": "system", "content": "You are a test."},
                                                    {"role": "user", "content": message}]}
    body.update(extra)
    return json.dumps(body, separators=(",", ":")).encode()


RAW_CASES = {
    # name: (providers, method, path, body(provider) or None, extra headers(provider) or None)
    "chat": (PROVIDERS, "POST", "/v1/chat/completions", lambda p: _chat(p, "interop-plain"), None),
    "stream": (PROVIDERS, "POST", "/v1/chat/completions", lambda p: _chat(p, "interop-plain", stream=True), None),
    "stream_usage": (("aimock",), "POST", "/v1/chat/completions",
                     lambda p: _chat(p, "interop-plain", stream=True, stream_options={"include_usage": True}), None),
    "tools": (PROVIDERS, "POST", "/v1/chat/completions",
              lambda p: _chat(p, "interop-tools", tools=[{"type": "function", "function": {
                  "name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]), None),
    "tools_stream": (("aimock",), "POST", "/v1/chat/completions",
                     lambda p: _chat(p, "interop-tools", stream=True, stream_options={"include_usage": True},
                                     tools=[{"type": "function", "function": {
                                         "name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]),
                     None),
    "error_401": (PROVIDERS, "POST", "/v1/chat/completions", lambda p: _chat(p, "interop-401"), None),
    "error_429": (PROVIDERS, "POST", "/v1/chat/completions", lambda p: _chat(p, "interop-429"), None),
    "error_500": (PROVIDERS, "POST", "/v1/chat/completions", lambda p: _chat(p, "interop-500"), None),
    "error_429_stream": (PROVIDERS, "POST", "/v1/chat/completions",
                         lambda p: _chat(p, "interop-429", stream=True), None),
    "responses": (PROVIDERS, "POST", "/v1/responses",
                  lambda p: json.dumps({"model": MODEL[p], "input": "interop-plain"}).encode(), None),
    "responses_stream": (("aimock",), "POST", "/v1/responses",
                         lambda p: json.dumps({"model": MODEL[p], "input": "interop-plain", "stream": True}).encode(),
                         None),
    "models_one_provider": (PROVIDERS, "GET", "/v1/models", None, lambda p: {"X-Provider": p}),
    "model_get": (("mockllm",), "GET", "/v1/models/mockllm-large", None, lambda p: {"X-Provider": p}),
    "model_get_404": (PROVIDERS, "GET", "/v1/models/no-such-model", None, lambda p: {"X-Provider": p}),
    # The router has the refused key configured for 'mockllm-revoked'; direct, the client sends it.
    "models_401": (("mockllm",), "GET", "/v1/models", None,
                   lambda p: {"X-Provider": "mockllm-revoked", "Authorization": "Bearer sk-revoked"}),
}


def _make_client_test(scenario, client, provider):
    def test(self):
        self.compare_client(scenario, client, provider)
    test.__doc__ = "%s via %s from %s: the same through the router as direct" % (scenario, client, provider)
    return test


def _make_raw_test(name, provider):
    _, method, path, body, headers = RAW_CASES[name]

    def test(self):
        self.compare_raw(provider, method, path, body(provider) if body else None,
                         headers(provider) if headers else None)
    test.__doc__ = "raw HTTP %s %s on %s: status, body bytes and headers as direct" % (method, path, provider)
    return test


def _make_headers_test(client, provider):
    def test(self):
        self.compare_request_headers(client, provider)
    test.__doc__ = "the request headers %s sends reach %s through the router as sent" % (client, provider)
    return test


def _add(name, fn):
    if name in KNOWN_FAILURES:
        fn = unittest.expectedFailure(fn)
    setattr(InteropTest, name, fn)


def _generate():
    for scenario, (providers, spec) in SCENARIOS.items():
        for client in CLIENTS:
            if spec["kind"] not in CLIENT_KINDS[client]:
                continue
            for provider in providers:
                _add("test_client_%s_%s_%s" % (scenario, client.replace("-", "_"), provider),
                     _make_client_test(scenario, client, provider))
    for name, (providers, *_rest) in RAW_CASES.items():
        for provider in providers:
            _add("test_raw_%s_%s" % (name, provider), _make_raw_test(name, provider))
    for client in CLIENTS:
        for provider in PROVIDERS:
            _add("test_request_headers_%s_%s" % (client.replace("-", "_"), provider),
                 _make_headers_test(client, provider))
    unknown = KNOWN_FAILURES.keys() - set(dir(InteropTest))
    assert not unknown, "KNOWN_FAILURES names no such test: %s" % sorted(unknown)


_generate()


if __name__ == "__main__":
    main()
