#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""A loopback OpenAI-compatible provider that answers in odd-but-legal and in broken ways, and a
loopback egress proxy (CONNECT tunnels and plain forwarding). Python 3 standard library only;
every wait is bounded.

OddProvider serves POST .../chat/completions (a completion, or an SSE stream when the body asks
for one; a tool call when the body has "tools"), GET/HEAD .../models and .../models/ID, and:

  GET  /_odd/requests   every request so far: method, path, version, headers (in order, as sent),
                        body (text and base64), the modes that applied, the TLS client
                        certificate's subject, and what was answered (status, the body bytes
                        before any gzip or chunked framing)
  POST /_odd/reset      forgets the requests
  POST /_odd/modes      {"modes": [...], "options": {...}}: the instance's defaults from now on

Behaviour is picked per request by modes, the union of
  - the instance's defaults (constructor, --mode on the command line, POST /_odd/modes): a probe
    cannot put odd members into its requests, so its tests start one instance per behaviour;
  - a path prefix before /v1/: BaseURL=http://127.0.0.1:PORT/gzip,crlf/v1 (also for GET /models);
  - an "odd" member in the request's JSON body: "gzip,crlf", ["gzip", "crlf"], or
    {"modes": ..., "delay_ms": 200, ...} (the other members are options, below).

Modes (MODES below has the list and a line on each): gzip, gzip-always, crlf, cr, pad, ping,
cut, cut-mid-event, close, http10, eof, hang, no-done, no-usage, tool-args-one-chunk,
tool-no-index, models-missing, models-401.

