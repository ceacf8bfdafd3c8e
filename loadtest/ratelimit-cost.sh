#!/usr/bin/env bash
# What a rate limit costs per request: one meshgate worker with no limit, with
# a local per-client limit that always allows, with a shadow limit that
# refuses (counted, not blocked) every request, and with a global limit
# through a local redis-server (batch 1: a Redis call per request; batch 100),
# in interleaved rounds. Loopback only, bounded: ROUNDS x 5 runs of DURATION
# seconds. Usage:
#   make build && loadtest/ratelimit-cost.sh [ROUNDS] [DURATION]
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-3}
DURATION=${2:-5}

label_A="A: no rate limit"; top_A=""; route_A=""
label_B="B: per client_ip limit, always allows"
top_B="[rate_limits.per_client]
key = \"client_ip\"
rate = 100000000
headers_on_allowed = true"
route_B='rate_limits = ["per_client"]'
label_C="C: shadow limit refusing every request"
top_C="[rate_limits.trial]
key = \"route\"
rate = 1
per = \"1h\"
mode = \"shadow\""
route_C='rate_limits = ["trial"]'

command -v redis-server >/dev/null || scripts/install-deps.sh redis-server
REDIS=$(free_port)
taskset -c 0 redis-server --port "$REDIS" --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)
wait_port "$REDIS"
SIDE_PID=${pids[-1]}; SIDE_NAME=Redis
global_policy="[redis]
url = \"redis://127.0.0.1:$REDIS/0\"
[rate_limits.fleet]
key = \"client_ip\"
rate = 100000
scope = \"global\"
headers_on_allowed = true"
label_D="D: global client_ip limit, batch 1 (Redis call per request)"
top_D="$global_policy"
route_D='rate_limits = ["fleet"]'
label_E="E: global client_ip limit, batch = 100"
top_E="$global_policy
batch = 100"
route_E='rate_limits = ["fleet"]'

run_bench "$ROUNDS" "$DURATION" "loadtest/results/ratelimit-$(date -u +%Y%m%d).md" A B C D E
