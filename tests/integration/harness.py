# SPDX-License-Identifier: LGPL-2.1-or-later
"""Integration test harness: real provider-router processes against loopback mock providers.

Python 3 standard library only. Binaries are found through the environment meson sets
(PROVIDER_ROUTER, MOCK_PROVIDER), else under build/ in the source tree. Everything listens on
127.0.0.1 only. Every wait is bounded in time.
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

SOURCE_ROOT = os.environ.get("PROVIDER_ROUTER_SOURCE_DIR") or os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_DIR = os.environ.get("PROVIDER_ROUTER_BUILD_DIR") or os.path.join(SOURCE_ROOT, "build")


def _binary(env_name, relative):
    path = os.environ.get(env_name) or os.path.join(BUILD_DIR, relative)
    return path


PROVIDER_ROUTER = _binary("PROVIDER_ROUTER", "src/provider-router")
MOCK_PROVIDER = _binary("MOCK_PROVIDER", "tests/mock/mock-provider")
SHIPPED_CONFIG = os.path.join(SOURCE_ROOT, "data", "provider-router.conf")

LOOPBACK = "127.0.0.1"

# Sanitizer builds are several times slower: meson sets this factor for them. It scales the
# generous waits, never the assertions about ordering.
SLOW = float(os.environ.get("PROVIDER_ROUTER_TEST_SLOW") or 1.0)

# Variables of the original plan and of systemd that must not leak from the caller's environment
# into a daemon under test.
_SCRUBBED_ENV = (
    "PORT", "HOST", "DEFAULT_PROVIDER", "LM_STUDIO_BASE_URL", "LM_STUDIO_DEFAULT_MODEL",
    "QWEN_PROXY_BASE_URL", "QWEN_API_KEY", "QWEN_BASE_URL", "MODEL_MAPPINGS", "LOG_LEVEL",
    "LOG_REQUESTS", "LOG_RESPONSES", "REQUEST_TIMEOUT", "CREDENTIALS_DIRECTORY", "JOURNAL_STREAM",
    "NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID",
    "INVOCATION_ID", "STATE_DIRECTORY", "DBUS_SESSION_BUS_ADDRESS", "DBUS_SYSTEM_BUS_ADDRESS",
)

_SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                    "WARNING: AddressSanitizer", "ThreadSanitizer", "UndefinedBehaviorSanitizer")

# Every process started by the harness that is still running, for the failure dump and for a
# last-resort cleanup.
_live = []


def wait_until(predicate, timeout, interval=0.02, what="condition"):
    """Polls predicate until it returns a true value; returns it. Raises after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def free_port():
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def closed_port():
    """A loopback port nothing listens on (connections are refused)."""
    return free_port()


def _base_env(extra=None):
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.setdefault("LANG", "C.UTF-8")
    if extra:
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
    return env


def _read(path, limit=None):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    if limit and len(text) > limit:
        text = "[... %d bytes cut ...]\n" % (len(text) - limit) + text[-limit:]
    return text


def sanitizer_reports(text):
    return [line for line in text.splitlines() if any(m in line for m in _SANITIZER_MARKS)]


