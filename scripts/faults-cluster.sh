#!/usr/bin/env bash
# The cluster fault run (`make faults-cluster`; docs/operations.md,
# "Running on a cluster"): a 3-node Cassandra (replication factor 3) on the loopback
# aliases 127.0.0.2-4, a 3-node NATS cluster, then the fault suite's harness
# (examples/faults/, its `cluster` scenario) with 2 workers and 2 pollers
# on them, killing one Cassandra node, one NATS node and the leading poller
# while the accounts sync. Dovecot is the local stack's (never restarted).
# Everything this script starts is stopped when it ends, Ctrl-C included.
#
#   FAULTS_SEED=N                 replay a run (the seed is printed)
#   FAULTS_CLUSTER_ACCOUNTS=3     accounts synced at once
#   FAULTS_MESSAGES=1000          messages per account
#   FAULTS_CLUSTER_HEAP=768M      heap of each Cassandra node
#   FAULTS_CLUSTER_DIR=DIR        state of the cluster (<repo>/.stack/cluster);
#                                 wiped at each run
#
# Ports: CQL 19142 on each alias, storage 17100, JMX 17201-17203 (on
# 127.0.0.1), NATS clients 14322-14324, routes 16322-16324, monitoring
# 18322-18324. Exit 1 when a number that must be zero is not.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"

MAIN_STATE=${CALIOPEN_IMAP_STACK_DIR:-$REPO_ROOT/.stack}
[ -f "$MAIN_STATE/env" ] || {
    echo "[cluster] $MAIN_STATE/env missing: the local stack (its Dovecot) must be up: scripts/stack.sh up" >&2
    exit 2
}
# shellcheck source=/dev/null
. "$MAIN_STATE/env"
# The stack's own functions (Cassandra config and start, readiness, schema,
# spawn, terminate), pointed below at each node of this cluster in turn.
# shellcheck source=scripts/stack.sh
. "$REPO_ROOT/scripts/stack.sh"

say() { printf '[cluster] %s\n' "$*" >&2; }

CLUSTER=${FAULTS_CLUSTER_DIR:-$REPO_ROOT/.stack/cluster}
CASS_IPS=(127.0.0.2 127.0.0.3 127.0.0.4)
CASS_NATIVE_PORT=${FAULTS_CLUSTER_CQL_PORT:-19142}
CASS_STORAGE_PORT=17100
JMX_BASE=17201
CASS_HEAP=${FAULTS_CLUSTER_HEAP:-768M}
CASS_SEEDS=${CASS_IPS[0]}:$CASS_STORAGE_PORT
# An empty cluster: nothing to stream, so no bootstrap (and its 30 s wait).
CASS_EXTRA_YAML='auto_bootstrap: false'
CASS_REPLICATION=3
KEYSPACE=${FAULTS_CLUSTER_KEYSPACE:-caliopen_cluster}
NATS_PORTS=(14322 14323 14324)
NATS_ROUTES=(16322 16323 16324)
NATS_MONS=(18322 18323 18324)

# Point the stack's Cassandra functions at node $1 (0-based).
cass_node() {
    HOST=${CASS_IPS[$1]}
    CASS_DIR=$CLUSTER/cassandra$(($1 + 1))
    CASS_JMX_PORT=$((JMX_BASE + $1))
}

# Stop every server of this cluster still running (by its pid file, and only
# when that pid is still the server we started).
stop_all() {
    local f pid pids=()
    for f in "$CLUSTER"/cassandra*/cassandra.pid "$CLUSTER"/nats*/nats.pid; do
        [ -f "$f" ] || continue
        pid=$(read_pid "$f")
        if pid_matches "$pid" CassandraDaemon || pid_matches "$pid" nats-server; then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
    done
    for pid in "${pids[@]}"; do terminate "$pid" 40; done
}

