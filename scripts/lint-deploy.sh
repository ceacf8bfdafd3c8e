#!/usr/bin/env bash
# Lint the deployment files: the systemd unit (systemd-analyze verify, against
# the freshly built binary) and the Dockerfile (hadolint).
set -euo pipefail
cd "$(dirname "$0")/.."

bin="$PWD/target/debug/meshgate"
[ -x "$bin" ] || cargo build --locked --bin meshgate
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# verify checks that ExecStart exists: point it at the build instead of /usr/local/bin.
sed "s#/usr/local/bin/meshgate#$bin#g" systemd/meshgate.service > "$tmp/meshgate.service"
if ! out=$(systemd-analyze verify "$tmp/meshgate.service" 2>&1); then
  echo "systemd-analyze verify failed:" >&2
  echo "$out" >&2
  exit 1
fi
echo "systemd unit: ok"

hadolint docker/Dockerfile
echo "Dockerfile: ok"