class _Process:
    """A child process with its stderr in a file."""

    label = "process"

    def __init__(self, argv, env, workdir, log_name, stdout=None):
        self.argv = list(argv)
        self.workdir = workdir
        self.log_path = os.path.join(workdir, log_name)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                     stdout=stdout if stdout is not None else self._log,
                                     stderr=self._log, cwd=workdir, close_fds=True)
        self.returncode = None
        self.final_log = None
        _live.append(self)

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def log(self, limit=20000):
        if self.final_log is not None:
            return self.final_log if not limit or len(self.final_log) <= limit else self.final_log[-limit:]
        return _read(self.log_path, limit)

    def send_signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout=15.0, sig=signal.SIGTERM):
        """Sends sig and waits; returns the exit status. Kills on timeout."""
        if self.returncode is not None:
            return self.returncode
        if self.alive():
            self.proc.send_signal(sig)
        try:
            self.returncode = self.proc.wait(timeout=timeout * SLOW)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.returncode = "killed after %.0f s without exiting" % (timeout * SLOW)
        self._log.close()
        self.final_log = _read(self.log_path)
        if self in _live:
            _live.remove(self)
        return self.returncode

    def kill(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self in _live:
            _live.remove(self)
        self._log.close()

    def rss_kib(self):
        """Resident set size from /proc, in KiB."""
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS for pid %d" % self.pid)

    def assert_clean_exit(self, timeout=15.0):
        rc = self.stop(timeout)
        log = self.log()
        reports = sanitizer_reports(log)
        if rc != 0 or reports:
            raise AssertionError("%s %s exited with %r%s\n--- log ---\n%s" % (
                self.label, " ".join(self.argv), rc,
                " and sanitizer reports" if reports else "", log))


class MockProvider(_Process):
    """tests/mock/mock-provider on an ephemeral loopback port."""

    label = "mock provider"

    def __init__(self, name, models=(), workdir=None):
        self.name = name
        self._own_dir = workdir is None
        workdir = workdir or tempfile.mkdtemp(prefix="mock-%s-" % name)
        port_file = os.path.join(workdir, "mock-%s.port" % name)
        argv = [MOCK_PROVIDER, "--name", name, "--port", "0", "--port-file", port_file]
        for m in models:
            argv += ["--model", m]
        super().__init__(argv, _base_env(), workdir, "mock-%s.log" % name)

        def port_ready():
            if not self.alive():
                raise AssertionError("mock provider %s exited: %s" % (name, self.log()))
            try:
                with open(port_file) as f:
                    return int(f.read().strip() or 0)
            except (OSError, ValueError):
                return 0

        self.port = wait_until(port_ready, 10 * SLOW, what="mock provider %s to listen" % name)
        self.base_url = "http://%s:%d/v1" % (LOOPBACK, self.port)

    def stats(self):
        r = http_request(self.port, "GET", "/_mock/stats")
        assert r.status == 200, r
        return r.json()

    def reset(self):
        r = http_request(self.port, "POST", "/_mock/reset", body=b"")
        assert r.status == 200, r

    def wait_stat(self, key, value, timeout=10.0):
        """Waits until stats()[key] >= value; returns the stats."""
        box = {}

        def check():
            box["s"] = self.stats()
            return box["s"][key] >= value
        try:
            wait_until(check, timeout * SLOW, interval=0.02, what="mock %s %s >= %d" % (self.name, key, value))
        except AssertionError as e:
            raise AssertionError("%s; last stats: %s" % (e, json.dumps(box.get("s")))) from None
        return box["s"]

    def cleanup(self):
        self.assert_clean_exit()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def router_config(port, providers, default=None, mappings=None, router=None, with_echo=True):
    """A configuration file's text.

    providers: {name: base_url or dict of keys}; default: DefaultProvider (first provider if
    None); mappings: {model: provider}; router: extra [Router] keys. An echo provider is added
    unless with_echo is False, so a test can always check that the daemon still serves."""
    lines = ["[Router]", "Host=%s" % LOOPBACK, "Port=%d" % port]
    names = list(providers)
    if default is None and names:
        default = names[0]
    if default:
        lines.append("DefaultProvider=%s" % default)
    # The circuit breaker would turn one test's deliberate failures into another's 503s; the
    # tests of the breaker itself set FailureThreshold.
    keys = {"LogLevel": "debug", "LogRequests": "true", "FailureThreshold": "0"}
    keys.update(router or {})
    for k, v in keys.items():
        lines.append("%s=%s" % (k, v))
    for name, spec in providers.items():
        lines += ["", "[Provider %s]" % name]
        if isinstance(spec, str):
            spec = {"BaseURL": spec}
        for k, v in spec.items():
            lines.append("%s=%s" % (k, v))
    if with_echo and "echo" not in providers:
        lines += ["", "[Provider echo]", "Kind=echo"]
    if mappings:
        lines += ["", "[ModelMappings]"]
        for model, provider in mappings.items():
            lines.append("%s=%s" % (model, provider))
    return "\n".join(lines) + "\n"


class _PortTaken(Exception):
    pass


class Router(_Process):
    """The real daemon, started by hand (binding Host:Port itself) or through
    systemd-socket-activate.

    config: the main file's text, or a function port -> text, or None for no --config at all;
    dropins: {file name: text}; env: extra environment (None removes a variable)."""

    label = "provider-router"

    def __init__(self, config=None, dropins=None, env=None, args=(), socket_activated=False,
                 port=None, wait=True, workdir=None):
        self._own_dir = workdir is None
        workdir = workdir or tempfile.mkdtemp(prefix="provider-router-test-")
        self.socket_activated = socket_activated
        # A free port may be taken by someone else before the daemon binds it: then try another,
        # unless the caller chose the port.
        for attempt in range(3):
            self.port = port or free_port()
            try:
                self._launch(workdir, config, dropins, env, args, wait)
                return
            except _PortTaken:
                self.kill()
                if port or attempt == 2:
                    raise AssertionError("port %d is in use\n%s" % (self.port, self.log())) from None

    def _launch(self, workdir, config, dropins, env, args, wait):
        self.config_path = None
        if config is not None:
            text = config(self.port) if callable(config) else config
            self.config_path = os.path.join(workdir, "provider-router.conf")
            with open(self.config_path, "w") as f:
                f.write(text)
        if dropins:
            d = os.path.join(workdir, "provider-router.conf.d")
            os.makedirs(d, exist_ok=True)
            for name, text in dropins.items():
                with open(os.path.join(d, name), "w") as f:
                    f.write(text)
        state = os.path.join(workdir, "state")
        os.makedirs(state, exist_ok=True)
        full_env = _base_env({"STATE_DIRECTORY": state})
        full_env.update({k: str(v) for k, v in (env or {}).items() if v is not None})
        for k, v in (env or {}).items():
            if v is None:
                full_env.pop(k, None)

        daemon = [PROVIDER_ROUTER, "--bus=none"]
        if self.config_path:
            daemon += ["--config", self.config_path]
        daemon += list(args)
        if self.socket_activated:
            # systemd-socket-activate passes on only what -E names.
            argv = ["systemd-socket-activate", "-l", "%s:%d" % (LOOPBACK, self.port)]
            for k, v in full_env.items():
                if k in _PASSED_TO_ACTIVATED or k in (env or {}):
                    argv += ["-E", "%s=%s" % (k, v)]
            argv += daemon
        else:
            argv = daemon
        _Process.__init__(self, argv, full_env, workdir, "provider-router.log")
        if self.socket_activated:
            # It listens before the daemon runs (the first connection starts it): wait for the
            # socket, then for the daemon.
            wait_until(lambda: _port_open(self.port) or self._dead(), 10 * SLOW,
                       what="systemd-socket-activate to listen")
        if wait:
            self.wait_ready()

    def _dead(self):
        if not self.alive():
            log = self.log()
            if "in use" in log:
                raise _PortTaken()
            raise AssertionError("%s exited early with %r\n--- log ---\n%s" % (
                self.label, self.proc.returncode, log))
        return False

    def wait_ready(self, timeout=15.0):
        def ready():
            self._dead()
            try:
                r = http_request(self.port, "GET", "/health", timeout=2)
            except OSError:
                return False
            return r.status == 200
        wait_until(ready, timeout * SLOW, interval=0.05, what="provider-router /health on port %d" % self.port)

    def cleanup(self):
        self.assert_clean_exit()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # conveniences
    def request(self, method, path, body=None, headers=None, timeout=30.0):
        return http_request(self.port, method, path, body=body, headers=headers, timeout=timeout)

    def chat(self, body, headers=None, timeout=30.0):
        return http_request(self.port, "POST", "/v1/chat/completions", body=body, headers=headers,
                            timeout=timeout)

    def stream(self, body, headers=None, timeout=30.0, on_event=None):
        return stream_request(self.port, "/v1/chat/completions", body, headers=headers, timeout=timeout,
                              on_event=on_event)


_PASSED_TO_ACTIVATED = ("PATH", "LANG", "HOME", "STATE_DIRECTORY", "ASAN_OPTIONS", "UBSAN_OPTIONS",
                        "LSAN_OPTIONS", "G_DEBUG", "G_SLICE")


def _port_open(port):
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1):
            return True
    except OSError:
        return False


