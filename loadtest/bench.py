#!/usr/bin/env python3
"""Side-by-side benchmark: meshgate, a bare Pingora proxy, NGINX, HAProxy and
Envoy on the same machine, same origin, same pinning (`make bench`).

Loopback only. Every process started here is stopped on exit (normal, error
or Ctrl-C), and every run is bounded by its duration.

Pinning on a 2-core machine: the load generator and the origin (NGINX,
one worker) share core 0; the proxy under test runs alone on core 1 with one
worker. CPU per request is the proxy's CPU time (all threads, all processes
of it, from /proc/PID/task/*/schedstat) divided by the requests served, so
it does not depend on how fast the load generator is.

Usage: loadtest/bench.py [--rounds N] [--duration S] [--scenarios a,b,...]
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOADTEST = ROOT / "loadtest"
CONFIGS = LOADTEST / "configs"
RESULTS = LOADTEST / "results"
MESHGATE = ROOT / "target/release/meshgate"
BARE = ROOT / "target/release/bare-pingora"
LOAD_CORE, PROXY_CORE = "0", "1"

SYSTEMS = ["meshgate", "bare-pingora", "nginx", "haproxy", "envoy"]

# meshgate's TLS 1.3 suite order (AES-128-GCM first, whatever the client lists
# first), for the `tls-aes128` variant of NGINX and HAProxy; both follow the
# client (NGINX) or OpenSSL's AES-256-first list (HAProxy) by default.
TLS13_AES128 = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
NGINX_TLS13_AES128 = f"    ssl_prefer_server_ciphers on;\n    ssl_conf_command Ciphersuites {TLS13_AES128};\n"
HAPROXY_TLS13_AES128 = f"    ssl-default-bind-ciphersuites {TLS13_AES128}\n"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc=None, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def render(template, **values):
    text = (CONFIGS / template).read_text()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", str(v))
    left = re.findall(r"\{\{[A-Z0-9_]+\}\}", text)
    if left:
        raise RuntimeError(f"{template}: no value for {left}")
    return text


class Procs:
    """Every process the harness starts, stopped at exit."""

    def __init__(self):
        self.procs = []

    def start(self, argv, core, log, env=None):
        p = subprocess.Popen(
            ["taskset", "-c", core] + [str(a) for a in argv],
            stdout=subprocess.DEVNULL,
            stderr=open(log, "w"),
            env=env,
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    def stop(self, p, sig=signal.SIGINT):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in list(self.procs):
            self.stop(p, signal.SIGKILL)


def tree(pid):
    """pid and all its descendants."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_ns(pid):
    total = 0
    for p in tree(pid):
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):
                pass
    return total


