#!/usr/bin/env python3
"""Abuse probes: meshgate and NGINX side by side against misbehaving clients
(`make abuse`).

Usage:
  python3 loadtest/abuse.py                   # the full suite, about 4 minutes
  python3 loadtest/abuse.py --quick           # counts, durations and timeouts / 10: under a minute
  python3 loadtest/abuse.py --probes 2,8a --systems meshgate

Each probe starts a fresh proxy (meshgate, or NGINX with comparable limits)
with the config that probe needs, runs a well-behaved client next to it (one
GET every 50 ms on its own keep-alive connection; its latencies and failures
are reported, not asserted), attacks, reads what happened, and stops the
proxy. Both proxies forward to one origin: NGINX with one worker answering
`ok` (and, with its echo module, reading `/upload` bodies before answering),
whose access log counts the requests that reached it.

Probes (full / --quick):
  1   unfinished 900 KiB request heads, 500 / 50 connections held 10 / 1 s: RSS growth
  2   partial TLS ClientHellos, 1000 / 100 connections: how many are open at 5, 15, 35, 50 s (/ 10)
  3   idle keep-alive connections, 10,000 / 1,000: RSS per connection
  4   h2c rapid-reset churn (each stream cancelled ~1 ms after HEADERS), 10 / 1 s:
      requests that reached the origin, proxy CPU
  5   the next request head dribbled a byte every 5 / 0.5 s on 500 / 50 kept-alive connections
      (head timeout 10 / 1 s): how many are open at 15 and 40 s (/ 10)
  6a  slow 10 GB POST bodies (10 B/s), 200 / 20 connections, default body limits
  6b  the same with the body limits raised to 20 GB (route timeout 30 / 3 s)
  7   max_connections = 500 / 50, full of idle connections: is a new client served?
  8a  SETTINGS flood, 8b PING flood (h2c, a client that reads), 10 / 1 s: ACKs before the end
  9   plain HTTP sent to the TLS port: the first response line
  10  classic Rapid Reset (HEADERS and RST_STREAM in one write), 10 / 1 s: proxy CPU, good-client p99

Timeouts are scaled with --quick as well (header timeouts 10 s -> 1 s, ...), so
each probe keeps its shape. Pinning as in bench.py (2 cores): the proxy alone
on core 1 with one worker; this script (the attack), the well-behaved client
and the origin on core 0.

Loopback only: every socket is opened to 127.0.0.1. Bounded: each probe ends
after its duration and opens at most its stated number of connections (the
h2 churn probes reconnect after each GOAWAY, up to 60,000 / 6,000 connections).
Every process started here is stopped at the end (normal exit, error, Ctrl-C).

Results: one markdown table (probe | meshgate | NGINX) on stdout, written with
the raw numbers to loadtest/results/abuse-<timestamp>.md and .json.
"""

import argparse
import asyncio
import collections
import datetime
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import LOAD_CORE, MESHGATE, PROXY_CORE, RESULTS, Procs, free_port, rss_kib, tree, wait_port  # noqa: E402

HOST = "127.0.0.1"
ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")
CLK_TCK = os.sysconf("SC_CLK_TCK")
NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # the hard limit: this script and the proxies use it all
now = time.monotonic


def ms(seconds):
    """A duration both meshgate and NGINX read: whole milliseconds."""
    return f"{round(seconds * 1000)}ms"


def cpu_seconds(pid):
    """utime + stime of a process tree (/proc/PID/stat; all threads)."""
    total = 0
    for p in tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


# ---- the systems --------------------------------------------------------------

class Proxy:
    def __init__(self, name, proc, **ports):
        self.name, self.proc, self.pid = name, proc, proc.pid
        self.plain, self.tls, self.h2c, self.admin = ports["plain"], ports["tls"], ports["h2c"], ports.get("admin")

    def metrics(self):
        """meshgate's counters of interest, summed over listeners: {"name{reason}": value}."""
        if not self.admin:
            return {}
        text = urllib.request.urlopen(f"http://{HOST}:{self.admin}/metrics", timeout=5).read().decode()
        out = collections.Counter()
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(("meshgate_downstream_rejected", "meshgate_downstream_goaways",
                                                           "meshgate_downstream_client_resets", "meshgate_downstream_connections_evicted",
                                                           "meshgate_upstream_requests_total", "meshgate_tls_handshake_errors")):
                continue
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            reason = next((kv.split("=", 1)[1].strip('"') for kv in labels.rstrip("}").split(",") if kv.startswith("reason=")), "")
            out[f"{name}{{{reason}}}" if reason else name] += int(float(value))
        return dict(out)