def run_check_config(config_path=None, env=None, timeout=30.0):
    """provider-router --check-config; returns (exit status, stdout, stderr)."""
    argv = [PROVIDER_ROUTER, "--check-config"]
    if config_path:
        argv += ["--config", config_path]
    p = subprocess.run(argv, env=_base_env(env), stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=timeout * SLOW)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


# --- HTTP -----------------------------------------------------------------------------------

class Response:
    def __init__(self, status, reason, headers, body, elapsed):
        self.status = status
        self.reason = reason
        self.headers = headers      # http.client.HTTPMessage: case-insensitive get()
        self.body = body
        self.elapsed = elapsed

    def header(self, name):
        return self.headers.get(name)

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise AssertionError("not JSON (%s): %r" % (e, self.body[:500])) from None

    def __repr__(self):
        return "<Response %d %r %s>" % (self.status, self.body[:300], dict(self.headers.items()))


def _encode_body(body):
    if body is None:
        return None
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()


def http_request(port, method, path, body=None, headers=None, timeout=30.0):
    """One request on a fresh connection; returns a Response with the whole body."""
    data = _encode_body(body)
    h = {"Content-Type": "application/json"} if data is not None else {}
    h.update(headers or {})
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout * SLOW)
    start = time.monotonic()
    try:
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        payload = resp.read()
        return Response(resp.status, resp.reason, resp.headers, payload, time.monotonic() - start)
    finally:
        conn.close()


