#!/usr/bin/env python3
"""User-space instructions per proxied request, counted by Valgrind's
callgrind: meshgate against the bare Pingora reference on scenario 1's
request (HTTP/1.1 keep-alive, small GET), with the same origin and config as
`bench.py`.

CPU time on this VM moves by 10-25% between rounds; an instruction count
does not move, so a change of a few percent in meshgate's own work shows up
here when the timed benchmark cannot see it. It counts user space only (the
kernel's share is the same for both) and weighs every instruction alike, so
it says where work is, not what it costs in time: the timed runs of
`bench.py` remain the measure of speed.

Each system serves a warm-up, then callgrind's counters are zeroed, then
`--requests` requests are counted (h2load --h1, 10 connections). Loopback
only; every process is stopped at the end.

`--systems` takes `system` or `system:VARIANT` (a `bench.py` variant:
`routes1000`, `ratelimit`, `tracing`, `tls`, `lowercase`, `fast`, `pingora`, `endpoints3`, `resilience3`, `resilienceoff`), so scenarios 6-8's, 10's and 11's costs,
which are smaller than the timed runs' spread, can be counted too. With
`routes1000` the request is scenario 6's: the last of the 1,000 routes.
With `tls` it is scenario 3's: a new TLS 1.3 connection per request (wrk,
10 connections, `Connection: close`); wrk runs for a time, so `--requests`
is then read as seconds and the count is what wrk served.

Usage: loadtest/instructions.py [--requests N] [--top K] [--systems a,b:variant,...] [--keep DIR]
"""

import argparse
import collections
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the same origin, configs and process handling)


def parse(path):
    """Self cost per function of a callgrind output (uncompressed names)."""
    cost = collections.Counter()
    fn, after_call = None, False
    with open(path) as f:
        for line in f:
            if line.startswith("fn="):
                fn = line[3:].strip()
            elif line.startswith("calls="):
                after_call = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                parts = line.split()
                if len(parts) >= 2:
                    if after_call:
                        after_call = False  # an inclusive call cost, not this function's own
                    else:
                        cost[fn] += int(parts[1])
    return cost


# Where an instruction belongs, first match wins (function names as callgrind
# gives them).
PARTS = [
    ("header maps (http, pingora_http)", r"http::header|pingora_http::|HeaderName|HeaderValue"),
    ("allocator (mimalloc, Vec growth)", r"^_?mi_|__rust_(re)?alloc|__rust_dealloc|raw_vec|finish_grow"),
    ("memcpy, memmove, memset", r"memcpy|memmove|memset"),
    ("timers (Pingora's timeouts, clock)", r"pingora_timeout|Timespec|clock_gettime|tokio::sync::notify"),
    ("meshgate's own functions", r"meshgate::"),
    ("tracing (opentelemetry)", r"opentelemetry"),
    ("prometheus", r"prometheus"),
    ("tokio", r"tokio::"),
    ("pingora (other)", r"pingora"),
]


def parts(cost):
    out = collections.Counter()
    for fn, c in cost.items():
        out[next((name for name, pat in PARTS if re.search(pat, fn)), "other")] += c
    return out


def short(name):
    return re.sub(r"::h[0-9a-f]{16}$", "", name)[:110]


