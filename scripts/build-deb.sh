#!/usr/bin/env bash
# Build the Debian package around an already built meshgate binary:
#   scripts/build-deb.sh [PROFILE]   (release: `make deb`; dev: the test build, tests/it/deploy.rs)
# Makes the unit (with /usr/bin paths), the man page and shell completions in target/deb/,
# then runs cargo-deb without building. Prints the package's path.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-release}
CARGO=${CARGO:-cargo}
case $PROFILE in
  release) BIN=target/release/meshgate ;;
  dev) BIN=target/debug/meshgate ;;
  *) BIN=target/$PROFILE/meshgate ;;
esac
[ -x "$BIN" ] || { echo "build-deb: no $BIN (build it first)" >&2; exit 1; }
command -v cargo-deb >/dev/null 2>&1 || "$CARGO" install cargo-deb --locked --version '^3'
out=target/deb
mkdir -p "$out/scripts"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
# The date of the last commit: the same package from the same tree.
when=$(date -R -u -d "@$(git log -1 --format=%ct 2>/dev/null || date +%s)")
cat > "$out/changelog" <<CHANGES
meshgate ($version-1) unstable; urgency=medium

  * meshgate $version. What changed is in the project's history and docs/.

 -- meshgate maintainers <maintainers@meshgate.dev>  $when
CHANGES
sed 's|/usr/local/bin/meshgate|/usr/bin/meshgate|g' systemd/meshgate.service > "$out/meshgate.service"
"$BIN" man | gzip -9n > "$out/meshgate.1.gz"
"$BIN" completions bash > "$out/meshgate.bash"
"$BIN" completions zsh > "$out/_meshgate"
"$BIN" completions fish > "$out/meshgate.fish"
"$CARGO" deb -p meshgate --no-build --locked --profile "$PROFILE" -o "$out/" 2>&1 | tail -n 1
