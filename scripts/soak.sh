#!/usr/bin/env bash
# The soak (README, "Soak"): the whole system, long, under mixed load and
# faults. Starts a private stack (it restarts NATS, Cassandra, Dovecot and
# S3, so never the shared one), forgets earlier runs' identities, builds,
# and runs the harness (examples/soak/), which writes SOAK.md and
# soak-latency.svg.
#
#   scripts/soak.sh           SOAK_MINUTES (30) of load, release build
#   scripts/soak.sh --quick   fewer identities, a lower rate, debug build,
#                             report in target/soak/ (make test runs it
#                             with SOAK_MINUTES=3)
#
# SOAK_SEED=N replays a schedule; more settings in examples/soak/main.rs.
# The private stack is stopped at the end unless SOAK_KEEP_STACK=1.
# Exit 1 when a required zero is not zero.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
PROFILE=release
if [ "${1:-}" = --quick ]; then export SOAK_QUICK=1; PROFILE=debug; fi
PROFILE=${SOAK_PROFILE:-$PROFILE}

export CALIOPEN_IMAP_STACK_DIR=${SOAK_STACK_DIR:-$REPO_ROOT/.stack-soak}
export STACK_NATS_PORT=24222 STACK_NATS_MONITOR_PORT=28222 \
    STACK_CASSANDRA_PORT=29042 STACK_CASSANDRA_STORAGE_PORT=27000 \
    STACK_CASSANDRA_JMX_PORT=27199 STACK_IMAPS_PORT=20993 \
    STACK_IMAP_STARTTLS_PORT=20143 STACK_S3_PORT=29000 \
    STACK_CASSANDRA_HEAP=${STACK_CASSANDRA_HEAP:-768M}
# Stopped however the run ends (Ctrl-C, a failed build) unless kept.
[ "${SOAK_KEEP_STACK:-0}" = 1 ] || trap 'bash scripts/stack.sh down' EXIT
bash scripts/stack.sh up
# shellcheck source=/dev/null
. "$CALIOPEN_IMAP_STACK_DIR/env"
# No identity of an earlier run: the poller would schedule it and `status
# --all` list it (every other row hangs off an identity's own ids).
"$STACK_CQLSH" --request-timeout=120 127.0.0.1 "$STACK_CASSANDRA_PORT" \
    -e "TRUNCATE $STACK_CASSANDRA_KEYSPACE.user_identity"

if [ "$PROFILE" = release ]; then
    cargo build --release --bins --example soak -q
else
    cargo build --bins --example soak -q
fi
export CALIOPEN_IMAP_BIN=$REPO_ROOT/target/$PROFILE/caliopen-imap
rc=0
"target/$PROFILE/examples/soak" || rc=$?
exit $rc
