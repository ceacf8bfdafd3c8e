#!/usr/bin/env bash
# What access logs and tracing cost: requests/s and CPU per request of one
# meshgate worker in three set-ups, in interleaved rounds.
#   A  baseline: metrics (always on), access log off, tracing off
#   B  + JSON access log to a file + tracing at 1% sampling
#   C  + JSON access log to a file + tracing at 100% sampling
# Loopback only, bounded: ROUNDS x 3 runs of DURATION seconds. Usage:
#   make build && loadtest/observability-cost.sh [ROUNDS] [DURATION]
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-3}
DURATION=${2:-5}

otlp=$(free_port)
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
wait_port "$otlp"

label_A="A: metrics only"; top_A=""; route_A=""
label_B="B: + access log + tracing 1%"; route_B=""
top_B="[telemetry]
access_log = \"json\"
access_log_file = \"$work/access-B.log\"
[telemetry.tracing]
endpoint = \"http://127.0.0.1:$otlp/v1/traces\"
sample_ratio = 0.01"
label_C="C: + access log + tracing 100%"; route_C=""
top_C="[telemetry]
access_log = \"json\"
access_log_file = \"$work/access-C.log\"
[telemetry.tracing]
endpoint = \"http://127.0.0.1:$otlp/v1/traces\"
sample_ratio = 1.0
queue_size = 65536"

run_bench "$ROUNDS" "$DURATION" "loadtest/results/observability-$(date -u +%Y%m%d).md" A B C
