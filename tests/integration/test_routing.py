#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""Routing by X-Provider header, by model mapping (file and MODEL_MAPPINGS) and by default;
X-Provider / X-Request-Id on every answer; /v1/models, /health, CORS."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SharedRouterTestCase, chat_body, http_request, main  # noqa: E402

BETA_KEY = "sk-beta-secret-0123456789"


class RoutingTest(SharedRouterTestCase):
    mappings = {"file-model": "beta", "overridden": "alpha", "alpha-alias": "alpha"}
    # The plan's variable beats the file: 'overridden' goes to beta.
    router_env = {"MODEL_MAPPINGS": "env-model:beta, overridden:beta", "BETA_KEY": BETA_KEY}
    # CORS is off unless asked for: test_cors_preflight asks. test_models checks that the
    # providers are asked: no list kept from an earlier test.
    router_keys = {"CORSAllowOrigin": "*", "ModelsCacheSec": "0"}

    @classmethod
    def extra_providers(cls):
        return {"beta": {"APIKeyEnv": "BETA_KEY"}}

    def chat_ok(self, body, headers=None):
        r = self.router.chat(body, headers=headers)
        self.assertEqual(r.status, 200, r)
        self.assertTrue(r.header("X-Request-Id"), r)
        return r

    def assert_served_by(self, r, mock, content="hello"):
        self.assertEqual(r.header("X-Provider"), mock.name, r)
        self.assertEqual(r.header("X-Mock-Name"), mock.name, r)
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "%s: %s" % (mock.name, content), r)

    def assert_counts(self, alpha, beta):
        self.assertEqual(self.alpha.stats()["chat"], alpha)
        self.assertEqual(self.beta.stats()["chat"], beta)

    def test_default_provider(self):
        r = self.chat_ok(chat_body(model="unmapped-model"))
        self.assert_served_by(r, self.alpha)
        self.assertEqual(r.json()["model"], "unmapped-model")
        self.assert_counts(1, 0)

    def test_no_model_goes_to_default(self):
        r = self.chat_ok(chat_body(model=None))
        self.assert_served_by(r, self.alpha)
        self.assert_counts(1, 0)

    def test_header(self):
        r = self.chat_ok(chat_body(model="unmapped-model"), headers={"X-Provider": "beta"})
        self.assert_served_by(r, self.beta)
        self.assert_counts(0, 1)

    def test_header_beats_mapping(self):
        r = self.chat_ok(chat_body(model="file-model"), headers={"X-Provider": "alpha"})
        self.assert_served_by(r, self.alpha)
        r = self.chat_ok(chat_body(model="alpha-alias"), headers={"X-Provider": "beta"})
        self.assert_served_by(r, self.beta)
        self.assert_counts(1, 1)

    def test_mapping_from_file(self):
        r = self.chat_ok(chat_body(model="file-model"))
        self.assert_served_by(r, self.beta)
        self.assertEqual(r.json()["model"], "file-model")
        r = self.chat_ok(chat_body(model="alpha-alias"))
        self.assert_served_by(r, self.alpha)
        self.assert_counts(1, 1)

    def test_mapping_from_environment(self):
        r = self.chat_ok(chat_body(model="env-model"))
        self.assert_served_by(r, self.beta)
        # MODEL_MAPPINGS overrides the file's mapping of the same model.
        r = self.chat_ok(chat_body(model="overridden"))
        self.assert_served_by(r, self.beta)
        self.assert_counts(0, 2)

    def test_echo_provider(self):
        r = self.chat_ok(chat_body("hi echo", model="whatever"), headers={"X-Provider": "echo"})
        self.assertEqual(r.header("X-Provider"), "echo")
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "hi echo")
        self.assert_counts(0, 0)

    def test_request_id_generated_and_forwarded(self):
        r1 = self.chat_ok(chat_body())
        r2 = self.chat_ok(chat_body())
        id1, id2 = r1.header("X-Request-Id"), r2.header("X-Request-Id")
        self.assertNotEqual(id1, id2)
        # The provider saw the same id as the client.
        last = self.alpha.stats()["last_request"]
        self.assertEqual(last["headers"].get("x-request-id"), id2, last)

    def test_request_id_kept(self):
        rid = "client-chosen.id_42:abc"
        r = self.chat_ok(chat_body(), headers={"X-Request-Id": rid})
        self.assertEqual(r.header("X-Request-Id"), rid)
        self.assertEqual(self.alpha.stats()["last_request"]["headers"].get("x-request-id"), rid)
        # Also on an error the router produces itself.
        r = self.router.chat("{broken", headers={"X-Request-Id": rid})
        self.assertEqual(r.status, 400, r)
        self.assertEqual(r.header("X-Request-Id"), rid)

    def test_unusable_request_id_replaced(self):
        for bad in ("has spaces in it", "x" * 200, "semi;colon"):
            r = self.chat_ok(chat_body(), headers={"X-Request-Id": bad})
            rid = r.header("X-Request-Id")
            self.assertTrue(rid)
            self.assertNotEqual(rid, bad)

    def test_headers_on_every_answer(self):
        answers = [
            self.router.chat(chat_body()),
            self.router.chat(chat_body(), headers={"X-Provider": "beta"}),
            self.router.chat(chat_body(mock={"status": 503, "body": {"error": {"message": "busy"}}})),
        ]
        for r in answers:
            self.assertTrue(r.header("X-Request-Id"), r)
            self.assertIn(r.header("X-Provider"), ("alpha", "beta"), r)
        others = [
            self.router.request("GET", "/health"),
            self.router.request("GET", "/v1/models"),
            self.router.request("GET", "/no/such/path"),
            self.router.request("GET", "/v1/chat/completions"),
            self.router.chat("{broken"),
            self.router.chat(chat_body(), headers={"X-Provider": "nope"}),
            self.router.request("OPTIONS", "/v1/chat/completions"),
        ]
        for r in others:
            self.assertTrue(r.header("X-Request-Id"), r)
        self.assertEqual(others[2].status, 404, others[2])
        self.assertEqual(others[3].status, 405, others[3])
        self.assertIn("POST", others[3].header("Allow") or "", others[3])

    def test_body_forwarded_byte_for_byte(self):
        body = ('{ "model" : "unmapped-model",\n  "messages":[{"role":"user","content":"b\\u00e9 \u00fc \U0001F600"}],'
                '"temperature":0.70, "zzz":[1,2,{"a":null}] }').encode()
        r = self.chat_ok(body)
        self.assert_served_by(r, self.alpha, content="b\u00e9 \u00fc \U0001F600")
        last = self.alpha.stats()["last_request"]
        self.assertEqual(last["body"].encode(), body)
        self.assertEqual(last["path"], "/v1/chat/completions")
        self.assertEqual(last["method"], "POST")

    def test_large_body_forwarded_intact(self):
        content = "".join(chr(0x41 + (i * 7) % 26) for i in range(900 * 1024))
        body = chat_body(content, model="unmapped-model")
        import json as _json
        data = _json.dumps(body).encode()
        r = self.chat_ok(data)
        self.assertEqual(r.json()["choices"][0]["message"]["content"], "alpha: " + content)
        last = self.alpha.stats()["last_request"]
        self.assertEqual(last["body_size"], len(data))
        self.assertEqual(last["body"].encode(), data)

    def test_authorization(self):
        # A provider without a key of its own gets the client's Authorization header...
        self.chat_ok(chat_body(), headers={"Authorization": "Bearer client-token"})
        self.assertEqual(self.alpha.stats()["last_request"]["headers"].get("authorization"),
                         "Bearer client-token")
        # ...one with a key gets its key, never the client's.
        self.chat_ok(chat_body(), headers={"Authorization": "Bearer client-token", "X-Provider": "beta"})
        self.assertEqual(self.beta.stats()["last_request"]["headers"].get("authorization"),
                         "Bearer " + BETA_KEY)
        self.assertNotIn(BETA_KEY, self.router.log(limit=None))

    def test_models(self):
        r = self.router.request("GET", "/v1/models")
        self.assertEqual(r.status, 200, r)
        doc = r.json()
        self.assertEqual(doc.get("object"), "list", doc)
        ids = [m["id"] for m in doc["data"]]
        for m in doc["data"]:
            self.assertEqual(m.get("object"), "model", m)
        for want in ("alpha-1", "alpha-2", "beta-1", "file-model", "env-model", "overridden", "alpha-alias"):
            self.assertIn(want, ids, doc)
        self.assertEqual(len(ids), len(set(ids)), "duplicates in %s" % ids)
        self.assertGreaterEqual(self.alpha.stats()["models"], 1)
        self.assertGreaterEqual(self.beta.stats()["models"], 1)

    def test_head_and_trailing_slash(self):
        r = self.router.request("HEAD", "/health")
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.body, b"")
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.router.port, timeout=30)
        try:
            conn.request("POST", "/v1/chat/completions/", body=json.dumps(chat_body()),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            self.assertEqual(resp.status, 200)
            resp.read()
        finally:
            conn.close()

    def test_health(self):
        r = self.router.request("GET", "/health")
        self.assertEqual(r.status, 200, r)
        self.assertTrue((r.header("Content-Type") or "").startswith("application/json"), r)
        doc = r.json()
        self.assertEqual(doc.get("status"), "ok", doc)
        self.assertEqual(doc.get("default_provider"), "alpha", doc)
        providers = doc.get("providers")
        for name in ("alpha", "beta", "echo"):
            self.assertIn(name, providers, doc)
            self.assertIn("state", providers[name], doc)
        # After a served request the provider is known to be up.
        self.chat_ok(chat_body())
        doc = self.router.request("GET", "/health").json()
        self.assertEqual(doc["providers"]["alpha"]["state"], "up", doc)

    def test_cors_preflight(self):
        r = self.router.request("OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://localhost:8080",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-provider",
        })
        self.assertEqual(r.status, 204, r)
        self.assertEqual(r.body, b"")
        self.assertTrue(r.header("Access-Control-Allow-Origin"), r)
        self.assertIn("POST", r.header("Access-Control-Allow-Methods") or "", r)
        allowed = (r.header("Access-Control-Allow-Headers") or "").lower()
        self.assertIn("x-provider", allowed, r)
        self.assertIn("content-type", allowed, r)
        self.assertTrue(r.header("X-Request-Id"), r)
        # Ordinary answers carry the CORS headers too, and expose ours.
        r = self.chat_ok(chat_body(), headers={"Origin": "http://localhost:8080"})
        self.assertTrue(r.header("Access-Control-Allow-Origin"), r)
        exposed = (r.header("Access-Control-Expose-Headers") or "").lower()
        self.assertIn("x-provider", exposed, r)
        self.assertIn("x-request-id", exposed, r)

    def test_keep_alive_connection_serves_many(self):
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.router.port, timeout=30)
        try:
            for i in range(5):
                provider = "alpha" if i % 2 == 0 else "beta"
                conn.request("POST", "/v1/chat/completions", body=json.dumps(chat_body("n%d" % i)),
                             headers={"Content-Type": "application/json", "X-Provider": provider})
                resp = conn.getresponse()
                body = json.loads(resp.read())
                self.assertEqual(resp.status, 200)
                self.assertEqual(resp.headers.get("X-Provider"), provider)
                self.assertEqual(body["choices"][0]["message"]["content"], "%s: n%d" % (provider, i))
        finally:
            conn.close()
        self.assert_counts(3, 2)


if __name__ == "__main__":
    main()