on_exit() {
    local rc=$?
    trap - EXIT INT TERM
    [ ${#pids_started[@]} -eq 0 ] || say "stopping the cluster"
    stop_all
    exit "$rc"
}
pids_started=()
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

t0=$SECONDS
cargo build --bins --examples -q

# A fresh cluster each run (a leftover of an interrupted run is stopped first).
stop_all
rm -rf "$CLUSTER"
mkdir -p "$CLUSTER"

# --------------------------------------------------------------- NATS x 3
for i in 0 1 2; do
    dir=$CLUSTER/nats$((i + 1))
    mkdir -p "$dir"
    routes=()
    for j in 0 1 2; do
        [ "$j" = "$i" ] || routes+=("nats://127.0.0.1:${NATS_ROUTES[$j]}")
    done
    HOST=127.0.0.1 require_free_ports "${NATS_PORTS[$i]}" "${NATS_ROUTES[$i]}" "${NATS_MONS[$i]}"
    spawn "$dir/nats.pid" "$dir/stdout.log" \
        nats-server -a 127.0.0.1 -p "${NATS_PORTS[$i]}" -m "${NATS_MONS[$i]}" \
        --cluster_name caliopen-faults --cluster "nats://127.0.0.1:${NATS_ROUTES[$i]}" \
        --routes "$(IFS=,; echo "${routes[*]}")" -P "$dir/nats.pid" -l "$dir/nats.log"
    pids_started+=("nats$((i + 1))")
done
for i in 0 1 2; do
    for _ in $(seq 200); do
        curl -fsS -m 2 "http://127.0.0.1:${NATS_MONS[$i]}/routez" 2>/dev/null |
            grep -q '"num_routes": 2' && continue 2
        sleep 0.1
    done
    die "NATS node $((i + 1)) did not join the cluster, see $CLUSTER/nats$((i + 1))/nats.log"
done
say "NATS: 3 nodes clustered ($((SECONDS - t0)) s)"

# ----------------------------------------------------------- Cassandra x 3
# One after another: each waits for the one before to answer (2 shared cores).
for i in 0 1 2; do
    cass_node "$i"
    t=$SECONDS
    cass_start
    pids_started+=("cassandra$((i + 1))")
    cass_wait_ready
    say "Cassandra node $((i + 1)) ($HOST) up in $((SECONDS - t)) s, heap $CASS_HEAP"
done
cass_node 0
for _ in $(seq 120); do
    n=$(cqlsh -e "SELECT peer FROM system.peers" 2>/dev/null | grep -c '127\.0\.0\.[34]' || true)
    [ "$n" = 2 ] && break
    sleep 1
done
[ "$n" = 2 ] || die "node 1 does not see both other nodes (system.peers)"
CASS_DIR=$CLUSTER
mkdir -p "$CASS_DIR/logs"
cass_apply_schema
say "schema applied: keyspace $KEYSPACE, replication factor $CASS_REPLICATION ($((SECONDS - t0)) s)"

# ------------------------------------------------------------- the harness
nats_url=
for p in "${NATS_PORTS[@]}"; do nats_url+=${nats_url:+,}nats://127.0.0.1:$p; done
hosts=
for ip in "${CASS_IPS[@]}"; do hosts+=${hosts:+,}$ip:$CASS_NATIVE_PORT; done
cass_pids=
for i in 1 2 3; do cass_pids+=${cass_pids:+,}$CLUSTER/cassandra$i/cassandra.pid; done
nats_pids=
for i in 1 2 3; do nats_pids+=${nats_pids:+,}$CLUSTER/nats$i/nats.pid; done

rc=0
STACK_NATS_URL=$nats_url STACK_CASSANDRA_HOSTS=$hosts STACK_IMAP_PASSWORD=$STACK_IMAP_PASSWORD \
    FAULTS_CLUSTER=1 FAULTS_KEYSPACE=$KEYSPACE FAULTS_CONSISTENCY=4 \
    FAULTS_CLUSTER_CASS_PIDS=$cass_pids FAULTS_CLUSTER_NATS_PIDS=$nats_pids \
    FAULTS_CLUSTER_HEAP=$CASS_HEAP \
    target/debug/examples/faults || rc=$?
say "wall time $((SECONDS - t0)) s (cluster start included)"
exit "$rc"