class Lab:
    """The origin, a certificate, and the proxies under test, each started with a probe's limits."""

    def __init__(self, k):
        self.k = k  # 1.0, or 0.1 with --quick
        self.procs = Procs()
        self.work = Path(tempfile.mkdtemp(prefix="meshgate-abuse-"))
        self.work.chmod(0o755)  # NGINX workers run unprivileged
        (self.work / "logs").mkdir()
        self.started = 0

    def setup(self):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-days", "2", "-subj", "/CN=abuse.local", "-addext", "subjectAltName=DNS:abuse.local",
                        "-keyout", self.work / "key.pem", "-out", self.work / "cert.pem"], check=True, capture_output=True)
        self.origin_port = free_port()
        self.access_log = self.work / "logs/origin-access.log"
        load = f"load_module {ECHO_MODULE};" if ECHO_MODULE.exists() else ""
        # /upload reads the whole body before answering (echo module), as an application would.
        upload = "echo_read_request_body; echo ok;" if load else 'return 200 "ok\\n";'
        conf = self.work / "origin.conf"
        conf.write_text(f"""
worker_processes 1; daemon off; pid {self.work}/origin.pid; worker_rlimit_nofile {NOFILE};
{load}
events {{ worker_connections {NOFILE - 100}; }}
http {{
    log_format uri '$request_uri';
    access_log {self.access_log} uri;
    keepalive_requests 10000000; keepalive_timeout 120s; client_max_body_size 0;
    {self.temp_paths("origin")}
    default_type text/plain;
    server {{
        listen {HOST}:{self.origin_port};
        location / {{ return 200 "ok\\n"; }}
        location /upload {{ {upload} }}
    }}
}}
""")
        p = self.procs.start(["nginx", "-c", conf, "-e", self.work / "logs/origin-error.log"], LOAD_CORE, self.work / "logs/origin.log")
        wait_port(self.origin_port, p)

    def temp_paths(self, tag):
        return " ".join(f"{kind}_temp_path {self.work}/tmp-{tag}-{kind};"
                        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))

    def origin_requests(self):
        """Requests the origin has answered, the good client's (/good) left out."""
        try:
            return sum(1 for line in self.access_log.open("rb") if not line.startswith(b"/good"))
        except OSError:
            return 0

    def origin_connections(self):
        out = subprocess.run(["ss", "-Htn", "state", "established", f"sport = :{self.origin_port}"],
                             capture_output=True, text=True).stdout
        return len(out.splitlines())

    def start(self, system, meshgate=None, nginx=None):
        self.started += 1
        plain, tls, admin = free_port(), free_port(), free_port()
        log = self.work / f"logs/{system}-{self.started}.log"
        if system == "meshgate":
            conf = self.work / f"meshgate-{self.started}.toml"
            conf.write_text(self.meshgate_toml(plain, tls, admin, **(meshgate or {})))
            p = self.procs.start([MESHGATE, "run", "-c", conf], PROXY_CORE, log)
            h2c = plain
        else:
            h2c = free_port()
            conf = self.work / f"nginx-{self.started}.conf"
            conf.write_text(self.nginx_conf(plain, tls, h2c, **(nginx or {})))
            p = self.procs.start(["nginx", "-c", conf, "-e", self.work / f"logs/nginx-error-{self.started}.log"], PROXY_CORE, log)
        for port in (plain, tls, h2c):
            wait_port(port, p, timeout=30)
        return Proxy(system, p, plain=plain, tls=tls, h2c=h2c, admin=admin if system == "meshgate" else None)

    def meshgate_toml(self, plain, tls, admin, limits=None, route=None, upstream=None):
        k = self.k
        limits = {"idle_timeout": "120s", "header_read_timeout": ms(30 * k), "handshake_timeout": ms(10 * k)} | (limits or {})
        route = {"path_prefix": "/", "upstream": "origin"} | (route or {})
        upstream = {"endpoints": [f"{HOST}:{self.origin_port}"]} | (upstream or {})
        inline = "{ " + ", ".join(f"{key} = {json.dumps(v)}" for key, v in limits.items()) + " }"
        table = lambda d: "".join(f"{key} = {json.dumps(v)}\n" for key, v in d.items())  # noqa: E731
        return f"""[gateway]
workers = 1
shutdown_grace_period = "0s"

[admin]
listen = "{HOST}:{admin}"

[telemetry]
access_log = "off"

[listeners.plain]
bind = "{HOST}:{plain}"
limits = {inline}

[listeners.tls]
bind = "{HOST}:{tls}"
tls = {{ certs = ["abuse"], alpn = ["h2", "http/1.1"] }}
limits = {inline}

[certs.abuse]
cert = "{self.work}/cert.pem"
key = "{self.work}/key.pem"

[routes.all]
{table(route)}
[upstreams.origin]
{table(upstream)}"""

    def nginx_conf(self, plain, tls, h2c, worker_connections=NOFILE - 100, http=None):
        http = {"client_header_timeout": ms(30 * self.k), "client_max_body_size": "10m",
                "keepalive_requests": "1000", "keepalive_timeout": "120s"} | (http or {})
        directives = "".join(f"    {key} {v};\n" for key, v in http.items())
        return f"""worker_processes 1; daemon off; pid {self.work}/nginx-{self.started}.pid; worker_rlimit_nofile {NOFILE};
events {{ worker_connections {worker_connections}; }}
http {{
    access_log off;
{directives}    {self.temp_paths(f"proxy{self.started}")}
    upstream origin {{ server {HOST}:{self.origin_port}; keepalive 128; }}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    ssl_certificate {self.work}/cert.pem;
    ssl_certificate_key {self.work}/key.pem;
    server {{
        listen {HOST}:{plain};
        listen {HOST}:{tls} ssl http2;
        location / {{ proxy_pass http://origin; }}
    }}
    server {{
        listen {HOST}:{h2c} http2;
        location / {{ proxy_pass http://origin; }}
    }}
}}
"""

    def close(self):
        self.procs.stop_all()
        shutil.rmtree(self.work, ignore_errors=True)


# ---- the well-behaved client --------------------------------------------------

class Stop(Exception):
    pass


