#!/usr/bin/env bash
# What metrics, access logs and tracing cost: requests/s and CPU per request
# of one meshgate worker in three set-ups, in interleaved rounds.
#   A  baseline: metrics (always on), access log off, tracing off
#   B  + JSON access log to a file + tracing at 1% sampling
#   C  + JSON access log to a file + tracing at 100% sampling
# Loopback only, bounded: ROUNDS x 3 runs of DURATION seconds. Usage:
#   make build && loadtest/observability-cost.sh [ROUNDS] [DURATION]
# Pinning (2 cores): wrk and the origin on core 0, meshgate (1 worker) on core 1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
DURATION=${2:-5}
CONNS=${CONNS:-32}
BIN=target/release/meshgate
[ -x "$BIN" ] || { echo "build first: make build" >&2; exit 1; }
command -v wrk >/dev/null || scripts/install-deps.sh wrk

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

origin=$(free_port); otlp=$(free_port)
taskset -c 0 "$BIN" demo-upstream --listen "127.0.0.1:$origin" >/dev/null 2>&1 & pids+=($!)
# A minimal OTLP/HTTP sink: accepts every export with 200.
python3 - "$otlp" >/dev/null 2>&1 <<'PY' & pids+=($!)
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *a): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
wait_port "$origin"; wait_port "$otlp"

config() { # name extra-telemetry
  local listen=$1 admin=$2 telemetry=$3
  cat <<TOML
[gateway]
workers = 1
shutdown_grace_period = "0s"
$telemetry
[admin]
listen = "127.0.0.1:$admin"
[listeners.public]
bind = "127.0.0.1:$listen"
[routes.bench]
path_prefix = "/"
upstream = "origin"
request_headers = { set = { "x-via" = "meshgate" } }
[upstreams.origin]
endpoints = ["127.0.0.1:$origin"]
TOML
}
tel_A=''
tel_B="[telemetry]
access_log = \"json\"
access_log_file = \"$work/access-B.log\"
[telemetry.tracing]
endpoint = \"http://127.0.0.1:$otlp/v1/traces\"
sample_ratio = 0.01"
tel_C="[telemetry]
access_log = \"json\"
access_log_file = \"$work/access-C.log\"
[telemetry.tracing]
endpoint = \"http://127.0.0.1:$otlp/v1/traces\"
sample_ratio = 1.0
queue_size = 65536"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
declare -A rps cpu p99
for round in $(seq 1 "$ROUNDS"); do
  for s in A B C; do
    listen=$(free_port); admin=$(free_port)
    var="tel_$s"; config "$listen" "$admin" "${!var}" > "$work/$s.toml"
    taskset -c 1 "$BIN" run -c "$work/$s.toml" >/dev/null 2>"$work/$s.err" & gw=$!
    wait_port "$listen"
    taskset -c 0 wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$listen/" >/dev/null   # warm-up
    t0=$(cpu_ticks "$gw")
    out=$(taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "http://127.0.0.1:$listen/")
    t1=$(cpu_ticks "$gw")
    kill -INT "$gw"; wait "$gw" 2>/dev/null || true
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    r=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    l=$(awk '$1=="99%" {print $2}' <<<"$out")
    us=$(python3 -c "print(round(($t1-$t0)/$hz*1e6/$reqs, 1))")
    rps[$s]+="$r "; cpu[$s]+="$us "; p99[$s]+="$l "
    echo "round $round $s: $r req/s, p99 $l, ${us} us CPU/request" >&2
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
minmax() { tr ' ' '\n' | grep -v '^$' | sort -g | awk 'NR==1{lo=$1} {hi=$1} END {print lo "–" hi}'; }
base=$(median <<<"${rps[A]}")
out="loadtest/results/observability-$(date -u +%Y%m%d).md"
{
  echo "| set-up | req/s (median, min–max) | vs baseline | CPU µs/request (median) | p99 (median) |"
  echo "|---|---|---|---|---|"
  for s in A B C; do
    m=$(median <<<"${rps[$s]}")
    label=$(case $s in A) echo "A: metrics only";; B) echo "B: + access log + tracing 1%";; C) echo "C: + access log + tracing 100%";; esac)
    echo "| $label | $m ($(minmax <<<"${rps[$s]}")) | $(python3 -c "print(f'{$m/$base:.3f}×')") | $(median <<<"${cpu[$s]}") | $(tr ' ' '\n' <<<"${p99[$s]}" | grep -v '^$' | sort | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') |"
  done
  echo
  echo "$ROUNDS interleaved rounds of ${DURATION}s, wrk -t1 -c$CONNS on core 0 with the origin (meshgate demo-upstream), meshgate 1 worker on core 1; $(nproc) cores, $(uname -r), $(date -u +%F)."
} | tee "$out"
echo "written to $out" >&2
