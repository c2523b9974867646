#!/usr/bin/env bash
# The fault suite (docs/faults.md): builds the binary and the harness
# (examples/faults/), gives the harness a keyspace of its own, and runs it
# against the local stack. Its table goes to stdout (and to
# target/faults/<tag>/table.md); the daemons' logs stay in that folder.
#
#   scripts/faults.sh           the full suite (3,000-message mailboxes,
#                               10 kill rounds, 10,000 payloads, and service
#                               restarts of the stack: NATS, Dovecot, Cassandra)
#   scripts/faults.sh --quick   300 messages, 2 kill rounds, 1,000 payloads,
#                               no service restart
#
# FAULTS_SEED=N replays a run (the seed is printed); FAULTS_ONLY=kill9,sigterm
# picks scenarios; more settings in the header of examples/faults/main.rs.
# Exit 1 when a number that must be zero is not.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
[ "${1:-}" = --quick ] && export FAULTS_QUICK=1

STATE=${CALIOPEN_IMAP_STACK_DIR:-$REPO_ROOT/.stack}
[ -f "$STATE/env" ] || { echo "[faults] $STATE/env missing: run scripts/stack.sh up" >&2; exit 2; }
# shellcheck source=/dev/null
. "$STATE/env"
export STACK_IMAP_PASSWORD

cargo build --bins --examples -q

# A keyspace of its own, so the suite's poller schedules only the suite's
# identities, and nothing the tests or benchmarks keep is touched.
KS=${FAULTS_KEYSPACE:-caliopen_faults}
export FAULTS_KEYSPACE=$KS
WORK=$REPO_ROOT/target/faults
mkdir -p "$WORK"
stamp=$WORK/schema-$KS.applied
sum="$KS $(sha256sum <config/schema.cql)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
    sed -E "s/\bcaliopen\./$KS./g; s/(KEYSPACE IF NOT EXISTS) caliopen\b/\1 $KS/" \
        config/schema.cql >"$WORK/schema-$KS.cql"
    "$STACK_CQLSH" --connect-timeout=20 --request-timeout=120 \
        "${STACK_CASSANDRA_HOSTS%%:*}" "${STACK_CASSANDRA_HOSTS##*:}" \
        -f "$WORK/schema-$KS.cql"
    echo "$sum" >"$stamp"
fi

exec target/debug/examples/faults