def read_response(f):
    """(status, headers) of one HTTP/1.1 response with a Content-Length body, read from file `f`."""
    line = f.readline(65536)
    if not line:
        raise ConnectionError("closed")
    status = int(line.split()[1])
    headers = {}
    while (h := f.readline(65536)) not in (b"\r\n", b"\n", b""):
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    n = int(headers.get("content-length", 0))
    if len(f.read(n)) < n:
        raise ConnectionError("short body")
    return status, headers


def good_client_main(port, out):
    """One GET every 50 ms on a keep-alive connection (a new one after a failure) until SIGTERM."""
    def on_term(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stop
    signal.signal(signal.SIGTERM, on_term)
    lat, errors, statuses = [], collections.Counter(), collections.Counter()
    sock = f = None
    tick = now()
    try:
        while True:
            if tick > now():
                time.sleep(tick - now())
            tick = max(tick + 0.05, now())
            t0 = time.perf_counter()
            try:
                if sock is None:
                    sock = socket.create_connection((HOST, port), timeout=5)
                    f = sock.makefile("rb")
                sock.sendall(b"GET /good HTTP/1.1\r\nHost: abuse.local\r\n\r\n")
                status, headers = read_response(f)
                statuses[status] += 1
                if status == 200:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors[f"status {status}"] += 1
                if headers.get("connection", "").lower() == "close":
                    sock.close()
                    sock = None
            except (OSError, ValueError, IndexError) as e:
                errors[type(e).__name__] += 1
                if sock:
                    sock.close()
                sock = None
    except Stop:
        pass
    Path(out).write_text(json.dumps(dict(
        requests=sum(statuses.values()) + sum(v for k, v in errors.items() if not k.startswith("status")),
        ok=len(lat), failures=sum(errors.values()), errors=errors,
        p50_ms=pct(lat, 0.5) and pct(lat, 0.5) * 1000, p99_ms=pct(lat, 0.99) and pct(lat, 0.99) * 1000,
        max_ms=lat and max(lat) * 1000)))


class GoodClient:
    def __init__(self, lab, port):
        self.lab, self.out = lab, lab.work / f"good-{lab.started}.json"
        self.proc = lab.procs.start([sys.executable, __file__, "--good-client", port, self.out], LOAD_CORE,
                                    lab.work / f"logs/good-{lab.started}.log")
        self.result = None

    def stop(self):
        if self.result is None:
            self.lab.procs.stop(self.proc, signal.SIGTERM)
            try:
                self.result = json.loads(self.out.read_text())
            except (OSError, ValueError):
                self.result = {"failures": None, "error": "no result"}
        return self.result


def good_cell(g):
    if not g or g.get("failures") is None:
        return "no result"
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    errs = ", ".join(f"{k} ×{v}" for k, v in g["errors"].items())
    return (f"p50 {fmt(g['p50_ms'])} ms, p99 {fmt(g['p99_ms'])} ms, max {fmt(g['max_ms'] or None)} ms; "
            f"{g['failures']} of {g['requests']} failed" + (f" ({errs})" if errs else ""))


# ---- HTTP/1 over asyncio ---------------------------------------------------------

class Watch:
    """A client connection: what the server sends it (the first 4 KiB) and when the server closes it."""

    def __init__(self, reader, writer):
        self.reader, self.writer, self.data, self.closed_at = reader, writer, b"", None
        self.task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self):
        try:
            while chunk := await self.reader.read(65536):
                if len(self.data) < 4096:
                    self.data += chunk
        except OSError:
            pass
        self.closed_at = now()

    @property
    def open(self):
        return self.closed_at is None and not self.writer.is_closing()

    @property
    def status(self):
        parts = self.data.split(b"\r\n", 1)[0].split()
        return parts[1].decode() if len(parts) > 1 and parts[0].startswith(b"HTTP/") else ("none" if not self.data else "other")

    def write(self, data):
        if self.open:
            self.writer.write(data)

    def close(self):
        self.task.cancel()
        self.writer.close()


async def connect_many(port, count, batch=250):
    """`count` connections opened `batch` at a time: (list of (reader, writer), failures)."""
    conns, failed = [], 0
    for start in range(0, count, batch):
        res = await asyncio.gather(*(asyncio.open_connection(HOST, port) for _ in range(min(batch, count - start))),
                                   return_exceptions=True)
        failed += sum(isinstance(r, BaseException) for r in res)
        conns += [r for r in res if not isinstance(r, BaseException)]
    return conns, failed


