#!/usr/bin/env bash
# Local test stack for caliopen-imap: NATS, a single-node Cassandra 5.0, a
# private Dovecot 2.3 instance and an S3 server (versitygw, posix backend),
# all on 127.0.0.1, all state in one folder.
#
#   scripts/stack.sh up      install what is missing, start what is not running
#   scripts/stack.sh down    stop what `up` started
#   scripts/stack.sh status  one line per service; exit 0 if all run, 3 if not
#   scripts/stack.sh env     print the sourceable env file written by `up`
#   scripts/stack.sh stop SERVICE    stop one service (nats, cassandra, dovecot, s3)
#   scripts/stack.sh start SERVICE   start it again and wait until it answers
#                                    (used by the fault suite, scripts/faults.sh)
#   scripts/stack.sh s3-up|s3-down|s3-status
#                            the S3 server alone (tests start a private one
#                            with their own CALIOPEN_IMAP_STACK_DIR and port)
#   scripts/stack.sh s3-admin ARGS...
#                            `versitygw admin ARGS...` as the root key, for a
#                            server started with STACK_S3_ADMIN_PORT set (its
#                            users and bucket owners: keys limited to a bucket)
#
# State (configs, data, logs, pid files, TLS material) lives in
# $CALIOPEN_IMAP_STACK_DIR (default: <repo>/.stack). Downloaded Cassandra jars
# and the cqlsh virtualenv are cached per user in
# ${XDG_CACHE_HOME:-~/.cache}/caliopen-imap/cassandra-<version>/ and shared by
# every clone. The S3 server is built once from the Go module proxy into
# ${XDG_CACHE_HOME:-~/.cache}/caliopen-imap/versitygw-<version>/.
# Ports can be overridden by the STACK_*_PORT variables below.
#
# The functions live in scripts/stack/, one file per service (common.sh,
# nats.sh, cassandra.sh, tls.sh, dovecot.sh, s3.sh) and commands.sh for the
# commands above; this file holds the settings and the command line.
set -euo pipefail

# ----------------------------------------------------------------- settings

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${CALIOPEN_IMAP_STACK_DIR:-$REPO_ROOT/.stack}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)           # always absolute

HOST=127.0.0.1
NATS_PORT=${STACK_NATS_PORT:-14222}
NATS_MON_PORT=${STACK_NATS_MONITOR_PORT:-18222}
CASS_NATIVE_PORT=${STACK_CASSANDRA_PORT:-19042}
CASS_STORAGE_PORT=${STACK_CASSANDRA_STORAGE_PORT:-17000}
CASS_JMX_PORT=${STACK_CASSANDRA_JMX_PORT:-17199}
IMAPS_PORT=${STACK_IMAPS_PORT:-10993}
IMAP_PORT=${STACK_IMAP_STARTTLS_PORT:-10143}
KEYSPACE=${STACK_CASSANDRA_KEYSPACE:-caliopen}
S3_PORT=${STACK_S3_PORT:-19000}
CASS_START_TIMEOUT=${STACK_CASSANDRA_START_TIMEOUT:-180}
# Heap, seeds and replication factor of the node(s) started here; the cluster
# fault run (scripts/faults-cluster.sh, which sources this file) sets its own.
CASS_HEAP=${STACK_CASSANDRA_HEAP:-1G}
CASS_SEEDS=
CASS_EXTRA_YAML=
CASS_REPLICATION=1

# Loopback-only development credentials (the shipped config/imapworker.yaml
# uses them); override with STACK_S3_ACCESS_KEY / STACK_S3_SECRET_KEY.
S3_ACCESS_KEY=${STACK_S3_ACCESS_KEY:-caliopen-imap}
S3_SECRET_KEY=${STACK_S3_SECRET_KEY:-caliopen-imap-local-secret}
S3_BUCKET=${STACK_S3_BUCKET:-caliopen-raw-messages}
# Set: the S3 server keeps users (internal IAM in $S3_DIR/iam) and serves its
# admin API on this port (tests of keys limited to their bucket).
S3_ADMIN_PORT=${STACK_S3_ADMIN_PORT:-}

# ---------------------------------------------------------------- functions

# In this order: each file may use the settings and the files before it.
# shellcheck source=scripts/stack/common.sh
. "$REPO_ROOT/scripts/stack/common.sh"
# shellcheck source=scripts/stack/nats.sh
. "$REPO_ROOT/scripts/stack/nats.sh"
# shellcheck source=scripts/stack/cassandra.sh
. "$REPO_ROOT/scripts/stack/cassandra.sh"
# shellcheck source=scripts/stack/tls.sh
. "$REPO_ROOT/scripts/stack/tls.sh"
# shellcheck source=scripts/stack/dovecot.sh
. "$REPO_ROOT/scripts/stack/dovecot.sh"
# shellcheck source=scripts/stack/s3.sh
. "$REPO_ROOT/scripts/stack/s3.sh"
# shellcheck source=scripts/stack/commands.sh
. "$REPO_ROOT/scripts/stack/commands.sh"

# Sourced (by scripts/faults-cluster.sh): the functions only.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

case ${1:-} in
    up)     cmd_up ;;
    down)   cmd_down ;;
    status) cmd_status ;;
    env)    cmd_env ;;
    stop)   cmd_stop "${2:-}" ;;
    start)  cmd_start "${2:-}" ;;
    s3-up)     cmd_s3_up ;;
    s3-down)   cmd_s3_down ;;
    s3-status) s3_status_row ;;
    s3-admin)
        [ -n "$S3_ADMIN_PORT" ] || die "s3-admin needs STACK_S3_ADMIN_PORT (the port s3-up gave the admin API)"
        shift
        ADMIN_ACCESS_KEY="$S3_ACCESS_KEY" ADMIN_SECRET_KEY="$S3_SECRET_KEY" \
            "$S3_BIN" admin --er "http://$HOST:$S3_ADMIN_PORT" "$@" ;;
    *)      echo "usage: $0 up|down|status|env|stop SERVICE|start SERVICE|s3-up|s3-down|s3-status|s3-admin ARGS" >&2; exit 2 ;;
esac
