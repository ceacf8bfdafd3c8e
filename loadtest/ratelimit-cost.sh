#!/usr/bin/env bash
# What a local rate limit costs per request: one meshgate worker with no
# limit, with a per-client limit that always allows, and with a shadow limit
# that refuses (counted, not blocked) every request, in interleaved rounds.
# Loopback only, bounded: ROUNDS x 3 runs of DURATION seconds. Usage:
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

run_bench "$ROUNDS" "$DURATION" "loadtest/results/ratelimit-$(date -u +%Y%m%d).md" A B C