def measure(b, system, variant, requests, out):
    """Run `system` under callgrind; its dump and how many requests it counts."""
    proc, ports = b.start(system, variant)
    # Re-run the same command under callgrind: stop the plain one first.
    argv = [str(a) for a in proc.args[3:]]  # after "taskset -c N"
    b.procs.stop(proc)
    log = b.work / f"logs/{system}-callgrind.log"
    cg = b.procs.start(["valgrind", "--tool=callgrind", "--compress-strings=no", "--compress-pos=no",
                        f"--callgrind-out-file={out}"] + argv, bench.PROXY_CORE, log)
    bench.wait_port(ports["plain"], cg, timeout=120)
    if variant == "tls":
        # Scenario 3: a full TLS 1.3 handshake per request. wrk runs for a
        # time, not a count: `requests` is read as seconds here.
        url = f"https://127.0.0.1:{ports['tls']}/"
        b.wrk(url, 10, 5, headers=["Connection: close"])
        zero(cg)
        counted = b.wrk(url, 10, requests, headers=["Connection: close"])
        if counted["errors"]:
            raise RuntimeError(f"{system}: {counted['errors']} failed requests")
        n = counted["requests"]
    else:
        url = f"http://127.0.0.1:{ports['plain']}/"
        h2load = ["taskset", "-c", bench.LOAD_CORE, "h2load", "--h1", "-c10", "-t1"]
        if variant == "routes1000":
            host, prefix = bench.route_shape(999)
            url = f"http://127.0.0.1:{ports['plain']}{prefix}x"
            h2load += ["-H", f":authority: {host}"]
        subprocess.run(h2load + ["-n2000", url], check=True, capture_output=True, timeout=600)
        zero(cg)
        run = subprocess.run(h2load + [f"-n{requests}", url], check=True, capture_output=True, text=True,
                             timeout=1800)
        if f"{requests} succeeded" not in run.stdout:
            raise RuntimeError(f"{system}: not every request succeeded:\n{run.stdout}")
        n = requests
    subprocess.run(["callgrind_control", "-d", str(cg.pid)], check=True, capture_output=True, timeout=120)
    b.procs.stop(cg)
    dumps = sorted(Path(out).parent.glob(Path(out).name + ".*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise RuntimeError(f"{system}: callgrind wrote no dump")
    return dumps[-1], n


def zero(cg):
    subprocess.run(["callgrind_control", "-z", str(cg.pid)], check=True, capture_output=True, timeout=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--top", type=int, default=25, help="functions listed by their difference")
    ap.add_argument("--systems", default="bare-pingora,meshgate")
    ap.add_argument("--keep", metavar="DIR", type=Path,
                    help="copy the callgrind dumps here, for `callgrind_annotate --inclusive=yes`")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control", "h2load"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: run `make bench-deps`")
    b = bench.Bench(args)
    counts, served = {}, {}
    try:
        b.setup()
        for entry in args.systems.split(","):
            system, _, variant = entry.partition(":")
            dump, n = measure(b, system, variant or "default", args.requests,
                              b.work / f"callgrind.{entry.replace(':', '-')}")
            counts[entry] = parse(dump)
            served[entry] = n
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(dump, args.keep / f"callgrind.{entry.replace(':', '-')}.out")
    finally:
        b.procs.stop_all()
        shutil.rmtree(b.work, ignore_errors=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    what = ("scenario 1's request (HTTP/1.1 keep-alive, small GET); `:tls` entries scenario 3's "
            "(a new TLS 1.3 connection per request, wrk for `--requests` seconds)"
            if any(e.endswith(":tls") for e in counts)
            else "scenario 1's request (HTTP/1.1 keep-alive, small GET)")
    lines = [f"# Instructions per request (callgrind), {stamp}", "",
             f"`python3 loadtest/instructions.py {' '.join(sys.argv[1:])}`: {what} through each system; "
             "user space only.", "",
             "| system | requests counted | instructions per request | ÷ first |", "|---|---|---|---|"]
    per = {s: {fn: c / served[s] for fn, c in cost.items()} for s, cost in counts.items()}
    first = None
    for system, cost in per.items():
        total = sum(cost.values())
        first = first or total
        lines.append(f"| {system} | {served[system]:,} | {total:,.0f} | {total / first:.2f}× |")
    systems = list(per)
    by_part = {s: parts(c) for s, c in per.items()}
    lines += ["", "By part (instructions per request):", "",
              "| part | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for name in [p for p, _ in PARTS] + ["other"]:
        lines.append(f"| {name} | " + " | ".join(f"{by_part[s][name]:,.0f}" for s in systems) + " |")
    if len(systems) >= 2:
        a, c = per[systems[0]], per[systems[1]]
        diff = {k: c.get(k, 0) - a.get(k, 0) for k in set(a) | set(c)}
        lines += ["", f"Largest differences ({systems[1]} − {systems[0]}, instructions per request):", "",
                  f"| function | {systems[0]} | {systems[1]} | difference |", "|---|---|---|---|"]
        for k, d in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
            lines.append(f"| `{short(k)}` | {a.get(k, 0):,.0f} | {c.get(k, 0):,.0f} | {d:+,.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    bench.RESULTS.mkdir(exist_ok=True)
    path = bench.RESULTS / f"instructions-{stamp}.md"
    path.write_text(text)
    print(f"written: {path.relative_to(bench.ROOT)}")


if __name__ == "__main__":
    main()