Options: events (content events of a stream, default 3), delay_ms (before each event after the
first), pad_bytes / pad_comment (40960 in 1024-byte comments), pings / ping_sec (2500 ': ping'
comments, 20 KB, spread over 1 s: both more than the router's default 16K stream buffer), hang_sec
(60), status (answer this status with an OpenAI error body).

Every answer carries the provider's own 'x-request-id: odd-NAME-N' and 'X-Odd-Provider: NAME'.

Run by hand or from another test as a process:
  oddprovider.py --port 0 --port-file FILE [--name N] [--model ID]... [--mode M]...
                 [--option KEY=VALUE]... [--tls-cert PEM --tls-key PEM [--client-ca PEM]]
It stops on SIGTERM or SIGINT with exit status 0.

EgressProxy logs every request (CONNECT targets and forwarded absolute URLs), tunnels CONNECT
byte for byte in both directions as bytes arrive, and forwards plain http:// requests to
loopback targets only.
"""

import argparse
import base64
import ipaddress
import json
import os
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib

LOOPBACK = "127.0.0.1"

MODES = {
    "gzip": "Content-Encoding: gzip (answers and streams) when the request's Accept-Encoding allows it",
    "gzip-always": "Content-Encoding: gzip whatever the request's Accept-Encoding says",
    "gzip-corrupt": "Content-Encoding: gzip, but what follows the first event (answers: the gzip header) "
                    "is not gzip",
    "crlf": "SSE lines end in CR LF",
    "cr": "SSE lines end in a lone CR",
    "pad": "before the first data event, pad_bytes of ': xxx' comments of pad_comment bytes each",
    "ping": "before the first data event, pings ': ping' comments spread over ping_sec seconds",
    "cut": "a stream ends cleanly after two content events: no finish_reason, no [DONE]",
    "cut-mid-event": "a stream ends cleanly after two content events and half of a third",
    "close": "'Connection: close' on the answer, the connection closed after it",
    "http10": "an HTTP/1.0 answer, no Content-Length: its end is the connection's close",
    "eof": "an HTTP/1.1 answer, no Content-Length, 'Connection: close': ends with the close",
    "hang": "read the request, answer nothing (until the peer leaves, or hang_sec)",
    "no-done": "a stream without the final 'data: [DONE]'",
    "no-usage": "stream_options.include_usage ignored: no usage chunk",
    "tool-args-one-chunk": "a streamed tool call's arguments all in its first delta",
    "tool-no-index": "streamed tool-call deltas without 'index'",
    "models-missing": "GET /models lists another model, not the provider's",
    "models-401": "GET /models answers 401 with an OpenAI error body",
}

DEFAULT_OPTIONS = {
    "events": 3, "delay_ms": 0, "pad_bytes": 40960, "pad_comment": 1024, "pings": 2500,
    "ping_sec": 1.0, "hang_sec": 60.0, "status": 0,
}

MAX_HEAD = 64 * 1024
MAX_BODY = 32 * 1024 * 1024
IO_TIMEOUT = 10.0           # one read or write
KEEPALIVE_IDLE = 30.0       # an idle kept-alive connection
LIFETIME = 60 * 60.0        # a server never outlives a test run by much
MAX_CONNECTIONS = 256
TOOL_ARGUMENTS = '{"location": "Paris, France", "unit": "celsius"}'
CREATED = 1700000000


class BadRequest(Exception):
    pass


def is_loopback(host):
    host = host.strip("[]")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_modes(value):
    """'a,b', ['a', 'b'] or None -> list of mode names; raises BadRequest on an unknown one."""
    if value is None:
        return []
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = []
        for v in value:
            if not isinstance(v, str):
                raise BadRequest("modes must be strings, not %r" % (v,))
            items += v.split(",")
    else:
        raise BadRequest("modes must be a string or a list, not %r" % (value,))
    out = []
    for m in (i.strip() for i in items):
        if not m:
            continue
        if m not in MODES:
            raise BadRequest("unknown odd mode '%s' (known: %s)" % (m, ", ".join(sorted(MODES))))
        out.append(m)
    return out


def parse_options(d):
    out = {}
    for k, v in d.items():
        if k == "modes":
            continue
        if k not in DEFAULT_OPTIONS:
            raise BadRequest("unknown odd option '%s' (known: %s)" % (k, ", ".join(sorted(DEFAULT_OPTIONS))))
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise BadRequest("odd option '%s' must be a number >= 0, not %r" % (k, v))
        out[k] = v
    return out


def gzip_allowed(accept_encoding):
    """Does an Accept-Encoding value allow gzip (RFC 9110 §12.5.3, q-values included)?"""
    if not accept_encoding:
        return False
    star = None
    for item in accept_encoding.split(","):
        parts = [p.strip() for p in item.split(";")]
        coding, q = parts[0].lower(), 1.0
        for p in parts[1:]:
            if p.lower().startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if coding in ("gzip", "x-gzip"):
            return q > 0
        if coding == "*":
            star = q > 0
    return bool(star)


# --- connections -------------------------------------------------------------------------------

class _Conn:
    """A socket (maybe TLS) with a read buffer; every read bounded in time and size."""

    def __init__(self, sock, stopping):
        self.sock = sock
        self.stopping = stopping
        self.buf = b""
        sock.settimeout(IO_TIMEOUT)

    def readable(self, timeout):
        """Waits up to timeout for data (or EOF); False on timeout or when the server stops."""
        end = time.monotonic() + timeout
        while not self.stopping.is_set():
            if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            r, _, _ = select.select([self.sock], [], [], min(left, 0.1))
            if r:
                return True
        return False

    def fill(self, timeout=IO_TIMEOUT):
        if not self.readable(timeout):
            raise TimeoutError("no data within %.0f s" % timeout)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError()
        self.buf += chunk

    def read_until(self, needle, limit, timeout=IO_TIMEOUT):
        while needle not in self.buf:
            if len(self.buf) > limit:
                raise BadRequest("more than %d bytes without %r" % (limit, needle))
            self.fill(timeout)
        i = self.buf.index(needle)
        out, self.buf = self.buf[:i], self.buf[i + len(needle):]
        return out

    def read_exactly(self, n):
        while len(self.buf) < n:
            self.fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self, idle):
        """(request line, [(name, value)]) of the next request, None at a clean end."""
        if not self.buf:
            try:
                if not self.readable(idle):
                    return None
                self.fill()
            except (EOFError, TimeoutError, OSError):
                return None
        head = self.read_until(b"\r\n\r\n", MAX_HEAD)
        lines = head.decode("latin-1").split("\r\n")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise BadRequest("bad header line %r" % line)
            headers.append((name.strip(), value.strip()))
        return lines[0], headers

    def read_body(self, headers):
        h = {k.lower(): v for k, v in headers}
        if "chunked" in h.get("transfer-encoding", "").lower():
            body = b""
            while True:
                size = int(self.read_until(b"\r\n", 1024).split(b";")[0], 16)
                if size == 0:
                    while self.read_until(b"\r\n", MAX_HEAD):  # trailers
                        pass
                    return body
                if len(body) + size > MAX_BODY:
                    raise BadRequest("body larger than %d bytes" % MAX_BODY)
                body += self.read_exactly(size)
                self.read_exactly(2)
        n = int(h.get("content-length") or 0)
        if n > MAX_BODY:
            raise BadRequest("body larger than %d bytes" % MAX_BODY)
        return self.read_exactly(n)

    def send(self, data):
        if data:
            self.sock.sendall(data)

    def wait_peer_gone(self, limit):
        """Until the peer closes, the server stops, or limit seconds pass."""
        end = time.monotonic() + limit
        while time.monotonic() < end and not self.stopping.is_set():
            if self.readable(min(0.1, max(end - time.monotonic(), 0))):
                try:
                    if not self.sock.recv(4096):
                        return True
                except OSError:
                    return True



class _Body:
    """Writes an answer body: gzip or not, chunked, or up to the close."""

    def __init__(self, conn, chunked, gzip_on, corrupt=False):
        self.conn = conn
        self.chunked = chunked
        self.gz = zlib.compressobj(6, zlib.DEFLATED, 31) if gzip_on or corrupt else None
        self.corrupt = corrupt      # after the first piece, bytes that are not gzip
        self.plain = b""            # what was written, before encoding and framing

    def _frame(self, data):
        if not data:
            return
        if self.chunked:
            data = b"%x\r\n" % len(data) + data + b"\r\n"
        self.conn.send(data)

    def write(self, data):
        if self.corrupt and self.plain:
            self._frame(b"\xff" * max(len(data), 16))
            return
        self.plain += data
        if self.gz:
            # A sync flush after each piece: every event can be decoded as soon as it is here.
            data = self.gz.compress(data) + self.gz.flush(zlib.Z_SYNC_FLUSH)
        self._frame(data)

    def end(self):
        if self.gz and not self.corrupt:
            self._frame(self.gz.flush(zlib.Z_FINISH))
        if self.chunked:
            self.conn.send(b"0\r\n\r\n")


# --- the provider --------------------------------------------------------------------------------

def _last_user_text(body):
    text = ""
    for m in body.get("messages") or []:
        if isinstance(m, dict) and m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                text = c
            elif isinstance(c, list):
                text = " ".join(p.get("text", "") for p in c if isinstance(p, dict))
    return text


def _split(text, n):
    n = max(1, min(n, len(text))) if text else 1
    step = -(-len(text) // n) if text else 1
    return [text[i:i + step] for i in range(0, len(text), step)] or [""]


class OddProvider:
    """The odd provider in this process: threads on a loopback port. close() stops it."""

    def __init__(self, name="odd", models=("odd-model",), modes=(), options=None, tls=None,
                 port=0, lifetime=LIFETIME):
        """tls: None, or {"cert": PEM, "key": PEM, "client_ca": PEM or None} (client_ca set:
        a client certificate signed by it is required)."""
        self.name = name
        self.models = list(models)
        self.lock = threading.Lock()
        self.modes = parse_modes(list(modes))
        self.options = dict(DEFAULT_OPTIONS)
        self.options.update(parse_options(options or {}))
        self.records = []
        self.accepted = 0           # connections, since the start or reset()
        self.active = 0
        self.max_active = 0
        self.tls_errors = []        # handshakes that failed, as strings
        self.counter = 0
        self.stopping = threading.Event()
        self.ctx = None
        if tls:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(tls["cert"], tls["key"])
            if tls.get("client_ca"):
                self.ctx.verify_mode = ssl.CERT_REQUIRED
                self.ctx.load_verify_locations(tls["client_ca"])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, port))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        scheme = "https" if tls else "http"
        self.origin = "%s://%s:%d" % (scheme, LOOPBACK, self.port)
        self.base_url = self.origin + "/v1"
        self.threads = []
        self.deadline = time.monotonic() + lifetime
        self.acceptor = threading.Thread(target=self._accept_loop, name="odd-accept", daemon=True)
        self.acceptor.start()

    def url(self, *modes):
        """A BaseURL whose path prefix selects modes: http://127.0.0.1:PORT/gzip,crlf/v1."""
        parse_modes(list(modes))
        return "%s/%s/v1" % (self.origin, ",".join(modes)) if modes else self.base_url

    # --- control -------------------------------------------------------------------------------

    def set_modes(self, modes=(), options=None):
        with self.lock:
            self.modes = parse_modes(list(modes))
            self.options = dict(DEFAULT_OPTIONS)
            self.options.update(parse_options(options or {}))

    def requests(self):
        with self.lock:
            return [dict(r) for r in self.records]

    def chats(self):
        return [r for r in self.requests() if r["path"].split("?")[0].endswith("/chat/completions")]

    def last_chat(self, timeout=10.0):
        """The newest chat record once its answer is recorded: a streamed answer's record is
        completed after its last byte is sent, so a client can have it all a moment before."""
        end = time.monotonic() + timeout
        while True:
            chats = self.chats()
            if chats and "answer_b64" in chats[-1]:
                return chats[-1]
            if time.monotonic() > end:
                raise AssertionError("no answered chat request recorded within %.0f s: %r"
                                     % (timeout, chats[-1:] or None))
            time.sleep(0.01)

    def reset(self):
        with self.lock:
            self.records = []
            self.tls_errors = []
            self.accepted = self.max_active = 0

    def connections(self):
        """{"accepted": connections accepted, "max_active": most open at once} since reset()."""
        with self.lock:
            return {"accepted": self.accepted, "max_active": self.max_active}

    def close(self):
        self.stopping.set()
        self.acceptor.join(5)
        for t in list(self.threads):
            t.join(5)
        self.sock.close()

    # --- server --------------------------------------------------------------------------------

    def _accept_loop(self):
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            try:
                sock, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.threads = [t for t in self.threads if t.is_alive()]
            if len(self.threads) >= MAX_CONNECTIONS:
                sock.close()
                continue
            t = threading.Thread(target=self._serve, args=(sock,), name="odd-conn", daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, sock):
        peer_cert = None
        with self.lock:
            self.accepted += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.ctx:
                sock.settimeout(IO_TIMEOUT)
                try:
                    sock = self.ctx.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    with self.lock:
                        self.tls_errors.append(str(e))
                    sock.close()
                    return
                cert = sock.getpeercert()
                if cert:
                    peer_cert = dict(x[0] for x in cert.get("subject", ()))
            conn = _Conn(sock, self.stopping)
            idle = IO_TIMEOUT
            while not self.stopping.is_set():
                try:
                    head = conn.read_head(idle)
                    if head is None:
                        return
                    line, headers = head
                    parts = line.split()
                    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                        raise BadRequest("bad request line %r" % line)
                    method, target, version = parts
                    h = {k.lower(): v for k, v in headers}
                    if h.get("expect", "").lower() == "100-continue":
                        conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                    body = conn.read_body(headers)
                except BadRequest as e:
                    self._send_simple(conn, "HTTP/1.1", 400, _error_json(str(e), "invalid_request_error"),
                                      close=True)
                    return
                keep = self._handle(conn, method, target, version, headers, body, peer_cert)
                if not keep:
                    return
                idle = KEEPALIVE_IDLE
        except (OSError, EOFError, TimeoutError, ValueError):
            pass
        finally:
            with self.lock:
                self.active -= 1
            try:
                sock.close()
            except OSError:
                pass

    def _next_id(self):
        with self.lock:
            self.counter += 1
            return self.counter

    def _head(self, version, status, ctype, extra=(), length=None, close=False, gzip_on=False,
              chunked=False, rid=None):
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}.get(status, "Odd")
        lines = ["%s %d %s" % (version, status, reason)]
        if ctype:
            lines.append("Content-Type: %s" % ctype)
        lines.append("x-request-id: odd-%s-%d" % (self.name, rid or self._next_id()))
        lines.append("X-Odd-Provider: %s" % self.name)
        lines.append("Server: oddprovider")
        if gzip_on:
            lines += ["Content-Encoding: gzip", "Vary: Accept-Encoding"]
        if length is not None:
            lines.append("Content-Length: %d" % length)
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        if close and version != "HTTP/1.0":
            lines.append("Connection: close")
        lines += ["%s: %s" % kv for kv in extra]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send_simple(self, conn, version, status, body, close=False, ctype="application/json", head_only=False):
        conn.send(self._head(version, status, ctype, length=len(body), close=close) + (b"" if head_only else body))

    def _handle(self, conn, method, target, version, headers, body, peer_cert):
        """Answers one request; returns whether the connection stays open."""
        h = {k.lower(): v for k, v in headers}
        path = urllib.parse.urlsplit(target).path if target.startswith(("http://", "https://")) else target
        path = path.split("?")[0]
        client_close = ("close" in h.get("connection", "").lower() or
                        (version == "HTTP/1.0" and "keep-alive" not in h.get("connection", "").lower()))

        if path.startswith("/_odd/"):
            return self._control(conn, method, path, body) and not client_close

        rid = self._next_id()
        record = {
            "time": time.monotonic(), "method": method, "path": target, "version": version,
            "headers": [list(kv) for kv in headers], "body": body.decode("utf-8", "replace"),
            "body_b64": base64.b64encode(body).decode(), "tls_client": peer_cert, "id": rid,
        }
        with self.lock:
            self.records.append(record)
            modes, options = list(self.modes), dict(self.options)

        try:
            i = path.find("/v1/")
            if i > 0:
                for seg in path[1:i].split("/"):
                    modes += parse_modes(seg)
            data = None
            if method == "POST" and body:
                try:
                    data = json.loads(body)
                except ValueError:
                    data = None
                if isinstance(data, dict) and "odd" in data:
                    odd = data["odd"]
                    if isinstance(odd, dict):
                        modes += parse_modes(odd.get("modes"))
                        options.update(parse_options(odd))
                    else:
                        modes += parse_modes(odd)
        except BadRequest as e:
            return self._answer(conn, record, version, 400, _error_json(str(e), "invalid_request_error"),
                                set(), client_close, rid, h)
        modes = set(modes)
        with self.lock:
            record["modes"] = sorted(modes)

        if "hang" in modes:
            conn.wait_peer_gone(options["hang_sec"])
            return False

        if options["status"]:
            return self._answer(conn, record, version, int(options["status"]),
                                _error_json("odd status %d" % options["status"], "server_error"),
                                modes, client_close, rid, h)

        tail = path[i + 3:] if i >= 0 else path
        if method in ("GET", "HEAD") and tail == "/models":
            return self._models(conn, record, method, version, modes, client_close, rid, h)
        if method in ("GET", "HEAD") and tail.startswith("/models/"):
            mid = urllib.parse.unquote(tail[len("/models/"):])
            if mid in self.models and "models-missing" not in modes:
                body = json.dumps(self._model_entry(mid)).encode()
                return self._answer(conn, record, version, 200, body, modes, client_close, rid, h,
                                    head_only=method == "HEAD")
            return self._answer(conn, record, version, 404,
                                _error_json("The model '%s' does not exist" % mid, "invalid_request_error",
                                            code="model_not_found"), modes, client_close, rid, h)
        if method == "POST" and tail == "/responses" and isinstance(data, dict):
            if data.get("stream"):
                return self._stream(conn, record, version, data, modes, options, client_close, rid, h,
                                    events=self._response_events(data, options, rid))
            return self._answer(conn, record, version, 200, json.dumps(self._response(data, rid)).encode(),
                                modes, client_close, rid, h)
        if method == "POST" and tail == "/chat/completions":
            if not isinstance(data, dict):
                return self._answer(conn, record, version, 400,
                                    _error_json("the body is not a JSON object", "invalid_request_error"),
                                    modes, client_close, rid, h)
            if data.get("stream"):
                return self._stream(conn, record, version, data, modes, options, client_close, rid, h)
            return self._answer(conn, record, version, 200, self._completion(data, modes, rid), modes,
                                client_close, rid, h)
        return self._answer(conn, record, version, 404,
                            _error_json("no route for %s %s" % (method, path), "invalid_request_error"),
                            modes, client_close, rid, h)

    def _control(self, conn, method, path, body):
        if method == "GET" and path == "/_odd/requests":
            out = json.dumps(self.requests()).encode()
        elif method == "POST" and path == "/_odd/reset":
            self.reset()
            out = b"{}"
        elif method == "POST" and path == "/_odd/modes":
            try:
                d = json.loads(body or b"{}")
                self.set_modes(d.get("modes") or [], d.get("options") or {})
            except (ValueError, AttributeError, BadRequest) as e:
                self._send_simple(conn, "HTTP/1.1", 400, _error_json(str(e), "invalid_request_error"))
                return True
            out = b"{}"
        else:
            self._send_simple(conn, "HTTP/1.1", 404, _error_json("no such control", "invalid_request_error"))
            return True
        self._send_simple(conn, "HTTP/1.1", 200, out)
        return True

    # --- answers -------------------------------------------------------------------------------

    def _framing(self, version, modes, stream, client_close):
        """(status-line version, chunked?, close-delimited?, close after?)"""
        if "http10" in modes:
            return "HTTP/1.0", False, True, True
        if "eof" in modes:
            return "HTTP/1.1", False, True, True
        if version == "HTTP/1.0":
            # An HTTP/1.0 client cannot read chunks: the close ends the body.
            return "HTTP/1.0", False, stream, client_close or stream
        return "HTTP/1.1", stream, False, client_close or "close" in modes

    def _gzip(self, modes, h):
        return "gzip-always" in modes or ("gzip" in modes and gzip_allowed(h.get("accept-encoding")))

    def _answer(self, conn, record, version, status, body, modes, client_close, rid, h, head_only=False):
        """A whole answer: Content-Length, or up to the close."""
        out_version, _, eof, close = self._framing(version, modes, False, client_close)
        gzip_on = self._gzip(modes, h)
        wire = body
        if "gzip-corrupt" in modes:
            gzip_on = True
            wire = zlib.compressobj(6, zlib.DEFLATED, 31).compress(body)[:10] + b"\xff" * 64
        elif gzip_on:
            c = zlib.compressobj(6, zlib.DEFLATED, 31)
            wire = c.compress(body) + c.flush()
        with self.lock:
            record["status"] = status
            record["answer_b64"] = base64.b64encode(body).decode()
        head = self._head(out_version, status, "application/json", length=None if eof else len(wire),
                          close=close, gzip_on=gzip_on, rid=rid)
        conn.send(head + (b"" if head_only else wire))
        return not close

    def _model_entry(self, mid):
        return {"id": mid, "object": "model", "created": CREATED, "owned_by": "odd-org-%s" % self.name,
                "context_length": 32768, "max_model_len": 32768, "root": mid, "parent": None,
                "permission": [], "meta": {"n_params": 7000000000, "quantization": "Q4_K_M"}}

    def _models(self, conn, record, method, version, modes, client_close, rid, h):
        if "models-401" in modes:
            body = _error_json("Incorrect API key provided: sk-odd***. You can find your API key at "
                               "https://platform.openai.com/account/api-keys.", "invalid_request_error",
                               code="invalid_api_key")
            return self._answer(conn, record, version, 401, body, modes, client_close, rid, h,
                                head_only=method == "HEAD")
        ids = ["odd-unlisted-model"] if "models-missing" in modes else self.models
        body = json.dumps({"object": "list", "data": [self._model_entry(m) for m in ids]}).encode()
        return self._answer(conn, record, version, 200, body, modes, client_close, rid, h,
                            head_only=method == "HEAD")

    def _usage(self, data, completion_tokens):
        prompt = len(_last_user_text(data).split()) + 10
        return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                "total_tokens": prompt + completion_tokens}

    def _tool_name(self, data):
        tools = data.get("tools")
        if not isinstance(tools, list) or not tools or data.get("tool_choice") == "none":
            return None
        fn = tools[0].get("function") if isinstance(tools[0], dict) else None
        return (fn or {}).get("name") or "tool"

    def _completion(self, data, modes, rid):
        model = data.get("model") or (self.models[0] if self.models else "odd")
        tool = self._tool_name(data)
        if tool:
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_odd_%d" % rid, "type": "function",
                "function": {"name": tool, "arguments": TOOL_ARGUMENTS}}]}
            finish, tokens = "tool_calls", 12
        else:
            text = "%s: %s" % (self.name, _last_user_text(data))
            message = {"role": "assistant", "content": text}
            finish, tokens = "stop", len(text.split())
        return json.dumps({
            "id": "chatcmpl-odd-%d" % rid, "object": "chat.completion", "created": CREATED, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
            "usage": self._usage(data, tokens), "system_fingerprint": "fp_odd"}).encode()

    def _response(self, data, rid, status="completed", text=None):
        """A Responses API answer (POST /v1/responses): input is a string or a list of messages."""
        inp = data.get("input")
        if text is None:
            text = "%s: %s" % (self.name, inp if isinstance(inp, str) else _last_user_text({"messages": inp}))
        return {"id": "resp_odd_%d" % rid, "object": "response", "created_at": CREATED, "status": status,
                "model": data.get("model"), "output": [{
                    "type": "message", "id": "msg_odd_%d" % rid, "status": status, "role": "assistant",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
                "usage": {"input_tokens": 5, "output_tokens": len(text.split()), "total_tokens": 5 + len(text.split())}}

    def _response_events(self, data, options, rid):
        """A Responses API stream: named events, the last one response.completed, no [DONE]."""
        delay = options["delay_ms"] / 1000.0
        whole = self._response(data, rid)
        text = whole["output"][0]["content"][0]["text"]

        def event(name, payload):
            return ("event: %s\ndata: %s\n\n" % (name, json.dumps(dict(payload, type=name)))).encode()

        out = [(0, event("response.created", {"response": self._response(data, rid, "in_progress", "")}))]
        for word in _split(text, max(int(options["events"]), 1)):
            out.append((delay, event("response.output_text.delta", {"item_id": "msg_odd_%d" % rid,
                                                                    "output_index": 0, "content_index": 0,
                                                                    "delta": word})))
        out.append((delay, event("response.completed", {"response": whole})))
        return out

    def _events(self, data, modes, options, rid):
        """The stream as [(seconds to wait before, bytes)], line endings as the modes say."""
        model = data.get("model") or (self.models[0] if self.models else "odd")
        cid = "chatcmpl-odd-%d" % rid

        def chunk(delta, finish=None, usage=None, choices=True):
            c = {"id": cid, "object": "chat.completion.chunk", "created": CREATED, "model": model,
                 "system_fingerprint": "fp_odd",
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
                 if choices else []}
            if usage is not None:
                c["usage"] = usage
            return ("data: %s\n\n" % json.dumps(c)).encode()

        delay = options["delay_ms"] / 1000.0
        cut = "cut" in modes or "cut-mid-event" in modes
        n = max(int(options["events"]), 3 if cut else 1)
        tool = self._tool_name(data)
        content = []
        if tool:
            pieces = [TOOL_ARGUMENTS] if "tool-args-one-chunk" in modes else _split(TOOL_ARGUMENTS, max(n, 4))
            for k, piece in enumerate(pieces):
                call = {"index": 0}
                if k == 0:
                    call.update({"id": "call_odd_%d" % rid, "type": "function",
                                 "function": {"name": tool, "arguments": piece}})
                else:
                    call["function"] = {"arguments": piece}
                if "tool-no-index" in modes:
                    del call["index"]
                delta = {"tool_calls": [call]}
                if k == 0:
                    delta = {"role": "assistant", "content": None, "tool_calls": [call]}
                content.append(chunk(delta))
            finish, tokens = "tool_calls", 12
        else:
            text = "%s: %s" % (self.name, _last_user_text(data))
            for k, piece in enumerate(_split(text, n)):
                delta = {"role": "assistant", "content": piece} if k == 0 else {"content": piece}
                content.append(chunk(delta))
            finish, tokens = "stop", len(text.split())

        out = []
        if "pad" in modes:
            size = max(int(options["pad_comment"]), 4)
            line = b": " + b"x" * (size - 4) + b"\n\n"
            out += [(0, line)] * (int(options["pad_bytes"]) // size)
        if "ping" in modes:
            count = int(options["pings"])
            gap = options["ping_sec"] / count if count else 0
            out += [(gap, b": ping\n\n")] * count
        for k, ev in enumerate(content):
            if cut and k == 2:
                if "cut-mid-event" in modes:
                    out.append((delay, ev[:len(ev) // 2]))
                break
            out.append((delay if k else 0, ev))
        if not cut:
            out.append((delay, chunk({}, finish)))
            so = data.get("stream_options")
            if isinstance(so, dict) and so.get("include_usage") and "no-usage" not in modes:
                out.append((0, chunk(None, usage=self._usage(data, tokens), choices=False)))
            if "no-done" not in modes:
                out.append((0, b"data: [DONE]\n\n"))
        eol = b"\r\n" if "crlf" in modes else b"\r" if "cr" in modes else None
        if eol:
            out = [(d, b.replace(b"\n", eol)) for d, b in out]
        return out

    def _stream(self, conn, record, version, data, modes, options, client_close, rid, h, events=None):
        out_version, chunked, eof, close = self._framing(version, modes, True, client_close)
        corrupt = "gzip-corrupt" in modes
        gzip_on = self._gzip(modes, h) or corrupt
        if events is None:
            events = self._events(data, modes, options, rid)
        conn.send(self._head(out_version, 200, "text/event-stream", extra=[("Cache-Control", "no-cache")],
                             close=close, gzip_on=gzip_on, chunked=chunked, rid=rid))
        w = _Body(conn, chunked, gzip_on, corrupt)
        with self.lock:
            record["status"] = 200
        try:
            # Waits add up on a schedule, so that many short ones (pings) take their nominal time.
            due = time.monotonic()
            for wait, piece in events:
                if wait:
                    due += wait
                    left = due - time.monotonic()
                    if left > 0 and self.stopping.wait(left):
                        return False
                w.write(piece)
            w.end()
        finally:
            with self.lock:
                record["answer_b64"] = base64.b64encode(w.plain).decode()
        return not close


def _error_json(message, type_, code=None):
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


def requests_of(port):
    """GET /_odd/requests of an odd provider (plain HTTP, in another process) on port."""
    import http.client
    c = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        c.request("GET", "/_odd/requests")
        return json.loads(c.getresponse().read())
    finally:
        c.close()


class OddProviderProcess:
    """oddprovider.py as a separate process (what a probe test needs: one instance per
    behaviour, chosen on the command line). stop() returns its exit status."""

    def __init__(self, workdir, name="odd", models=("odd-model",), modes=(), options=None, tls=None,
                 timeout=10.0):
        port_file = os.path.join(workdir, "odd-%s.port" % name)
        argv = [sys.executable, os.path.abspath(__file__), "--port", "0", "--port-file", port_file,
                "--name", name]
        for m in models:
            argv += ["--model", m]
        for m in modes:
            argv += ["--mode", m]
        for k, v in (options or {}).items():
            argv += ["--option", "%s=%s" % (k, v)]
        if tls:
            argv += ["--tls-cert", tls["cert"], "--tls-key", tls["key"]]
            if tls.get("client_ca"):
                argv += ["--client-ca", tls["client_ca"]]
        self.name = name
        self.log_path = os.path.join(workdir, "odd-%s.log" % name)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
                                     close_fds=True)
        end = time.monotonic() + timeout
        self.port = 0
        while not self.port:
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError("odd provider %s did not start: %s" % (name, self.log()))
            try:
                with open(port_file) as f:
                    self.port = int(f.read().strip() or 0)
            except (OSError, ValueError):
                time.sleep(0.02)
        self.origin = "%s://%s:%d" % ("https" if tls else "http", LOOPBACK, self.port)
        self.base_url = self.origin + "/v1"

    def log(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, timeout=10.0):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


# --- the egress proxy ----------------------------------------------------------------------------

_HOP = ("connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
        "te", "trailer", "upgrade")


class EgressProxy:
    """A loopback HTTP proxy: CONNECT tunnels and absolute-URI forwarding, to loopback only.
    log() lists every request: {"method", "target", "headers", "time"}."""

    CONNECT_HEADERS = [("Proxy-Agent", "odd-egress-proxy/1"), ("X-Odd-Proxy", "tunnel")]

    def __init__(self, lifetime=LIFETIME):
        self.lock = threading.Lock()
        self.entries = []
        self.stopping = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.url = "http://%s:%d" % (LOOPBACK, self.port)
        self.threads = []
        self.deadline = time.monotonic() + lifetime
        self.acceptor = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)
        self.acceptor.start()

    def log(self):
        with self.lock:
            return [dict(e) for e in self.entries]

    def connects(self):
        return [e["target"] for e in self.log() if e["method"] == "CONNECT"]

    def forwards(self):
        return [e["target"] for e in self.log() if e["method"] != "CONNECT"]

    def reset(self):
        with self.lock:
            self.entries = []

    def close(self):
        self.stopping.set()
        self.acceptor.join(5)
        for t in list(self.threads):
            t.join(5)
        self.sock.close()

    def _accept_loop(self):
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            try:
                sock, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.threads = [t for t in self.threads if t.is_alive()]
            if len(self.threads) >= MAX_CONNECTIONS:
                sock.close()
                continue
            t = threading.Thread(target=self._serve, args=(sock,), name="proxy-conn", daemon=True)
            self.threads.append(t)
            t.start()

    def _refuse(self, conn, status, why):
        body = why.encode()
        conn.send(b"HTTP/1.1 %d Refused\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                  b"Connection: close\r\n\r\n" % (status, len(body)) + body)

    def _serve(self, sock):
        conn = _Conn(sock, self.stopping)
        upstream = None
        try:
            head = conn.read_head(IO_TIMEOUT)
            if head is None:
                return
            line, headers = head
            parts = line.split()
            if len(parts) != 3:
                return self._refuse(conn, 400, "bad request line")
            method, target, version = parts
            with self.lock:
                self.entries.append({"method": method, "target": target, "time": time.monotonic(),
                                     "headers": [list(kv) for kv in headers]})
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                if not is_loopback(host) or not port.isdigit():
                    return self._refuse(conn, 403, "loopback targets only")
                try:
                    upstream = socket.create_connection((host.strip("[]"), int(port)), timeout=IO_TIMEOUT)
                except OSError as e:
                    return self._refuse(conn, 502, "cannot connect: %s" % e)
                extra = "".join("%s: %s\r\n" % kv for kv in self.CONNECT_HEADERS)
                conn.send(("HTTP/1.1 200 Connection established\r\n%s\r\n" % extra).encode())
                self._tunnel(conn, upstream)
                return
            u = urllib.parse.urlsplit(target)
            if u.scheme != "http" or not u.hostname or not is_loopback(u.hostname):
                return self._refuse(conn, 403, "http:// loopback targets only")
            try:
                upstream = socket.create_connection((u.hostname, u.port or 80), timeout=IO_TIMEOUT)
            except OSError as e:
                return self._refuse(conn, 502, "cannot connect: %s" % e)
            # One request per upstream connection: both sides are told the connection closes.
            out = "%s %s %s\r\n" % (method, (u.path or "/") + ("?" + u.query if u.query else ""), version)
            out += "".join("%s: %s\r\n" % (k, v) for k, v in headers if k.lower() not in _HOP)
            out += "Connection: close\r\n\r\n"
            upstream.sendall(out.encode("latin-1") + conn.buf)
            conn.buf = b""
            up = _Conn(upstream, self.stopping)
            rhead = up.read_head(120.0)
            if rhead is None:
                return self._refuse(conn, 502, "no answer")
            rline, rheaders = rhead
            back = rline + "\r\n" + "".join("%s: %s\r\n" % (k, v) for k, v in rheaders
                                           if k.lower() not in _HOP)
            back += "Connection: close\r\n\r\n"
            conn.send(back.encode("latin-1") + up.buf)
            up.buf = b""
            self._tunnel(conn, upstream)
        except (OSError, EOFError, TimeoutError, BadRequest, ValueError):
            pass
        finally:
            for s in (upstream, sock):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass

    def _tunnel(self, conn, upstream):
        """Bytes both ways as they come, until both sides are done (or 10 minutes idle)."""
        a = conn.sock
        if conn.buf:
            upstream.sendall(conn.buf)
            conn.buf = b""
        peers = {a: upstream, upstream: a}
        open_ = {a, upstream}
        last = time.monotonic()
        while open_ and not self.stopping.is_set() and time.monotonic() - last < 600:
            r, _, _ = select.select(list(open_), [], [], 0.1)
            for s in r:
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                last = time.monotonic()
                if data:
                    peers[s].sendall(data)
                    continue
                open_.discard(s)
                try:
                    peers[s].shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                if peers[s] not in open_:
                    return


# --- command line ---------------------------------------------------------------------------------

def _main(argv=None):
    ap = argparse.ArgumentParser(description="An OpenAI-compatible provider for odd and broken answers.",
                                 epilog="modes: " + "; ".join("%s: %s" % kv for kv in MODES.items()))
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--name", default="odd")
    ap.add_argument("--model", action="append", default=[])
    ap.add_argument("--mode", action="append", default=[], help="a mode, or several with commas")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--tls-cert")
    ap.add_argument("--tls-key")
    ap.add_argument("--client-ca", help="require a client certificate signed by this CA")
    ap.add_argument("--lifetime-sec", type=float, default=LIFETIME)
    a = ap.parse_args(argv)
    options = {}
    for o in a.option:
        k, sep, v = o.partition("=")
        if not sep:
            ap.error("--option wants KEY=VALUE, not '%s'" % o)
        options[k] = float(v) if "." in v else int(v)
    tls = {"cert": a.tls_cert, "key": a.tls_key, "client_ca": a.client_ca} if a.tls_cert else None
    try:
        p = OddProvider(a.name, a.model or ["odd-model"], parse_modes(a.mode), options, tls, a.port,
                        a.lifetime_sec)
    except BadRequest as e:
        ap.error(str(e))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    if a.port_file:
        tmp = a.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % p.port)
        os.rename(tmp, a.port_file)
    print("odd provider '%s' on %s, modes: %s" % (a.name, p.base_url, ",".join(p.modes) or "-"), flush=True)
    done.wait(a.lifetime_sec)
    p.close()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