async def get(reader, writer, timeout=10):
    """One keep-alive GET /; its status."""
    writer.write(b"GET / HTTP/1.1\r\nHost: abuse.local\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
    await asyncio.wait_for(reader.readexactly(length), timeout)
    return int(head.split()[1])


async def get_many(port, count, batch=500):
    """`count` kept-alive connections with one GET done on each: their Watches."""
    async def one():
        r, w = await asyncio.open_connection(HOST, port)
        try:
            await get(r, w)
        except BaseException:
            w.close()
            raise
        return r, w
    out = []
    for start in range(0, count, batch):
        res = await asyncio.gather(*(one() for _ in range(min(batch, count - start))), return_exceptions=True)
        out += [Watch(r, w) for r, w in (x for x in res if not isinstance(x, BaseException))]
    return out


def statuses(ws):
    c = collections.Counter(w.status for w in ws)
    return ", ".join(f"{k} ×{v}" for k, v in sorted(c.items()))


# ---- HTTP/2 frames by hand ------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
H2_ERRORS = ["NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT", "STREAM_CLOSED",
             "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR", "CONNECT_ERROR",
             "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED"]


def frame(ftype, flags, sid, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


def get_headers(sid, authority=b"127.0.0.1"):
    """HEADERS for GET / (END_STREAM | END_HEADERS): static-table :method GET, :scheme http,
    :path /, and :authority as a literal with an indexed name."""
    return frame(HEADERS, 0x5, sid, b"\x82\x86\x84\x41" + bytes([len(authority)]) + authority)


def rst(sid):
    return frame(RST_STREAM, 0, sid, struct.pack(">I", 8))  # CANCEL


class H2:
    """A prior-knowledge h2c client connection, non-blocking: frames queued out, frames read and
    counted (SETTINGS and PING ACKs, response HEADERS, GOAWAY); the server's SETTINGS and PINGs
    are acknowledged. `end` is set when the server closes or resets it."""

    def __init__(self, port):
        self.sock = socket.create_connection((HOST, port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each write goes out at once
        self.sock.setblocking(False)
        self.out = bytearray(PREFACE + frame(SETTINGS, 0, 0) + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1 << 30)))
        self.inbuf = bytearray()
        self.end = self.goaway = None
        self.acks = collections.Counter()
        self.responses = 0

    def pump(self, wait=0.0):
        if self.end:
            return
        try:
            if self.out:
                del self.out[:self.sock.send(self.out)]
        except BlockingIOError:
            pass
        except OSError as e:
            self.end = "reset" if isinstance(e, ConnectionResetError) else type(e).__name__
            return
        if wait:
            select.select([self.sock], [self.sock] if self.out else [], [], wait)
        while True:
            try:
                chunk = self.sock.recv(1 << 18)
            except BlockingIOError:
                break
            except OSError as e:
                self.end = "reset" if isinstance(e, ConnectionResetError) else type(e).__name__
                return
            if not chunk:
                self.end = "closed"
                return
            self.inbuf += chunk
            self._parse()

    def _parse(self):
        buf, i = self.inbuf, 0
        while len(buf) - i >= 9:
            length = int.from_bytes(buf[i:i + 3], "big")
            if len(buf) - i < 9 + length:
                break
            ftype, flags = buf[i + 3], buf[i + 4]
            payload = bytes(buf[i + 9:i + 9 + length])
            i += 9 + length
            if ftype == SETTINGS:
                if flags & 1:
                    self.acks["settings"] += 1
                else:
                    self.out += frame(SETTINGS, 1, 0)
            elif ftype == PING:
                if flags & 1:
                    self.acks["ping"] += 1
                else:
                    self.out += frame(PING, 1, 0, payload)
            elif ftype == GOAWAY and self.goaway is None:
                code = int.from_bytes(payload[4:8], "big")
                self.goaway = H2_ERRORS[code] if code < len(H2_ERRORS) else hex(code)
            elif ftype == HEADERS:
                self.responses += 1
        del buf[:i]

    @property
    def reason(self):
        return f"GOAWAY {self.goaway}" if self.goaway else (self.end or "time limit")

    def close(self):
        self.sock.close()


def churn(port, seconds, max_conns, together):
    """Rapid Reset: GET streams cancelled right after they open, for `seconds`, a new connection
    after each GOAWAY or close. `together`: HEADERS and RST_STREAM in the same write, ten pairs a
    write; else RST_STREAM ~1 ms after HEADERS, one stream at a time."""
    streams = conns = responses = 0
    ends = collections.Counter()
    pair = len(get_headers(1) + rst(1))
    end = now() + seconds
    c = None
    while now() < end:
        if c is None or c.end or c.goaway:
            if c:
                ends[c.reason] += 1
                responses += c.responses
                streams -= len(c.out) // pair  # queued, never sent
                c.close()
                c = None
            if conns >= max_conns:
                ends["connection cap reached"] += 1
                break
            conns += 1
            try:
                c, sid = H2(port), 1
            except OSError as e:
                ends[f"connect: {type(e).__name__}"] += 1
                time.sleep(0.01)
                continue
        if together:
            if len(c.out) < 65536:
                c.out += b"".join(get_headers(s) + rst(s) for s in range(sid, sid + 20, 2))
                sid += 20
                streams += 10
            c.pump(0.001 if len(c.out) >= 65536 else 0)
        else:
            c.out += get_headers(sid)
            c.pump()
            time.sleep(0.001)
            c.out += rst(sid)
            c.pump()
            sid += 2
            streams += 1
    if c:
        ends[c.reason] += 1
        responses += c.responses
        streams -= len(c.out) // pair
        c.close()
    return dict(streams=streams, connections=conns, responses=responses, ends=dict(ends))


def ends_text(ends):
    return ", ".join(f"{k} ×{v}" for k, v in sorted(ends.items(), key=lambda kv: -kv[1]))


# ---- the probes --------------------------------------------------------------------
# Each takes (lab, proxy) and returns its raw numbers plus "cell", the table's summary.

def p1_heads(lab, px):
    n, hold = max(1, round(500 * lab.k)), 10 * lab.k
    pad = b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"a" * 10228) for i in range(90))  # 90 lines of 10 KiB
    head = b"GET / HTTP/1.1\r\nHost: abuse.local\r\n" + pad  # ~900 KiB, no final CRLF: never ends

    async def run():
        before = rss_kib(px.pid)
        t0 = now()
        conns, failed = await connect_many(px.plain, n)
        ws = [Watch(r, w) for r, w in conns]

        async def send(w):
            try:
                for i in range(0, len(head), 65536):
                    if not w.open:
                        return False
                    w.write(head[i:i + 65536])
                    await w.writer.drain()
                return True
            except OSError:
                return False
        senders = [asyncio.create_task(send(w)) for w in ws]
        peak = before
        while now() < t0 + hold:
            await asyncio.sleep(0.25)
            peak = max(peak, rss_kib(px.pid))
        end = rss_kib(px.pid)
        whole = sum(s.done() and not s.cancelled() and s.result() is True for s in senders)
        for s in senders:
            s.cancel()
        closed = [w for w in ws if not w.open]
        r = dict(connections=len(ws), failed=failed, heads_sent_whole=whole, closed_by_server=len(closed),
                 statuses=statuses(closed), rss_before_mib=before / 1024, rss_peak_growth_mib=(peak - before) / 1024,
                 rss_end_growth_mib=(end - before) / 1024)
        for w in ws:
            w.close()
        return r
    r = asyncio.run(run())
    r["cell"] = (f"RSS +{r['rss_end_growth_mib']:.0f} MiB at {hold:g} s (peak +{r['rss_peak_growth_mib']:.0f}); "
                 f"{r['heads_sent_whole']}/{n} heads sent whole; {r['closed_by_server']} closed by the server"
                 + (f" ({r['statuses']})" if r["closed_by_server"] else ""))
    return r