def rss_kib(pid, field="VmRSS"):
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class Bench:
    def __init__(self, args):
        self.args = args
        self.procs = Procs()
        self.work = Path(tempfile.mkdtemp(prefix="meshgate-bench-"))
        # NGINX workers run as an unprivileged user: they must read the files.
        self.work.chmod(0o755)
        self.ports = {}

    # ---- set-up ---------------------------------------------------------

    def setup(self):
        (self.work / "www").mkdir(mode=0o755)
        (self.work / "www/1m").write_bytes(os.urandom(1024 * 1024))
        (self.work / "www/1m").chmod(0o644)
        (self.work / "logs").mkdir()
        self.origin_port = free_port()
        conf = self.work / "origin.conf"
        conf.write_text(render("nginx-origin.conf", PORT=self.origin_port, WORK=self.work))
        p = self.procs.start(["nginx", "-c", conf, "-e", self.work / "logs/origin-error.log"], LOAD_CORE, self.work / "origin.log")
        wait_port(self.origin_port, p)
        # ECDSA P-256, as the TLS targets say.
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-days", "2", "-subj", "/CN=bench.local", "-addext", "subjectAltName=DNS:bench.local",
             "-keyout", self.work / "key.pem", "-out", self.work / "cert.pem"],
            check=True, capture_output=True,
        )
        (self.work / "combined.pem").write_text((self.work / "cert.pem").read_text() + (self.work / "key.pem").read_text())
        self.otlp_port = free_port()
        sink = self.procs.start([sys.executable, LOADTEST / "otlp_sink.py", self.otlp_port], LOAD_CORE, self.work / "otlp.log")
        wait_port(self.otlp_port, sink)

    # ---- the proxies ----------------------------------------------------

    def start(self, system, variant="default"):
        """Start `system` (config `variant`); its process and ports."""
        plain, h2c, tls, admin = free_port(), free_port(), free_port(), free_port()
        values = dict(PLAIN=plain, H2C=h2c, TLS=tls, ADMIN=admin, ORIGIN=self.origin_port, WORK=self.work, OTLP=self.otlp_port)
        log = self.work / f"logs/{system}-{variant}.log"
        name = system.split("@")[0]
        if name == "meshgate":
            h2c = plain
            conf = self.work / f"meshgate-{variant}.toml"
            extra_gateway, extra_route, extra_top = meshgate_variant(variant, self.otlp_port)
            endpoints, extra_upstream = meshgate_endpoints(variant, self.origin_port)
            # The head deadline off: what its stream wrapper costs.
            extra_limits = ', header_read_timeout = "0s"' if variant == "nodeadline" else ""
            text = render("meshgate.toml", GATEWAY_EXTRA=extra_gateway, ROUTE_EXTRA=extra_route,
                          LIMITS_EXTRA=extra_limits, ENDPOINTS=endpoints, UPSTREAM_EXTRA=extra_upstream,
                          **values) + extra_top
            if variant == "fastlog":
                # The access log on (JSON, to a file), as an operator runs it.
                text = text.replace('access_log = "off"',
                                    f'access_log = "json"\naccess_log_file = "{self.work}/access-{variant}.log"')
            conf.write_text(text)
            p = self.procs.start([MESHGATE, "run", "-c", conf], PROXY_CORE, log)
        elif name == "bare-pingora":
            h2c = plain
            # One listener per process: TLS scenarios get a TLS one.
            if variant == "tls":
                plain = tls
                p = self.procs.start([BARE, f"127.0.0.1:{tls}", f"127.0.0.1:{self.origin_port}", self.work / "cert.pem", self.work / "key.pem"], PROXY_CORE, log)
            else:
                p = self.procs.start([BARE, f"127.0.0.1:{plain}", f"127.0.0.1:{self.origin_port}"], PROXY_CORE, log)
        elif name == "nginx":
            conf = self.work / f"nginx-{variant}.conf"
            text = render("nginx-proxy.conf", **values)
            if variant == "routes1000":
                text = text.replace("# ROUTES", nginx_routes(1000, plain))
            if variant == "tls-aes128":
                text = text.replace("# TLS13\n", NGINX_TLS13_AES128)
            conf.write_text(text)
            p = self.procs.start(["nginx", "-c", conf, "-e", self.work / "logs/nginx-error.log"], PROXY_CORE, log)
        elif name == "haproxy":
            conf = self.work / "haproxy.cfg"
            text = render("haproxy.cfg", **values)
            if variant == "tls-aes128":
                text = text.replace("# TLS13\n", HAPROXY_TLS13_AES128)
            conf.write_text(text)
            p = self.procs.start(["haproxy", "-f", conf], PROXY_CORE, log)
        elif name == "envoy":
            h2c = plain
            conf = self.work / "envoy.yaml"
            conf.write_text(render("envoy.yaml", **values))
            p = self.procs.start([shutil.which("envoy"), "-c", conf, "--concurrency", "1", "--log-level", "error",
                                  "--disable-hot-restart"], PROXY_CORE, log)
        else:
            raise ValueError(system)
        wait_port(plain if not (name == "bare-pingora" and variant == "tls") else tls, p, timeout=60)
        if name != "bare-pingora" or variant == "tls":
            wait_port(tls, p, timeout=60)
        return p, dict(plain=plain, h2c=h2c, tls=tls)

    # ---- load -----------------------------------------------------------

    def wrk(self, url, conns, duration, headers=(), post_bytes=0):
        argv = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency",
                "-s", str(LOADTEST / "wrk-report.lua")]
        for h in headers:
            argv += ["-H", h]
        env = dict(os.environ, WRK_POST_BYTES=str(post_bytes)) if post_bytes else None
        out = subprocess.run(argv + [url], capture_output=True, text=True, timeout=duration + 30, env=env).stdout
        m = re.search(r"^REPORT (.*)$", out, re.M)
        if not m:
            raise RuntimeError(f"wrk printed no report:\n{out}")
        r = json.loads(m.group(1))
        return dict(requests=r["requests"], rps=r["requests"] / r["seconds"], errors=r["errors"],
                    bytes=r["bytes"], p50=r["p50"] / 1000, p99=r["p99"] / 1000, p999=r["p999"] / 1000)

    def h2load(self, url, duration, clients=10, streams=10):
        log = self.work / "h2load.tsv"
        argv = ["taskset", "-c", LOAD_CORE, "h2load", "-t1", f"-c{clients}", f"-m{streams}", "-D", str(duration),
                "--log-file", str(log), url]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30).stdout
        m = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
        if not m:
            raise RuntimeError(f"h2load printed no summary:\n{out}")
        done, ok = int(m.group(2)), int(m.group(3))
        lat = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.count("\t") >= 2)
        pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] / 1000 if lat else float("nan")
        return dict(requests=done, rps=done / duration, errors=done - ok, bytes=0, p50=pct(0.5), p99=pct(0.99), p999=pct(0.999))

    def s_time(self, port, duration, clients=4):
        """New TLS connections that resume one session (`openssl s_time -reuse`):
        `clients` sequential clients, each an HTTP/1.0 GET per connection. wrk
        and h2load never resume, so scenario 3 is full handshakes only; this is
        what a client that keeps its ticket costs. Latency is not reported."""
        argv = ["taskset", "-c", LOAD_CORE, "openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-reuse",
                "-time", str(duration), "-www", "/"]
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(clients)]
        done = resumed = 0
        try:
            for proc in procs:
                out, _ = proc.communicate(timeout=duration + 30)
                m = re.search(r"^(\d+) connections in [\d.]+s;", out, re.M)
                if not m:
                    raise RuntimeError(f"openssl s_time printed no summary:\n{out[-2000:]}")
                done += int(m.group(1))
                # Progress marks: `r` a resumed session, `*` a full handshake.
                marks = "".join(line for line in out.splitlines() if set(line) <= set("r*"))
                resumed += marks.count("r")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if done and resumed < 0.9 * done:
            raise RuntimeError(f"only {resumed} of {done} connections resumed their session")
        return dict(requests=done, rps=done / duration, errors=0, bytes=0, p50=None, p99=None, p999=None)

    def measure(self, system, variant, load):
        """Start, warm up, measure one run, stop."""
        p, ports = self.start(system, variant)
        try:
            load(ports, 1)  # warm-up: pools filled, caches hot
            c0 = cpu_ns(p.pid)
            r = load(ports, self.args.duration)
            c1 = cpu_ns(p.pid)
            r["cpu_us"] = (c1 - c0) / 1000 / max(r["requests"], 1)
            r["rss_mib"] = rss_kib(p.pid, "VmHWM") / 1024
            if p.poll() is not None:
                raise RuntimeError(f"{system} exited during the run")
            return r
        finally:
            self.procs.stop(p)

    def profile(self, system, variant, load):
        """A scenario's load on `system` under `perf record`; the top of the
        report (self time by symbol, shared object)."""
        p, ports = self.start(system, variant)
        try:
            load(ports, 1)
            data = self.work / f"perf-{system}.data"
            rec = subprocess.Popen(["perf", "record", "-F", "1999", "-g", "-o", data, "-p", str(p.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            load(ports, self.args.duration)
            rec.send_signal(signal.SIGINT)
            rec.wait(timeout=60)
            out = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "dso,symbol",
                                  "--stdio", "-g", "none"],
                                 capture_output=True, text=True, timeout=300).stdout
            rows = []
            for line in out.splitlines():
                m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[.\]\s+(.*?)\s*(-\s+-\s*)?$", line)
                if m:
                    rows.append((float(m.group(1)), m.group(2), m.group(3)))
            groups = {}
            for pct, dso, sym in rows:
                if dso.startswith("[kernel"):
                    g = "kernel"
                elif re.match(r"_?mi_", sym):
                    g = "allocator (mimalloc)"
                elif dso.startswith("libc") or dso.startswith("ld-linux"):
                    g = "libc (memmove, syscalls)"
                elif "meshgate::" in sym:
                    g = "meshgate's own code"
                elif "opentelemetry" in sym:
                    g = "opentelemetry"
                elif "prometheus" in sym:
                    g = "prometheus"
                elif "tokio" in sym:
                    g = "tokio"
                elif "pingora" in sym:
                    g = "pingora"
                else:
                    g = "other user space (http, hashing, alloc glue, ...)"
                groups[g] = groups.get(g, 0.0) + pct
            summary = ["share of CPU samples by part:"] + [f"  {v:5.1f}%  {k}" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])]
            top = [f"  {pct:5.2f}%  {dso}  {sym[:140]}" for pct, dso, sym in rows[:40]]
            own = [f"  {pct:5.2f}%  {sym[:140]}" for pct, dso, sym in rows if "meshgate::" in sym][:25]
            return "\n".join(summary + ["top symbols:"] + top + ["meshgate's own symbols:"] + own)
        finally:
            self.procs.stop(p)

    def idle_connections(self, system, count):
        """RSS per idle keep-alive connection: `count` connections, one request each, then idle."""
        p, ports = self.start(system, "default")
        try:
            time.sleep(0.5)
            before = rss_kib(p.pid)
            out = subprocess.run(
                ["taskset", "-c", LOAD_CORE, sys.executable, LOADTEST / "idle_conns.py", str(ports["plain"]), str(count), str(p.pid)],
                capture_output=True, text=True, timeout=300,
            )
            if out.returncode != 0:
                raise RuntimeError(f"idle_conns.py failed: {out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            after = r["rss_kib"]
            return dict(open=r["open"], rss_before_mib=before / 1024, rss_after_mib=after / 1024,
                        kib_per_conn=(after - before) / max(r["open"], 1))
        finally:
            self.procs.stop(p)


def meshgate_variant(variant, otlp_port):
    """(keys for [gateway], keys for the catch-all route, tables appended) of
    a meshgate variant."""
    if variant == "ratelimit":
        # Always allows: the cost of the check, not of refusals.
        return "", 'rate_limits = ["per_client"]', '\n[rate_limits.per_client]\nkey = "client_ip"\nrate = 100000000\n'
    if variant == "routes1000":
        return "", "", meshgate_routes(1000)
    if variant == "tracing":
        return "", "", f'\n[telemetry.tracing]\nendpoint = "http://127.0.0.1:{otlp_port}/v1/traces"\nsample_ratio = 0.01\n'
    if variant in ("steal", "nosteal"):
        return f"work_stealing = {str(variant == 'steal').lower()}", "", ""
    if variant == "lowercase":
        return 'header_case = "lowercase"', "", ""
    if variant in ("fast", "fastlog"):
        return 'http1_engine = "fast"', "", ""
    if variant == "pingora":
        # Pingora's HTTP/1.1 driver for every request (the default is the fast lane).
        return 'http1_engine = "pingora"', "", ""
    if variant == "resilienceoff":
        return "", "retries = false", ""
    return "", "", ""


def meshgate_endpoints(variant, origin):
    """(the origin upstream's endpoints, its extra keys) of a meshgate variant:
    `endpoints3` balances over the origin at three addresses with nothing
    watching them; `resilience3` adds health checks and outlier detection
    (on by default), so the two differ only by what watching costs."""
    one = f'"127.0.0.1:{origin}"'
    three = ", ".join(f'"127.0.0.{i}:{origin}"' for i in (1, 2, 3))
    if variant == "endpoints3":
        return three, "outlier = false"
    if variant == "resilience3":
        return three, 'health_check = { kind = "http", path = "/", interval = "2s", timeout = "1s" }'
    if variant == "resilienceoff":
        # The defaults that watch every request, off: what they cost.
        return one, "outlier = false\nretry_budget = false"
    return one, ""


def route_shape(i):
    """Route i of the 1,000-route set: 100 hosts, each with 10 path prefixes."""
    return f"svc{i // 10}.bench.local", f"/api/{i}/"


def meshgate_routes(n):
    out = []
    for i in range(n):
        host, prefix = route_shape(i)
        out.append(f'[routes.r{i}]\nhost = "{host}"\npath_prefix = "{prefix}"\nupstream = "origin"\n'
                   f'request_headers = {{ set = {{ "x-via" = "meshgate" }} }}\n')
    return "\n" + "\n".join(out)


def nginx_routes(n, port):
    servers = {}
    for i in range(n):
        host, prefix = route_shape(i)
        servers.setdefault(host, []).append(prefix)
    out = []
    for host, prefixes in servers.items():
        locs = "".join(f"        location {p} {{ proxy_pass http://origin; }}\n" for p in prefixes)
        out.append(f"    server {{\n        listen 127.0.0.1:{port};\n        server_name {host};\n{locs}    }}\n")
    return "".join(out)


# ---- scenarios --------------------------------------------------------------

def scenarios(b):
    d = b.args.duration
    last_host, last_prefix = route_shape(999)

    def h1(ports, dur):
        return b.wrk(f"http://127.0.0.1:{ports['plain']}/", 50, dur)

    def h2c(ports, dur):
        return b.h2load(f"http://127.0.0.1:{ports['h2c']}/", dur)

    def tls_new(ports, dur):
        return b.wrk(f"https://127.0.0.1:{ports['tls']}/", 20, dur, headers=["Connection: close"])

    def tls_resumed(ports, dur):
        return b.s_time(ports["tls"], dur)

    def tls_keepalive(ports, dur):
        return b.wrk(f"https://127.0.0.1:{ports['tls']}/", 50, dur)

    def h2_tls(ports, dur):
        return b.h2load(f"https://127.0.0.1:{ports['tls']}/", dur)

    def post(ports, dur):
        return b.wrk(f"http://127.0.0.1:{ports['plain']}/", 50, dur, post_bytes=1024)

    def big(ports, dur):
        return b.wrk(f"http://127.0.0.1:{ports['plain']}/1m", 10, dur)

    def routed(ports, dur):
        return b.wrk(f"http://127.0.0.1:{ports['plain']}{last_prefix}x", 50, dur, headers=[f"Host: {last_host}"])

    return {
        "1-h1": ("HTTP/1.1 keep-alive, small GET (wrk -c50)",
                 [(s, "default") for s in SYSTEMS] + [("meshgate", "lowercase"), ("meshgate", "pingora")], h1),
        "1p-post": ("HTTP/1.1 keep-alive, 1 KiB POST bodies (wrk -c50)",
                    [(s, "default") for s in SYSTEMS] + [("meshgate", "pingora")], post),
        "2-h2c": ("h2c, 10 connections x 10 streams (h2load)", [(s, "default") for s in SYSTEMS], h2c),
        "3-tls-handshake": ("TLS 1.3, new connection per request (wrk -c20, Connection: close)",
                            [(s, "tls") for s in SYSTEMS] + [("nginx", "tls-aes128"), ("haproxy", "tls-aes128")],
                            tls_new),
        "3r-tls-resumed": ("TLS 1.3, new connection per request resuming a session (openssl s_time -reuse, 4 clients, HTTP/1.0)",
                           [(s, "tls") for s in SYSTEMS], tls_resumed),
        "4a-tls-keepalive": ("TLS 1.3 keep-alive, HTTP/1.1 (wrk -c50)",
                             [(s, "tls") for s in SYSTEMS] + [("meshgate", "pingora")], tls_keepalive),
        "4b-h2-tls": ("HTTP/2 over TLS, 10 x 10 streams (h2load)", [(s, "tls") for s in SYSTEMS], h2_tls),
        "5-1mib": ("1 MiB responses (wrk -c10), MB/s", [(s, "default") for s in SYSTEMS] + [("meshgate", "pingora")], big),
        "6-routes": ("1,000 routes (100 hosts x 10 prefixes) vs 1 route, request for the last one",
                     [("meshgate", "default"), ("meshgate", "routes1000"), ("nginx", "default"), ("nginx", "routes1000")], routed),
        "7-ratelimit": ("a local rate limit on every request", [("meshgate", "default"), ("meshgate", "ratelimit")], h1),
        "11-resilience": ("the defaults that watch every request (retries, retry budget, outlier detection) off vs on",
                          [("meshgate", "resilienceoff"), ("meshgate", "default")], h1),
        "10-endpoints": ("3 endpoints: nothing watching them vs health checks and outlier detection",
                        [("meshgate", "endpoints3"), ("meshgate", "resilience3")], h1),
        "8-telemetry": ("metrics + tracing at 1% (OTLP to a local sink)", [("meshgate", "default"), ("meshgate", "tracing")], h1),
        # Not part of the default run (--scenarios runtime): the runtime choice behind the default.
        "runtime": ("work stealing on and off (scenario 1 load)",
                    [("meshgate", "steal"), ("meshgate", "nosteal"), ("bare-pingora", "default")], h1),
        "deadline": ("header_read_timeout's stream wrapper on and off (scenario 1 load)",
                     [("meshgate", "default"), ("meshgate", "nodeadline"), ("bare-pingora", "default")], h1),
        "log": ("the fast lane with the JSON access log on (scenario 1 load)",
                [("meshgate", "fast"), ("meshgate", "fastlog"), ("nginx", "default")], h1),
        "case": ("header_case preserve and lowercase (scenario 1 load)",
                 [("meshgate", "default"), ("meshgate", "lowercase"), ("bare-pingora", "default")], h1),
    }


# ---- report -----------------------------------------------------------------

def med(xs):
    return statistics.median(xs) if xs else float("nan")


def span(xs, fmt="{:.0f}"):
    return f"{fmt.format(min(xs))}–{fmt.format(max(xs))}" if xs else "–"


def ms(runs, key):
    """Median latency in ms, or a dash where the load generator reports none."""
    xs = [r[key] for r in runs if r[key] is not None]
    return f"{med(xs):.2f}" if xs else "–"


def label(system, variant):
    return system if variant in ("default", "tls") else f"{system} ({variant})"


def report(results, idle, meta, targets):
    lines = [f"# meshgate benchmark, {meta['date']}", "",
             f"Machine: {meta['machine']}. Versions: {meta['versions']}.", "",
             f"Command: `{meta['command']}`. {meta['rounds']} interleaved rounds of {meta['duration']} s per scenario "
             "(systems A B C ... A B C ...), medians with min–max. Load generator and origin (NGINX, 1 worker) on core 0, "
             "the proxy alone on core 1 with one worker. CPU µs/request: the proxy's CPU time over requests served.", ""]
    for key, (title, rows) in results.items():
        lines += [f"## {key}: {title}", ""]
        mg = rows.get(("meshgate", "tls" if "tls" in key or "handshake" in key else "default"))
        big = key.startswith("5-")
        head = "| system | req/s | " + ("MB/s | " if big else "") + "CPU µs/request | p50 ms | p99 ms | p99.9 ms | peak RSS MiB | meshgate CPU ÷ this | meshgate req/s ÷ this |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for (system, variant), runs in rows.items():
            rps = [r["rps"] for r in runs]
            cpu = [r["cpu_us"] for r in runs]
            cols = [label(system, variant), f"{med(rps):.0f} ({span(rps)})"]
            if big:
                mbs = [r["bytes"] / 1e6 / meta["duration"] for r in runs]
                cols.append(f"{med(mbs):.0f}")
            cols += [f"{med(cpu):.1f} ({span(cpu, '{:.1f}')})",
                     ms(runs, "p50"), ms(runs, "p99"), ms(runs, "p999"), f"{max(r['rss_mib'] for r in runs):.1f}"]
            if mg and system != "meshgate":
                cols += [f"{med([r['cpu_us'] for r in mg]) / med(cpu):.2f}×", f"{med([r['rps'] for r in mg]) / med(rps):.2f}×"]
            else:
                cols += ["–", "–"]
            errors = sum(r["errors"] for r in runs)
            if errors:
                cols[0] += f" ({errors} errors)"
            lines.append("| " + " | ".join(cols) + " |")
        lines.append("")
    if idle:
        lines += [f"## 9-idle: {meta['idle']:,} idle keep-alive connections (one request each, then idle)", "",
                  "| system | connections held | RSS before MiB | RSS after MiB | KiB per connection |", "|---|---|---|---|---|"]
        for system, r in idle.items():
            lines.append(f"| {system} | {r['open']} | {r['rss_before_mib']:.1f} | {r['rss_after_mib']:.1f} | {r['kib_per_conn']:.1f} |")
        lines.append("")
    if targets:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in targets]
        lines.append("")
    return "\n".join(lines)


