# SPDX-License-Identifier: LGPL-2.1-or-later
"""Pieces shared by bench/run and bench/profile: processes that are always cleaned up, the
upstreams, the proxies under test, request bodies, and reading /proc."""
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")

LOAD_CPU = 0    # load generator, upstreams, clients
PROXY_CPU = 1   # the proxy under test, alone

# The fixed answers of the throughput upstream: what a provider sends for a short reply.
FIXED_JSON = json.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "bench",
    "choices": [{"index": 0, "message": {"role": "assistant",
                                         "content": "Hello! This is the fixed answer of the benchmark upstream."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 12, "total_tokens": 24},
}, separators=(",", ":")) + "\n"


def _sse_body():
    def chunk(delta, finish=None, usage=None):
        c = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "bench",
             "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            c["usage"] = usage
        return "data: " + json.dumps(c, separators=(",", ":")) + "\n\n"
    words = ["Hello!", " This", " is", " the", " fixed", " stream", " of", " the", " benchmark", " upstream."]
    out = chunk({"role": "assistant", "content": ""})
    out += "".join(chunk({"content": w}) for w in words)
    out += chunk({}, finish="stop")
    out += chunk(None, usage={"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22})
    return out + "data: [DONE]\n\n"


FIXED_SSE = _sse_body()

PROSE = ("The router reads every request far enough to route it, then passes the body on byte for "
         "byte. This paragraph stands in for a long conversation: code, logs and documents that "
         "clients paste into a prompt.\n")


def chat_body(size, model, stream, mock=None):
    """A valid chat request of exactly size bytes: a long user message carries the bulk."""
    def render(content):
        b = {"model": model, "stream": stream,
             "messages": [{"role": "system", "content": "You are a helpful assistant."},
                          {"role": "user", "content": content}]}
        if mock is not None:
            b["mock"] = mock
        return json.dumps(b, separators=(",", ":")).encode()
    bare = len(render(""))
    if size < bare:
        raise ValueError(f"a body of {size} bytes cannot hold a chat request")
    text = ""
    while len(render(text)) < size:
        text += PROSE
    # JSON escapes make the rendered text longer than the text: trim until it fits exactly.
    while len(render(text)) > size:
        text = text[:-max(1, (len(render(text)) - size) // 2)]
    while len(render(text)) < size:
        text += "x"
    out = render(text)
    assert len(out) == size
    return out


def nginx_string(s):
    """s as the inside of a single-quoted nginx string."""
    return s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_lines(path):
    n = 0
    try:
        with open(path, "rb") as f:
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                n += b.count(b"\n")
    except OSError:
        pass
    return n


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Proc:
    def __init__(self, name, popen, pids_fn=None):
        self.name = name
        self.popen = popen
        self.pid = popen.pid
        self._pids_fn = pids_fn

    def pids(self):
        """The process and, for nginx, its workers."""
        return self._pids_fn(self) if self._pids_fn else [self.pid]


def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def nginx_pids(p):
    return [p.pid] + children(p.pid)


def cpu_seconds(pids):
    """utime + stime of the processes (every thread, live or gone), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / CLK_TCK


def core_busy_seconds(cpu):
    """Time CPU cpu spent not idle (user, nice, system, irq, softirq), in seconds: whoever ran."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:]]
                return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK
    return 0.0


def status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Session:
    """A temporary directory and every process started in it; stop() ends them all, and runs on
    exit and on SIGINT/SIGTERM too."""

    def __init__(self, keep=False):
        self.dir = tempfile.mkdtemp(prefix="provider-router-bench.")
        os.chmod(self.dir, 0o755)  # nginx workers run as nobody and need its temp paths
        self.keep = keep
        self.procs = []
        self._stopped = False
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, sig, frame):
        log(f"bench: signal {sig}, stopping everything")
        self.stop()
        sys.exit(128 + sig)

    def path(self, name):
        return os.path.join(self.dir, name)

    def write(self, name, data):
        p = self.path(name)
        with open(p, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        return p

    def start(self, name, argv, cpu, stdout=None, stderr=None, env=None, pids_fn=None):
        out = open(stdout or os.devnull, "wb")
        err = open(stderr or self.path(name + ".stderr"), "wb")
        popen = subprocess.Popen(["taskset", "-c", str(cpu)] + argv, stdout=out, stderr=err,
                                 stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        out.close()
        err.close()
        p = Proc(name, popen, pids_fn)
        self.procs.append(p)
        return p

    def run(self, name, argv, timeout, env=None):
        """Runs a bounded client (wrk, ttfb) to completion and returns (returncode, stdout, stderr);
        registered like the servers, so that a signal or a failure stops it too."""
        popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                 env=env, text=True, start_new_session=True)
        p = Proc(name, popen)
        self.procs.append(p)
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.end(p)
            raise RuntimeError(f"{name} did not finish within {timeout:.0f} s")
        self.procs.remove(p)
        return popen.returncode, out, err

    def end(self, p, timeout=10):
        """Stops p and everything in its process group (its session, which we created)."""
        if p.popen.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)  # workers left behind, if any
        except ProcessLookupError:
            pass
        try:
            p.popen.wait(5)
        except subprocess.TimeoutExpired:
            log(f"bench: {p.name} (pid {p.pid}) did not exit")
        if p in self.procs:
            self.procs.remove(p)

    def stop(self):
        if self._stopped:
            return
        self._stopped = True
        for p in reversed(list(self.procs)):
            self.end(p, timeout=5)
        if self.keep:
            log(f"bench: kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def wait_port(port, proc=None, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with status {proc.popen.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f} s")


def http_post(port, path, body, timeout=10.0):
    """One request, Connection: close; returns (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Connection: close\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(body)) + body)
        data = b""
        while True:
            k = s.recv(65536)
            if not k:
                break
            data += k
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
        body, rest2 = b"", rest
        while rest2:
            size_line, _, rest2 = rest2.partition(b"\r\n")
            n = int(size_line.split(b";")[0], 16)
            if n == 0:
                break
            body += rest2[:n]
            rest2 = rest2[n + 2:]
        rest = body
    return status, rest


async def _one_connection(port, request, counter, n, errors):
    import asyncio
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while counter[0] < n:
            counter[0] += 1
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                errors[0] += 1
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if m:
                await reader.readexactly(int(m.group(1)))
            elif re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            else:
                raise RuntimeError("an answer with neither Content-Length nor chunked encoding")
    finally:
        writer.close()


def fixed_load(port, path, body, n, conns):
    """Exactly n POST requests over conns keep-alive connections; returns the non-200 count."""
    import asyncio
    request = (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % (path.encode(), len(body))) + body
    counter, errors = [0], [0]

    async def run():
        await asyncio.gather(*(_one_connection(port, request, counter, n, errors) for _ in range(conns)))
    asyncio.run(run())
    return errors[0]


class Rig:
    """The upstreams (fixed-answer nginx, timed-frame mock) on the load core, and the proxies
    under test, started on the proxy core on demand."""

    def __init__(self, session, router_bin, mock_bin):
        self.s = session
        self.router_bin = router_bin
        self.mock_bin = mock_bin
        self.upstream_port = free_port()
        self.mock_port = free_port()

    def start_upstreams(self):
        conf = open(os.path.join(HERE, "nginx-upstream.conf.in")).read()
        conf = (conf.replace("@DIR@", self.s.dir).replace("@PORT@", str(self.upstream_port))
                .replace("@JSON@", nginx_string(FIXED_JSON)).replace("@SSE@", nginx_string(FIXED_SSE)))
        path = self.s.write("nginx-upstream.conf", conf)
        self.upstream = self.s.start("upstream-nginx", ["nginx", "-p", self.s.dir, "-c", path], LOAD_CPU,
                                     pids_fn=nginx_pids)
        self.mock = self.s.start("mock-provider", [self.mock_bin, "--port", str(self.mock_port), "--name", "mock",
                                                   "--quiet"], LOAD_CPU)
        wait_port(self.upstream_port, self.upstream)
        wait_port(self.mock_port, self.mock)

    def router_conf(self, port, log_requests=None):
        lines = ["[Router]", "Host=127.0.0.1", f"Port={port}", "DefaultProvider=json"]
        if log_requests is not None:
            lines.append(f"LogRequests={'true' if log_requests else 'false'}")
        lines += ["", "[Provider json]", f"BaseURL=http://127.0.0.1:{self.upstream_port}/json/v1",
                  "", "[Provider sse]", f"BaseURL=http://127.0.0.1:{self.upstream_port}/sse/v1",
                  "", "[Provider mock]", f"BaseURL=http://127.0.0.1:{self.mock_port}/v1",
                  "", "[ModelMappings]", "bench-json=json", "bench-sse=sse", "bench-mock=mock", ""]
        return "\n".join(lines)

    def start_router(self, name="router", log_requests=None, wrapper=None, cpu=PROXY_CPU, wait=10.0):
        """The router with LogRequests at its default (log_requests=None) or as given; its stderr,
        where the request log goes, into a file."""
        port = free_port()
        conf = self.s.write(name + ".conf", self.router_conf(port, log_requests))
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)  # stderr is a file, never the journal
        for k in ("PORT", "HOST", "DEFAULT_PROVIDER", "MODEL_MAPPINGS", "LOG_LEVEL", "LOG_REQUESTS",
                  "LOG_RESPONSES", "REQUEST_TIMEOUT"):
            env.pop(k, None)  # the plan's variables would override the file
        argv = (wrapper or []) + [self.router_bin, "--bus=none", "--config", conf]
        p = self.s.start(name, argv, cpu, stderr=self.s.path(name + ".log"), env=env)
        p.port = p.http_port = port
        p.paths = {"json": "/v1/chat/completions", "sse": "/v1/chat/completions", "mock": "/v1/chat/completions"}
        p.models = {"json": "bench-json", "sse": "bench-sse", "mock": "bench-mock"}
        wait_port(port, p, timeout=wait)
        return p

    def start_nginx_proxy(self, name="nginx", wrapper=None, extra=None, wait=10.0):
        port = free_port()
        conf = open(os.path.join(HERE, "nginx-proxy.conf.in")).read()
        conf = (conf.replace("@DIR@", self.s.dir).replace("@PORT@", str(port))
                .replace("@UPSTREAM_PORT@", str(self.upstream_port)).replace("@MOCK_PORT@", str(self.mock_port)))
        path = self.s.write(name + ".conf", conf)
        p = self.s.start(name, (wrapper or []) + ["nginx", "-p", self.s.dir, "-c", path] + (extra or []), PROXY_CPU,
                         pids_fn=nginx_pids)
        p.port = port
        p.paths = {"json": "/json/v1/chat/completions", "sse": "/sse/v1/chat/completions",
                   "mock": "/mock/v1/chat/completions"}
        p.models = {"json": "bench-json", "sse": "bench-sse", "mock": "bench-mock"}
        wait_port(port, p, timeout=wait)
        # The worker appears a moment after the port opens.
        end = time.monotonic() + (0 if extra and "master_process off;" in extra else 5)
        while len(p.pids()) < 2 and time.monotonic() < end:
            time.sleep(0.02)
        return p

    def worker_pid(self, p):
        """The process doing the work: the router itself, or nginx's single worker."""
        pids = p.pids()
        return pids[-1]


BUILD_CACHE = "/var/tmp/provider-router-bench-builds"


def build_commit(rev):
    """A private build of the router and the mock at commit rev, from `git archive` (the shared
    checkout and its build/ are left alone), cached by commit. Returns (router, mock)."""
    sha = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", rev + "^{commit}"], capture_output=True,
                         text=True, check=True).stdout.strip()
    base = os.path.join(BUILD_CACHE, sha[:12])
    router = os.path.join(base, "build", "src", "provider-router")
    mock = os.path.join(base, "build", "tests", "mock", "mock-provider")
    if os.access(router, os.X_OK) and os.access(mock, os.X_OK):
        return router, mock
    log(f"bench: building commit {sha[:12]} in {base}")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(os.path.join(base, "src"))
    archive = subprocess.Popen(["git", "-C", ROOT, "archive", sha], stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", os.path.join(base, "src")], stdin=archive.stdout, check=True)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {sha} failed")
    subprocess.run(["meson", "setup", "-Dman=disabled", os.path.join(base, "build"), os.path.join(base, "src")],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["ninja", "-C", os.path.join(base, "build"), "src/provider-router",
                    "tests/mock/mock-provider"], check=True, stdout=subprocess.DEVNULL)
    return router, mock


def build_ttfb(session):
    out = session.path("ttfb")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", out, os.path.join(HERE, "ttfb.c")], check=True)
    return out


def raise_nofile():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def check_tools(names):
    missing = [n for n in names if not shutil.which(n)]
    if missing:
        sys.exit("bench: missing " + ", ".join(missing) + " (apt-get install -y nginx-light wrk valgrind "
                 "linux-perf strace gcc util-linux)")