def p2_tls_partial(lab, px):
    n = max(1, round(1000 * lab.k))
    marks = [5 * lab.k, 15 * lab.k, 35 * lab.k, 50 * lab.k]
    # A record header announcing 512 bytes of handshake, then 10 of them (ClientHello type, length, version, 4 random bytes).
    hello = b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03" + os.urandom(4)

    async def run():
        t0 = now()
        conns, failed = await connect_many(px.tls, n)
        ws = [Watch(r, w) for r, w in conns]
        for w in ws:
            w.write(hello)
        while now() < t0 + marks[-1] and any(w.closed_at is None for w in ws):
            await asyncio.sleep(0.1)
        at = [sum(w.closed_at is None or w.closed_at - t0 > m for w in ws) for m in marks]
        closes = [w.closed_at - t0 for w in ws if w.closed_at is not None]
        r = dict(connections=len(ws), failed=failed, open_at=dict(zip([f"{m:g}s" for m in marks], at)),
                 answered=statuses([w for w in ws if w.data]) or "nothing",
                 close_s_median=statistics.median(closes) if closes else None)
        for w in ws:
            w.close()
        return r
    r = asyncio.run(run())
    r["cell"] = (f"open at {' / '.join(r['open_at'])}: {' / '.join(map(str, r['open_at'].values()))} of {r['connections']}"
                 + (f"; closed after {r['close_s_median']:.1f} s (median)" if r["close_s_median"] is not None else ""))
    return r


def p3_idle(lab, px):
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = min(max(1, round(10000 * lab.k)), soft - 500)

    async def run():
        await asyncio.sleep(0.5)
        before = rss_kib(px.pid)
        ws = await get_many(px.plain, n)
        await asyncio.sleep(2)
        after = rss_kib(px.pid)
        held = sum(w.open for w in ws)
        for w in ws:
            w.close()
        return dict(wanted=n, open=held, rss_before_mib=before / 1024, rss_after_mib=after / 1024,
                    kib_per_conn=(after - before) / max(held, 1))
    r = asyncio.run(run())
    r["cell"] = (f"{r['kib_per_conn']:.1f} KiB per connection ({r['open']:,} held; RSS {r['rss_before_mib']:.1f} → "
                 f"{r['rss_after_mib']:.1f} MiB)")
    if n < 10000 * lab.k:
        r["cell"] += f"; only {n:,}: open-file limit {soft}"
    return r


def rapid_reset(lab, px, together):
    seconds = 10 * lab.k
    origin0, cpu0, t0 = lab.origin_requests(), cpu_seconds(px.pid), now()
    r = churn(px.h2c, seconds, max(1, round(60000 * lab.k)), together)
    cpu = (cpu_seconds(px.pid) - cpu0) / (now() - t0) * 100
    time.sleep(0.5)  # requests still on their way to the origin
    r.update(origin_requests=lab.origin_requests() - origin0, cpu_pct=cpu, seconds=seconds)
    r["cell"] = (f"CPU {cpu:.0f}%; {r['origin_requests']:,} of {r['streams']:,} streams reached the origin; "
                 f"{r['connections']:,} connections (ends: {ends_text(r['ends'])})")
    return r


