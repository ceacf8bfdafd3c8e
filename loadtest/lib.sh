# Shared by the loadtest scripts (source it): start an origin, run meshgate
# in several set-ups in interleaved rounds, report medians as a markdown table.
# Loopback only; every process started here is stopped on exit.
# Pinning (2 cores): wrk and the origin on core 0, meshgate (1 worker) on core 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=target/release/meshgate
[ -x "$BIN" ] || { echo "build first: make build" >&2; exit 1; }
command -v wrk >/dev/null || scripts/install-deps.sh wrk

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

ORIGIN=$(free_port)
taskset -c 0 "$BIN" demo-upstream --listen "127.0.0.1:$ORIGIN" >/dev/null 2>&1 & pids+=($!)
wait_port "$ORIGIN"

# The gateway config for one set-up: $1 listen port, $2 admin port, $3 extra
# top-level TOML (before [admin]), $4 extra keys for the route.
bench_config() {
  cat <<TOML
[gateway]
workers = 1
shutdown_grace_period = "0s"
$3
[admin]
listen = "127.0.0.1:$2"
[listeners.public]
bind = "127.0.0.1:$1"
[routes.bench]
path_prefix = "/"
upstream = "origin"
request_headers = { set = { "x-via" = "meshgate" } }
$4
[upstreams.origin]
endpoints = ["127.0.0.1:$ORIGIN"]
TOML
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# wrk's latency ("850.00us", "10.23ms", "1.02s") in milliseconds.
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms$/,"",v)} else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000} printf "%.2f\n", v}'; }
minmax() { tr ' ' '\n' | grep -v '^$' | sort -g | awk 'NR==1{lo=$1} {hi=$1} END {print lo "–" hi}'; }

# run_bench ROUNDS DURATION OUTFILE SETUP...; for each SETUP the caller
# defines top_SETUP, route_SETUP and label_SETUP. If SIDE_PID is set (a
# helper such as redis-server), its CPU per request is reported too, as
# SIDE_NAME.
run_bench() {
  local rounds=$1 duration=$2 outfile=$3; shift 3
  local conns=${CONNS:-32} hz; hz=$(getconf CLK_TCK)
  declare -A rps cpu p99 side
  for round in $(seq 1 "$rounds"); do
    for s in "$@"; do
      local listen admin top route gw t0 t1 s0 s1 out reqs r l us sus
      listen=$(free_port); admin=$(free_port)
      top="top_$s"; route="route_$s"
      bench_config "$listen" "$admin" "${!top}" "${!route}" > "$work/$s.toml"
      taskset -c 1 "$BIN" run -c "$work/$s.toml" >/dev/null 2>"$work/$s.err" & gw=$!
      wait_port "$listen"
      taskset -c 0 wrk -t1 -c"$conns" -d1s "http://127.0.0.1:$listen/" >/dev/null   # warm-up
      t0=$(cpu_ticks "$gw"); s0=$(if [ -n "${SIDE_PID:-}" ]; then cpu_ticks "$SIDE_PID"; else echo 0; fi)
      out=$(taskset -c 0 wrk -t1 -c"$conns" -d"${duration}s" --latency "http://127.0.0.1:$listen/")
      t1=$(cpu_ticks "$gw"); s1=$(if [ -n "${SIDE_PID:-}" ]; then cpu_ticks "$SIDE_PID"; else echo 0; fi)
      kill -INT "$gw"; wait "$gw" 2>/dev/null || true
      reqs=$(awk '/requests in/ {print $1}' <<<"$out")
      r=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
      l=$(awk '$1=="99%" {print $2}' <<<"$out" | to_ms)
      us=$(python3 -c "print(round(($t1-$t0)/$hz*1e6/$reqs, 1))")
      sus=$(python3 -c "print(round(($s1-$s0)/$hz*1e6/$reqs, 1))")
      rps[$s]+="$r "; cpu[$s]+="$us "; p99[$s]+="$l "; side[$s]+="$sus "
      echo "round $round $s: $r req/s, p99 ${l}ms, ${us} us CPU/request${SIDE_PID:+, ${SIDE_NAME:-helper} ${sus} us}" >&2
    done
  done
  local base; base=$(median <<<"${rps[$1]}")
  {
    local side_head="" side_rule=""
    [ -n "${SIDE_PID:-}" ] && side_head=" ${SIDE_NAME:-helper} CPU µs/request |" && side_rule="---|"
    echo "| set-up | req/s (median, min–max) | vs baseline | CPU µs/request (median, min–max) | p99 ms (median) |$side_head"
    echo "|---|---|---|---|---|$side_rule"
    for s in "$@"; do
      local m label="label_$s" side_col=""
      m=$(median <<<"${rps[$s]}")
      [ -n "${SIDE_PID:-}" ] && side_col=" $(median <<<"${side[$s]}") |"
      echo "| ${!label} | $m ($(minmax <<<"${rps[$s]}")) | $(python3 -c "print(f'{$m/$base:.3f}×')") | $(median <<<"${cpu[$s]}") ($(minmax <<<"${cpu[$s]}")) | $(median <<<"${p99[$s]}") |$side_col"
    done
    echo
    echo "$rounds interleaved rounds of ${duration}s, wrk -t1 -c$conns on core 0 with the origin (meshgate demo-upstream), meshgate 1 worker on core 1; $(nproc) cores, $(uname -r), $(date -u +%F)."
  } | tee "$outfile"
  echo "written to $outfile" >&2
}