def check_targets(results, idle):
    out = []

    def cpu(key, system, variant):
        rows = results.get(key, (None, {}))[1]
        runs = rows.get((system, variant))
        return med([r["cpu_us"] for r in runs]) if runs else None

    def rps(key, system, variant):
        rows = results.get(key, (None, {}))[1]
        runs = rows.get((system, variant))
        return med([r["rps"] for r in runs]) if runs else None

    bare, env = cpu("1-h1", "bare-pingora", "default"), cpu("1-h1", "envoy", "default")
    # The default (header names kept as sent) and `header_case = "lowercase"`.
    for variant, note in [("default", ""), ("lowercase", ", header_case = lowercase")]:
        m = cpu("1-h1", "meshgate", variant)
        if m and bare:
            out.append((f"S1: meshgate CPU/request ≤ 1.05× bare Pingora{note}", f"{m / bare:.2f}×", m / bare <= 1.05))
        if m and env:
            r = rps("1-h1", "meshgate", variant) / rps("1-h1", "envoy", "default")
            out.append((f"S1: meshgate req/s ≥ 1.8× Envoy{note}", f"{r:.2f}×", r >= 1.8))
            out.append((f"S1: meshgate CPU/request ≤ 0.6× Envoy{note}", f"{m / env:.2f}×", m / env <= 0.6))
    t, n = cpu("3-tls-handshake", "meshgate", "tls"), cpu("3-tls-handshake", "nginx", "tls")
    if t and n:
        out.append(("S3: TLS handshake CPU/request ≤ 0.7× NGINX", f"{t / n:.2f}×", t / n <= 0.7))
    # The same target against NGINX choosing TLS 1.3 suites as meshgate does.
    n = cpu("3-tls-handshake", "nginx", "tls-aes128")
    if t and n:
        out.append(("S3, NGINX with meshgate's TLS 1.3 suite order: CPU/request ≤ 0.7× NGINX", f"{t / n:.2f}×", t / n <= 0.7))
    # The same target for clients that resume their session (scenario 3r).
    t, n = cpu("3r-tls-resumed", "meshgate", "tls"), cpu("3r-tls-resumed", "nginx", "tls")
    if t and n:
        out.append(("S3, sessions resumed (3r): CPU/request ≤ 0.7× NGINX", f"{t / n:.2f}×", t / n <= 0.7))
    a, b1000 = cpu("6-routes", "meshgate", "default"), cpu("6-routes", "meshgate", "routes1000")
    if a and b1000:
        out.append(("S6: 1,000 routes within 5% of 1 route (CPU/request)", f"{b1000 / a:.3f}×", b1000 / a <= 1.05))
    for key, variant, name in [("7-ratelimit", "ratelimit", "S7: a rate limit costs ≤ 5%"), ("8-telemetry", "tracing", "S8: metrics + 1% tracing cost ≤ 5%")]:
        base, on = cpu(key, "meshgate", "default"), cpu(key, "meshgate", variant)
        if base and on:
            out.append((name + " (CPU/request)", f"{on / base:.3f}×", on / base <= 1.05))
    if "meshgate" in idle:
        k = idle["meshgate"]["kib_per_conn"]
        out.append(("S9: ≤ 16 KiB per idle keep-alive connection", f"{k:.1f} KiB", k <= 16))
    return out