def p5_dribble(lab, px):
    n, step, marks = max(1, round(500 * lab.k)), 5 * lab.k, [15 * lab.k, 40 * lab.k]
    nxt = b"GET / HTTP/1.1\r\nHost: abuse.local\r\n\r\n"

    async def run():
        ws = await get_many(px.plain, n)
        t0, i = now(), 0
        while now() < t0 + marks[-1] and any(w.open for w in ws):
            for w in ws:
                w.write(nxt[i:i + 1])
            i += 1
            while now() < min(t0 + i * step, t0 + marks[-1]) and any(w.open for w in ws):
                await asyncio.sleep(0.05)
        at = [sum(w.closed_at is None or w.closed_at - t0 > m for w in ws) for m in marks]
        closes = [w.closed_at - t0 for w in ws if w.closed_at is not None]
        r = dict(connections=len(ws), wanted=n, bytes_dribbled=i, open_at=dict(zip([f"{m:g}s" for m in marks], at)),
                 answered=statuses([w for w in ws if w.data]) or "nothing",
                 close_s_median=statistics.median(closes) if closes else None)
        for w in ws:
            w.close()
        return r
    r = asyncio.run(run())
    r["cell"] = (f"open at {' / '.join(r['open_at'])}: {' / '.join(map(str, r['open_at'].values()))} of {r['connections']}"
                 + (f"; closed after {r['close_s_median']:.1f} s (median), answered: {r['answered']}" if r["close_s_median"] is not None else ""))
    return r


def p6_bodies(lab, px):
    n, hold = max(1, round(200 * lab.k)), 45 * lab.k
    head = b"POST /upload HTTP/1.1\r\nHost: abuse.local\r\nContent-Length: 10000000000\r\n\r\n"

    async def run():
        base = lab.origin_connections()
        t0 = now()
        conns, failed = await connect_many(px.plain, n)
        ws = [Watch(r, w) for r, w in conns]
        for w in ws:
            w.write(head)
        held, sample = [], max(0.25, hold / 45)
        while now() < t0 + hold and any(w.open for w in ws):
            await asyncio.sleep(0.1)  # a byte every 100 ms: 10 B/s
            for w in ws:
                w.write(b"x")
            if now() - t0 >= len(held) * sample:
                held.append(await asyncio.to_thread(lab.origin_connections) - base)
        closes = sorted(w.closed_at - t0 for w in ws if w.closed_at is not None)
        r = dict(connections=len(ws), failed=failed, statuses=statuses(ws), still_open=sum(w.open for w in ws),
                 close_s=[round(closes[0], 1), round(statistics.median(closes), 1), round(closes[-1], 1)] if closes else None,
                 origin_conns_peak=max(held, default=0), origin_conns_samples=held, hold_s=hold)
        for w in ws:
            w.close()
        return r
    r = asyncio.run(run())
    cs = r["close_s"]
    r["cell"] = (f"{r['statuses']}; " + (f"closed at {cs[0]:g}–{cs[2]:g} s (median {cs[1]:g}); " if cs else "")
                 + f"{r['still_open']} open at {hold:g} s; origin connections held: up to {r['origin_conns_peak']}")
    return r


def p7_maxconn(lab, px, limit):
    wait = max(3.0, 10 * lab.k)

    async def run():
        ws = []
        for _ in range(limit - 1):  # the well-behaved client holds the last one
            ws += await get_many(px.plain, 1)
        await asyncio.sleep(0.5)
        closed_filling = sum(not w.open for w in ws)
        t0 = time.perf_counter()
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(HOST, px.plain), wait)
            status = await get(r, w, timeout=wait)
            w.close()
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            status = type(e).__name__
        took = (time.perf_counter() - t0) * 1000
        await asyncio.sleep(0.5)
        res = dict(limit=limit, idle=len(ws), closed_while_filling=closed_filling, new_client=status, new_client_ms=took,
                   idle_closed_after=sum(not w.open for w in ws) - closed_filling)
        for w in ws:
            w.close()
        return res
    r = asyncio.run(run())
    served = r["new_client"] == 200
    r["cell"] = (f"new client {'served (200)' if served else 'NOT served: ' + str(r['new_client'])} in {r['new_client_ms']:.1f} ms; "
                 f"{r['idle_closed_after']} idle connection(s) closed for it" +
                 (f"; {r['closed_while_filling']} closed while filling" if r["closed_while_filling"] else ""))
    return r


def p8_flood(lab, px, kind):
    seconds = 10 * lab.k
    f = frame(SETTINGS, 0, 0) if kind == "settings" else frame(PING, 0, 0, b"abuse!!!")
    c, queued, t0 = H2(px.h2c), 0, now()
    c.pump()
    c.pump(0.05)  # the server's SETTINGS
    base = c.acks[kind]
    while now() < t0 + seconds and not c.end and not c.goaway:
        if len(c.out) < 16384:
            c.out += f * 64
            queued += 64
        c.pump(0.001 if len(c.out) >= 16384 else 0)
    took = now() - t0
    c.pump(0.2)  # what is still on its way
    end = c.reason
    sent = queued - len(c.out) // len(f)
    acks = c.acks[kind] - base
    c.close()
    r = dict(kind=kind, sent=sent, acks=acks, end=end, after_s=took)
    r["cell"] = f"{acks:,} ACKs for {sent:,} frames; {end} after {took:.2f} s"
    return r


