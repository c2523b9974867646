# caliopen-imap: build, test, demo, benchmarks.
#   make demo    the main job end to end on the local stack
#   make test    every test (brings the local stack up itself)
#   make bench   benchmarks against mbsync and the fetch/store ceilings
#   make bench-assign  live sync's assignment layer simulated: 100,000 and
#                10,000 identities, 10 workers, on the real Cassandra
#   make fuzz    cargo-fuzz targets, FUZZ_SECS each (default 300), on demand
#   make faults  the fault suite (kill -9, restarts, ...); faults-quick: small
#   make faults-cluster  3-node Cassandra (RF 3) + 3-node NATS, 2 workers and
#                2 pollers; kills a node of each and the leading poller (opt-in)
#   make soak    the whole system under mixed load and faults, SOAK_MINUTES
#                (30) on a private stack; writes SOAK.md (test runs 3 minutes)
#   make image   the container image caliopen-imap:<version> (podman or docker,
#                FROM scratch, Containerfile); deploy/compose.yaml runs it
#   make rules   promtool check/test of the Prometheus rules in deploy/prometheus

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
CARGO ?= cargo
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: all build release test unit lint demo bench bench-large bench-assign faults faults-quick faults-cluster soak \
        install uninstall stack-up stack-down stack-status clean fuzz image image-if-podman rules

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release --bins --examples

# Style and the alert rules first (cheap), an image where podman is (its
# test in tests/image.rs skips otherwise), then the quick fault scenarios
# and a 3-minute soak (on its own private stack, report in target/soak/),
# then unit and integration tests on the real stack (last, so the run
# closes on their summary).
test: lint rules image-if-podman stack-up
	bash scripts/faults.sh --quick
	SOAK_MINUTES=3 bash scripts/soak.sh --quick
	CALIOPEN_IMAP_IMAGE=$(TEST_IMAGE) $(CARGO) test --lib --test tests

unit:
	$(CARGO) test --lib

lint:
	python3 scripts/modgraph.py --check
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

demo:
	bash scripts/demo.sh

bench:
	bash scripts/bench.sh

bench-large:
	bash scripts/bench.sh --large

# Writes target/bench/live-assign.md; REST_SECS long enough to hold one read
# of the identities at 100,000 (every 500 s).
ASSIGN_REST_SECS ?= 520
bench-assign: stack-up
	CALIOPEN_IMAP_STACK_DIR=$${CALIOPEN_IMAP_STACK_DIR:-$(CURDIR)/.stack} \
		$(CARGO) run --release --example live_assign_sim -- --sizes 100000,10000 --rest $(ASSIGN_REST_SECS)

# The container image (see Containerfile and deploy/image.sh).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE ?= caliopen-imap:$(VERSION)
image:
	$(CARGO) build --release --bin caliopen-imap
	IMAGE=$(IMAGE) bash deploy/image.sh target/release/caliopen-imap

# make test's image: the same files around the debug binary the tests build
# anyway (a release build would add minutes to CI), tagged apart.
TEST_IMAGE = caliopen-imap:test
image-if-podman:
	@if command -v podman >/dev/null; then \
		$(CARGO) build --bin caliopen-imap && \
		IMAGE=$(TEST_IMAGE) bash deploy/image.sh target/debug/caliopen-imap; \
	else echo "image: podman not installed, no image built (tests/image.rs skips)"; fi

# The Prometheus rules: syntax, then their unit tests (Debian's prometheus
# package brings promtool; .ci/run installs it).
rules:
	@if ! command -v promtool >/dev/null; then \
		echo "rules: promtool not installed (apt-get install prometheus): not checked"; \
	else \
		promtool check rules deploy/prometheus/caliopen-imap.rules.yml && \
		cd deploy/prometheus && promtool test rules caliopen-imap.test.yml; \
	fi

# Fuzzers (nightly + cargo-fuzz, installed if missing): on demand, not in CI.
FUZZ_SECS ?= 300
fuzz:
	FUZZ_SECS=$(FUZZ_SECS) bash scripts/fuzz.sh

# Crash safety on the real stack; one table, exit 1 when a required zero is
# not zero. The full suite restarts the stack's services (NATS, Dovecot,
# Cassandra) mid-sync: do not run it while others use the same stack.
faults: stack-up
	bash scripts/faults.sh

faults-quick: stack-up
	bash scripts/faults.sh --quick

# Opt-in, not part of `make test`: starts its own 3-node Cassandra on
# 127.0.0.2-4 and 3-node NATS (3 x 768 MB of heap), uses the stack's Dovecot,
# stops everything it started on exit. About 5 minutes on 2 cores.
faults-cluster: stack-up
	bash scripts/faults-cluster.sh

# The whole system, long, under mixed load and faults (README, "Soak"), on
# a private stack of its own (other ports, .stack-soak/), stopped at the
# end. SOAK_MINUTES (30), SOAK_SEED, SOAK_RATE; writes SOAK.md and
# soak-latency.svg; exit 1 when a required zero is not zero.
SOAK_MINUTES ?= 30
soak:
	SOAK_MINUTES=$(SOAK_MINUTES) bash scripts/soak.sh

# The binary and its three program names.
install: release
	install -d $(DESTDIR)$(BINDIR)
	install -m 755 target/release/caliopen-imap $(DESTDIR)$(BINDIR)/caliopen-imap
	for name in imapworker imapctl idpoller; do \
		ln -sf caliopen-imap $(DESTDIR)$(BINDIR)/$$name; \
	done

uninstall:
	rm -f $(addprefix $(DESTDIR)$(BINDIR)/,caliopen-imap imapworker imapctl idpoller)

stack-up:
	bash scripts/stack.sh up

stack-down:
	bash scripts/stack.sh down

stack-status:
	bash scripts/stack.sh status

clean:
	$(CARGO) clean
