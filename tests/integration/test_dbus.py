#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""The D-Bus API (org.providerrouter.Router1) on a private dbus-daemon of the system type whose
policy is the real system bus's defaults plus our dbus/org.providerrouter.Router1.conf, driven by
the real clients: busctl, gdbus and provider-routerctl. The daemon under test runs as root (so the
policy lets it own the name); unprivileged callers are setpriv'd to nobody.

Covered: live switching of the default provider and of model mappings (no restart, no dropped
connection), properties, named errors, GetStats figures, authorization (with FakePolkit, a
stand-in for polkitd on the private bus, for the asynchronous polkit path), the bus policy,
PropertiesChanged, Reload, state across kill -9, --bus=session, and provider-routerctl's
command line and German translation.

Needs root (skipped otherwise), dbus-daemon, busctl, gdbus and setpriv; the translation test
also needs meson and unshare."""

import configparser
import functools
import http.client
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (BUILD_DIR, PROVIDER_ROUTER, SLOW, SOURCE_ROOT, MockProvider, Router,  # noqa: E402
                     RouterTestCase, _base_env, _Process, chat_body, dump_logs, main, router_config,
                     run_check_config, sanitizer_reports, wait_until)

CTL = os.environ.get("PROVIDER_ROUTERCTL") or os.path.join(BUILD_DIR, "src", "provider-routerctl")
BUS_POLICY = os.path.join(SOURCE_ROOT, "dbus", "org.providerrouter.Router1.conf")

NAME = "org.providerrouter.Router1"
PATH = "/org/providerrouter/Router1"
IFACE = "org.providerrouter.Router1"
ERR = "org.providerrouter.Router1.Error."
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
AUTH_REQUIRED = "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"

NOBODY_UID = 65534
AS_NOBODY = ["setpriv", "--reuid=%d" % NOBODY_UID, "--regid=%d" % NOBODY_UID, "--clear-groups"]
# uid 1 ('daemon' on Debian): a second unprivileged user, for the session bus.
AS_OTHER = ["setpriv", "--reuid=1", "--regid=1", "--clear-groups"]

STATS_KEYS = {"requests": "t", "errors": "t", "in_flight": "u", "latency_p50_usec": "t",
              "latency_p99_usec": "t"}

CLIENT_TIMEOUT = 20.0

_missing = [p for p in ("dbus-daemon", "busctl", "gdbus", "setpriv") if not shutil.which(p)]
if not os.path.exists(CTL):
    _missing.append(CTL)
NEEDS_TOOLS = unittest.skipIf(_missing, "not installed: %s" % ", ".join(_missing))
NEEDS_ROOT = unittest.skipUnless(os.geteuid() == 0,
                                 "the daemon must run as root to own the name on a system-type bus")


@functools.lru_cache(maxsize=None)
def _daemon_version():
    p = subprocess.run([PROVIDER_ROUTER, "--version"], capture_output=True, timeout=10 * SLOW,
                       env=_base_env(), stdin=subprocess.DEVNULL)
    return p.stdout.decode().split()[-1]


# --- a private bus --------------------------------------------------------------------------

# The default policy of Debian's /usr/share/dbus-1/system.conf: nobody owns anything and method
# calls are refused unless a service's file punches a hole.
_SYSTEM_POLICY = """
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Properties"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <!-- What polkit's own file (org.freedesktop.PolicyKit1.conf) adds, for FakePolkit. -->
  <policy user="root">
    <allow own="org.freedesktop.PolicyKit1"/>
  </policy>
  <policy context="default">
    <allow send_destination="org.freedesktop.PolicyKit1"/>
  </policy>
  <include>%s</include>
""" % BUS_POLICY

# A session bus any local user may connect to, so that the daemon's own "only the owner"
# rule is what refuses a second user (a stock session bus refuses it at authentication).
_SESSION_POLICY = """
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
"""


class PrivateBus(_Process):
    """dbus-daemon with its own configuration file and socket in workdir."""

    label = "dbus-daemon"

    def __init__(self, workdir, kind="system", prefix=()):
        self.kind = kind
        self.socket_path = os.path.join(workdir, "%s-bus.socket" % kind)
        self.address = "unix:path=%s" % self.socket_path
        conf = os.path.join(workdir, "%s-bus.conf" % kind)
        with open(conf, "w") as f:
            f.write('<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"\n'
                    ' "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">\n'
                    "<busconfig>\n  <type>%s</type>\n  <listen>%s</listen>\n  <auth>EXTERNAL</auth>\n%s"
                    "</busconfig>\n" % (kind, self.address,
                                        _SYSTEM_POLICY if kind == "system" else _SESSION_POLICY))
        os.chmod(conf, 0o644)
        argv = list(prefix) + ["dbus-daemon", "--config-file=%s" % conf, "--nofork", "--nopidfile",
                               "--nosyslog"]
        super().__init__(argv, _base_env(), workdir, "dbus-daemon-%s.log" % kind)

        def listening():
            if not self.alive():
                raise AssertionError("dbus-daemon exited: %s" % self.log())
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(self.socket_path)
                    return True
                except OSError:
                    return False
        wait_until(listening, 10 * SLOW, interval=0.05, what="dbus-daemon to listen")

    def shut_down(self):
        self.stop(timeout=10)


# --- a stand-in for polkit ----------------------------------------------------------------------

class _Writer:
    """D-Bus marshalling, little endian, of the few types FakePolkit sends."""

    def __init__(self):
        self.b = bytearray()

    def pad(self, n):
        self.b += b"\0" * (-len(self.b) % n)

    def byte(self, v):
        self.b.append(v)

    def u32(self, v):
        self.pad(4)
        self.b += struct.pack("<I", v)

    def string(self, s):
        data = s.encode()
        self.u32(len(data))
        self.b += data + b"\0"

    def signature(self, s):
        self.byte(len(s))
        self.b += s.encode() + b"\0"


class _Reader:
    def __init__(self, data, pos=0):
        self.d = data
        self.p = pos

    def pad(self, n):
        self.p += -self.p % n

    def byte(self):
        self.p += 1
        return self.d[self.p - 1]

    def u32(self):
        self.pad(4)
        self.p += 4
        return struct.unpack_from("<I", self.d, self.p - 4)[0]

    def string(self):
        n = self.u32()
        self.p += n + 1
        return self.d[self.p - n - 1:self.p - 1].decode()

    def signature(self):
        n = self.byte()
        self.p += n + 1
        return self.d[self.p - n - 1:self.p - 1].decode()

    def value(self, sig):
        if sig in ("s", "o"):
            return self.string()
        if sig == "g":
            return self.signature()
        if sig == "u":
            return self.u32()
        if sig == "b":
            return bool(self.u32())
        raise ValueError("FakePolkit cannot read '%s'" % sig)

    def string_dict(self, value_sig):
        """a{ss} (value_sig "s") or a{sv} (value_sig "v") of strings and uint32s."""
        n = self.u32()
        self.pad(8)
        end = self.p + n
        out = {}
        while self.p < end:
            self.pad(8)
            key = self.string()
            sig = self.signature() if value_sig == "v" else value_sig
            out[key] = self.value(sig)
        return out


class FakePolkit(threading.Thread):
    """org.freedesktop.PolicyKit1 on a private bus, speaking the wire protocol itself (the
    standard library has no D-Bus). It answers CheckAuthorization with self.answer: a tuple
    (is_authorized, is_challenge), or "error"; after self.delay seconds. Every request is kept in
    self.requests as a dict."""

    def __init__(self, socket_path):
        super().__init__(daemon=True)
        self.answer = (True, False)
        self.delay = 0.0
        self.requests = []
        self.serial = 0
        self.stopping = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10 * SLOW)
        self.sock.connect(socket_path)
        self.buf = b""
        self.sock.sendall(b"\0AUTH EXTERNAL %s\r\n" % str(os.geteuid()).encode().hex().encode())
        line = self._line()
        assert line.startswith(b"OK "), line
        self.sock.sendall(b"BEGIN\r\n")
        self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello")
        self.unique_name = self._reply_body()
        self.call("/org/freedesktop/DBus", "org.freedesktop.DBus", "RequestName", "su",
                  ("org.freedesktop.PolicyKit1", 4))
        assert self._reply_body() == 1, "could not own org.freedesktop.PolicyKit1"
        self.sock.settimeout(0.1)
        self.start()

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, "bus hung up"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _send(self, mtype, fields, signature="", body=b"", flags=0):
        self.serial += 1
        if signature:
            fields = fields + [(8, "g", signature)]
        w = _Writer()
        w.b += struct.pack("<cBBBII", b"l", mtype, flags, 1, len(body), self.serial)
        w.u32(0)  # the length of the header fields, filled in below
        start = len(w.b)
        for code, sig, value in fields:
            w.pad(8)
            w.byte(code)
            w.signature(sig)
            if sig in ("s", "o"):
                w.string(value)
            elif sig == "g":
                w.signature(value)
            else:
                w.u32(value)
        struct.pack_into("<I", w.b, 12, len(w.b) - start)
        w.pad(8)
        self.sock.sendall(bytes(w.b) + body)

    def call(self, path, interface, member, signature="", args=()):
        w = _Writer()
        for sig, value in zip(signature, args):
            w.string(value) if sig == "s" else w.u32(value)
        self._send(1, [(1, "o", path), (2, "s", interface), (3, "s", member),
                       (6, "s", "org.freedesktop.DBus")], signature, bytes(w.b))

    def _message(self):
        """The next whole message: (type, {field code: value}, body bytes), or None on timeout."""
        while True:
            if len(self.buf) >= 16:
                assert self.buf[0:1] == b"l", "FakePolkit reads little-endian messages only"
                body_len, _serial, fields_len = struct.unpack_from("<III", self.buf, 4)
                header_len = 16 + fields_len + (-(16 + fields_len) % 8)
                if len(self.buf) >= header_len + body_len:
                    msg, self.buf = self.buf[:header_len + body_len], self.buf[header_len + body_len:]
                    r = _Reader(msg, 16)
                    fields = {"serial": _serial}
                    while r.p < 16 + fields_len:
                        r.pad(8)
                        code = r.byte()
                        fields[code] = r.value(r.signature())
                    return msg[1], fields, msg[header_len:]
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            if not chunk:
                raise EOFError
            self.buf += chunk

    def _reply_body(self):
        """Waits (during setup) for a method return; returns its first argument."""
        while True:
            m = self._message()
            assert m is not None, "no reply from the bus"
            mtype, fields, body = m
            assert mtype != 3, "bus error %s" % fields.get(4)
            if mtype == 2:
                return _Reader(body).value(fields[8][0])

    def run(self):
        while not self.stopping:
            try:
                m = self._message()
            except (EOFError, OSError):
                return
            if m is None:
                continue
            mtype, fields, body = m
            if mtype != 1 or fields.get(3) != "CheckAuthorization":
                continue
            r = _Reader(body)
            r.pad(8)
            kind = r.string()
            subject = r.string_dict("v")
            request = {"sender": fields.get(7), "subject_kind": kind, "subject": subject,
                       "action": r.string(), "details": r.string_dict("s"), "flags": r.u32(),
                       "cancellation_id": r.string()}
            self.requests.append(request)
            if self.delay:
                time.sleep(self.delay)
            reply_to = [(5, "u", fields["serial"]), (6, "s", fields[7])]
            if self.answer == "error":
                w = _Writer()
                w.string("polkit is having a bad day")
                self._send(3, reply_to + [(4, "s", "org.freedesktop.PolicyKit1.Error.Failed")], "s", bytes(w.b))
                continue
            w = _Writer()
            w.pad(8)
            w.u32(int(self.answer[0]))
            w.u32(int(self.answer[1]))
            w.u32(0)  # details: an empty a{ss}
            w.pad(8)
            self._send(2, reply_to, "(bba{ss})", bytes(w.b))

    def close(self):
        self.stopping = True
        self.join(5 * SLOW)
        self.sock.close()


# --- a stand-in for a newer router, for provider-routerctl's side of the new methods -----------

def _split_types(sig):
    """'sa{sv}(su)' -> ['s', 'a{sv}', '(su)']: the complete types of a signature."""
    out, i = [], 0
    while i < len(sig):
        j = i
        while sig[j] == "a":
            j += 1
        if sig[j] in "({":
            depth = 0
            while True:
                depth += sig[j] in "({"
                depth -= sig[j] in ")}"
                j += 1
                if depth == 0:
                    break
        else:
            j += 1
        out.append(sig[i:j])
        i = j
    return out


_ALIGN = {"y": 1, "g": 1, "v": 1, "n": 2, "q": 2, "b": 4, "i": 4, "u": 4, "s": 4, "o": 4, "a": 4,
          "x": 8, "t": 8, "d": 8, "(": 8, "{": 8}
_FIXED = {"n": "<h", "q": "<H", "i": "<i", "u": "<I", "x": "<q", "t": "<Q", "d": "<d"}


def _marshal(b, sig, value):
    """Appends value, of the single complete type sig, to bytearray b (offsets from its start)."""
    b += b"\0" * (-len(b) % _ALIGN[sig[0]])
    c = sig[0]
    if c == "y":
        b.append(value)
    elif c == "b":
        b += struct.pack("<I", 1 if value else 0)
    elif c in _FIXED:
        b += struct.pack(_FIXED[c], value)
    elif c in "so":
        data = value.encode("utf-8", "surrogateescape")
        b += struct.pack("<I", len(data)) + data + b"\0"
    elif c == "g":
        b += bytes([len(value)]) + value.encode() + b"\0"
    elif c == "v":
        vsig, vvalue = value
        _marshal(b, "g", vsig)
        _marshal(b, vsig, vvalue)
    elif c == "a":
        elem = sig[1:]
        at = len(b)
        b += b"\0\0\0\0"
        b += b"\0" * (-len(b) % _ALIGN[elem[0]])
        start = len(b)
        items = value.items() if elem[0] == "{" else value
        for item in items:
            _marshal(b, elem, item)
        struct.pack_into("<I", b, at, len(b) - start)
    elif c in "({":
        for t, v in zip(_split_types(sig[1:-1]), value):
            _marshal(b, t, v)
    else:
        raise ValueError("cannot marshal '%s'" % sig)


def _unmarshal(d, pos, sig):
    """(value, new position) of the single complete type sig at pos in bytes d."""
    pos += -pos % _ALIGN[sig[0]]
    c = sig[0]
    if c == "y":
        return d[pos], pos + 1
    if c == "b":
        return bool(struct.unpack_from("<I", d, pos)[0]), pos + 4
    if c in _FIXED:
        return struct.unpack_from(_FIXED[c], d, pos)[0], pos + struct.calcsize(_FIXED[c])
    if c in "so":
        n = struct.unpack_from("<I", d, pos)[0]
        return d[pos + 4:pos + 4 + n].decode(), pos + 5 + n
    if c == "g":
        n = d[pos]
        return d[pos + 1:pos + 1 + n].decode(), pos + 2 + n
    if c == "v":
        vsig, pos = _unmarshal(d, pos, "g")
        value, pos = _unmarshal(d, pos, vsig)
        return (vsig, value), pos
    if c == "a":
        n, pos = _unmarshal(d, pos, "u")
        elem = sig[1:]
        pos += -pos % _ALIGN[elem[0]]
        end, items = pos + n, []
        while pos < end:
            item, pos = _unmarshal(d, pos, elem)
            items.append(item)
        return (dict(items) if elem[0] == "{" else items), pos
    if c in "({":
        out = []
        for t in _split_types(sig[1:-1]):
            v, pos = _unmarshal(d, pos, t)
            out.append(v)
        return tuple(out), pos
    raise ValueError("cannot unmarshal '%s'" % sig)


def sv(**kw):
    """An a{sv} value for _marshal from keyword arguments given as (signature, value)."""
    return dict(kw)


class FakeRouter(threading.Thread):
    """org.providerrouter.Router1 as a newer router offers it (INTERFACES.md, DECISIONS.md), on a
    private bus, speaking the wire protocol itself like FakePolkit: just enough to see what
    provider-routerctl sends and how it shows the answers. self.answers maps a method (or
    "Get:PROPERTY") to (signature, value), or to ("error", name, message); calls are kept in
    self.calls as (member, args)."""

    def __init__(self, socket_path):
        super().__init__(daemon=True)
        self.answers = {}
        self.calls = []
        self.serial = 0
        self.stopping = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10 * SLOW)
        self.sock.connect(socket_path)
        self.buf = b""
        self.sock.sendall(b"\0AUTH EXTERNAL %s\r\n" % str(os.geteuid()).encode().hex().encode())
        assert self._line().startswith(b"OK ")
        self.sock.sendall(b"BEGIN\r\n")
        self._send(1, [(1, "o", "/org/freedesktop/DBus"), (2, "s", "org.freedesktop.DBus"), (3, "s", "Hello"),
                       (6, "s", "org.freedesktop.DBus")])
        self._wait_reply()
        w = bytearray()
        _marshal(w, "s", NAME)
        _marshal(w, "u", 4)
        self._send(1, [(1, "o", "/org/freedesktop/DBus"), (2, "s", "org.freedesktop.DBus"),
                       (3, "s", "RequestName"), (6, "s", "org.freedesktop.DBus")], "su", bytes(w))
        assert self._wait_reply() == [1], "could not own %s" % NAME
        self.sock.settimeout(0.1)
        self.start()

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, "bus hung up"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _send(self, mtype, fields, signature="", body=b""):
        self.serial += 1
        if signature:
            fields = fields + [(8, "g", signature)]
        h = bytearray(struct.pack("<cBBBII", b"l", mtype, 0, 1, len(body), self.serial))
        _marshal(h, "a(yv)", [(code, (sig, value)) for code, sig, value in fields])
        h += b"\0" * (-len(h) % 8)
        self.sock.sendall(bytes(h) + body)

    def _message(self):
        while True:
            if len(self.buf) >= 16:
                assert self.buf[0:1] == b"l", "FakeRouter reads little-endian messages only"
                body_len, serial, fields_len = struct.unpack_from("<III", self.buf, 4)
                header_len = 16 + fields_len + (-(16 + fields_len) % 8)
                if len(self.buf) >= header_len + body_len:
                    msg, self.buf = self.buf[:header_len + body_len], self.buf[header_len + body_len:]
                    raw, _ = _unmarshal(msg, 12, "a(yv)")
                    fields = {code: value for code, (_sig, value) in raw}
                    fields["serial"] = serial
                    sig = fields.get(8, "")
                    args, pos = [], header_len
                    for t in _split_types(sig):
                        v, pos = _unmarshal(msg, pos, t)
                        args.append(v)
                    return msg[1], fields, args
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                return None
            if not chunk:
                raise EOFError
            self.buf += chunk

    def _wait_reply(self):
        while True:
            m = self._message()
            assert m is not None, "no reply from the bus"
            mtype, fields, args = m
            assert mtype != 3, "bus error %s" % fields.get(4)
            if mtype == 2:
                return args

    def run(self):
        while not self.stopping:
            try:
                m = self._message()
            except (EOFError, OSError):
                return
            if m is None or m[0] != 1:
                continue
            _mtype, fields, args = m
            member = fields.get(3)
            key = member
            if fields.get(2) == "org.freedesktop.DBus.Properties" and member == "Get":
                key = "Get:%s" % args[1]
            self.calls.append((key, args))
            reply_to = [(5, "u", fields["serial"]), (6, "s", fields[7])]
            answer = self.answers.get(key)
            if answer is None:
                answer = ("error", "org.freedesktop.DBus.Error.UnknownProperty" if key.startswith("Get:")
                          else "org.freedesktop.DBus.Error.UnknownMethod", "FakeRouter has no %s" % key)
            w = bytearray()
            if answer[0] == "error":
                _marshal(w, "s", answer[2])
                self._send(3, reply_to + [(4, "s", answer[1])], "s", bytes(w))
                continue
            sig, value = answer
            if key.startswith("Get:"):
                _marshal(w, "v", (sig, value))
                sig = "v"
            elif sig:
                for t, v in zip(_split_types(sig), value):
                    _marshal(w, t, v)
            self._send(2, reply_to, sig, bytes(w))

    def close(self):
        self.stopping = True
        self.join(5 * SLOW)
        self.sock.close()


class PipelinedClient:
    """A connection to the bus that sends many method calls to the router without waiting for
    each answer (busctl and gdbus wait): for load and for many callers at once. Speaks the wire
    protocol itself, as the current user (or as argv[0] of user, see run_as_nobody())."""

    def __init__(self, socket_path, uid=None):
        self.serial = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30 * SLOW)
        self.sock.connect(socket_path)
        self.buf = b""
        self.sock.sendall(b"\0AUTH EXTERNAL %s\r\n" % str(os.geteuid() if uid is None else uid).encode().hex().encode())
        line = self._line()
        assert line.startswith(b"OK "), line
        self.sock.sendall(b"BEGIN\r\n")
        s = self.call("Hello", "", (), dest="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                      interface="org.freedesktop.DBus")
        assert self.wait([s])[s][0] == "ok"

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, "bus hung up"
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def call(self, member, signature="", args=(), dest=NAME, path=PATH, interface=IFACE):
        """Sends a call; returns its serial."""
        self.serial += 1
        body = bytearray()
        for t, v in zip(_split_types(signature), args):
            _marshal(body, t, v)
        fields = [(1, ("o", path)), (2, ("s", interface)), (3, ("s", member)), (6, ("s", dest))]
        if signature:
            fields.append((8, ("g", signature)))
        h = bytearray(struct.pack("<cBBBII", b"l", 1, 0, 1, len(body), self.serial))
        _marshal(h, "a(yv)", fields)
        h += b"\0" * (-len(h) % 8)
        self.sock.sendall(bytes(h) + bytes(body))
        return self.serial

    def wait(self, serials, timeout=60.0):
        """{serial: ("ok", args) or ("error", name, message)} for each of serials."""
        want, out = set(serials), {}
        deadline = time.monotonic() + timeout * SLOW
        while want:
            if time.monotonic() > deadline:
                raise AssertionError("no answer to %d call(s)" % len(want))
            while len(self.buf) >= 16:
                body_len, _serial, fields_len = struct.unpack_from("<III", self.buf, 4)
                header_len = 16 + fields_len + (-(16 + fields_len) % 8)
                if len(self.buf) < header_len + body_len:
                    break
                msg, self.buf = self.buf[:header_len + body_len], self.buf[header_len + body_len:]
                raw, _ = _unmarshal(msg, 12, "a(yv)")
                fields = {code: value for code, (_sig, value) in raw}
                reply_to = fields.get(5)
                if msg[1] not in (2, 3) or reply_to not in want:
                    continue
                args, pos = [], header_len
                for t in _split_types(fields.get(8, "")):
                    v, pos = _unmarshal(msg, pos, t)
                    args.append(v)
                out[reply_to] = ("ok", args) if msg[1] == 2 else ("error", fields.get(4), args[0] if args else "")
                want.discard(reply_to)
            if want:
                chunk = self.sock.recv(1 << 20)
                if not chunk:
                    raise AssertionError("the bus hung up")
                self.buf += chunk
        return out

    def close(self):
        self.sock.close()


# --- clients --------------------------------------------------------------------------------

class Result:
    def __init__(self, argv, returncode, stdout, stderr):
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    def error_name(self):
        """The D-Bus error name in gdbus's message, or None."""
        m = re.search(r"GDBus\.Error:([A-Za-z0-9_.]+):", self.stderr)
        return m.group(1) if m else None

    def __repr__(self):
        return "<%s exited %r\n--- stdout ---\n%s--- stderr ---\n%s>" % (
            " ".join(self.argv), self.returncode, self.stdout, self.stderr)