def chat_body(content="hello", model="test-model", stream=False, mock=None, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    if model is None:
        del body["model"]
    if stream:
        body["stream"] = True
    if mock is not None:
        body["mock"] = mock
    body.update(extra)
    return body


class StreamResult:
    def __init__(self, status, headers, events, raw, complete, started, ended):
        self.status = status
        self.headers = headers
        self.events = events        # [(monotonic time the event was complete, bytes)]
        self.raw = raw              # the decoded body, as received
        self.complete = complete    # the chunked body ended with its terminating chunk
        self.started = started
        self.ended = ended

    def header(self, name):
        return self.headers.get(name)

    def data(self):
        """The data: payloads, in order (bytes)."""
        out = []
        for _, ev in self.events:
            for line in ev.split(b"\n"):
                if line.startswith(b"data:"):
                    out.append(line[5:].strip())
        return out

    def json_chunks(self):
        return [json.loads(d) for d in self.data() if d and d != b"[DONE]"]

    def done(self):
        return b"[DONE]" in self.data()

    def content(self):
        text = ""
        for c in self.json_chunks():
            for ch in c.get("choices") or []:
                text += (ch.get("delta") or {}).get("content") or ""
        return text


def split_events(buf):
    """Splits off whole SSE events; returns (events, rest)."""
    events = []
    while True:
        m = re.search(rb"\r\n\r\n|\n\n|\r\r", buf)
        if not m:
            return events, buf
        events.append(buf[:m.start()])
        buf = buf[m.end():]


def stream_request(port, path, body, headers=None, timeout=30.0, on_event=None):
    """POST and read the answer as it comes, timing each SSE event. on_event(time, event) is
    called for each event the moment it is complete."""
    data = _encode_body(body)
    h = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    h.update(headers or {})
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout * SLOW)
    started = time.monotonic()
    try:
        conn.request("POST", path, body=data, headers=h)
        resp = conn.getresponse()
        events, raw, rest, complete = [], b"", b"", True
        deadline = time.monotonic() + timeout * SLOW
        while time.monotonic() < deadline:
            try:
                chunk = resp.read1(65536)
            except http.client.IncompleteRead as e:
                raw += e.partial
                rest += e.partial
                complete = False
                break
            if not chunk:
                break
            now = time.monotonic()
            raw += chunk
            got, rest = split_events(rest + chunk)
            for ev in got:
                events.append((now, ev))
                if on_event:
                    on_event(now, ev)
        else:
            raise AssertionError("stream not finished after %.0f s" % (timeout * SLOW))
        if rest.strip():
            events.append((time.monotonic(), rest))
        return StreamResult(resp.status, resp.headers, events, raw, complete, started, time.monotonic())
    finally:
        conn.close()


