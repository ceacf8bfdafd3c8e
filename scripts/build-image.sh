#!/usr/bin/env bash
# Build the runtime image (docker/Dockerfile's `runtime` stage) around a
# meshgate binary built on this host, with podman: no Docker engine, no
# compiler image. `make image` runs it with the release binary.
#
#   scripts/build-image.sh [BINARY] [TAG]    (default: target/release/meshgate meshgate:latest)
#
# The stage is taken from docker/Dockerfile as it is, its one COPY from the
# build stage pointed at BINARY instead, so the two images cannot drift. The
# base image (debian:bookworm-slim) is used if podman has it; else pulled;
# where no registry is reachable, made with debootstrap (Debian's minbase,
# the same release) and imported under that name.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/meshgate}
tag=${2:-meshgate:latest}
base=debian:bookworm-slim

[ -x "$bin" ] || { echo "no binary at $bin (cargo build --release first)" >&2; exit 1; }
command -v podman >/dev/null || { echo "needs podman (Debian: podman)" >&2; exit 1; }

if ! podman image exists "$base"; then
  if ! timeout 60 podman pull --quiet "docker.io/library/$base" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { echo "no registry for $base, and no debootstrap to make it (Debian: debootstrap)" >&2; exit 1; }
    echo "making $base with debootstrap (no registry reachable)"
    root=$(mktemp -d)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
    tar -C "$root" -c . | podman import - "$base" >/dev/null
    rm -rf "$root"
    trap - EXIT
  fi
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
# The runtime stage, from its FROM line to the end of the file.
awk '/^FROM .* AS runtime/ { on = 1 } on' docker/Dockerfile \
  | sed 's#^COPY --from=build [^ ]* #COPY meshgate #' > "$ctx/Containerfile"
grep -q '^COPY meshgate ' "$ctx/Containerfile" \
  || { echo "docker/Dockerfile: no runtime stage with a COPY --from=build of the binary" >&2; exit 1; }
cp "$bin" "$ctx/meshgate"
mkdir -p "$ctx/docker"
cp docker/entrypoint.sh docker/gateway.toml "$ctx/docker/"
# --format docker keeps HEALTHCHECK (the OCI format has none).
podman build --quiet --isolation=chroot --format docker -t "$tag" -f "$ctx/Containerfile" "$ctx"
echo "built $tag"