def gvariant_string(s):
    """s as a GVariant text literal, for gdbus call arguments that gdbus would not take raw."""
    out = []
    for ch in s:
        if ch in ("'", "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7f:
            out.append("\\u%04x" % ord(ch))
        else:
            out.append(ch)
    return "'" + "".join(out) + "'"


class Clients:
    """busctl, gdbus and provider-routerctl on one bus, as root or as another user."""

    def __init__(self, bus):
        self.bus = bus
        self.session = bus.kind == "session"
        var = "DBUS_SESSION_BUS_ADDRESS" if self.session else "DBUS_SYSTEM_BUS_ADDRESS"
        self.env = {var: bus.address, "NO_COLOR": "1", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "",
                    "PAGER": "cat"}

    def run(self, argv, user=(), env=None, timeout=CLIENT_TIMEOUT):
        full_env = _base_env(dict(self.env, **(env or {})))
        if user:
            full_env["HOME"] = "/nonexistent"
        argv = list(user) + list(argv)
        p = subprocess.run(argv, env=full_env, stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=timeout * SLOW, cwd="/")
        return Result(argv, p.returncode, p.stdout.decode("utf-8", "replace"),
                      p.stderr.decode("utf-8", "replace"))

    def start(self, argv, user=()):
        """argv in the background; the caller bounds communicate() and kills it."""
        full_env = _base_env(dict(self.env, HOME="/nonexistent") if user else self.env)
        return subprocess.Popen(list(user) + list(argv), env=full_env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")

    def gdbus_argv(self, method, *args, interface=IFACE, dest=NAME, path=PATH):
        return ["gdbus", "call", "--session" if self.session else "--system",
                "--timeout", str(int(CLIENT_TIMEOUT * SLOW)), "--dest", dest,
                "--object-path", path, "--method", "%s.%s" % (interface, method)] + list(args)

    def name_owner(self, name=NAME):
        r = self.gdbus("GetNameOwner", name, interface="org.freedesktop.DBus", dest="org.freedesktop.DBus",
                       path="/org/freedesktop/DBus")
        assert r.returncode == 0, r
        return re.match(r"\('(.*)',\)", r.stdout.strip()).group(1)

    def owner_pid(self, name=NAME):
        r = self.gdbus("GetConnectionUnixProcessID", name, interface="org.freedesktop.DBus",
                       dest="org.freedesktop.DBus", path="/org/freedesktop/DBus")
        assert r.returncode == 0, r
        return int(re.match(r"\(uint32 ([0-9]+),\)", r.stdout.strip()).group(1))

    # busctl
    def busctl(self, *args, user=()):
        return self.run(["busctl", "--user" if self.session else "--system", "--no-pager",
                         "--timeout=%d" % int(CLIENT_TIMEOUT * SLOW)] + list(args), user=user)

    def busctl_call(self, method, signature=None, *args, user=()):
        argv = ["call", NAME, PATH, IFACE, method]
        if signature:
            argv += [signature] + [str(a) for a in args]
        return self.busctl(*argv, user=user)

    def prop(self, name, user=()):
        """A property's value through busctl --json."""
        r = self.busctl("--json=short", "get-property", NAME, PATH, IFACE, name, user=user)
        assert r.returncode == 0, r
        return json.loads(r.stdout)["data"]

    def stats(self, user=()):
        """GetStats through busctl --json: {provider: {key: (type, value)}}."""
        r = self.busctl("--json=short", "call", NAME, PATH, IFACE, "GetStats", user=user)
        assert r.returncode == 0, r
        reply = json.loads(r.stdout)
        assert reply["type"] == "a{sa{sv}}", reply
        return {p: {k: (v["type"], v["data"]) for k, v in entry.items()}
                for p, entry in reply["data"][0].items()}

    # gdbus
    def gdbus(self, method, *args, interface=IFACE, dest=NAME, path=PATH, user=()):
        return self.run(self.gdbus_argv(method, *args, interface=interface, dest=dest, path=path), user=user)

    # provider-routerctl
    def ctl(self, *args, user=(), env=None):
        argv = [CTL] + (["--user"] if self.session else []) + list(args)
        return self.run(argv, user=user, env=env)

    def has_owner(self):
        r = self.gdbus("NameHasOwner", NAME, interface="org.freedesktop.DBus", dest="org.freedesktop.DBus",
                       path="/org/freedesktop/DBus")
        assert r.returncode == 0, r
        return "true" in r.stdout


def parse_state(path):
    """routing.state as {section: {key: value}}, or None when there is no file."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    cp = configparser.ConfigParser(interpolation=None, delimiters=("=",))
    cp.optionxform = str
    cp.read_string(text)
    return {s: dict(cp.items(s)) for s in cp.sections()}


def providers_config(alpha, beta, extra=None):
    providers = {"alpha": alpha.base_url, "beta": beta.base_url}
    providers.update(extra or {})
    return providers


class BusTestMixin:
    """Assertions shared by the classes; needs self.router, self.clients, self.alpha, self.beta."""

    def chat_via(self, model="unmapped-model", content="hello", headers=None):
        """A chat request; returns the name of the provider that served it."""
        r = self.router.chat(chat_body(content, model=model), headers=headers)
        self.assertEqual(r.status, 200, r)
        served = r.header("X-Provider")
        if served in ("alpha", "beta"):
            self.assertEqual(r.header("X-Mock-Name"), served, r)
            self.assertEqual(r.json()["choices"][0]["message"]["content"], "%s: %s" % (served, content), r)
        return served

    def assert_counts(self, alpha, beta):
        self.assertEqual((self.alpha.stats()["chat"], self.beta.stats()["chat"]), (alpha, beta),
                         "chat requests seen by (alpha, beta)")

    def assert_bus_error(self, res, name, message_part=None):
        self.assertNotEqual(res.returncode, 0, res)
        self.assertEqual(res.error_name(), name, res)
        if message_part:
            self.assertIn(message_part, res.stderr, res)

    def assert_refused_by_ctl(self, res, message_part):
        self.assertEqual(res.returncode, 1, res)
        self.assertEqual(res.stdout, "", res)
        self.assertIn(message_part, res.stderr, res)
        # A human message: one or two lines, no D-Bus error name, no errno number.
        self.assertNotIn("org.freedesktop", res.stderr.splitlines()[0], res)
        self.assertLessEqual(len(res.stderr.splitlines()), 2, res)

    def routing(self):
        """What a change must leave alone: properties, the saved state."""
        return {"DefaultProvider": self.clients.prop("DefaultProvider"),
                "ModelMappings": self.clients.prop("ModelMappings"),
                "Providers": self.clients.prop("Providers"),
                "state": parse_state(self.state_file)}

    def assert_alive(self, pid=None):
        """The daemon still serves HTTP and D-Bus (same process when pid is given)."""
        self.assertTrue(self.router.alive(), self.router.log())
        if pid is not None:
            self.assertEqual(self.router.pid, pid, "the daemon was restarted")
        self.assert_still_serves(self.router)
        self.assertEqual(self.clients.prop("Version"), _daemon_version())
        r = self.clients.busctl_call("GetStats")
        self.assertEqual(r.returncode, 0, r)


# --- the system bus: one bus, two mocks and one daemon for the class ---------------------------

@NEEDS_TOOLS
@NEEDS_ROOT
class SystemBusTest(BusTestMixin, RouterTestCase):
    mappings = {"file-model": "beta"}

    @classmethod
    def config_text(cls, port, extra=None, broken=False):
        if broken:
            # A provider without BaseURL and a default naming no provider.
            return ("[Router]\nHost=127.0.0.1\nPort=%d\nDefaultProvider=missing\n\n"
                    "[Provider half]\nKind=openai\n" % port)
        return router_config(port, providers_config(cls.alpha, cls.beta, extra), default="alpha",
                             mappings=cls.mappings)

    @classmethod
    def write_config(cls, **kwargs):
        with open(cls.router.config_path, "w") as f:
            f.write(cls.config_text(cls.router.port, **kwargs))

    @classmethod
    def setUpClass(cls):
        cls.workdir = tempfile.mkdtemp(prefix="provider-router-dbus-")
        # nobody must reach the bus socket in here.
        os.chmod(cls.workdir, 0o755)
        cls.bus = cls.alpha = cls.beta = cls.router = None
        try:
            cls.bus = PrivateBus(cls.workdir, "system")
            cls.clients = Clients(cls.bus)
            cls.alpha = MockProvider("alpha", ["alpha-1"], workdir=cls.workdir)
            cls.beta = MockProvider("beta", ["beta-1"], workdir=cls.workdir)
            cls.router = Router(cls.config_text, env={"DBUS_SYSTEM_BUS_ADDRESS": cls.bus.address},
                                args=["--bus=system"], workdir=cls.workdir)
            cls.state_file = os.path.join(cls.workdir, "state", "routing.state")
            wait_until(cls.clients.has_owner, 10 * SLOW, interval=0.1, what="%s on the bus" % NAME)
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
        if cls.bus:
            cls.bus.shut_down()
        shutil.rmtree(cls.workdir, ignore_errors=True)
        return errors

    @classmethod
    def tearDownClass(cls):
        errors = cls._stop_all()
        if errors:
            raise AssertionError("\n\n".join(errors))

    def setUp(self):
        # Back to the configuration: the files as written at the start, runtime changes dropped.
        self.write_config()
        r = self.clients.busctl_call("Reload")
        self.assertEqual(r.returncode, 0, r)
        self.assertIsNone(parse_state(self.state_file))
        self.assertEqual(self.clients.prop("DefaultProvider"), "alpha")
        self.alpha.reset()
        self.beta.reset()
        self.pid = self.router.pid

    # -- switching live ---------------------------------------------------------------------

    def test_set_default_provider_live(self):
        self.assertEqual(self.chat_via(), "alpha")
        self.assert_counts(1, 0)

        # One keep-alive connection across the switch: it is not dropped, and its next request
        # takes the new route.
        conn = http.client.HTTPConnection("127.0.0.1", self.router.port, timeout=30 * SLOW)
        self.addCleanup(conn.close)
        body = json.dumps(chat_body("kept", model="unmapped-model"))
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        first = conn.getresponse()
        first.read()
        self.assertEqual(first.getheader("X-Provider"), "alpha")

        r = self.clients.busctl_call("SetDefaultProvider", "s", "beta")
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "", ""), r)

        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        second = conn.getresponse()
        self.assertEqual(second.status, 200)
        self.assertEqual(json.loads(second.read())["choices"][0]["message"]["content"], "beta: kept")
        self.assertEqual(second.getheader("X-Provider"), "beta")

        self.assertEqual(self.chat_via(), "beta")
        self.assert_counts(2, 2)
        # A mapping still beats the default, the header still beats both.
        self.assertEqual(self.chat_via(model="file-model"), "beta")
        self.assertEqual(self.chat_via(headers={"X-Provider": "alpha"}), "alpha")
        self.assert_counts(3, 3)

        self.assertEqual(self.clients.prop("DefaultProvider"), "beta")
        self.assertEqual(self.router.request("GET", "/health").json()["default_provider"], "beta")
        self.assertEqual(parse_state(self.state_file), {"Routing": {"DefaultProvider": "beta"}})

        # And back, through gdbus: the configured default again, so nothing is left to save.
        r = self.clients.gdbus("SetDefaultProvider", "alpha")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "()"), r)
        self.assertEqual(self.chat_via(), "alpha")
        self.assertIsNone(parse_state(self.state_file))
        self.assertEqual(self.router.pid, self.pid)
        self.assert_alive(self.pid)

    def test_set_default_with_ctl(self):
        r = self.clients.ctl("set-default", "beta")
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "", ""), r)
        self.assertEqual(self.chat_via(), "beta")
        self.assert_counts(0, 1)
        self.assertEqual(self.clients.prop("DefaultProvider"), "beta")
        self.assert_alive(self.pid)

    def test_map_and_unmap_with_ctl(self):
        self.assertEqual(self.chat_via(model="my-model"), "alpha")

        r = self.clients.ctl("map", "my-model", "beta")
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "", ""), r)
        self.assertEqual(self.chat_via(model="my-model"), "beta")
        self.assertEqual(self.chat_via(model="other-model"), "alpha")
        self.assertEqual(self.clients.prop("ModelMappings"), {"file-model": "beta", "my-model": "beta"})
        status = self.clients.ctl("status", "--no-pager")
        self.assertEqual(status.returncode, 0, status)
        self.assertRegex(status.stdout, r"(?m)^\s*Model mappings: file-model → beta\n\s+my-model → beta$")
        self.assertEqual(parse_state(self.state_file), {"SetModelMappings": {"my-model": "beta"}})

        # A mapping may be moved to another provider.
        r = self.clients.ctl("map", "my-model", "alpha")
        self.assertEqual(r.returncode, 0, r)
        self.assertEqual(self.chat_via(model="my-model"), "alpha")

        r = self.clients.ctl("unmap", "my-model")
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "", ""), r)
        self.assertEqual(self.clients.prop("ModelMappings"), {"file-model": "beta"})
        self.assertIsNone(parse_state(self.state_file))

        # A mapping from the file can be removed too; that is saved as a removal.
        r = self.clients.ctl("unmap", "file-model")
        self.assertEqual(r.returncode, 0, r)
        self.assertEqual(self.chat_via(model="file-model"), "alpha")
        self.assertEqual(self.clients.prop("ModelMappings"), {})
        self.assertEqual(parse_state(self.state_file), {"RemovedModelMappings": {"file-model": ""}})
        status = self.clients.ctl("status", "--no-pager")
        self.assertRegex(status.stdout, r"(?m)^\s*Model mappings: none$")
        self.assert_counts(4, 1)
        self.assert_alive(self.pid)

    def test_map_and_unmap_with_gdbus(self):
        r = self.clients.gdbus("SetModelMapping", "g-model", "beta")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "()"), r)
        self.assertEqual(self.chat_via(model="g-model"), "beta")
        r = self.clients.gdbus("Get", IFACE, "ModelMappings", interface="org.freedesktop.DBus.Properties")
        self.assertEqual(r.returncode, 0, r)
        self.assertIn("'g-model': 'beta'", r.stdout)

        # Names with spaces, quotes and non-ASCII letters are fine.
        odd = "odd 'model' é/ü:1"
        r = self.clients.gdbus("SetModelMapping", gvariant_string(odd), "beta")
        self.assertEqual(r.returncode, 0, r)
        self.assertEqual(self.chat_via(model=odd), "beta")
        # The longest name allowed.
        longest = "m" * 256
        r = self.clients.gdbus("SetModelMapping", gvariant_string(longest), "beta")
        self.assertEqual(r.returncode, 0, r)
        self.assertEqual(self.chat_via(model=longest), "beta")
        self.assertEqual(self.clients.prop("ModelMappings"),
                         {"file-model": "beta", "g-model": "beta", odd: "beta", longest: "beta"})

        for model in ("g-model", odd, longest):
            r = self.clients.gdbus("RemoveModelMapping", gvariant_string(model))
            self.assertEqual((r.returncode, r.stdout.strip()), (0, "()"), r)
        self.assertEqual(self.chat_via(model="g-model"), "alpha")
        self.assertEqual(self.chat_via(model=odd), "alpha")
        self.assertEqual(self.clients.prop("ModelMappings"), {"file-model": "beta"})
        self.assertIsNone(parse_state(self.state_file))
        self.assert_counts(2, 3)
        self.assert_alive(self.pid)

    # -- properties -------------------------------------------------------------------------

    def test_properties(self):
        c = self.clients
        self.assertEqual(c.prop("DefaultProvider"), "alpha")
        self.assertEqual(c.prop("ModelMappings"), {"file-model": "beta"})
        self.assertEqual(c.prop("Providers"), ["alpha", "beta", "echo"])
        self.assertEqual(c.prop("Version"), _daemon_version())
        states = c.prop("ProviderStates")
        self.assertEqual(sorted(states), ["alpha", "beta", "echo"])
        self.assertEqual(states["echo"], "up")
        for name, state in states.items():
            self.assertIn(state, ("unknown", "up", "down", "probing"), states)
        # A provider that answered is up.
        self.assertEqual(self.chat_via(), "alpha")
        wait_until(lambda: c.prop("ProviderStates")["alpha"] == "up", 10 * SLOW, interval=0.1,
                   what="alpha to be up")

        # The plain busctl output, with signatures.
        r = c.busctl("get-property", NAME, PATH, IFACE, "DefaultProvider", "ModelMappings", "Providers", "Version")
        self.assertEqual(r.returncode, 0, r)
        self.assertEqual(r.stdout.splitlines(), ['s "alpha"', 'a{ss} 1 "file-model" "beta"',
                                                 'as 3 "alpha" "beta" "echo"', 's "%s"' % _daemon_version()])

        # Introspection matches the committed interface description.
        r = c.busctl("introspect", NAME, PATH, IFACE)
        self.assertEqual(r.returncode, 0, r)
        for member, sig in (("DefaultProvider", "s"), ("ModelMappings", "a{ss}"), ("Providers", "as"),
                            ("ProviderStates", "a{ss}"), ("Version", "s")):
            self.assertRegex(r.stdout, r"(?m)^\.%s\s+property\s+%s\s" % (member, re.escape(sig)))
        for member, sig in (("SetDefaultProvider", "s"), ("SetModelMapping", "ss"),
                            ("RemoveModelMapping", "s"), ("GetStats", "-"), ("Reload", "-")):
            self.assertRegex(r.stdout, r"(?m)^\.%s\s+method\s+%s\s" % (member, re.escape(sig)))

        # Read-only: setting a property is refused.
        r = c.busctl("set-property", NAME, PATH, IFACE, "DefaultProvider", "s", "beta")
        self.assertNotEqual(r.returncode, 0, r)
        self.assertEqual(c.prop("DefaultProvider"), "alpha")

        # provider-routerctl shows the same.
        r = c.ctl("status", "--no-pager")
        self.assertEqual((r.returncode, r.stderr), (0, ""), r)
        self.assertRegex(r.stdout, r"(?m)^\s*Default provider: alpha$")
        self.assertRegex(r.stdout, r"(?m)^\s*Model mappings: file-model → beta$")
        self.assertRegex(r.stdout, r"(?m)^\s*Providers: alpha \[default\] \(up\)\n"
                                   r"\s+beta \((unknown|up|down|probing)\)\n\s+echo \(up\)$")
        self.assertRegex(r.stdout, r"(?m)^\s*Version: %s$" % re.escape(_daemon_version()))
        # Without a verb, status.
        self.assertEqual(c.ctl("--no-pager").stdout, r.stdout)

        r = c.ctl("providers", "--no-pager")
        self.assertEqual((r.returncode, r.stderr), (0, ""), r)
        lines = r.stdout.splitlines()
        self.assertEqual(lines[0].split(), ["PROVIDER", "STATE", "DEFAULT", "REQUESTS", "ERRORS", "IN-FLIGHT"])
        rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip() and "listed" not in line}
        self.assertEqual(sorted(rows), ["alpha", "beta", "echo"])
        self.assertEqual(rows["alpha"][1:3], ["up", "yes"])
        self.assertEqual(rows["beta"][2], "no")
        self.assertEqual(rows["echo"][1:3], ["up", "no"])
        self.assertEqual(lines[-1], "3 providers listed.")
        r = c.ctl("providers", "--no-pager", "--no-legend")
        self.assertEqual([line.split()[0] for line in r.stdout.splitlines()], ["alpha", "beta", "echo"])
        self.assert_alive(self.pid)

    # -- refusals ---------------------------------------------------------------------------

    def test_unknown_provider_refused(self):
        before = self.routing()
        message = "No provider 'nope' is configured. Known providers: alpha, beta, echo."

        r = self.clients.gdbus("SetDefaultProvider", "nope")
        self.assert_bus_error(r, ERR + "NoSuchProvider", message)
        r = self.clients.gdbus("SetModelMapping", "some-model", "nope")
        self.assert_bus_error(r, ERR + "NoSuchProvider", message)
        # Provider names are matched exactly.
        r = self.clients.gdbus("SetDefaultProvider", "Alpha")
        self.assert_bus_error(r, ERR + "NoSuchProvider", "No provider 'Alpha'")
        r = self.clients.gdbus("SetDefaultProvider", "''")
        self.assert_bus_error(r, ERR + "NoSuchProvider")

        r = self.clients.busctl_call("SetDefaultProvider", "s", "nope")
        self.assertEqual(r.returncode, 1, r)
        self.assertIn(message, r.stderr)

        r = self.clients.ctl("set-default", "nope")
        self.assert_refused_by_ctl(r, "Failed to set the default provider: " + message)
        r = self.clients.ctl("map", "some-model", "nope")
        self.assert_refused_by_ctl(r, "Failed to map the model: " + message)

        self.assertEqual(self.routing(), before)
        self.assertEqual(self.chat_via(), "alpha")
        self.assertEqual(self.chat_via(model="some-model"), "alpha")
        self.assert_alive(self.pid)

    def test_invalid_model_refused(self):
        before = self.routing()
        message = "Invalid model name: it must be 1-256 characters of valid UTF-8 without control characters."
        for model in ("", "m" * 257, "m" * 300, "bad\x01model", "tab\tmodel", "new\nline", "del\x7f"):
            with self.subTest(model=model[:20]):
                r = self.clients.gdbus("SetModelMapping", gvariant_string(model), "beta")
                self.assert_bus_error(r, ERR + "InvalidModel", message)
                r = self.clients.gdbus("RemoveModelMapping", gvariant_string(model))
                self.assert_bus_error(r, ERR + "InvalidModel", message)
                r = self.clients.busctl_call("SetModelMapping", "ss", model, "beta")
                self.assertEqual(r.returncode, 1, r)
                self.assertIn(message, r.stderr)
                r = self.clients.ctl("map", model, "beta")
                self.assert_refused_by_ctl(r, "Failed to map the model: " + message)
        # The model is checked before the provider.
        r = self.clients.gdbus("SetModelMapping", "''", "nope")
        self.assert_bus_error(r, ERR + "InvalidModel")
        # Not UTF-8 at all cannot even be put in a D-Bus message: provider-routerctl says so,
        # naming the argument, and exits 1. "\udcff" is the byte 0xff in argv.
        for args in (("map", "\udcff", "beta"), ("unmap", "a\udcff"), ("set-default", "\udcffbeta")):
            with self.subTest(ctl=args):
                r = self.clients.ctl(*args)
                self.assert_refused_by_ctl(r, "is not valid UTF-8")
                self.assertIn("\\377", r.stderr)
        # A model name that looks like an option needs "--", as usual.
        r = self.clients.ctl("map", "-dash-model", "beta")
        self.assertEqual(r.returncode, 1, r)
        self.assertEqual(self.clients.ctl("map", "--", "-dash-model", "beta").returncode, 0)
        self.assertEqual(self.chat_via(model="-dash-model"), "beta")
        self.assertEqual(self.clients.ctl("unmap", "--", "-dash-model").returncode, 0)

        self.assertEqual(self.routing(), before)
        self.assertEqual(self.chat_via(), "alpha")
        self.assert_alive(self.pid)

    def test_unmap_absent_model(self):
        before = self.routing()
        message = "Model 'never-mapped' has no mapping."
        r = self.clients.gdbus("RemoveModelMapping", "never-mapped")
        self.assert_bus_error(r, ERR + "NoSuchMapping", message)
        r = self.clients.busctl_call("RemoveModelMapping", "s", "never-mapped")
        self.assertEqual(r.returncode, 1, r)
        self.assertIn(message, r.stderr)
        r = self.clients.ctl("unmap", "never-mapped")
        self.assert_refused_by_ctl(r, "Failed to remove the model mapping: " + message)

        # Removing twice: the second time there is nothing to remove.
        self.assertEqual(self.clients.ctl("map", "twice", "beta").returncode, 0)
        self.assertEqual(self.clients.ctl("unmap", "twice").returncode, 0)
        r = self.clients.ctl("unmap", "twice")
        self.assert_refused_by_ctl(r, "Model 'twice' has no mapping.")

        self.assertEqual(self.routing(), before)
        self.assertEqual(self.chat_via(model="file-model"), "beta")
        self.assert_alive(self.pid)

    def test_malformed_calls_refused(self):
        c = self.clients
        before = self.routing()
        for args, message in (
                (("SetDefaultProvider", "u", "5"),
                 "Invalid arguments 'u' to call org.providerrouter.Router1.SetDefaultProvider(), expecting 's'."),
                (("SetDefaultProvider", "ss", "beta", "alpha"), "expecting 's'"),
                (("SetModelMapping", "s", "lonely"), "expecting 'ss'"),
                (("GetStats", "s", "x"), "expecting ''"),
                (("NoSuchMethod",), "Unknown method NoSuchMethod or interface org.providerrouter.Router1.")):
            with self.subTest(call=args):
                r = c.busctl_call(*args)
                self.assertEqual(r.returncode, 1, r)
                self.assertIn(message, r.stderr)
        r = c.gdbus("SetDefaultProvider", "beta", "alpha")
        self.assert_bus_error(r, "org.freedesktop.DBus.Error.InvalidArgs")
        r = c.gdbus("Frobnicate")
        self.assert_bus_error(r, "org.freedesktop.DBus.Error.UnknownMethod")
        r = c.gdbus("GetStats", path=PATH + "/nothing")
        self.assert_bus_error(r, "org.freedesktop.DBus.Error.UnknownObject")
        r = c.gdbus("Get", IFACE, "Nope", interface="org.freedesktop.DBus.Properties")
        self.assert_bus_error(r, "org.freedesktop.DBus.Error.UnknownProperty")
        self.assertEqual(self.routing(), before)
        self.assertEqual(self.chat_via(), "alpha")
        self.assert_alive(self.pid)

    # -- statistics -------------------------------------------------------------------------

    def assert_stats_shape(self, stats, providers):
        self.assertEqual(sorted(stats), sorted(providers + ["*"]))
        for name, entry in stats.items():
            for key, sig in STATS_KEYS.items():
                self.assertIn(key, entry, name)
                self.assertEqual(entry[key][0], sig, "%s %s" % (name, key))
            self.assertLessEqual(entry["latency_p50_usec"][1], entry["latency_p99_usec"][1], name)

    def test_get_stats_counts_exactly(self):
        c = self.clients
        before = c.stats()
        self.assert_stats_shape(before, ["alpha", "beta", "echo"])

        sent = {"alpha": 3, "beta": 2, "echo": 1}
        for _ in range(sent["alpha"]):
            self.assertEqual(self.chat_via(), "alpha")
        for _ in range(sent["beta"]):
            self.assertEqual(self.chat_via(model="file-model"), "beta")
        self.assertEqual(self.chat_via(headers={"X-Provider": "echo"}), "echo")
        # One error from beta, passed through, counted as a request and as an error.
        r = self.router.chat(chat_body(mock={"status": 500}), headers={"X-Provider": "beta"})
        self.assertEqual(r.status, 500, r)
        sent["beta"] += 1
        total = sum(sent.values())

        # The figures are recorded as each request completes, which may be a moment after the
        # client has its answer: wait for the total, then require exact equality everywhere.
        def settled():
            s = c.stats()
            return s if s["*"]["requests"][1] >= before["*"]["requests"][1] + total else None
        after = wait_until(settled, 10 * SLOW, interval=0.05, what="GetStats to count %d requests" % total)
        self.assert_stats_shape(after, ["alpha", "beta", "echo"])

        def delta(name, key):
            return after[name][key][1] - before[name][key][1]
        for name, n in sent.items():
            self.assertEqual(delta(name, "requests"), n, name)
            self.assertEqual(after[name]["in_flight"][1], 0, name)
        self.assertEqual(delta("*", "requests"), total)
        self.assertEqual(delta("alpha", "errors"), 0)
        self.assertEqual(delta("echo", "errors"), 0)
        self.assertEqual(delta("beta", "errors"), 1)
        self.assertEqual(delta("*", "errors"), 1)
        self.assertEqual(after["*"]["in_flight"][1], 0)
        self.assertGreater(after["alpha"]["latency_p50_usec"][1], 0)
        self.assertGreater(after["*"]["latency_p99_usec"][1], 0)
        self.assertEqual(self.alpha.stats()["chat"], 3)
        self.assertEqual(self.beta.stats()["chat"], 3)

        # D-Bus calls are not requests: asking again changes nothing.
        again = c.stats()
        for name in ("alpha", "beta", "echo", "*"):
            self.assertEqual(again[name]["requests"], after[name]["requests"], name)

        # provider-routerctl stats shows the same figures.
        r = c.ctl("stats", "--no-pager")
        self.assertEqual((r.returncode, r.stderr), (0, ""), r)
        # The providers' table: up to the first empty line (routes and comparisons follow).
        table = r.stdout.split("\n\n")[0]
        rows = {line.split()[0]: line.split() for line in table.splitlines()[1:] if line.strip()}
        self.assertEqual(int(rows["alpha"][1]), after["alpha"]["requests"][1])
        self.assertEqual(int(rows["beta"][1]), after["beta"]["requests"][1])
        self.assertEqual(int(rows["beta"][2]), after["beta"]["errors"][1])
        self.assertEqual(int(rows["(total)"][1]), after["*"]["requests"][1])
        self.assert_alive(self.pid)

    def test_get_stats_in_flight(self):
        c = self.clients
        done = {}

        def slow():
            done["r"] = self.router.chat(chat_body("slow", mock={"delay_ms": int(3000 * SLOW)}))
        t = threading.Thread(target=slow, daemon=True)
        t.start()
        self.addCleanup(t.join, 30 * SLOW)
        self.alpha.wait_stat("chat", 1)
        s = wait_until(lambda: (lambda s: s if s["alpha"]["in_flight"][1] == 1 else None)(c.stats()),
                       5 * SLOW, interval=0.05, what="alpha in_flight 1")
        self.assertEqual(s["*"]["in_flight"][1], 1)
        self.assertEqual(s["beta"]["in_flight"][1], 0)
        # Switching now does not move the request in flight; the next one goes to beta.
        self.assertEqual(c.busctl_call("SetDefaultProvider", "s", "beta").returncode, 0)
        self.assertEqual(self.chat_via(), "beta")
        t.join(30 * SLOW)
        self.assertFalse(t.is_alive())
        self.assertEqual(done["r"].status, 200, done["r"])
        self.assertEqual(done["r"].header("X-Provider"), "alpha")
        wait_until(lambda: c.stats()["*"]["in_flight"][1] == 0, 5 * SLOW, interval=0.05,
                   what="nothing in flight")
        self.assert_alive(self.pid)

    # -- who may do what --------------------------------------------------------------------

    def test_non_root_caller_reads_but_cannot_change(self):
        c = self.clients
        before = self.routing()

        # Reads are open.
        self.assertEqual(c.prop("DefaultProvider", user=AS_NOBODY), "alpha")
        self.assertEqual(c.prop("ModelMappings", user=AS_NOBODY), {"file-model": "beta"})
        self.assertEqual(c.prop("Providers", user=AS_NOBODY), ["alpha", "beta", "echo"])
        self.assertEqual(c.prop("Version", user=AS_NOBODY), _daemon_version())
        self.assert_stats_shape(c.stats(user=AS_NOBODY), ["alpha", "beta", "echo"])
        r = c.gdbus("GetStats", user=AS_NOBODY)
        self.assertEqual(r.returncode, 0, r)
        self.assertIn("'requests': <uint64 ", r.stdout)
        r = c.gdbus("GetAll", IFACE, interface="org.freedesktop.DBus.Properties", user=AS_NOBODY)
        self.assertEqual(r.returncode, 0, r)
        self.assertIn("'DefaultProvider': <'alpha'>", r.stdout)
        for verb in ("status", "providers", "stats"):
            r = c.ctl(verb, "--no-pager", user=AS_NOBODY)
            self.assertEqual((r.returncode, r.stderr), (0, ""), r)
        self.assertRegex(c.ctl("status", user=AS_NOBODY).stdout, r"(?m)^\s*Default provider: alpha$")

        # Changes are not (no polkit on this bus, so nobody can authorize them).
        denied = (ACCESS_DENIED, AUTH_REQUIRED)
        for args in (("SetDefaultProvider", "beta"), ("SetModelMapping", "x-model", "beta"),
                     ("RemoveModelMapping", "file-model"), ("Reload",)):
            with self.subTest(call=args[0]):
                r = c.gdbus(*args, user=AS_NOBODY)
                self.assertNotEqual(r.returncode, 0, r)
                self.assertIn(r.error_name(), denied, r)
                # Refused by the daemon, not by the bus policy.
                self.assertNotIn("Rejected send message", r.stderr, r)
        r = c.busctl_call("SetDefaultProvider", "s", "beta", user=AS_NOBODY)
        self.assertEqual(r.returncode, 1, r)
        self.assertRegex(r.stderr, "Access denied|[Aa]uthoriz")
        for args in (("set-default", "beta"), ("map", "x-model", "beta"), ("unmap", "file-model"),
                     ("reload",), ("--no-ask-password", "set-default", "beta")):
            with self.subTest(ctl=args):
                r = c.ctl(*args, user=AS_NOBODY)
                self.assertEqual((r.returncode, r.stdout), (1, ""), r)
                self.assertIn("Changing routing needs root or authorization for "
                              "org.providerrouter.Router1.manage (try with sudo).", r.stderr)

        self.assertEqual(self.routing(), before)
        self.assertEqual(self.chat_via(), "alpha")
        self.assertEqual(self.chat_via(model="file-model"), "beta")
        self.assert_alive(self.pid)

    def test_bus_policy(self):
        c = self.clients
        # The standard interfaces are open to anyone.
        r = c.gdbus("Ping", interface="org.freedesktop.DBus.Peer", user=AS_NOBODY)
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "()"), r)
        r = c.gdbus("Introspect", interface="org.freedesktop.DBus.Introspectable", user=AS_NOBODY)
        self.assertEqual(r.returncode, 0, r)
        self.assertIn('<interface name="%s">' % IFACE, r.stdout)
        # Any other interface is refused by the bus, for root as well.
        for user in (AS_NOBODY, ()):
            for iface, method in (("org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
                                  ("org.providerrouter.Router1.Debug", "Crash"),
                                  ("org.freedesktop.systemd1.Manager", "Reboot")):
                with self.subTest(user=user, interface=iface):
                    r = c.gdbus(method, interface=iface, user=user)
                    self.assert_bus_error(r, ACCESS_DENIED, "Rejected send message")
                    self.assertIn('interface="%s"' % iface, r.stderr)
        # A method call without an interface is refused too (the policy names interfaces).
        r = c.busctl("call", NAME, PATH, "", "GetStats", user=AS_NOBODY)
        self.assertNotEqual(r.returncode, 0, r)

        # Owning the name: not for nobody, while root may ask (it is taken: EXISTS, 3).
        r = c.gdbus("RequestName", NAME, "4", interface="org.freedesktop.DBus", dest="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus", user=AS_NOBODY)
        self.assert_bus_error(r, ACCESS_DENIED, 'not allowed to own the service "%s"' % NAME)
        r = c.gdbus("RequestName", NAME, "4", interface="org.freedesktop.DBus", dest="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "(uint32 3,)"), r)
        # Other names stay closed to root, as on the real system bus.
        r = c.gdbus("RequestName", "org.providerrouter.Router2", "4", interface="org.freedesktop.DBus",
                    dest="org.freedesktop.DBus", path="/org/freedesktop/DBus")
        self.assert_bus_error(r, ACCESS_DENIED, "not allowed to own")
        self.assertEqual(c.prop("DefaultProvider"), "alpha")
        self.assert_alive(self.pid)

    # -- polkit -----------------------------------------------------------------------------

    def start_polkit(self):
        pk = FakePolkit(self.bus.socket_path)
        self.addCleanup(pk.close)
        return pk

    def background(self, argv, user=()):
        p = self.clients.start(argv, user=user)

        def reap():
            if p.poll() is None:
                p.kill()
            p.communicate(timeout=10)
        self.addCleanup(reap)
        return p

    def test_polkit_decides_for_others(self):
        c = self.clients
        pk = self.start_polkit()
        daemon = c.name_owner()
        before = self.routing()

        # Root is never asked.
        self.assertEqual(c.busctl_call("SetDefaultProvider", "s", "beta").returncode, 0)
        self.assertEqual(c.gdbus("SetDefaultProvider", "alpha").returncode, 0)
        self.assertEqual(pk.requests, [])
        # Arguments are checked before polkit is bothered.
        r = c.gdbus("SetDefaultProvider", "nope", user=AS_NOBODY)
        self.assert_bus_error(r, ERR + "NoSuchProvider")
        r = c.gdbus("SetModelMapping", "''", "beta", user=AS_NOBODY)
        self.assert_bus_error(r, ERR + "InvalidModel")
        r = c.gdbus("RemoveModelMapping", "never-mapped", user=AS_NOBODY)
        self.assert_bus_error(r, ERR + "NoSuchMapping")
        self.assertEqual(pk.requests, [])

        # polkit says no, in each of its ways: nothing changes.
        for answer, name, message in (
                ((False, True), AUTH_REQUIRED, "Interactive authentication is required to change routing."),
                ((False, False), ACCESS_DENIED,
                 "Not authorized to change routing (polkit action org.providerrouter.Router1.manage)."),
                ("error", ACCESS_DENIED, "polkit could not be asked: polkit is having a bad day")):
            with self.subTest(answer=answer):
                pk.answer = answer
                asked = len(pk.requests)
                r = c.gdbus("SetDefaultProvider", "beta", user=AS_NOBODY)
                self.assert_bus_error(r, name, message)
                r = c.ctl("map", "pk-model", "beta", user=AS_NOBODY)
                self.assert_refused_by_ctl(r, "Failed to map the model: ")
                self.assertIn(message, r.stderr)
                self.assertEqual(len(pk.requests), asked + 2)
                self.assertEqual(self.routing(), before)
                self.assertEqual(self.chat_via(), "alpha")

        # polkit says yes: nobody's changes are made.
        pk.answer = (True, False)
        asked = len(pk.requests)
        r = c.gdbus("SetDefaultProvider", "beta", user=AS_NOBODY)
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "()"), r)
        self.assertEqual(self.chat_via(), "beta")
        req = pk.requests[asked]
        self.assertEqual(req["sender"], daemon)
        self.assertEqual(req["action"], "org.providerrouter.Router1.manage")
        self.assertEqual(req["subject_kind"], "system-bus-name")
        self.assertRegex(req["subject"].get("name", ""), r"^:1\.[0-9]+$")
        self.assertNotEqual(req["subject"]["name"], daemon)
        self.assertEqual(req["flags"], 0, "gdbus call does not allow interaction unless asked")
        for args in (("map", "pk-model", "alpha"), ("unmap", "file-model")):
            r = c.ctl(*args, user=AS_NOBODY)
            self.assertEqual((r.returncode, r.stderr), (0, ""), r)
        # provider-routerctl allows interaction (polkit would ask through an agent), unless told not to.
        self.assertEqual(pk.requests[-1]["flags"], 1)
        self.assertEqual(c.ctl("--no-ask-password", "map", "pk-model-2", "alpha", user=AS_NOBODY).returncode, 0)
        self.assertEqual(pk.requests[-1]["flags"], 0)
        self.assertEqual(self.chat_via(model="pk-model"), "alpha")
        self.assertEqual(self.chat_via(model="file-model"), "beta")
        self.assertEqual(c.prop("ModelMappings"), {"pk-model": "alpha", "pk-model-2": "alpha"})
        self.assertEqual(parse_state(self.state_file)["Routing"], {"DefaultProvider": "beta"})
        r = c.ctl("reload", user=AS_NOBODY)
        self.assertEqual(r.returncode, 0, r)
        self.assertEqual(c.prop("DefaultProvider"), "alpha")
        self.assertEqual(len(pk.requests), asked + 5)
        self.assert_alive(self.pid)

    def test_polkit_is_asked_without_blocking(self):
        c = self.clients
        pk = self.start_polkit()
        pk.delay = 3.0 * SLOW
        caller = self.background(c.gdbus_argv("SetDefaultProvider", "beta"), user=AS_NOBODY)
        wait_until(lambda: pk.requests, 10 * SLOW, interval=0.02, what="the daemon to ask polkit")
        asked = time.monotonic()

        # While polkit thinks, the daemon serves HTTP and D-Bus, on the old routing.
        self.assertEqual(self.chat_via(), "alpha")
        self.assertEqual(c.prop("DefaultProvider"), "alpha")
        self.assertIn("*", c.stats())
        self.assertEqual(c.busctl_call("SetModelMapping", "ss", "meanwhile", "beta").returncode, 0)
        self.assertLess(time.monotonic() - asked, pk.delay, "the daemon waited for polkit")
        self.assertIsNone(caller.poll(), "answered before polkit did")

        out, err = caller.communicate(timeout=30 * SLOW)
        self.assertEqual((caller.returncode, out.decode().strip()), (0, "()"), err)
        self.assertEqual(self.chat_via(), "beta")
        self.assertEqual(self.chat_via(model="meanwhile"), "beta")
        self.assertEqual(c.prop("DefaultProvider"), "beta")

        # A caller that leaves before polkit answers: the daemon does not mind.
        pk.requests.clear()
        caller = self.background(c.gdbus_argv("SetDefaultProvider", "alpha"), user=AS_NOBODY)
        wait_until(lambda: pk.requests, 10 * SLOW, interval=0.02, what="the daemon to ask polkit")
        caller.kill()
        caller.communicate(timeout=10)
        pk.delay = 0
        # The next question is answered only after the previous one.
        r = c.gdbus("SetModelMapping", "after", "alpha", user=AS_NOBODY)
        self.assertEqual(r.returncode, 0, r)
        self.assertEqual(c.prop("DefaultProvider"), self.chat_via())
        self.assertEqual(self.chat_via(model="after"), "alpha")
        self.assert_alive(self.pid)

    def test_polkit_answer_after_reload_is_checked_again(self):
        # A change authorized after the configuration changed under it is checked against the
        # configuration of the moment it is made.
        c = self.clients
        self.write_config(extra={"gamma": {"BaseURL": self.beta.base_url}})
        self.assertEqual(c.busctl_call("Reload").returncode, 0)
        self.assertEqual(c.busctl_call("SetModelMapping", "ss", "gone-model", "gamma").returncode, 0)
        pk = self.start_polkit()
        pk.delay = 2.0 * SLOW
        calls = [self.background(c.gdbus_argv("SetDefaultProvider", "gamma"), user=AS_NOBODY),
                 self.background(c.gdbus_argv("RemoveModelMapping", "gone-model"), user=AS_NOBODY)]
        wait_until(lambda: pk.requests, 10 * SLOW, interval=0.02, what="the daemon to ask polkit")
        # gamma and its mapping go away while polkit thinks.
        self.write_config()
        self.assertEqual(c.busctl_call("Reload").returncode, 0)
        self.assertEqual(c.prop("Providers"), ["alpha", "beta", "echo"])
        results = []
        for p in calls:
            out, err = p.communicate(timeout=30 * SLOW)
            results.append(Result(["gdbus"], p.returncode, out.decode(), err.decode()))
        self.assert_bus_error(results[0], ERR + "NoSuchProvider", "No provider 'gamma' is configured.")
        self.assert_bus_error(results[1], ERR + "NoSuchMapping", "Model 'gone-model' has no mapping.")
        self.assertEqual(len(pk.requests), 2)
        self.assertEqual(c.prop("DefaultProvider"), "alpha")
        self.assertEqual(c.prop("ModelMappings"), {"file-model": "beta"})
        self.assertIsNone(parse_state(self.state_file))
        self.assertEqual(self.chat_via(), "alpha")
        self.assert_alive(self.pid)

    # -- signals ----------------------------------------------------------------------------

    def start_monitor(self, argv, ready, user=()):
        env = _base_env(self.clients.env)
        limit = int(60 * SLOW)
        mon = _Process(list(user) + ["timeout", "-s", "TERM", str(limit)] + argv, env, self.workdir,
                       "monitor-%d.log" % len(self._procs))
        mon.label = "monitor"
        self._procs.append(mon)
        self.addCleanup(mon.stop, 10)
        wait_until(lambda: ready in mon.log(limit=None) or (not mon.alive() and self.fail(mon.log())),
                   10 * SLOW, what="%s to be ready" % argv[0])
        return mon

    @staticmethod
    def busctl_signals(mon):
        """The changed properties of each of our PropertiesChanged signals, from busctl --json."""
        out = []
        for line in mon.log(limit=None).splitlines():
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if msg.get("member") != "PropertiesChanged" or msg.get("path") != PATH:
                continue
            iface, changed, _invalidated = msg["payload"]["data"]
            if iface == IFACE:
                out.append({k: v["data"] for k, v in changed.items()})
        return out

    @staticmethod
    def gdbus_signals(mon):
        return [line for line in mon.log(limit=None).splitlines()
                if line.startswith(PATH + ": org.freedesktop.DBus.Properties.PropertiesChanged ('%s'" % IFACE)]

    def test_properties_changed(self):
        c = self.clients
        match = "type='signal',sender='%s',interface='org.freedesktop.DBus.Properties',path='%s'" % (NAME, PATH)
        bmon = self.start_monitor(["busctl", "--system", "monitor", "--json=short", "--match", match],
                                  "Monitoring bus message stream.")
        # gdbus monitor subscribes with a match rule (no eavesdropping): nobody may watch too.
        # Its "is owned by" line comes after a round trip that follows the AddMatch.
        gmon = self.start_monitor(["gdbus", "monitor", "--system", "--dest", NAME, "--object-path", PATH],
                                  "The name %s is owned by" % NAME, user=AS_NOBODY)

        def routing_signals(mon):
            return [s for s in self.busctl_signals(mon) if "DefaultProvider" in s or "ModelMappings" in s]

        steps = [
            (lambda: c.busctl_call("SetDefaultProvider", "s", "beta"), {"DefaultProvider": "beta"}),
            (lambda: c.ctl("map", "sig-model", "beta"),
             {"ModelMappings": {"file-model": "beta", "sig-model": "beta"}}),
            (lambda: c.gdbus("RemoveModelMapping", "sig-model"), {"ModelMappings": {"file-model": "beta"}}),
            (lambda: c.ctl("reload"), {"DefaultProvider": "alpha", "ModelMappings": {"file-model": "beta"}}),
            (lambda: c.gdbus("SetDefaultProvider", "beta"), {"DefaultProvider": "beta"}),
            # SIGHUP is a reload too.
            (lambda: self.router.send_signal(signal.SIGHUP), {"DefaultProvider": "alpha"}),
        ]
        for i, (action, expected) in enumerate(steps):
            r = action()
            if r is not None:
                self.assertEqual(r.returncode, 0, r)
            got = wait_until(lambda: (lambda s: s if len(s) > i else None)(routing_signals(bmon)),
                             10 * SLOW, interval=0.05, what="PropertiesChanged #%d" % (i + 1))
            for key, value in expected.items():
                self.assertEqual(got[i].get(key), value, "signal #%d: %s" % (i + 1, got[i]))
        # Refused calls, reads and no-op changes tell nothing; then one last change, whose signal
        # (signals keep their order) shows that nothing came in between.
        self.assertEqual(c.gdbus("SetDefaultProvider", "nope").error_name(), ERR + "NoSuchProvider")
        self.assertEqual(c.gdbus("SetDefaultProvider", "beta", user=AS_NOBODY).returncode, 1)
        self.assertEqual(c.gdbus("RemoveModelMapping", "never-mapped").error_name(), ERR + "NoSuchMapping")
        self.assertEqual(c.busctl_call("GetStats").returncode, 0)
        self.assertEqual(c.busctl_call("SetDefaultProvider", "s", "alpha").returncode, 0)
        self.assertEqual(c.busctl_call("SetModelMapping", "ss", "file-model", "beta").returncode, 0)
        self.assertEqual(c.busctl_call("SetModelMapping", "ss", "last-model", "alpha").returncode, 0)

        def routing_lines(mon):
            return [s for s in self.gdbus_signals(mon) if "'DefaultProvider'" in s or "'ModelMappings'" in s]
        n = len(steps) + 1
        got = wait_until(lambda: (lambda s: s if len(s) >= n else None)(routing_signals(bmon)),
                         10 * SLOW, interval=0.05, what="the last PropertiesChanged")
        self.assertEqual(len(got), n, got)
        self.assertEqual(got[-1]["ModelMappings"], {"file-model": "beta", "last-model": "alpha"})
        g = wait_until(lambda: (lambda s: s if len(s) >= n else None)(routing_lines(gmon)),
                       10 * SLOW, interval=0.05, what="gdbus monitor to see %d signals" % n)
        self.assertEqual(len(g), n, "\n".join(g))
        self.assertIn("'DefaultProvider': <'beta'>", g[0])
        self.assertIn("'sig-model': 'beta'", g[1])
        self.assertNotIn("sig-model", g[2])
        self.assertIn("'DefaultProvider': <'alpha'>", g[3])
        self.assertIn("'last-model': 'alpha'", g[-1])
        self.assert_alive(self.pid)

    # -- Reload -----------------------------------------------------------------------------

    def test_reload_rereads_config_and_drops_runtime_changes(self):
        c = self.clients
        self.assertEqual(c.ctl("set-default", "beta").returncode, 0)
        self.assertEqual(c.ctl("map", "rt-model", "beta").returncode, 0)
        self.assertIsNotNone(parse_state(self.state_file))

        self.write_config(extra={"gamma": {"BaseURL": self.beta.base_url}})
        r = c.ctl("reload")
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "", ""), r)

        self.assertEqual(c.prop("Providers"), ["alpha", "beta", "gamma", "echo"])
        self.assertIn("gamma", c.prop("ProviderStates"))
        self.assertIn("gamma", c.stats())
        self.assertEqual(c.prop("DefaultProvider"), "alpha")
        self.assertEqual(c.prop("ModelMappings"), {"file-model": "beta"})
        self.assertFalse(os.path.exists(self.state_file))
        self.assertEqual(self.chat_via(), "alpha")
        self.assertEqual(self.chat_via(model="rt-model"), "alpha")
        self.assertEqual(self.chat_via(headers={"X-Provider": "gamma"}), "gamma")

        # The new provider can be chosen at once.
        self.assertEqual(c.busctl_call("SetDefaultProvider", "s", "gamma").returncode, 0)
        r = self.router.chat(chat_body("via gamma"))
        self.assertEqual(r.header("X-Provider"), "gamma", r)
        self.assertEqual(r.header("X-Mock-Name"), "beta", r)

        # A provider dropped from the file disappears, and the default falls back to the file's.
        self.write_config()
        self.assertEqual(c.busctl_call("Reload").returncode, 0)
        self.assertEqual(c.prop("Providers"), ["alpha", "beta", "echo"])
        self.assertNotIn("gamma", c.stats())
        self.assertEqual(c.prop("DefaultProvider"), "alpha")
        self.assertIn("Configuration reloaded", self.router.log(limit=None))
        self.assert_alive(self.pid)

    def test_reload_with_request_in_flight(self):
        # A request in flight on a provider that a reload removes finishes on it, and its figures
        # go nowhere (the sanitizer build checks that nothing is used after being freed).
        c = self.clients
        self.write_config(extra={"gamma": {"BaseURL": self.beta.base_url}})
        self.assertEqual(c.busctl_call("Reload").returncode, 0)
        done = {}

        def slow():
            done["r"] = self.router.chat(chat_body("slow", mock={"delay_ms": int(2000 * SLOW)}),
                                         headers={"X-Provider": "gamma"})
        t = threading.Thread(target=slow, daemon=True)
        t.start()
        self.addCleanup(t.join, 30 * SLOW)
        self.beta.wait_stat("chat", 1)
        self.assertEqual(c.stats()["gamma"]["in_flight"][1], 1)
        self.write_config()
        self.assertEqual(c.busctl_call("Reload").returncode, 0)
        self.assertEqual(c.prop("Providers"), ["alpha", "beta", "echo"])
        self.assertNotIn("gamma", c.stats())
        t.join(30 * SLOW)
        self.assertFalse(t.is_alive())
        self.assertEqual(done["r"].status, 200, done["r"])
        self.assertEqual(done["r"].header("X-Provider"), "gamma")
        self.assertEqual(done["r"].json()["choices"][0]["message"]["content"], "beta: slow")
        wait_until(lambda: c.stats()["*"]["in_flight"][1] == 0, 5 * SLOW, interval=0.05, what="nothing in flight")
        self.assertNotIn("gamma", c.stats())
        self.assert_alive(self.pid)

    def test_reload_broken_config_keeps_routing(self):
        c = self.clients
        self.assertEqual(c.ctl("set-default", "beta").returncode, 0)
        before = self.routing()

        self.write_config(broken=True)
        r = c.gdbus("Reload")
        self.assert_bus_error(r, ERR + "ConfigInvalid", "The configuration has errors and was not applied: ")
        self.assertIn("missing", r.stderr)
        r = c.busctl_call("Reload")
        self.assertEqual(r.returncode, 1, r)
        self.assertIn("The configuration has errors and was not applied", r.stderr)
        r = c.ctl("reload")
        self.assert_refused_by_ctl(r, "Failed to reload the configuration: The configuration has errors")

        self.assertEqual(self.routing(), before)
        self.assertEqual(parse_state(self.state_file), {"Routing": {"DefaultProvider": "beta"}})
        self.assertEqual(self.chat_via(), "beta")
        self.assertIn("Keeping the previous configuration.", self.router.log(limit=None))
        # Changes still work on the old configuration.
        self.assertEqual(c.ctl("map", "still-works", "alpha").returncode, 0)
        self.assertEqual(self.chat_via(model="still-works"), "alpha")
        self.assert_alive(self.pid)

    # -- provider-routerctl's command line ------------------------------------------------------

    def test_ctl_command_line(self):
        c = self.clients
        r = c.ctl("--help")
        self.assertEqual((r.returncode, r.stderr), (0, ""), r)
        for verb in ("status", "providers", "set-default NAME", "map MODEL PROVIDER", "unmap MODEL", "stats",
                     "reload"):
            self.assertRegex(r.stdout, r"(?m)^  %s\s" % re.escape(verb))
        self.assertEqual(c.ctl("-h").stdout, r.stdout)
        r = c.ctl("--version")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "provider-routerctl %s" % _daemon_version()), r)

        r = c.ctl("frobnicate")
        self.assert_refused_by_ctl(r, "Unknown command 'frobnicate'. See 'provider-routerctl --help'.")
        r = c.ctl("map", "only-model")
        self.assert_refused_by_ctl(r, "Too few arguments for 'map'.")
        r = c.ctl("set-default", "a", "b")
        self.assert_refused_by_ctl(r, "Too many arguments for 'set-default'.")
        r = c.ctl("--bogus-option", "status")
        self.assertEqual((r.returncode, r.stdout), (1, ""), r)
        self.assertIn("bogus-option", r.stderr)
        # No bus to talk to.
        r = c.ctl("status", env={"DBUS_SYSTEM_BUS_ADDRESS": "unix:path=%s/no-such-bus" % self.workdir})
        self.assert_refused_by_ctl(r, "Failed to connect to the system bus: ")
        # Nothing of that reached the daemon.
        self.assertEqual(c.prop("DefaultProvider"), "alpha")
        self.assert_alive(self.pid)

    def test_ctl_new_verbs_arguments(self):
        # split, comparisons, compare, probe: wrong arguments are refused before anything is sent,
        # so the daemon (which may not know these methods at all) never sees them.
        c = self.clients
        r = c.ctl("--help")
        for verb in ("split MODEL PROVIDER[:WEIGHT]...", "comparisons [N]", "compare MODEL PROMPT", "probe NAME"):
            self.assertRegex(r.stdout, r"(?m)^  %s\s" % re.escape(verb))
        for opt in ("-H --host=[USER@]HOST[:PORT]", "-M --machine=CONTAINER", "--providers=NAME,..."):
            self.assertIn(opt, r.stdout)
        before = self.routing()
        refusals = [
            (("split", "m"), "Too few arguments for 'split'."),
            (("split",), "Too few arguments for 'split'."),
            (("split", "m", "alpha:0"), "Invalid arm 'alpha:0': expected PROVIDER or PROVIDER:WEIGHT, with a "
                                        "weight from 1 to 4294967295."),
            (("split", "m", "alpha:-1"), "Invalid arm 'alpha:-1'"),
            (("split", "m", "alpha:+2"), "Invalid arm 'alpha:+2'"),
            (("split", "m", "alpha: 2"), "Invalid arm 'alpha: 2'"),
            (("split", "m", "alpha:2x"), "Invalid arm 'alpha:2x'"),
            (("split", "m", "alpha:"), "Invalid arm 'alpha:'"),
            (("split", "m", ":5"), "Invalid arm ':5'"),
            (("split", "m", ""), "Invalid arm ''"),
            (("split", "m", "alpha:4294967296"), "Invalid arm 'alpha:4294967296'"),
            (("split", "m", "alpha:80", "beta", "alpha:1"), "Provider 'alpha' is named twice in the split of 'm'."),
            (("comparisons", "0"), "Invalid number of comparisons '0': expected a whole number from 1 to 4294967295."),
            (("comparisons", "--", "-3"), "Invalid number of comparisons '-3'"),
            (("comparisons", "ten"), "Invalid number of comparisons 'ten'"),
            (("comparisons", "4294967296"), "Invalid number of comparisons '4294967296'"),
            (("comparisons", "1", "2"), "Too many arguments for 'comparisons'."),
            (("compare", "m"), "Too few arguments for 'compare'."),
            (("compare", "m", "p", "q"), "Too many arguments for 'compare'."),
            (("compare", "m", ""), "The prompt is empty."),
            (("--providers=alpha,,beta", "compare", "m", "p"), "Invalid --providers='alpha,,beta': expected "
                                                               "NAME[,NAME...]."),
            (("--providers=", "compare", "m", "p"), "Invalid --providers=''"),
            (("--providers=alpha,", "compare", "m", "p"), "Invalid --providers='alpha,'"),
            (("--providers=beta,beta", "compare", "m", "p"), "A provider is named twice in --providers='beta,beta'."),
            (("--providers=alpha", "status"), "--providers= is an option of 'compare' only."),
            (("--providers=alpha", "split", "m", "alpha"), "--providers= is an option of 'compare' only."),
            (("probe",), "Too few arguments for 'probe'."),
            (("probe", "alpha", "beta"), "Too many arguments for 'probe'."),
            (("split", "m", b"al\xffpha".decode("utf-8", "surrogateescape")), "is not valid UTF-8"),
            (("compare", "m", b"\xc3(".decode("utf-8", "surrogateescape")), "is not valid UTF-8"),
        ]
        for args, message in refusals:
            with self.subTest(args=args):
                self.assert_refused_by_ctl(c.ctl(*args), message)
        # getopt would take a prompt that starts with '-' for an option; '--' ends the options.
        r = c.ctl("compare", "m", "-x")
        self.assertEqual((r.returncode, r.stdout), (1, ""), r)
        self.assertIn("invalid option", r.stderr)
        self.assertEqual(self.routing(), before)
        self.assert_alive(self.pid)

    def test_ctl_remote_options(self):
        # -H and -M: refused with --user; reaching nothing is a clear failure. (A real sshd and
        # container are in the system test, tests/system/inside.sh.)
        c = self.clients
        for args in (("--user", "-H", "root@127.0.0.1", "status"), ("-M", "box", "--user", "status"),
                     ("--host=127.0.0.1", "--user", "set-default", "beta"), ("--machine=box", "--user", "stats")):
            with self.subTest(args=args):
                self.assert_refused_by_ctl(c.run([CTL] + list(args)),
                                           "--user cannot be combined with -H/--host= or -M/--machine=")
        self.assert_refused_by_ctl(c.ctl("-H", "", "status"), "Empty host name for -H/--host=.")
        self.assert_refused_by_ctl(c.ctl("--machine=", "status"), "Empty machine name for -M/--machine=.")
        self.assert_refused_by_ctl(c.ctl("-M", "no/such", "status"), "Invalid machine name 'no/such' for "
                                                                       "-M/--machine=.")
        r = c.ctl("-M", "pr-no-such-container", "status")
        self.assert_refused_by_ctl(r, "No container 'pr-no-such-container' is known to systemd-machined "
                                      "(see 'machinectl list').")
        # Argument errors come before ssh is started.
        r = c.ctl("-H", "root@127.0.0.1:1", "split", "m", "alpha:0")
        self.assert_refused_by_ctl(r, "Invalid arm 'alpha:0'")
        if shutil.which("ssh"):
            # Port 1 on loopback: nothing listens, ssh fails at once and says so, then we do.
            r = c.ctl("-H", "root@127.0.0.1:1", "status",
                      env={"HOME": self.workdir, "SSH_AUTH_SOCK": None})
            self.assertEqual((r.returncode, r.stdout), (1, ""), r)
            self.assertIn("ssh: connect to host 127.0.0.1 port 1", r.stderr)
            self.assertIn("Failed to query the router: the connection to 'root@127.0.0.1:1' over SSH failed: ",
                          r.stderr)
        self.assert_alive(self.pid)

    def test_ctl_german(self):
        # LANGUAGE=de with the .mo from 'meson install --destdir'. provider-routerctl looks in
        # the LOCALEDIR it was built with, and glibc has no variable to point it elsewhere, so
        # the installed locale directory is bind-mounted there in a private mount namespace.
        c = self.clients
        localedir = None
        with open(os.path.join(BUILD_DIR, "config.h")) as f:
            for line in f:
                m = re.match(r'#define LOCALEDIR "(.*)"', line)
                if m:
                    localedir = m.group(1)
        if not localedir or not shutil.which("unshare") or not shutil.which("meson"):
            self.skipTest("no LOCALEDIR in config.h, or no unshare/meson")
        dest = tempfile.mkdtemp(prefix="provider-router-destdir-")
        self.addCleanup(shutil.rmtree, dest, True)
        p = subprocess.run(["meson", "install", "-C", BUILD_DIR, "--destdir", dest, "--no-rebuild", "--quiet"],
                           capture_output=True, timeout=120 * SLOW, stdin=subprocess.DEVNULL, env=_base_env())
        self.assertEqual(p.returncode, 0, p.stderr.decode())
        installed = dest + localedir
        mo = os.path.join(installed, "de", "LC_MESSAGES", "provider-router.mo")
        self.assertTrue(os.path.exists(mo), "meson install did not install %s" % mo)
        if not os.path.isdir(localedir):
            self.skipTest("%s does not exist to mount the installed translations on" % localedir)

        probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10 * SLOW)
        if probe.returncode != 0:
            self.skipTest("no mount namespace here: %s" % probe.stderr.decode().strip())

        def ctl_de(*args, lang="de"):
            script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
            return c.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", installed,
                          localedir, CTL] + list(args), env={"LANGUAGE": lang, "LANG": "C.UTF-8", "LC_ALL": None})

        r = ctl_de("frobnicate")
        self.assert_refused_by_ctl(r, "Unbekannter Befehl »frobnicate«. Siehe »provider-routerctl --help«.")
        r = ctl_de("--help")
        self.assertEqual(r.returncode, 0, r)
        self.assertNotIn("Query or change how provider-router routes requests.", r.stdout)
        r = ctl_de("set-default", "nope")
        self.assertEqual(r.returncode, 1, r)
        self.assertNotIn("Failed to set the default provider", r.stderr)
        # The daemon's own message stays as it is; the ctl's frame is German.
        self.assertIn("No provider 'nope' is configured.", r.stderr)
        # The newer verbs and options too.
        r = ctl_de("split", "m", "alpha:0")
        self.assert_refused_by_ctl(r, "Ungültiger Anteil »alpha:0«")
        r = ctl_de("--user", "-H", "host", "status")
        self.assert_refused_by_ctl(r, "--user kann nicht mit -H/--host= oder -M/--machine= kombiniert werden")
        r = ctl_de("probe", "alpha")
        self.assert_refused_by_ctl(r, "Anbieter konnte nicht geprüft werden: Der Router hat keine Methode Probe")
        r = ctl_de("--help")
        self.assertIn("  -H --host=[BENUTZER@]RECHNER[:PORT]\n", r.stdout)
        # English without the translation asked for.
        r = ctl_de("frobnicate", lang="en")
        self.assertIn("Unknown command 'frobnicate'.", r.stderr)

        # The polkit message is translated in the installed policy.
        policies = [os.path.join(d, f) for d, _, fs in os.walk(dest) for f in fs
                    if f == "org.providerrouter.Router1.policy"]
        self.assertEqual(len(policies), 1, policies)
        with open(policies[0]) as f:
            self.assertIn('<message xml:lang="de">', f.read())
        self.assert_alive(self.pid)


# --- provider-routerctl against a newer router: FakeRouter on a private session bus -------------

def _rec(**kw):
    """An a{sv} record: ints are 't', floats 'd', bools 'b', strings 's', lists of str 'as'."""
    out = {}
    for k, v in kw.items():
        if isinstance(v, tuple):
            out[k] = v
        elif isinstance(v, bool):
            out[k] = ("b", v)
        elif isinstance(v, int):
            out[k] = ("t", v)
        elif isinstance(v, float):
            out[k] = ("d", v)
        elif isinstance(v, list):
            out[k] = ("as", v)
        else:
            out[k] = ("s", v)
    return out


LONG_ANSWER = " ".join("word%d" % i for i in range(120)) + "\n\n    indented code line\nend."


@NEEDS_TOOLS
class CtlNewMethodsTest(RouterTestCase):
    """What provider-routerctl sends for split, comparisons, compare and probe, and how it shows the
    answers (status with ModelSplits, stats with routes and pairs), against FakeRouter, which answers
    with the signatures of INTERFACES.md and DECISIONS.md. No daemon: the daemon's side of these
    methods is tested with the daemon."""

    @classmethod
    def setUpClass(cls):
        cls.workdir = tempfile.mkdtemp(prefix="provider-router-ctl-fake-")
        os.chmod(cls.workdir, 0o755)
        cls.bus = PrivateBus(cls.workdir, "session")
        cls.clients = Clients(cls.bus)
        cls.fake = FakeRouter(cls.bus.socket_path)

    @classmethod
    def tearDownClass(cls):
        cls.fake.close()
        cls.bus.shut_down()
        shutil.rmtree(cls.workdir, ignore_errors=True)

    def setUp(self):
        stats = {"alpha": _rec(requests=5, errors=0, in_flight=("u", 0), state="up"),
                 "beta": _rec(requests=3, errors=1, in_flight=("u", 0), state="up"),
                 "*": _rec(requests=8, errors=1, in_flight=("u", 0))}
        self.fake.answers = {"Get:DefaultProvider": ("s", "alpha"), "Get:Providers": ("as", ["alpha", "beta"]),
                             "Get:Version": ("s", "9.9"), "Get:ModelMappings": ("a{ss}", {"file-model": "beta"}),
                             "GetStats": ("a{sa{sv}}", [stats])}
        self.fake.calls = []

    def ctl(self, *args, env=None):
        return self.clients.ctl("--no-pager", *args, env=env)

    def calls(self, member):
        return [args for m, args in self.fake.calls if m == member]

    def assert_clean(self, r, rc=0):
        self.assertEqual((r.returncode, r.stderr), (rc, ""), r)
        self.assertNotIn("\x1b", r.stdout)

    # -- status and split ---------------------------------------------------------------------

    def test_status_model_splits(self):
        # Absent (a router older than the property): no line, no error.
        r = self.ctl("status")
        self.assert_clean(r)
        self.assertNotIn("Model splits", r.stdout)
        self.assertEqual(len(self.calls("Get:ModelSplits")), 1)

        self.fake.answers["Get:ModelSplits"] = ("a{sa(su)}", {"qwen3-coder": [("alpha", 80), ("beta", 20)],
                                                             "*": [("alpha", 1), ("beta", 1), ("gam\x1bma", 1)]})
        r = self.ctl("status")
        self.assert_clean(r)
        self.assertRegex(r.stdout, r"(?m)^\s*Model mappings: file-model → beta\n"
                                   r"\s*Model splits: qwen3-coder → alpha 80%, beta 20%\n"
                                   r"\s+\* → alpha 33%, beta 33%, gam\?ma 33%\n\s*Providers: alpha \[default\]")
        # The labels line up.
        labels = [line.index(":") for line in r.stdout.splitlines() if re.match(r"^\s*[A-Z][a-z ]+:", line)]
        self.assertEqual(len(set(labels)), 1, r.stdout)

        self.fake.answers["Get:ModelSplits"] = ("a{sa(su)}", {})
        r = self.ctl("status")
        self.assert_clean(r)
        self.assertNotIn("Model splits", r.stdout)

    def test_split(self):
        self.fake.answers["SetModelSplit"] = ("", ())
        for args, sent in ((("qwen3-coder", "alpha:80", "beta:20"), ["qwen3-coder", [("alpha", 80), ("beta", 20)]]),
                           (("*", "alpha", "beta:3"), ["*", [("alpha", 1), ("beta", 3)]]),
                           (("m", "lm:studio:4294967295"), ["m", [("lm:studio", 4294967295)]]),
                           (("m", "alpha:007"), ["m", [("alpha", 7)]])):
            with self.subTest(args=args):
                self.fake.calls = []
                r = self.ctl("split", *args)
                self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "", ""), r)
                self.assertEqual(self.calls("SetModelSplit"), [sent])

        self.fake.answers["SetModelSplit"] = ("error", ERR + "NoSuchProvider",
                                              "No provider 'nope' is configured. Known providers: alpha, beta.")
        r = self.ctl("split", "m", "alpha:1", "nope:2")
        self.assertEqual((r.returncode, r.stdout), (1, ""), r)
        self.assertEqual(r.stderr, "Failed to set the model split: No provider 'nope' is configured. Known "
                                   "providers: alpha, beta.\n")
        self.fake.answers["SetModelSplit"] = ("error", ACCESS_DENIED, "Access denied")
        r = self.ctl("split", "m", "alpha:1")
        self.assertEqual(r.returncode, 1, r)
        self.assertIn("Failed to set the model split: Access denied\nChanging routing needs root", r.stderr)

    # -- comparisons --------------------------------------------------------------------------

    def comparison(self, when, model, p_status=200, m_status=200, m_error="", similarity=0.87, **kw):
        rec = _rec(request_id="%032x" % when, time_realtime_usec=when * 1000000, model=model, origin="mirror",
                   primary_provider="alpha", primary_status=("u", p_status), primary_ttfb_usec=100000,
                   primary_duration_usec=1500000, primary_prompt_tokens=12, primary_completion_tokens=60,
                   primary_tokens_per_sec=40.0, primary_finish_reason="stop", primary_tool_calls=[],
                   primary_answer_length=300, primary_error="",
                   mirror_provider="beta", mirror_status=("u", m_status), mirror_ttfb_usec=220000,
                   mirror_duration_usec=1200000, mirror_prompt_tokens=12, mirror_completion_tokens=63,
                   mirror_tokens_per_sec=52.5, mirror_finish_reason="stop", mirror_tool_calls=["get_weather"],
                   mirror_answer_length=310, mirror_error=m_error)
        if similarity is not None:
            rec["similarity"] = ("d", similarity)
        rec.update(_rec(**kw))
        return rec

    def test_comparisons_table(self):
        now = int(time.time())
        newest = self.comparison(now, "qwen3-coder")
        older = self.comparison(now - 3600, "m\x1b[31mred", m_status=0, m_error="connection refused",
                                similarity=None, mirror_ttfb_usec=0, mirror_duration_usec=0,
                                mirror_tokens_per_sec=0.0)
        self.fake.answers["GetComparisons"] = ("aa{sv}", [[newest, older]])

        r = self.ctl("comparisons")
        self.assert_clean(r)
        self.assertEqual(self.calls("GetComparisons"), [[20]])
        lines = r.stdout.splitlines()
        self.assertEqual(lines[0].split(), ["TIME", "MODEL", "PRIMARY", "MIRROR", "STATUS", "TTFB-DIFF", "TIME-DIFF",
                                            "TOKENS/S", "SIMILARITY"])
        table = lines[:3]
        # Columns line up: the last one is right-aligned, so every line is as long.
        self.assertEqual(len({len(line) for line in table}), 1, r.stdout)
        # Oldest first, newest last.
        self.assertEqual(table[1].split()[3:], ["m?[31mred", "alpha", "beta", "200/err", "-", "-", "40.0/-", "-"])
        self.assertTrue(table[1].startswith(time.strftime("%b %d %H:%M:%S", time.localtime(now - 3600))), table)
        self.assertEqual(table[2].split()[3:], ["qwen3-coder", "alpha", "beta", "200/200", "+120.0ms", "-300.0ms",
                                                "40.0/52.5", "0.87"])
        self.assertTrue(table[2].startswith(time.strftime("%b %d %H:%M:%S", time.localtime(now))), table)
        self.assertIn("2 comparisons listed, newest last.", r.stdout)
        self.assertIn("journalctl MESSAGE_ID=3f0a1c9e6b2d4e8f9a7c5b1d2e4f6a80", r.stdout)

        r = self.ctl("--no-legend", "comparisons", "5")
        self.assert_clean(r)
        self.assertEqual(self.calls("GetComparisons")[-1], [5])
        self.assertEqual([line.split()[3] for line in r.stdout.splitlines()], ["m?[31mred", "qwen3-coder"])

        self.fake.answers["GetComparisons"] = ("aa{sv}", [[]])
        r = self.ctl("comparisons", "1")
        self.assert_clean(r)
        self.assertEqual(r.stdout, "No comparisons recorded.\n")

        # An answer of another shape is refused, not misread.
        self.fake.answers["GetComparisons"] = ("a{sv}", [{}])
        r = self.ctl("comparisons")
        self.assertEqual((r.returncode, r.stdout), (1, ""), r)
        self.assertEqual(r.stderr, "Failed to get the comparisons: unexpected answer from the router (signature "
                                   "'a{sv}' instead of 'aa{sv}').\n")

    # -- compare ------------------------------------------------------------------------------

    def answer(self, provider, content, status=200, error="", **kw):
        rec = _rec(provider=provider, status=("u", status), ttfb_usec=120000, duration_usec=1500000,
                   prompt_tokens=12, completion_tokens=85, tokens_per_sec=56.7, finish_reason="stop",
                   content=content, error=error)
        rec.update(_rec(**kw))
        return rec

    def test_compare_side_by_side(self):
        self.fake.answers["Compare"] = ("aa{sv}", [[self.answer("alpha", LONG_ANSWER),
                                                   self.answer("beta", "Hi!\x1b]0;pwned\x07 there\ttab")]])
        r = self.ctl("--providers=alpha,beta", "compare", "qwen3-coder", "Say hi", env={"COLUMNS": "100"})
        self.assert_clean(r)
        self.assertEqual(self.calls("Compare"), [["qwen3-coder", ["alpha", "beta"], "Say hi"]])
        lines = r.stdout.splitlines()
        self.assertTrue(all(len(line) <= 100 for line in lines), r.stdout)
        col = (100 - 3) // 2
        self.assertTrue(all(line[col:col + 3] in (" │ ", " │") for line in lines), r.stdout)
        self.assertEqual([line for line in lines if line.endswith(" ")], [])
        left = [line[:col].rstrip() for line in lines]
        right = [line[col + 3:] for line in lines]
        self.assertEqual(left[:4], ["alpha", "status 200, finish reason stop", "TTFB 120.0ms, total 1.50s",
                                    "tokens: 12 in, 85 out, 56.7/s"])
        self.assertEqual(right[:4], ["beta", "status 200, finish reason stop", "TTFB 120.0ms, total 1.50s",
                                     "tokens: 12 in, 85 out, 56.7/s"])
        self.assertEqual(left[4], "─" * col)
        # The long answer is all there, in order, wrapped at spaces; its indentation is kept.
        body = left[5:]
        self.assertEqual(" ".join(" ".join(body).split()), " ".join(LONG_ANSWER.split()))
        self.assertGreater(len(body), 10)
        self.assertIn("    indented code line", body)
        # The other answer, its escape sequence defused.
        self.assertEqual(right[5].rstrip(), "Hi!?]0;pwned? there tab")

        # Without --providers, the router chooses: an empty list.
        r = self.ctl("compare", "qwen3-coder", "Say hi", env={"COLUMNS": "100"})
        self.assert_clean(r)
        self.assertEqual(self.calls("Compare")[-1], ["qwen3-coder", [], "Say hi"])

    def test_compare_narrow_and_failures(self):
        answers = [self.answer("alpha", "short one"), self.answer("beta", "", status=502, error="upstream said no",
                                                                  finish_reason="", completion_tokens=0,
                                                                  tokens_per_sec=0.0),
                   self.answer("gamma", "third")]
        self.fake.answers["Compare"] = ("aa{sv}", [answers])
        # Three side by side need 3 x 28 columns and two separators.
        r = self.ctl("compare", "m", "p", env={"COLUMNS": "90"})
        self.assert_clean(r, rc=1)  # beta failed
        self.assertIn("alpha", r.stdout.splitlines()[0])
        self.assertIn("gamma", r.stdout.splitlines()[0])
        self.assertIn("error: upstream said no", r.stdout)
        self.assertIn("status 502", r.stdout)
        self.assertIn("tokens: 12 in, 0 out, -/s", r.stdout)

        r = self.ctl("compare", "m", "p", env={"COLUMNS": "80"})
        self.assert_clean(r, rc=1)
        self.assertNotIn("│", r.stdout)
        blocks = r.stdout.split("\n\n")
        self.assertEqual([b.splitlines()[0] for b in blocks], ["alpha", "beta", "gamma"])
        self.assertTrue(all(len(line) <= 80 for line in r.stdout.splitlines()))

        self.fake.answers["Compare"] = ("aa{sv}", [[self.answer("alpha", "ok")]])
        r = self.ctl("compare", "m", "p", env={"COLUMNS": "80"})
        self.assert_clean(r)
        self.assertEqual(r.stdout.splitlines()[-1], "ok")

        self.fake.answers["Compare"] = ("aa{sv}", [[]])
        r = self.ctl("compare", "m", "p")
        self.assertEqual((r.returncode, r.stdout), (1, ""), r)
        self.assertEqual(r.stderr, "Failed to compare the providers: the router compared no provider.\n")

        self.fake.answers["Compare"] = ("error", ERR + "NoSuchProvider", "No provider 'x' is configured.")
        r = self.ctl("--providers=x", "compare", "m", "p")
        self.assertEqual((r.returncode, r.stdout, r.stderr),
                         (1, "", "Failed to compare the providers: No provider 'x' is configured.\n"), r)

    # -- probe --------------------------------------------------------------------------------

    def probe_result(self, checks, passed=None):
        return ("a{sv}", [_rec(provider="alpha", passed=all(ok for _, ok, _ in checks) if passed is None else passed,
                               ttfb_usec=120000, checks=("a(sbs)", checks))])

    def test_probe_checklist(self):
        checks = [("/models lists the model", True, "alpha-1 is listed"),
                  ("a plain answer", True, "200, 2 tokens"),
                  ("a stream ends with [DONE]", True, "4 frames, then [DONE]")]
        self.fake.answers["Probe"] = self.probe_result(checks)
        r = self.ctl("probe", "alpha")
        self.assert_clean(r)
        self.assertEqual(self.calls("Probe"), [["alpha"]])
        lines = r.stdout.splitlines()
        self.assertEqual(lines[0], "Conformance of alpha:")
        self.assertEqual(lines[1].split(), ["CHECK", "DETAIL"])
        self.assertEqual(lines[2], "✓  /models lists the model    alpha-1 is listed")
        self.assertEqual(lines[4], "✓  a stream ends with [DONE]  4 frames, then [DONE]")
        self.assertEqual(lines[5:], ["Time to first byte: 120.0ms", "All 3 checks passed."])

        checks[2] = ("a stream ends with [DONE]", False, "the stream ended without data: [DONE]")
        self.fake.answers["Probe"] = self.probe_result(checks)
        r = self.ctl("--no-legend", "probe", "alpha")
        self.assert_clean(r, rc=1)
        self.assertIn("✗  a stream ends with [DONE]  the stream ended without data: [DONE]", r.stdout)
        self.assertEqual(r.stdout.splitlines()[-1], "1 of 3 checks failed.")
        self.assertNotIn("CHECK", r.stdout)

        # Without UTF-8, ASCII marks.
        r = self.ctl("probe", "alpha", env={"LANG": "C", "LC_ALL": "C"})
        self.assertEqual(r.returncode, 1, r)
        self.assertIn("-  a stream ends with [DONE]", r.stdout)
        self.assertIn("+  a plain answer", r.stdout)

        # Not passed with no failed check (the probe could not run): still exit 1.
        self.fake.answers["Probe"] = self.probe_result([], passed=False)
        r = self.ctl("probe", "alpha")
        self.assert_clean(r, rc=1)
        self.assertEqual(r.stdout.splitlines()[-1], "The probe did not pass.")

        self.fake.answers["Probe"] = ("error", ERR + "NoSuchProvider", "No provider 'x' is configured.")
        r = self.ctl("probe", "x")
        self.assertEqual((r.returncode, r.stdout, r.stderr),
                         (1, "", "Failed to probe the provider: No provider 'x' is configured.\n"), r)

    # -- stats --------------------------------------------------------------------------------

    def test_stats_routes_and_pairs(self):
        routes = [_rec(model="qwen3-coder", provider="alpha", requests=80, errors=1, ttfb_p50_usec=90000,
                       ttfb_p99_usec=400000, latency_p50_usec=1200000, latency_p99_usec=3000000,
                       tokens_per_sec_p50=41.5),
                  _rec(model="qwen3-coder", provider="beta", requests=20, errors=0, ttfb_p50_usec=150000,
                       ttfb_p99_usec=500000, latency_p50_usec=1500000, latency_p99_usec=3500000,
                       tokens_per_sec_p50=38.25)]
        pairs = [_rec(primary="alpha", mirror="beta", count=42, similarity_p50=0.87,
                      latency_delta_p50_usec=("x", -300000), ttfb_delta_p50_usec=("x", 120000),
                      primary_error_rate=0.0, mirror_error_rate=0.024)]
        stats = self.fake.answers["GetStats"][1][0]
        stats["*"].update(routes=("aa{sv}", routes), comparisons=("aa{sv}", pairs))
        r = self.ctl("stats")
        self.assert_clean(r)
        lines = r.stdout.splitlines()
        i = lines.index(next(line for line in lines if line.startswith("MODEL")))
        self.assertEqual(lines[i].split(), ["MODEL", "PROVIDER", "REQUESTS", "ERRORS", "P50", "P99", "TTFB-P50",
                                            "TTFB-P99", "TOKENS/S"])
        self.assertEqual(lines[i + 1].split(), ["qwen3-coder", "alpha", "80", "1", "1.20s", "3.00s", "90.0ms",
                                                "400.0ms", "41.5"])
        self.assertEqual(lines[i + 2].split()[:3], ["qwen3-coder", "beta", "20"])
        j = lines.index(next(line for line in lines if line.startswith("PRIMARY")))
        self.assertEqual(lines[j].split(), ["PRIMARY", "MIRROR", "COUNT", "SIMILARITY", "TIME-DIFF", "TTFB-DIFF",
                                            "PRIMARY-ERRORS", "MIRROR-ERRORS"])
        self.assertEqual(lines[j + 1].split(), ["alpha", "beta", "42", "0.87", "-300.0ms", "+120.0ms", "0.0%",
                                                "2.4%"])
        # The provider table above is as before.
        self.assertEqual(lines[0].split()[0], "PROVIDER")
        self.assertEqual(lines[1].split()[:3], ["alpha", "5", "0"])


# --- restarts: a daemon of their own per test ----------------------------------------------------

@NEEDS_TOOLS
@NEEDS_ROOT
class RestartTest(BusTestMixin, RouterTestCase):

    def setUp(self):
        self.workdir = tempfile.mkdtemp(prefix="provider-router-dbus-restart-")
        os.chmod(self.workdir, 0o755)
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.bus = PrivateBus(self.workdir, "system")
        self._procs.append(self.bus)
        self.addCleanup(self.bus.shut_down)
        self.clients = Clients(self.bus)
        self.alpha = self.start_mock("alpha")
        self.beta = self.start_mock("beta")
        self.state_file = os.path.join(self.workdir, "state", "routing.state")
        self.router = None

    def launch(self, extra=None, env=None):
        providers = providers_config(self.alpha, self.beta, extra)
        r = Router(lambda port: router_config(port, providers, default="alpha", mappings={"file-model": "beta"}),
                   env=dict(env or {}, DBUS_SYSTEM_BUS_ADDRESS=self.bus.address), args=["--bus=system"],
                   workdir=self.workdir)
        self._procs.append(r)
        self.addCleanup(r.kill)
        wait_until(self.clients.has_owner, 10 * SLOW, interval=0.1, what="%s on the bus" % NAME)
        self.router = r
        return r

    def test_state_survives_kill_9(self):
        first = self.launch()
        c = self.clients
        self.assertEqual(c.ctl("set-default", "beta").returncode, 0)
        self.assertEqual(c.ctl("map", "keep-model", "alpha").returncode, 0)
        self.assertEqual(c.ctl("unmap", "file-model").returncode, 0)
        with open(self.state_file) as f:
            saved = f.read()
        self.assertEqual(parse_state(self.state_file), {"Routing": {"DefaultProvider": "beta"},
                                                         "SetModelMappings": {"keep-model": "alpha"},
                                                         "RemovedModelMappings": {"file-model": ""}})
        self.assertEqual(os.stat(self.state_file).st_mode & 0o777, 0o640)

        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10 * SLOW)
        self.assertEqual(first.proc.returncode, -signal.SIGKILL)
        first.kill()
        wait_until(lambda: not c.has_owner(), 10 * SLOW, interval=0.05, what="the name to be released")

        # Meanwhile: the ctl says so, and the name is root's (or the service user's) only.
        r = c.ctl("status")
        self.assert_refused_by_ctl(r, "provider-router is not running (no %s on the system bus)." % NAME)
        r = c.gdbus("RequestName", NAME, "4", interface="org.freedesktop.DBus", dest="org.freedesktop.DBus",
                    path="/org/freedesktop/DBus", user=AS_NOBODY)
        self.assert_bus_error(r, ACCESS_DENIED, "not allowed to own")

        second = self.launch()
        self.assertNotEqual(second.pid, first.pid)
        with open(self.state_file) as f:
            self.assertEqual(f.read(), saved)
        self.assertEqual(c.prop("DefaultProvider"), "beta")
        self.assertEqual(c.prop("ModelMappings"), {"keep-model": "alpha"})
        self.assertEqual(self.chat_via(), "beta")
        self.assertEqual(self.chat_via(model="keep-model"), "alpha")
        self.assertIn("Restored 3 routing change(s)", second.log(limit=None))
        r = c.ctl("status", "--no-pager")
        self.assertRegex(r.stdout, r"(?m)^\s*Default provider: beta$")
        self.assertRegex(r.stdout, r"(?m)^\s*Model mappings: keep-model → alpha$")

        # Reload returns to the file, and a restart after that stays there.
        self.assertEqual(c.ctl("reload").returncode, 0)
        self.assertFalse(os.path.exists(self.state_file))
        second.assert_clean_exit()
        wait_until(lambda: not c.has_owner(), 10 * SLOW, interval=0.05, what="the name to be released")
        self.launch()
        self.assertEqual(c.prop("DefaultProvider"), "alpha")
        self.assertEqual(c.prop("ModelMappings"), {"file-model": "beta"})
        self.assert_alive()
        self.router.assert_clean_exit()

    def test_stop_while_polkit_is_asked(self):
        router = self.launch()
        pk = FakePolkit(self.bus.socket_path)
        self.addCleanup(pk.close)
        pk.delay = 5.0 * SLOW
        caller = self.clients.start(self.clients.gdbus_argv("SetDefaultProvider", "beta"), user=AS_NOBODY)
        self.addCleanup(lambda: caller.poll() is None and caller.kill())
        wait_until(lambda: pk.requests, 10 * SLOW, interval=0.02, what="the daemon to ask polkit")
        # SIGTERM with a question pending: a clean, prompt exit (the sanitizer build checks
        # that the pending call is freed), and the caller gets an error, not a hang.
        started = time.monotonic()
        router.assert_clean_exit()
        self.assertLess(time.monotonic() - started, pk.delay)
        _, err = caller.communicate(timeout=30 * SLOW)
        self.assertNotEqual(caller.returncode, 0, err)
        self.assertIsNone(parse_state(self.state_file))

    def test_unreadable_state_is_ignored(self):
        os.makedirs(os.path.dirname(self.state_file), exist_ok=True)
        for content in (b"this is not a key file\n[[[\n", b"\xff\xfe\x00garbage", b""):
            with self.subTest(content=content):
                with open(self.state_file, "wb") as f:
                    f.write(content)
                router = self.launch()
                self.assertEqual(self.clients.prop("DefaultProvider"), "alpha")
                self.assertEqual(self.clients.prop("ModelMappings"), {"file-model": "beta"})
                self.assertEqual(self.chat_via(), "alpha")
                if content:
                    log = router.log(limit=None)
                    self.assertIn("Failed to read the saved routing state %s, using the configuration"
                                  % self.state_file, log)
                # The next change replaces the file with a good one.
                self.assertEqual(self.clients.ctl("set-default", "beta").returncode, 0)
                self.assertEqual(parse_state(self.state_file), {"Routing": {"DefaultProvider": "beta"}})
                self.assert_alive(router.pid)
                router.assert_clean_exit()
                wait_until(lambda: not self.clients.has_owner(), 10 * SLOW, interval=0.05,
                           what="the name to be released")

    def test_state_directory_not_writable(self):
        # A state directory that cannot be made (its parent is a file): changes still apply,
        # with a warning that they are not persistent.
        blocker = os.path.join(self.workdir, "not-a-directory")
        with open(blocker, "w") as f:
            f.write("")
        self.launch(env={"STATE_DIRECTORY": os.path.join(blocker, "state")})
        r = self.clients.ctl("set-default", "beta")
        self.assertEqual((r.returncode, r.stderr), (0, ""), r)
        self.assertEqual(self.chat_via(), "beta")
        self.assertIn("the change is not persistent", self.router.log(limit=None))
        self.assert_alive(self.router.pid)
        self.router.assert_clean_exit()

    def test_any_valid_model_name_survives_restart(self):
        # Model names are keys of routing.state: the characters a key file cannot hold as they
        # are must still come back after a restart (they once were dropped, with GLib-CRITICALs).
        first = self.launch()
        c = self.clients
        names = ["a=b", "#hash", " lead", "trail ", "x[de]", "]", "50%", "%41", "é ü/x:1", "plain"]
        for name in names:
            r = c.gdbus("SetModelMapping", gvariant_string(name), "beta")
            self.assertEqual(r.returncode, 0, r)
        expected = dict((n, "beta") for n in names)
        self.assertEqual(c.prop("ModelMappings"), dict({"file-model": "beta"}, **expected))
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10 * SLOW)
        first.kill()
        self.assertNotIn("CRITICAL", first.log(limit=None))
        wait_until(lambda: not c.has_owner(), 10 * SLOW, interval=0.05, what="the name to be released")

        second = self.launch()
        self.assertEqual(c.prop("ModelMappings"), dict({"file-model": "beta"}, **expected))
        self.assertIn("Restored %d routing change(s)" % len(names), second.log(limit=None))
        for name in ("a=b", "#hash", " lead", "x[de]", "50%"):
            self.assertEqual(self.chat_via(model=name), "beta")
        self.assertEqual(self.chat_via(model="A"), "alpha")
        self.assertNotIn("CRITICAL", second.log(limit=None))
        self.assert_alive(second.pid)
        second.assert_clean_exit()

    def test_second_instance_refused(self):
        first = self.launch()
        providers = providers_config(self.alpha, self.beta)
        other = tempfile.mkdtemp(prefix="provider-router-dbus-second-")
        self.addCleanup(shutil.rmtree, other, True)
        second = Router(lambda port: router_config(port, providers),
                        env={"DBUS_SYSTEM_BUS_ADDRESS": self.bus.address}, args=["--bus=system"],
                        workdir=other, wait=False)
        self._procs.append(second)
        self.addCleanup(second.kill)
        second.proc.wait(timeout=15 * SLOW)
        rc = second.stop()
        self.assertNotEqual(rc, 0, second.log())
        self.assertIn("Failed to acquire the bus name %s on the system bus" % NAME, second.log())
        self.assertEqual(sanitizer_reports(second.log()), [])
        self.assertEqual(self.clients.owner_pid(), first.pid)
        self.assert_alive(first.pid)
        first.assert_clean_exit()

    def test_bus_lost_is_a_failure(self):
        # Without its bus the daemon exits, and with a failure status, so that systemd
        # (Restart=on-failure) starts it again. It once exited 0, silently.
        router = self.launch()
        self.bus.shut_down()
        router.proc.wait(timeout=15 * SLOW)
        rc = router.stop()
        log = router.log(limit=None)
        self.assertEqual(rc, 1, log)
        self.assertIn("Lost the connection to the system bus, exiting.", log)
        self.assertEqual(sanitizer_reports(log), [])

    def test_saved_entry_for_unconfigured_provider_ignored(self):
        gamma = {"gamma": {"BaseURL": self.beta.base_url}}
        first = self.launch(extra=gamma)
        c = self.clients
        self.assertEqual(c.ctl("set-default", "gamma").returncode, 0)
        self.assertEqual(c.ctl("map", "gamma-model", "gamma").returncode, 0)
        self.assertEqual(c.ctl("map", "beta-model", "beta").returncode, 0)
        first.assert_clean_exit()
        wait_until(lambda: not c.has_owner(), 10 * SLOW, interval=0.05, what="the name to be released")

        # gamma is gone from the configuration.
        second = self.launch()
        log = second.log(limit=None)
        self.assertIn("saved default provider 'gamma' is not configured, ignoring", log)
        self.assertIn("saved mapping 'gamma-model' -> 'gamma' is not valid now, ignoring", log)
        self.assertEqual(c.prop("Providers"), ["alpha", "beta", "echo"])
        self.assertEqual(c.prop("DefaultProvider"), "alpha")
        # What is still valid is kept.
        self.assertEqual(c.prop("ModelMappings"), {"file-model": "beta", "beta-model": "beta"})
        self.assertEqual(self.chat_via(), "alpha")
        self.assertEqual(self.chat_via(model="gamma-model"), "alpha")
        self.assertEqual(self.chat_via(model="beta-model"), "beta")
        self.assert_alive(second.pid)
        second.assert_clean_exit()


# --- bounds (issue 11.9): routes, polkit checks, saving a large table ----------------------------

@NEEDS_TOOLS
@NEEDS_ROOT
class LimitsTest(BusTestMixin, RouterTestCase):

    def setUp(self):
        self.workdir = tempfile.mkdtemp(prefix="provider-router-dbus-limits-")
        os.chmod(self.workdir, 0o755)
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.bus = PrivateBus(self.workdir, "system")
        self._procs.append(self.bus)
        self.addCleanup(self.bus.shut_down)
        self.clients = Clients(self.bus)
        self.alpha = self.start_mock("alpha")
        self.beta = self.start_mock("beta")
        self.state_file = os.path.join(self.workdir, "state", "routing.state")
        self.router = None

    def launch(self, keys=None):
        providers = providers_config(self.alpha, self.beta)
        r = Router(lambda port: router_config(port, providers, default="alpha", mappings={"file-model": "beta"},
                                              router=keys),
                   env={"DBUS_SYSTEM_BUS_ADDRESS": self.bus.address}, args=["--bus=system"], workdir=self.workdir)
        self._procs.append(r)
        self.addCleanup(r.kill)
        wait_until(self.clients.has_owner, 10 * SLOW, interval=0.1, what="%s on the bus" % NAME)
        self.router = r
        return r

    def test_max_routes(self):
        router = self.launch({"MaxRoutes": "3"})
        c = self.clients
        for model in ("m1", "m2"):
            self.assertEqual(c.busctl_call("SetModelMapping", "ss", model, "beta").returncode, 0)
        before = self.routing()
        r = c.gdbus("SetModelMapping", "m3", "beta")
        self.assert_bus_error(r, ERR + "TooManyRoutes", "The routing table is full: 3 routes are set (MaxRoutes=3).")
        r = c.ctl("map", "m3", "beta")
        self.assert_refused_by_ctl(r, "The routing table is full")
        self.assertEqual(self.routing(), before)
        self.assertEqual(c.prop("ModelMappings"), {"file-model": "beta", "m1": "beta", "m2": "beta"})
        self.assertEqual(self.chat_via(model="m3"), "alpha")
        # A model that has a route may still be moved, and room made by removing one.
        self.assertEqual(c.busctl_call("SetModelMapping", "ss", "m1", "alpha").returncode, 0)
        self.assertEqual(c.busctl_call("RemoveModelMapping", "s", "m2").returncode, 0)
        self.assertEqual(c.busctl_call("SetModelMapping", "ss", "m3", "beta").returncode, 0)
        self.assertEqual(self.chat_via(model="m3"), "beta")
        self.assertEqual(parse_state(self.state_file), {"SetModelMappings": {"m1": "alpha", "m3": "beta"}})
        self.assert_alive(router.pid)
        # More mappings in the files than MaxRoutes= is a configuration error.
        path = os.path.join(self.workdir, "too-many.conf")
        with open(path, "w") as f:
            f.write("[Router]\nMaxRoutes=1\n[ModelMappings]\na=echo\nb=echo\n")
        rc, _, err = run_check_config(path)
        self.assertEqual(rc, 1, err)
        self.assertIn("2 model mappings are configured, more than MaxRoutes=1", err)
        router.assert_clean_exit()

    def test_pending_polkit_checks_bounded(self):
        """Every question to polkit holds a call until polkit answers: at most 64 wait, the next
        callers are refused at once, and those that waited are answered in the end."""
        router = self.launch()
        pk = FakePolkit(self.bus.socket_path)
        self.addCleanup(pk.close)
        # Long enough for 70 callers to come, shorter than gdbus's own timeout (25 s).
        pk.delay = 15.0
        callers = [self.clients.start(self.clients.gdbus_argv("SetDefaultProvider", "beta"), user=AS_NOBODY)
                   for _ in range(70)]
        for p in callers:
            self.addCleanup(lambda p=p: p.poll() is None and p.kill())
        started = time.monotonic()
        refused = wait_until(lambda: (lambda d: d if len(d) >= 6 else None)([p for p in callers if p.poll() is not None]),
                             pk.delay, interval=0.05, what="callers past the bound to be refused")
        self.assertLess(time.monotonic() - started, pk.delay, "refused only after polkit answered")
        for p in refused:
            out, err = p.communicate(timeout=10)
            self.assertNotEqual(p.returncode, 0, out)
            self.assertIn("org.freedesktop.DBus.Error.LimitsExceeded", err.decode(), err)
            self.assertIn("Too many authorization checks are waiting for polkit (64)", err.decode(), err)
        # Meanwhile the daemon serves, on the old routing.
        self.assertEqual(self.chat_via(), "alpha")
        pk.delay = 0
        results = []
        for p in callers:
            if p in refused:
                continue
            out, err = p.communicate(timeout=60 * SLOW)
            results.append(p.returncode)
        self.assertEqual(len(results), 64)
        self.assertEqual(results, [0] * 64)
        self.assertEqual(len(pk.requests), 64)
        self.assertEqual(self.clients.prop("DefaultProvider"), "beta")
        self.assertEqual(self.chat_via(), "beta")
        self.assert_alive(router.pid)
        router.assert_clean_exit()

    def test_many_mappings_saved_without_blocking(self):
        """2,000 mappings set as fast as a client can send them: each answered once it is on
        disk, /health answered meanwhile, all of them back after kill -9."""
        first = self.launch()
        client = PipelinedClient(self.bus.socket_path)
        self.addCleanup(client.close)
        worst = [0.0]
        stop = threading.Event()

        def probe():
            h = http.client.HTTPConnection("127.0.0.1", first.port, timeout=60 * SLOW)
            while not stop.is_set():
                t = time.monotonic()
                h.request("GET", "/health")
                h.getresponse().read()
                worst[0] = max(worst[0], time.monotonic() - t)
                time.sleep(0.005)
            h.close()
        prober = threading.Thread(target=probe)
        prober.start()
        started = time.monotonic()
        try:
            for k in range(20):
                serials = [client.call("SetModelMapping", "ss", ("bulk-%05d" % i, "beta"))
                           for i in range(k * 100, k * 100 + 100)]
                answers = client.wait(serials)
                self.assertEqual([a[0] for a in answers.values()], ["ok"] * 100, list(answers.values())[:3])
                if k == 0:
                    # Answered means saved.
                    self.assertEqual(len(parse_state(self.state_file)["SetModelMappings"]), 100)
        finally:
            stop.set()
            prober.join()
        elapsed = time.monotonic() - started
        print("\n    2,000 SetModelMapping, 100 at a time: %.2f s; longest /health answer meanwhile %.1f ms"
              % (elapsed, worst[0] * 1000), file=sys.stderr)
        self.assertLess(worst[0], 1.0 * SLOW)
        saved = parse_state(self.state_file)["SetModelMappings"]
        self.assertEqual(len(saved), 2000)
        self.assertEqual(saved["bulk-01999"], "beta")

        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10 * SLOW)
        first.kill()
        wait_until(lambda: not self.clients.has_owner(), 10 * SLOW, interval=0.05, what="the name to be released")
        second = self.launch()
        self.assertIn("Restored 2000 routing change(s)", second.log(limit=None))
        self.assertEqual(len(self.clients.prop("ModelMappings")), 2001)
        self.assertEqual(self.chat_via(model="bulk-01234"), "beta")
        self.assert_alive(second.pid)
        second.assert_clean_exit()


# --- the session bus, unprivileged ----------------------------------------------------------------

class UnprivilegedRouter(Router):
    """The daemon as nobody on a session bus (harness.Router runs it as the caller)."""

    def _launch(self, workdir, config, dropins, env, args, wait):
        self.config_path = os.path.join(workdir, "provider-router.conf")
        with open(self.config_path, "w") as f:
            f.write(config(self.port))
        state = os.path.join(workdir, "state")
        os.makedirs(state, exist_ok=True)
        os.chown(state, NOBODY_UID, NOBODY_UID)
        full_env = _base_env(dict(env, STATE_DIRECTORY=state, HOME="/nonexistent"))
        argv = AS_NOBODY + [PROVIDER_ROUTER, "--bus=session", "--config", self.config_path] + list(args)
        _Process.__init__(self, argv, full_env, workdir, "provider-router.log")
        if wait:
            self.wait_ready()


@NEEDS_TOOLS
@NEEDS_ROOT
class SessionBusTest(BusTestMixin, RouterTestCase):

    def test_session_bus_unprivileged(self):
        workdir = tempfile.mkdtemp(prefix="provider-router-dbus-session-")
        self.addCleanup(shutil.rmtree, workdir, True)
        # The bus runs as nobody and makes its socket in here.
        os.chown(workdir, NOBODY_UID, NOBODY_UID)
        os.chmod(workdir, 0o755)
        bus = PrivateBus(workdir, "session", prefix=AS_NOBODY)
        self._procs.append(bus)
        self.addCleanup(bus.shut_down)
        c = self.clients = Clients(bus)
        self.alpha = self.start_mock("alpha")
        self.beta = self.start_mock("beta")
        providers = providers_config(self.alpha, self.beta)
        self.router = UnprivilegedRouter(lambda port: router_config(port, providers, default="alpha"),
                                         env={"DBUS_SESSION_BUS_ADDRESS": bus.address}, workdir=workdir)
        self._procs.append(self.router)
        self.addCleanup(self.router.cleanup)
        self.state_file = os.path.join(workdir, "state", "routing.state")
        wait_until(c.has_owner, 10 * SLOW, interval=0.1, what="%s on the session bus" % NAME)
        with open("/proc/%d/status" % self.router.pid) as f:
            self.assertRegex(f.read(), r"(?m)^Uid:\s+%d\s+%d\s" % (NOBODY_UID, NOBODY_UID))

        r = c.ctl("status", "--no-pager", user=AS_NOBODY)
        self.assertEqual((r.returncode, r.stderr), (0, ""), r)
        self.assertRegex(r.stdout, r"(?m)^\s*Default provider: alpha$")
        r = c.ctl("set-default", "beta", user=AS_NOBODY)
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, "", ""), r)
        self.assertEqual(self.chat_via(), "beta")
        r = c.ctl("map", "s-model", "alpha", user=AS_NOBODY)
        self.assertEqual(r.returncode, 0, r)
        self.assertEqual(self.chat_via(model="s-model"), "alpha")
        self.assertEqual(c.prop("ModelMappings", user=AS_NOBODY), {"s-model": "alpha"})
        self.assertEqual(parse_state(self.state_file), {"Routing": {"DefaultProvider": "beta"},
                                                         "SetModelMappings": {"s-model": "alpha"}})
        self.assertEqual(os.stat(self.state_file).st_uid, NOBODY_UID)
        r = c.ctl("unmap", "s-model", user=AS_NOBODY)
        self.assertEqual(r.returncode, 0, r)
        self.assertEqual(self.chat_via(model="s-model"), "beta")
        r = c.gdbus("SetDefaultProvider", "nope", user=AS_NOBODY)
        self.assert_bus_error(r, ERR + "NoSuchProvider")

        # Another user on the same bus reads but does not change.
        before = self.routing()
        self.assertEqual(c.prop("DefaultProvider", user=AS_OTHER), "beta")
        r = c.gdbus("SetDefaultProvider", "alpha", user=AS_OTHER)
        self.assert_bus_error(r, ACCESS_DENIED, "Only the user running the router may change its routing.")
        r = c.ctl("set-default", "alpha", user=AS_OTHER)
        self.assertEqual(r.returncode, 1, r)
        self.assertIn("Only the user running the router may change its routing.", r.stderr)
        self.assertEqual(self.routing(), before)
        self.assertEqual(self.chat_via(), "beta")

        r = c.ctl("reload", user=AS_NOBODY)
        self.assertEqual(r.returncode, 0, r)
        self.assertEqual(c.prop("DefaultProvider"), "alpha")
        self.assertIsNone(parse_state(self.state_file))
        self.assert_alive()

    def test_no_session_bus(self):
        # --bus=session without a session bus: a clear message and status 1, nothing half-started.
        workdir = tempfile.mkdtemp(prefix="provider-router-dbus-nobus-")
        self.addCleanup(shutil.rmtree, workdir, True)
        router = Router(lambda port: router_config(port, {"echo": {"Kind": "echo"}}, with_echo=False),
                        env={"DBUS_SESSION_BUS_ADDRESS": None, "XDG_RUNTIME_DIR": None}, args=["--bus=session"],
                        workdir=workdir, wait=False)
        self._procs.append(router)
        self.addCleanup(router.kill)
        router.proc.wait(timeout=15 * SLOW)
        rc = router.stop()
        self.assertEqual(rc, 1, router.log())
        self.assertIn("Failed to connect to the session bus: ", router.log())
        self.assertEqual(sanitizer_reports(router.log()), [])


if __name__ == "__main__":
    main()