class RawClient:
    """A client on a plain socket: for hanging up at a chosen moment and for not reading."""

    def __init__(self, port, rcvbuf=None, timeout=30.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            # Before connect(), so that the window is small from the start.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout * SLOW)
        self.sock.connect((LOOPBACK, port))
        self.buf = b""

    def send_request(self, method, path, body=None, headers=None, chunked=False):
        data = _encode_body(body)
        h = {"Host": "%s" % LOOPBACK}
        if data is not None:
            h["Content-Type"] = "application/json"
            if chunked:
                h["Transfer-Encoding"] = "chunked"
            else:
                h["Content-Length"] = str(len(data))
        h.update(headers or {})
        head = "%s %s HTTP/1.1\r\n" % (method, path) + "".join("%s: %s\r\n" % kv for kv in h.items()) + "\r\n"
        self.sock.sendall(head.encode())
        if data is not None:
            if chunked:
                step = 16384
                for i in range(0, len(data), step):
                    piece = data[i:i + step]
                    try:
                        self.sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
                    except (BrokenPipeError, ConnectionResetError):
                        return False
                try:
                    self.sock.sendall(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    return False
            else:
                try:
                    self.sock.sendall(data)
                except (BrokenPipeError, ConnectionResetError):
                    return False
        return True

    def _fill(self, n=65536):
        chunk = self.sock.recv(n)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk

    def read_head(self):
        """Returns (status, {lower-case name: value})."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def read_until(self, needle, limit=64 * 1024 * 1024):
        """Reads raw bytes until needle has been seen; returns everything read so far."""
        while needle not in self.buf:
            if len(self.buf) > limit:
                raise AssertionError("%r not seen in %d bytes" % (needle, len(self.buf)))
            self._fill()
        return self.buf

    def read_chunked_body(self, limit=1 << 31):
        """Decodes a chunked body to its end; returns (body bytes, complete)."""
        body = bytearray()
        while True:
            while b"\r\n" not in self.buf:
                try:
                    self._fill()
                except EOFError:
                    return bytes(body), False
            line, self.buf = self.buf.split(b"\r\n", 1)
            size = int(line.split(b";")[0], 16)
            if size == 0:
                return bytes(body), True
            while len(self.buf) < size + 2:
                try:
                    self._fill(max(65536, size + 2 - len(self.buf)))
                except EOFError:
                    body += self.buf
                    return bytes(body), False
            body += self.buf[:size]
            self.buf = self.buf[size + 2:]
            if len(body) > limit:
                raise AssertionError("body larger than %d bytes" % limit)

    def close(self, reset=False):
        if reset:
            # RST instead of FIN.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.sock.close()


# --- unittest glue ---------------------------------------------------------------------------

def dump_logs(procs=(), stream=None):
    """Prints the logs of procs and of every process still running."""
    stream = stream or sys.stderr
    seen = []
    for p in list(procs) + list(_live):
        if p in seen:
            continue
        seen.append(p)
        stream.write("\n===== log of %s (pid %d): %s =====\n%s\n" % (p.label, p.pid, " ".join(p.argv), p.log()))
    stream.flush()


class RouterTestCase(unittest.TestCase):
    """Adds process helpers whose cleanup asserts a clean exit, and prints the logs of every
    running process when a test fails."""

    maxDiff = 4000

    def run(self, result=None):
        self._procs = []
        before = (len(result.failures), len(result.errors)) if result else None
        outcome = super().run(result)
        if result is not None and (len(result.failures), len(result.errors)) != before:
            dump_logs(self._procs)
        return outcome

    def start_mock(self, name, models=()):
        m = MockProvider(name, models)
        self._procs.append(m)
        self.addCleanup(m.cleanup)
        return m

    def start_router(self, *args, **kwargs):
        r = Router(*args, **kwargs)
        self._procs.append(r)
        self.addCleanup(r.cleanup)
        return r

    # assertions shared by the test files
    def assert_error(self, resp, status, error_type, message_part=None, provider=None):
        self.assertEqual(resp.status, status, resp)
        self.assertTrue(resp.header("X-Request-Id"), "no X-Request-Id on %r" % resp)
        ctype = resp.header("Content-Type") or ""
        self.assertTrue(ctype.startswith("application/json"), resp)
        err = resp.json().get("error")
        self.assertIsInstance(err, dict, resp)
        self.assertEqual(err.get("type"), error_type, resp)
        self.assertIsInstance(err.get("message"), str, resp)
        if message_part:
            self.assertIn(message_part, err["message"], resp)
        if provider:
            self.assertEqual(err.get("provider"), provider, resp)
            self.assertEqual(resp.header("X-Provider"), provider, resp)
        return err

    def assert_still_serves(self, router, provider=None):
        """The daemon answers the next request normally (through provider, else echo)."""
        if provider is None:
            r = router.chat(chat_body("still there?"), headers={"X-Provider": "echo"})
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.header("X-Provider"), "echo", r)
            self.assertEqual(r.json()["choices"][0]["message"]["content"], "still there?", r)
        else:
            r = router.chat(chat_body("still there?"), headers={"X-Provider": provider.name})
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.header("X-Provider"), provider.name, r)
            self.assertEqual(r.json()["choices"][0]["message"]["content"],
                             "%s: still there?" % provider.name, r)


class SharedRouterTestCase(RouterTestCase):
    """Two mock providers (alpha, beta) and one router for the whole class. Subclasses may set
    router_keys ([Router] keys), mappings, router_env, and override extra_providers()."""

    router_keys = {}
    mappings = None
    router_env = None

    @classmethod
    def extra_providers(cls):
        """{name: BaseURL or dict of keys} added after alpha and beta; the mocks are running."""
        return {}

    @classmethod
    def setUpClass(cls):
        cls._workdir = tempfile.mkdtemp(prefix="provider-router-it-")
        cls.alpha = cls.beta = cls.router = None
        try:
            cls.alpha = MockProvider("alpha", ["alpha-1", "alpha-2"], workdir=cls._workdir)
            cls.beta = MockProvider("beta", ["beta-1"], workdir=cls._workdir)
            providers = {"alpha": cls.alpha.base_url, "beta": cls.beta.base_url}
            for name, spec in cls.extra_providers().items():
                if name in providers and isinstance(spec, dict):
                    spec = dict({"BaseURL": providers[name]}, **spec)
                providers[name] = spec
            cls.router = Router(lambda port: router_config(port, providers, default="alpha",
                                                           mappings=cls.mappings, router=cls.router_keys),
                                env=cls.router_env, workdir=cls._workdir)
        except Exception:
            dump_logs()
            cls._stop_all()
            raise

    @classmethod
    def _stop_all(cls):
        errors = []
        for p in (cls.router, cls.alpha, cls.beta):
            if p is None:
                continue
            try:
                p.assert_clean_exit()
            except AssertionError as e:
                errors.append(str(e))
        shutil.rmtree(cls._workdir, ignore_errors=True)
        return errors

    @classmethod
    def tearDownClass(cls):
        errors = cls._stop_all()
        if errors:
            raise AssertionError("\n\n".join(errors))

    def setUp(self):
        self.alpha.reset()
        self.beta.reset()


def main():
    """unittest.main(), then exit 77 (meson's "skipped") when every test was skipped."""
    try:
        prog = unittest.main(verbosity=2, exit=False)
    finally:
        for p in list(_live):
            p.kill()
    result = prog.result
    if not result.wasSuccessful():
        sys.exit(1)
    if result.skipped and result.testsRun <= len(result.skipped):
        sys.exit(77)
    sys.exit(0)