def chart(results, path):
    """Grouped horizontal bars: CPU µs/request per scenario and system."""
    colors = {"meshgate": "#2b6cb0", "bare-pingora": "#68d391", "nginx": "#38a169", "haproxy": "#d69e2e", "envoy": "#e53e3e"}
    rows = []
    for key, (title, data) in results.items():
        for (system, variant), runs in data.items():
            rows.append((key, label(system, variant), system, med([r["cpu_us"] for r in runs])))
    if not rows:
        return
    # Each scenario on its own scale: 1 MiB bodies cost 10x a small GET.
    tops = {}
    for key, _, _, v in rows:
        tops[key] = max(tops.get(key, 0), v)
    bar, gap, left, width = 16, 10, 260, 520
    y, parts, last = 40, [], None
    for key, name, system, v in rows:
        top = tops[key] or 1
        if key != last:
            y += gap
            parts.append(f'<text x="8" y="{y + 12}" font-weight="bold">{key}</text>')
            y += 18
            last = key
        w = max(1, v / top * width)
        parts.append(f'<text x="{left - 6}" y="{y + 12}" text-anchor="end">{name}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 3}" fill="{colors.get(system, "#888")}"/>')
        parts.append(f'<text x="{left + w + 4:.1f}" y="{y + 12}">{v:.1f}</text>')
        y += bar
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 80}" height="{y + 20}" font-family="sans-serif" font-size="12">'
           f'<text x="8" y="20" font-size="14" font-weight="bold">CPU µs per request (lower is better), one worker on one core; each scenario to its own scale</text>'
           + "".join(parts) + "</svg>\n")
    path.write_text(svg)