def p9_plain_to_tls(lab, px):
    with socket.create_connection((HOST, px.tls), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: abuse.local\r\n\r\n")
        data = b""
        try:
            while b"\r\n" not in data and len(data) < 4096 and (chunk := s.recv(4096)):
                data += chunk
        except OSError as e:
            data = data or f"({type(e).__name__})".encode()
    line = data.split(b"\r\n", 1)[0].decode("latin-1") or "(closed, nothing sent)"
    return dict(first_line=line, cell=f"`{line}`")


# ---- the suite ------------------------------------------------------------------------

def probes(k):
    """key -> (title, function, meshgate config, NGINX config, meshgate metrics worth showing)."""
    n = lambda x: f"{max(1, round(x * k)):,}"  # noqa: E731
    s = lambda x: f"{x * k:g} s"  # noqa: E731
    limit = max(2, round(500 * k))
    body_t = ms(30 * k)
    body_mg = dict(route={"timeout": body_t}, upstream={"read_timeout": body_t})
    body_ngx = {"client_body_timeout": body_t, "proxy_read_timeout": body_t}
    return {
        "1": (f"{n(500)} connections, each an unfinished 900 KiB request head, held {s(10)}", p1_heads,
              dict(limits={"max_request_header_bytes": 1048576}),
              dict(http={"large_client_header_buffers": "32 32k"}), ("head_budget", "header_")),
        "2": (f"{n(1000)} TLS connections, each a partial ClientHello (record of 512 B announced, 10 B sent); "
              f"head timeout {s(10)}", p2_tls_partial,
              dict(limits={"handshake_timeout": ms(10 * k)}), dict(http={"client_header_timeout": ms(10 * k)}), ("tls_handshake",)),
        "3": (f"{n(10000)} idle keep-alive connections (one request each)", p3_idle, {}, {}, ()),
        "4": (f"h2c rapid-reset churn, RST_STREAM ~1 ms after HEADERS, {s(10)}", lambda lab, px: rapid_reset(lab, px, False),
              {}, {}, ("goaways", "client_resets", "upstream")),
        "5": (f"{n(500)} kept-alive connections dribbling the next head a byte every {s(5)}; head timeout {s(10)}", p5_dribble,
              dict(limits={"header_read_timeout": ms(10 * k)}), dict(http={"client_header_timeout": ms(10 * k)}), ("rejected",)),
        "6a": (f"{n(200)} POSTs declaring 10 GB, sent at 10 B/s, held up to {s(45)}; default body limits "
               "(meshgate 10 MiB, NGINX client_max_body_size 10m)", p6_bodies, body_mg, dict(http=body_ngx), ("rejected", "upstream")),
        "6b": (f"the same with body limits raised to 20 GB; route timeout / client_body_timeout and proxy_read_timeout {s(30)}",
               p6_bodies, dict(body_mg, route={"timeout": body_t, "max_body_bytes": 20_000_000_000}),
               dict(http=body_ngx | {"client_max_body_size": "20g"}), ("rejected", "upstream")),
        "7": (f"max_connections = {limit} (NGINX: worker_connections {limit + 5}), full of idle keep-alive connections "
              f"({limit - 1} + the well-behaved client's), then a new client", lambda lab, px: p7_maxconn(lab, px, limit),
              dict(limits={"max_connections": limit}), dict(worker_connections=limit + 5), ("evicted", "connection_limit")),
        "8a": (f"SETTINGS flood from a client that reads (h2c), up to {s(10)}", lambda lab, px: p8_flood(lab, px, "settings"),
               {}, {}, ("goaways",)),
        "8b": (f"PING flood from a client that reads (h2c), up to {s(10)}", lambda lab, px: p8_flood(lab, px, "ping"),
               {}, {}, ("goaways",)),
        "9": ("plain HTTP/1.1 request sent to the TLS port: first response line", p9_plain_to_tls, {}, {}, ("tls_handshake",)),
        "10": (f"classic Rapid Reset: HEADERS + RST_STREAM in one write, continuously for {s(10)}",
               lambda lab, px: rapid_reset(lab, px, True), {}, {}, ("goaways", "client_resets", "upstream")),
    }


def metrics_note(metrics, wanted):
    short = {"meshgate_downstream_rejected_total": "rejected", "meshgate_downstream_goaways_total": "goaways",
             "meshgate_downstream_client_resets_total": "client_resets", "meshgate_upstream_requests_total": "upstream",
             "meshgate_tls_handshake_errors_total": "tls_handshake", "meshgate_downstream_connections_evicted_total": "evicted"}
    parts = []
    for key, v in sorted(metrics.items()):
        name, _, reason = key.partition("{")
        label = short.get(name, name) + (f"{{{reason}" if reason else "")
        if v and any(w in label for w in wanted):
            parts.append(f"{label}={v:,}")
    return "; metrics: " + ", ".join(parts) if parts else ""


def run_one(lab, key, spec, system):
    title, fn, mg_conf, ngx_conf, wanted = spec
    px = lab.start(system, meshgate=mg_conf if system == "meshgate" else None, nginx=ngx_conf if system != "meshgate" else None)
    good = GoodClient(lab, px.plain)
    try:
        time.sleep(0.3)
        try:
            r = fn(lab, px)
        except Exception as e:  # one broken probe must not sink the suite
            r = dict(cell=f"FAILED: {type(e).__name__}: {e}")
        r["good"] = good.stop()
        if px.proc.poll() is not None:
            r["cell"] += f"; **the proxy exited ({px.proc.returncode})**"
        elif system == "meshgate":
            try:
                r["metrics"] = px.metrics()
                r["cell"] += metrics_note(r["metrics"], wanted)
            except OSError as e:
                r["cell"] += f"; metrics unreadable: {e}"
        return r
    finally:
        good.stop()
        lab.procs.stop(px.proc)


def report(rows, meta):
    systems = meta["systems"]
    lines = [f"# Abuse probes, {meta['date']}", "",
             f"Machine: {meta['machine']}. Versions: {meta['versions']}.", "",
             f"Command: `{meta['command']}`{' (quick: counts, durations and timeouts / 10)' if meta['quick'] else ''}. "
             "Each probe against a fresh proxy, one worker alone on core 1; attack, well-behaved client "
             "(GET every 50 ms on its own keep-alive connection) and origin (NGINX) on core 0. Loopback only.", "",
             "| probe | " + " | ".join(DISPLAY[s] for s in systems) + " |", "|---" * (len(systems) + 1) + "|"]
    for key, title, results in rows:
        esc = lambda t: str(t).replace("|", "/")  # noqa: E731
        lines.append(f"| {key}. {esc(title)} | " + " | ".join(esc(results.get(s, {}).get("cell", "–")) for s in systems) + " |")
        lines.append(f"| {key}. ↳ well-behaved client | " + " | ".join(esc(good_cell(results.get(s, {}).get("good")))
                                                                   for s in systems) + " |")
    return "\n".join(lines + ["", *NOTES]) + "\n"


DISPLAY = {"meshgate": "meshgate", "nginx": "NGINX"}
NOTES = [
    "Reading the table: a connection is counted open until the attacker sees the server close or reset it. "
    "NGINX (one worker) has `keepalive_requests 1000` and `keepalive_timeout 120s` as meshgate's defaults, "
    "`client_max_body_size 10m` as meshgate's `max_body_bytes`, and the probe's limits as in its row.",
    "",
    "- 2: NGINX 1.22 has no TLS handshake timeout of its own; `client_header_timeout` bounds the handshake.",
    "- 3: NGINX allocates its whole connection array (`worker_connections`) at start, so its figure leaves that out; "
    "kernel socket buffers are in neither figure.",
    "- 4, 10: requests counted at the origin (its access log), the well-behaved client's left out. "
    "The origin answers in well under 1 ms, so in 4 most streams are complete before their reset.",
    "- 6: NGINX reads a request body whole (`proxy_request_buffering on`, its default) before it contacts the origin; "
    "meshgate streams it (`buffer_request_body` off). After a 413 NGINX keeps reading the body for `lingering_time` (30 s).",
    "- 7: NGINX has no connection limit of its own; when free `worker_connections` run low it closes idle keep-alive "
    "connections, up to 32 at a time.",
    "- 8: the frames are written 64 at a time; ACKs are counted until the GOAWAY, reset or close.",
]


def versions():
    mg = subprocess.run([MESHGATE, "--version"], capture_output=True, text=True).stdout.strip()
    ngx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().replace("nginx version: ", "")
    return f"{mg}, {ngx}"


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--good-client":
        return good_client_main(int(sys.argv[2]), sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="counts, durations and timeouts / 10")
    ap.add_argument("--probes", default="", help="comma-separated keys (1,2,...,6a,6b,...,10; `6` = 6a and 6b)")
    ap.add_argument("--systems", default="meshgate,nginx")
    args = ap.parse_args()
    for tool in ["nginx", "openssl", "taskset", "ss"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: `make abuse` installs it (Debian: nginx-light, openssl, util-linux, iproute2)")
    if not MESHGATE.exists():
        sys.exit(f"{MESHGATE} is missing: `make abuse` builds it")
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 cores: the attack and the proxy are pinned apart")
    systems = [s for s in args.systems.split(",") if s]
    if set(systems) - set(DISPLAY):
        sys.exit(f"--systems: one or more of {', '.join(DISPLAY)}")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited by the proxies
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    k = 0.1 if args.quick else 1.0
    suite = probes(k)
    wanted = [p for p in args.probes.split(",") if p]
    keys = [key for key in suite if not wanted or key in wanted or key.rstrip("ab") in wanted]
    if wanted and not keys:
        sys.exit(f"--probes: keys are {', '.join(suite)}")

    lab = Lab(k)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    started = now()
    try:
        lab.setup()
        if not ECHO_MODULE.exists():
            print(f"{ECHO_MODULE} missing: the origin answers /upload without reading the body", file=sys.stderr)
        rows, raw = [], {}
        for key in keys:
            title = suite[key][0]
            results = {}
            for system in systems:
                t0 = now()
                results[system] = run_one(lab, key, suite[key], system)
                print(f"[{now() - started:5.0f} s] {key} {system} ({now() - t0:.0f} s): {results[system]['cell']}", file=sys.stderr)
            rows.append((key, title, results))
            raw[key] = {"title": title} | results
        stamp = datetime.datetime.now(datetime.timezone.utc)
        meta = dict(date=stamp.strftime("%Y-%m-%d %H:%M UTC"), quick=args.quick, systems=systems,
                    machine=f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), {platform.platform()}",
                    versions=versions(), command="python3 loadtest/abuse.py" + "".join(f" {a}" for a in sys.argv[1:]),
                    open_file_limit=hard, seconds=round(now() - started))
        md = report(rows, meta)
        RESULTS.mkdir(exist_ok=True)
        name = f"abuse-{stamp:%Y%m%d-%H%M}"
        (RESULTS / f"{name}.md").write_text(md)
        (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "probes": raw}, indent=1, default=str))
        print(md)
        print(f"written: loadtest/results/{name}.md, .json ({meta['seconds']} s)", file=sys.stderr)
    finally:
        lab.close()


if __name__ == "__main__":
    main()
