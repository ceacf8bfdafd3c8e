#!/usr/bin/env bash
# `make test`: install what the tests need, lint, build once, lint the
# deployment files against that build, run every test; then how long each
# phase took. Tests run several at a time: most of their time is waiting
# on sockets and timers, not CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
TEST_THREADS=${TEST_THREADS:-8}

times=()
phase() {
  local name=$1 start=$SECONDS
  shift
  echo "== $name"
  "$@"
  times+=("$(printf '%-8s %4ss' "$name" $((SECONDS - start)))")
}

phase install make --no-print-directory test-deps
phase lint make --no-print-directory lint-code
# One build of the stack serves the tests and the deployment lint (the
# binary the tests run is the one systemd-analyze verifies).
phase build "$CARGO" test --workspace --locked --no-run
phase deploy scripts/lint-deploy.sh
phase test "$CARGO" test --workspace --locked -- --test-threads "$TEST_THREADS"
# The integration suite again on Pingora's HTTP/1.1 driver
# (gateway.http1_engine = "pingora"; the first pass ran on the default, the
# fast lane): every behaviour the same on both drivers.
phase pingora-h1 env MESHGATE_TEST_HTTP1_ENGINE=pingora \
  "$CARGO" test --locked -p meshgate --test it -- --test-threads "$TEST_THREADS"

echo "== make test: phases"
printf '   %s\n' "${times[@]}"
echo "   total    ${SECONDS}s"