def versions():
    def first_line(argv):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    nginx = first_line(["nginx", "-v"]).replace("nginx version: ", "")
    haproxy = " ".join(first_line(["haproxy", "-v"]).split()[:3])
    envoy_out = subprocess.run([shutil.which("envoy") or "envoy", "--version"], capture_output=True, text=True).stdout
    envoy = re.search(r"version: \S+/(\d+\.\d+\.\d+)", envoy_out)
    meshgate = first_line([str(MESHGATE), "--version"])
    return f"{meshgate} (Pingora 0.9.1), {nginx}, {haproxy}, Envoy {envoy.group(1) if envoy else '?'}, wrk, h2load"


def update_docs(md):
    doc = ROOT / "docs/performance.md"
    text = doc.read_text()
    begin, end = "<!-- bench:begin -->", "<!-- bench:end -->"
    # The doc has its own title; the report's sections go one level down.
    body = md.split("\n", 1)[1].replace("\n## ", "\n### ")
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1]
        doc.write_text(f"{pre}{begin}\n{body.strip()}\n{end}{post}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--scenarios", default="")
    ap.add_argument("--idle", type=int, default=10000,
                    help="connections for the idle-memory scenario (0: skip); lowered to fit the open-file limit")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/performance.md")
    ap.add_argument("--profile", default="", help="only profile these systems (comma-separated, `system` or `system:variant`) with perf, "
                         "on the first of --scenarios (default: scenario 1)")
    args = ap.parse_args()
    for tool in ["nginx", "haproxy", "wrk", "h2load", "envoy", "openssl", "taskset"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: run `make bench`, which installs it")
    for binary in [MESHGATE, BARE]:
        if not binary.exists():
            sys.exit(f"{binary} is missing: run `make bench`, which builds it")
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 cores: the load generator and the proxy are pinned apart")
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    # HAProxy needs two descriptors per connection it may hold.
    if args.idle > (hard - 1000) // 2:
        args.idle = (hard - 1000) // 2 // 100 * 100
        print(f"open-file limit {hard}: the idle scenario uses {args.idle} connections", file=sys.stderr)

    b = Bench(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    if args.profile:
        if not shutil.which("perf"):
            sys.exit("perf is missing (Debian: linux-perf)")
        try:
            b.setup()
            wanted = args.scenarios.split(",")[0] or "1"
            all_scenarios = scenarios(b)
            name = next((k for k in all_scenarios if k.startswith(wanted)), None)
            if name is None:
                sys.exit(f"no scenario {wanted!r}: one of {', '.join(all_scenarios)}")
            _, runs, load = all_scenarios[name]
            RESULTS.mkdir(exist_ok=True)
            for entry in args.profile.split(","):
                # `system` (its first variant in the scenario) or `system:variant`.
                system, _, wanted_variant = entry.partition(":")
                variant = next((v for s, v in runs if s == system and wanted_variant in ("", v)), None)
                if variant is None:
                    sys.exit(f"scenario {name} does not run {entry}")
                top = b.profile(system, variant, load)
                tag = "" if name == "1-h1" else f"{name.split('-')[0]}-"
                if wanted_variant:
                    system = f"{system}-{variant}"
                path = RESULTS / f"profile-{tag}{system}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M}.txt"
                path.write_text(top + "\n")
                print(f"== {system} ({name}, {args.duration} s; {path.relative_to(ROOT)})\n{top}\n")
        finally:
            b.procs.stop_all()
            shutil.rmtree(b.work, ignore_errors=True)
        return
    try:
        b.setup()
        wanted = [s for s in args.scenarios.split(",") if s]
        results = {}
        for key, (title, systems, load) in scenarios(b).items():
            if wanted and not any(key.startswith(w) for w in wanted):
                continue
            if not wanted and not key[0].isdigit():
                continue
            rows = {sv: [] for sv in systems}
            for rnd in range(args.rounds):
                for system, variant in systems:
                    try:
                        r = b.measure(system, variant, load)
                    except Exception as e:  # one broken system must not sink the run
                        print(f"{key} round {rnd + 1} {system}/{variant}: FAILED: {e}", file=sys.stderr)
                        continue
                    rows[(system, variant)].append(r)
                    print(f"{key} round {rnd + 1} {label(system, variant)}: {r['rps']:.0f} req/s, "
                          f"{r['cpu_us']:.1f} µs CPU/request, p99 {ms([r], 'p99')} ms", file=sys.stderr)
            results[key] = (title, {k: v for k, v in rows.items() if v})
        idle = {}
        if args.idle and (not wanted or any("9-idle".startswith(w) or w.startswith("9") for w in wanted)):
            for system in SYSTEMS:
                try:
                    idle[system] = b.idle_connections(system, args.idle)
                    print(f"9-idle {system}: {idle[system]['kib_per_conn']:.1f} KiB/connection", file=sys.stderr)
                except Exception as e:
                    print(f"9-idle {system}: FAILED: {e}", file=sys.stderr)
        now = datetime.datetime.now(datetime.timezone.utc)
        meta = dict(date=now.strftime("%Y-%m-%d %H:%M UTC"), rounds=args.rounds, duration=args.duration, idle=args.idle,
                    machine=f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), {platform.platform()}",
                    versions=versions(), command="make bench" + (f" BENCH_ARGS='{' '.join(sys.argv[1:])}'" if sys.argv[1:] else ""))
        targets = check_targets(results, idle)
        md = report(results, idle, meta, targets)
        RESULTS.mkdir(exist_ok=True)
        stamp = now.strftime("%Y%m%d-%H%M")
        (RESULTS / f"bench-{stamp}.md").write_text(md)
        (RESULTS / f"bench-{stamp}.json").write_text(json.dumps(
            {k: {"title": t, "rows": {f"{s}/{v}": runs for (s, v), runs in rows.items()}} for k, (t, rows) in results.items()}
            | {"9-idle": idle}, indent=1))
        chart(results, RESULTS / f"bench-{stamp}.svg")
        # A partial run (--scenarios) is kept under its date only.
        if not wanted:
            shutil.copy(RESULTS / f"bench-{stamp}.svg", RESULTS / "latest.svg")
            (RESULTS / "latest.md").write_text(md)
            if not args.no_docs:
                update_docs(md)
        print(md)
        print(f"\nwritten: loadtest/results/bench-{stamp}.md, .json, .svg" + ("" if wanted else " (and latest.*)"), file=sys.stderr)
    finally:
        b.procs.stop_all()
        shutil.rmtree(b.work, ignore_errors=True)


if __name__ == "__main__":
    main()
