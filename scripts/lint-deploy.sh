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
# The unit's exposure, as `systemd-analyze security` rates it: at most 2.0 ("OK").
score=$(systemd-analyze security --offline=true "$tmp/meshgate.service" 2>/dev/null \
  | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
if [ -z "$score" ] || ! awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }'; then
  echo "systemd-analyze security: exposure ${score:-unknown}, above 2.0" >&2
  systemd-analyze security --offline=true "$tmp/meshgate.service" >&2 || true
  exit 1
fi
echo "systemd unit: ok (exposure $score)"

hadolint docker/Dockerfile
echo "Dockerfile: ok"

# Compose cannot run here (no Docker engine): check that it parses and that
# every file it mounts or builds from exists.
python3 - <<'PY'
import os, sys, yaml
base = "docker"
doc = yaml.safe_load(open(os.path.join(base, "compose.yaml")))
problems = []
for name, svc in doc["services"].items():
    for vol in svc.get("volumes", []):
        src = vol.split(":")[0]
        if src.startswith("."):
            if not os.path.exists(os.path.normpath(os.path.join(base, src))):
                problems.append(f"{name}: missing {src}")
    build = svc.get("build")
    if build:
        ctx = os.path.normpath(os.path.join(base, build["context"]))
        if not os.path.exists(os.path.join(ctx, build["dockerfile"])):
            problems.append(f"{name}: missing {build['dockerfile']}")
for f in ["docker/prometheus.yml", "docker/grafana/provisioning/datasources/prometheus.yaml",
          "docker/grafana/provisioning/dashboards/meshgate.yaml"]:
    yaml.safe_load(open(f))
# The demo's traces go to a service the compose file runs.
import tomllib
from urllib.parse import urlparse
tracing = tomllib.load(open("config/compose.toml", "rb")).get("telemetry", {}).get("tracing")
if not tracing:
    problems.append("config/compose.toml: no [telemetry.tracing] for the Jaeger service")
elif urlparse(tracing["endpoint"]).hostname not in doc["services"]:
    problems.append(f"config/compose.toml: tracing endpoint {tracing['endpoint']} is no compose service")
if problems:
    sys.exit("compose.yaml: " + ", ".join(problems))
print("compose.yaml: ok")
PY
