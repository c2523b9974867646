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

CASS_VERSION=5.0.8
HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/caliopen-imap/cassandra-$CASS_VERSION
CASS_LIB=$CACHE_DIR/lib
CQLSH_VENV=$CACHE_DIR/cqlsh-venv
CQLSH=$CQLSH_VENV/bin/cqlsh

# S3: versitygw, a maintained S3 gateway (Apache-2.0) whose posix backend
# keeps objects as plain files. Built from the Go module proxy, cached per user.
S3_VERSION=v1.8.0
S3_CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/caliopen-imap/versitygw-$S3_VERSION
S3_BIN=$S3_CACHE_DIR/bin/versitygw
# Python's `minio` client, the one Caliopen's reader uses: tests read objects
# back through it.
S3_PY_VENV=$S3_CACHE_DIR/minio-venv
S3_PYTHON=$S3_PY_VENV/bin/python
S3_PY_MINIO_VERSION=7.2.20
# Loopback-only development credentials (the shipped config/imapworker.yaml
# uses them); override with STACK_S3_ACCESS_KEY / STACK_S3_SECRET_KEY.
S3_ACCESS_KEY=${STACK_S3_ACCESS_KEY:-caliopen-imap}
S3_SECRET_KEY=${STACK_S3_SECRET_KEY:-caliopen-imap-local-secret}
S3_BUCKET=${STACK_S3_BUCKET:-caliopen-raw-messages}
S3_REGION=us-east-1
# Set: the S3 server keeps users (internal IAM in $S3_DIR/iam) and serves its
# admin API on this port (tests of keys limited to their bucket).
S3_ADMIN_PORT=${STACK_S3_ADMIN_PORT:-}
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855

# Debian's JDK 17, explicitly: Cassandra 5.0 does not run on JDK 24+ (another
# JDK, Temurin 25, is installed on the build machines too).
JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64
JAVA=$JAVA_HOME/bin/java

APT_PACKAGES=(nats-server dovecot-imapd dovecot-core openjdk-17-jre-headless
              maven python3-venv openssl curl)

NATS_DIR=$STATE/nats
CASS_DIR=$STATE/cassandra
DOVE_DIR=$STATE/dovecot
S3_DIR=$STATE/s3
TLS_DIR=$STATE/tls
LOG_DIR=$STATE/logs                   # logs of install steps
DOVE_CONF=$DOVE_DIR/dovecot.conf
DOVE_PID=$DOVE_DIR/run/master.pid     # written by dovecot itself (base_dir)
DOVE_PASSWORD_FILE=$DOVE_DIR/password
ENV_FILE=$STATE/env
SCHEMA=$REPO_ROOT/config/schema.cql

# ------------------------------------------------------------------ helpers

log()  { printf '[stack] %s\n' "$*" >&2; }
die()  { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

# Run as root, or through sudo when we are not root.
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Is a TCP port on 127.0.0.1 accepting connections?
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# pid from a pid file, if the file exists and holds a number.
read_pid() { if [ -s "$1" ]; then tr -dc '0-9' <"$1"; fi; }

# Is pid $1 alive and is its command line containing $2? (Guards against a
# stale pid file whose number was reused by something else.)
pid_matches() {
    local pid=$1 pattern=$2 cmd
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmd == *"$pattern"* ]]
}

# Shell snippet that runs a command in its own session with no inherited
# file descriptor but 0-2 (so no lock, pipe or make jobserver fd of ours stays
# open in a server), after writing its pid to the file named by $0 (unless
# $0 is "-"). usage: setsid bash -c "$DETACH" PIDFILE|- CMD...
# shellcheck disable=SC2016  # expanded by the inner bash, not here
DETACH='
    for fd in /proc/$$/fd/*; do
        fd=${fd##*/}; [ "$fd" -gt 2 ] && eval "exec $fd>&-"
    done
    [ "$0" = - ] || echo $$ >"$0"
    exec "$@"'

# Start a server in the background, detached, output to a log file, and wait
# until its pid file exists. usage: spawn PIDFILE LOGFILE CMD...
# (A simple command, not a function, goes to the background so that no
# subshell of this script lingers as the server's parent.)
spawn() {
    local pidfile=$1 logfile=$2; shift 2
    setsid bash -c "$DETACH" "$pidfile" "$@" </dev/null >>"$logfile" 2>&1 8>&- 9>&- &
    local i; for i in $(seq 50); do [ -s "$pidfile" ] && return 0; sleep 0.1; done
    die "could not start $*"
}

# Fail early and clearly when a port we need is taken by someone else (for
# example the stack of another clone of this repository).
require_free_ports() {
    local port
    for port in "$@"; do
        port_open "$port" &&
            die "port $HOST:$port is already in use (another clone's stack? run its scripts/stack.sh down)"
    done
    return 0
}

# SIGTERM a pid, wait up to $2 seconds, then SIGKILL.
terminate() {
    local pid=$1 timeout=$2 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < timeout * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid still alive after ${timeout}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.2
}

# --------------------------------------------------------------- installing

install_apt_packages() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = "install ok installed" ] ||
            missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing Debian packages: ${missing[*]} (log: $LOG_DIR/apt.log)"
    # Lock timeout: another apt run may be in progress on this machine.
    as_root apt-get -o DPkg::Lock::Timeout=600 update -q >>"$LOG_DIR/apt.log" 2>&1 ||
        die "apt-get update failed, see $LOG_DIR/apt.log"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
        install -y -q --no-install-recommends "${missing[@]}" >>"$LOG_DIR/apt.log" 2>&1 ||
        die "apt-get install failed, see $LOG_DIR/apt.log"
}

# Cassandra jars with their runtime dependencies from Maven Central, fetched
# once per user through a throwaway pom, then reused by every clone.
install_cassandra_jars() {
    [ -f "$CACHE_DIR/.jars-complete" ] && return 0
    log "downloading Cassandra $CASS_VERSION jars to $CASS_LIB (log: $LOG_DIR/maven.log)"
    local work; work=$(mktemp -d "$CACHE_DIR/.fetch.XXXXXX")
    cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.caliopen-imap</groupId>
  <artifactId>cassandra-jars</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>$CASS_VERSION</version>
    </dependency>
  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>3.6.1</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
EOF
    (cd "$work" && JAVA_HOME=$JAVA_HOME mvn -B -q dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$work/lib") >>"$LOG_DIR/maven.log" 2>&1 ||
        { rm -rf "$work"; die "maven failed, see $LOG_DIR/maven.log"; }
    rm -rf "$CASS_LIB"
    mv "$work/lib" "$CASS_LIB"
    rm -rf "$work"
    touch "$CACHE_DIR/.jars-complete"
}

# cqlsh (PyPI) in a virtualenv next to the jars; used to probe and to apply
# the schema, and exported to the tests as STACK_CQLSH.
install_cqlsh() {
    [ -x "$CQLSH" ] && [ -f "$CACHE_DIR/.cqlsh-complete" ] && return 0
    log "installing cqlsh into $CQLSH_VENV (log: $LOG_DIR/pip.log)"
    rm -rf "$CQLSH_VENV"
    {
        /usr/bin/python3 -m venv "$CQLSH_VENV" &&
        "$CQLSH_VENV/bin/pip" install -q --disable-pip-version-check cqlsh &&
        "$CQLSH" --version
    } >>"$LOG_DIR/pip.log" 2>&1 || die "cqlsh install failed, see $LOG_DIR/pip.log"
    touch "$CACHE_DIR/.cqlsh-complete"
}

# versitygw from the Go module proxy, built once per user (about 4.3 CPU-minutes,
# see README); only the binary is kept, the module and build caches are
# thrown away.
install_s3() {
    [ -x "$S3_BIN" ] && [ -f "$S3_CACHE_DIR/.complete" ] && return 0
    local go; go=$(command -v go || echo /usr/local/go/bin/go)
    [ -x "$go" ] || die "Go (1.24 or later) is needed to build the S3 server versitygw; install it from https://go.dev/dl/"
    mkdir -p "$S3_CACHE_DIR" "$LOG_DIR"
    local work; work=$(mktemp -d "$S3_CACHE_DIR/.build.XXXXXX")
    log "building versitygw $S3_VERSION from the Go module proxy (once; log: $LOG_DIR/s3-build.log)"
    if ! env GOPATH="$work/gopath" GOCACHE="$work/cache" GOBIN="$work/bin" GOFLAGS=-mod=mod \
            "$go" install -trimpath -ldflags='-s -w' \
            "github.com/versity/versitygw/cmd/versitygw@$S3_VERSION" >>"$LOG_DIR/s3-build.log" 2>&1; then
        chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"
        die "building versitygw failed, see $LOG_DIR/s3-build.log"
    fi
    mkdir -p "$S3_CACHE_DIR/bin"
    mv "$work/bin/versitygw" "$S3_BIN"
    chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"
    touch "$S3_CACHE_DIR/.complete"
}

install_all() {
    install_apt_packages
    [ -x "$JAVA" ] || die "JDK 17 not found at $JAVA_HOME"
    mkdir -p "$CACHE_DIR"
    # One installer at a time per user cache (several clones may run `up`).
    (
        flock -w 1800 9 || die "timed out waiting for the cache lock $CACHE_DIR/.lock"
        install_cassandra_jars
        install_cqlsh
    ) 9>"$CACHE_DIR/.lock"
    s3_install_locked
}

install_s3_python() {
    [ -x "$S3_PYTHON" ] && [ -f "$S3_CACHE_DIR/.minio-py-complete" ] && return 0
    mkdir -p "$LOG_DIR"
    log "installing Python's minio client into $S3_PY_VENV (log: $LOG_DIR/pip.log)"
    rm -rf "$S3_PY_VENV"
    {
        /usr/bin/python3 -m venv "$S3_PY_VENV" &&
        "$S3_PY_VENV/bin/pip" install -q --disable-pip-version-check "minio==$S3_PY_MINIO_VERSION" &&
        "$S3_PYTHON" -c 'import minio'
    } >>"$LOG_DIR/pip.log" 2>&1 || die "minio (Python) install failed, see $LOG_DIR/pip.log"
    touch "$S3_CACHE_DIR/.minio-py-complete"
}

s3_install_locked() {
    mkdir -p "$S3_CACHE_DIR"
    (
        flock -w 1800 9 || die "timed out waiting for the cache lock $S3_CACHE_DIR/.lock"
        install_s3
        install_s3_python
    ) 9>"$S3_CACHE_DIR/.lock"
}

# ------------------------------------------------------------------- NATS

nats_pid()     { read_pid "$NATS_DIR/nats.pid"; }
nats_running() { pid_matches "$(nats_pid)" nats-server; }
nats_ready()   { curl -fsS -m 2 "http://$HOST:$NATS_MON_PORT/healthz" >/dev/null 2>&1; }

nats_start() {
    require_free_ports "$NATS_PORT" "$NATS_MON_PORT"
    mkdir -p "$NATS_DIR"
    rm -f "$NATS_DIR/nats.pid"
    spawn "$NATS_DIR/nats.pid" "$NATS_DIR/stdout.log" \
        nats-server -a "$HOST" -p "$NATS_PORT" -m "$NATS_MON_PORT" \
        -P "$NATS_DIR/nats.pid" -l "$NATS_DIR/nats.log"
    local i
    for i in $(seq 100); do
        nats_ready && return 0
        nats_running || break
        sleep 0.1
    done
    tail -n 20 "$NATS_DIR/nats.log" "$NATS_DIR/stdout.log" >&2 2>/dev/null || true
    die "NATS did not start, see $NATS_DIR/nats.log"
}

# --------------------------------------------------------------- Cassandra

cass_pid()     { read_pid "$CASS_DIR/cassandra.pid"; }
cass_running() { pid_matches "$(cass_pid)" CassandraDaemon; }
# The native port opens last, once the node is fully up.
cass_ready()   { port_open "$CASS_NATIVE_PORT"; }
cqlsh()        { "$CQLSH" --connect-timeout=10 --request-timeout=60 "$HOST" "$CASS_NATIVE_PORT" "$@"; }

cass_write_config() {
    mkdir -p "$CASS_DIR/conf" "$CASS_DIR/data" "$CASS_DIR/logs" "$CASS_DIR/tmp"
    # Cassandra 5.0 key names only: an unknown key stops the node.
    cat >"$CASS_DIR/conf/cassandra.yaml" <<EOF
# Generated by scripts/stack.sh: single test node on loopback.
cluster_name: caliopen-imap-test
num_tokens: 1
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "${CASS_SEEDS:-$HOST:$CASS_STORAGE_PORT}"
listen_address: $HOST
rpc_address: $HOST
storage_port: $CASS_STORAGE_PORT
native_transport_port: $CASS_NATIVE_PORT
start_native_transport: true
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
storage_compatibility_mode: NONE

data_file_directories:
  - $CASS_DIR/data/data
commitlog_directory: $CASS_DIR/data/commitlog
saved_caches_directory: $CASS_DIR/data/saved_caches
hints_directory: $CASS_DIR/data/hints
cdc_raw_directory: $CASS_DIR/data/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms

# Small test box: small memtables and caches, one compactor, no snapshots on
# TRUNCATE/DROP (tests clean tables often), roomier timeouts for slow CI.
memtable_heap_space: 128MiB
memtable_offheap_space: 128MiB
file_cache_size: 64MiB
key_cache_size: 16MiB
concurrent_compactors: 1
auto_snapshot: false
hinted_handoff_enabled: false
read_request_timeout: 10000ms
range_request_timeout: 20000ms
write_request_timeout: 10000ms
counter_write_request_timeout: 10000ms
cas_contention_timeout: 5000ms
truncate_request_timeout: 60000ms
request_timeout: 20000ms
${CASS_EXTRA_YAML:-}
EOF
    cat >"$CASS_DIR/conf/logback.xml" <<EOF
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>$CASS_DIR/logs/system.log</file>
    <encoder>
      <pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern>
    </encoder>
  </appender>
  <logger name="org.apache.cassandra" level="INFO"/>
  <logger name="com.thinkaurelius.thrift" level="ERROR"/>
  <root level="INFO">
    <appender-ref ref="FILE"/>
  </root>
</configuration>
EOF
}

cass_start() {
    require_free_ports "$CASS_NATIVE_PORT" "$CASS_STORAGE_PORT" "$CASS_JMX_PORT"
    cass_write_config
    rm -f "$CASS_DIR/cassandra.pid"
    local jamm=("$CASS_LIB"/jamm-*.jar)
    [ -f "${jamm[0]}" ] || die "jamm jar missing in $CASS_LIB"
    local opts=(
        "-Xms$CASS_HEAP" "-Xmx$CASS_HEAP" -Xss256k
        -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1
        -XX:G1HeapRegionSize=16m -XX:MaxGCPauseMillis=300
        -XX:+UseThreadPriorities -XX:+PerfDisableSharedMem -XX:+ExitOnOutOfMemoryError
        -XX:ErrorFile="$CASS_DIR/logs/hs_err_%p.log"
        -ea -da:net.openhft...
        "-javaagent:${jamm[0]}"
        # JPMS: what conf/jvm17-server.options of cassandra-5.0 lists
        -Djdk.attach.allowAttachSelf=true
        --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
        --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
        --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
        --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
        --add-exports java.sql/java.sql=ALL-UNNAMED
        --add-exports java.base/java.lang.ref=ALL-UNNAMED
        --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
        --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
        --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
        --add-opens java.base/java.lang.module=ALL-UNNAMED
        --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
        --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
        --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
        --add-opens java.base/jdk.internal.math=ALL-UNNAMED
        --add-opens java.base/jdk.internal.module=ALL-UNNAMED
        --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
        --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
        --add-opens java.base/sun.nio.ch=ALL-UNNAMED
        --add-opens java.base/java.io=ALL-UNNAMED
        --add-opens java.base/java.lang.reflect=ALL-UNNAMED
        --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
        --add-opens java.base/java.lang=ALL-UNNAMED
        --add-opens java.base/java.util=ALL-UNNAMED
        --add-opens java.base/java.nio=ALL-UNNAMED
        --add-opens java.base/java.util.concurrent=ALL-UNNAMED
        --add-opens java.base/java.util.concurrent.atomic=ALL-UNNAMED
        --add-opens java.base/java.math=ALL-UNNAMED
        --add-opens java.base/java.net=ALL-UNNAMED
        -Dio.netty.tryReflectionSetAccessible=true
        -Dio.netty.allocator.useCacheForAllThreads=true
        -Dio.netty.allocator.maxOrder=11
        -Djava.net.preferIPv4Stack=true
        # where things are
        "-Dcassandra.config=file://$CASS_DIR/conf/cassandra.yaml"
        "-Dlogback.configurationFile=$CASS_DIR/conf/logback.xml"
        "-Dcassandra.storagedir=$CASS_DIR/data"
        "-Dcassandra.logdir=$CASS_DIR/logs"
        "-Dcassandra-pidfile=$CASS_DIR/cassandra.pid"
        "-Djava.io.tmpdir=$CASS_DIR/tmp"
        "-Djna.tmpdir=$CASS_DIR/tmp"
        -Dcassandra-foreground=yes
        "-Dcassandra.jmx.local.port=$CASS_JMX_PORT"
        # single node: do not wait for gossip, at start nor at shutdown
        -Dcassandra.skip_wait_for_gossip_to_settle=0
        -Dcassandra.shutdown_announce_in_ms=0
    )
    log "starting Cassandra (log: $CASS_DIR/logs/system.log)"
    spawn "$CASS_DIR/cassandra.pid" "$CASS_DIR/logs/stdout.log" \
        "$JAVA" "${opts[@]}" -cp "$CASS_DIR/conf:$CASS_LIB/*" \
        org.apache.cassandra.service.CassandraDaemon
}

# Wait for the native port, then for a real query through cqlsh.
cass_wait_ready() {
    local deadline=$((SECONDS + CASS_START_TIMEOUT))
    while [ $SECONDS -lt $deadline ]; do
        if ! cass_running; then
            tail -n 30 "$CASS_DIR/logs/stdout.log" >&2 2>/dev/null || true
            die "Cassandra exited during start; logs: $CASS_DIR/logs/system.log and $CASS_DIR/logs/stdout.log"
        fi
        if cass_ready &&
            cqlsh -e "SELECT release_version FROM system.local" >/dev/null 2>&1; then
            return 0
        fi
        sleep 1
    done
    die "Cassandra not ready after ${CASS_START_TIMEOUT}s; logs: $CASS_DIR/logs/system.log and $CASS_DIR/logs/stdout.log"
}

# Apply config/schema.cql (idempotent: IF NOT EXISTS everywhere) whenever it
# changed since the last time, under the configured keyspace name.
cass_apply_schema() {
    [ -f "$SCHEMA" ] || { log "no $SCHEMA: schema not applied"; return 0; }
    local sum stamp=$CASS_DIR/schema.applied
    sum="$KEYSPACE $(sha256sum <"$SCHEMA")"
    [ "$CASS_REPLICATION" = 1 ] || sum="rf$CASS_REPLICATION $sum"
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ] && return 0
    local cql=$CASS_DIR/schema.cql
    if [ "$KEYSPACE" = caliopen ] && [ "$CASS_REPLICATION" = 1 ]; then
        cp "$SCHEMA" "$cql"
    else
        sed -E "s/\bcaliopen\./$KEYSPACE./g; s/(KEYSPACE IF NOT EXISTS) caliopen\b/\1 $KEYSPACE/;
                s/('replication_factor': )1\b/\1$CASS_REPLICATION/" \
            "$SCHEMA" >"$cql"
    fi
    log "applying $SCHEMA (keyspace $KEYSPACE)"
    cqlsh -f "$cql" >"$CASS_DIR/logs/schema.log" 2>&1 ||
        { cat "$CASS_DIR/logs/schema.log" >&2; die "applying the schema failed"; }
    echo "$sum" >"$stamp"
}

# ------------------------------------------------------------------ Dovecot

dove_running() { pid_matches "$(read_pid "$DOVE_PID")" dovecot; }
# Ready when the IMAPS port is open and the plain port greets like an IMAP
# server.
dove_ready() {
    port_open "$IMAPS_PORT" || return 1
    local greeting
    greeting=$( (exec 3<>"/dev/tcp/$HOST/$IMAP_PORT" && IFS= read -r -t 3 l <&3 &&
                 printf '%s' "$l") 2>/dev/null ) || return 1
    [[ $greeting == "* OK"* ]]
}

# A small CA and a server certificate signed by it, made once. (rustls
# refuses a self-signed CA certificate as the server's own certificate.)
tls_generate() {
    [ -s "$TLS_DIR/server.pem" ] && [ -s "$TLS_DIR/server.key" ] && [ -s "$TLS_DIR/ca.pem" ] &&
        return 0
    log "generating the test CA and server certificate in $TLS_DIR"
    mkdir -p "$TLS_DIR"
    (
        cd "$TLS_DIR"
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -sha256 \
            -keyout ca.key -out ca.pem -subj "/CN=caliopen-imap test CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign"
        openssl req -new -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
            -subj "/CN=localhost"
        printf '%s\n' \
            "basicConstraints=critical,CA:FALSE" \
            "keyUsage=critical,digitalSignature,keyEncipherment" \
            "extendedKeyUsage=serverAuth" \
            "subjectAltName=IP:127.0.0.1,DNS:localhost" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -set_serial "0x$(openssl rand -hex 8)" \
            -days 3650 -sha256 -extfile server.ext -out server.pem
        rm -f server.csr server.ext
        chmod 600 ca.key server.key
    ) >"$LOG_DIR/tls.log" 2>&1 || die "certificate generation failed, see $LOG_DIR/tls.log"
}

dove_write_config() {
    mkdir -p "$DOVE_DIR/run" "$DOVE_DIR/lib" "$DOVE_DIR/mail"
    # Mail processes run as user `mail`: it must be able to reach its folder.
    chmod 755 "$STATE" "$DOVE_DIR"
    chown mail:mail "$DOVE_DIR/mail"
    # A clone under a private folder (such as /root) is out of reach of the
    # `mail` user: keep the mailboxes in a folder of their own under /var/tmp.
    local mail_dir=$DOVE_DIR/mail
    if command -v runuser >/dev/null && ! runuser -u mail -- test -x "$DOVE_DIR/mail"; then
        mail_dir=/var/tmp/caliopen-imap-mail-$(printf '%s' "$STATE" | sha1sum | cut -c1-12)
        mkdir -p "$mail_dir"
        chmod 755 "$mail_dir"
        chown mail:mail "$mail_dir"
        runuser -u mail -- test -x "$mail_dir" ||
            die "user 'mail' cannot reach $DOVE_DIR/mail nor $mail_dir"
        log "mail user cannot reach $DOVE_DIR/mail: mailboxes kept in $mail_dir"
    fi
    [ -s "$DOVE_PASSWORD_FILE" ] ||
        ( umask 077; printf '%s\n' "${STACK_IMAP_PASSWORD:-caliopen-test-password}" >"$DOVE_PASSWORD_FILE" )
    local password; password=$(head -n 1 "$DOVE_PASSWORD_FILE")
    local dh=; [ -f /usr/share/dovecot/dh.pem ] && dh="ssl_dh = </usr/share/dovecot/dh.pem"
    cat >"$DOVE_CONF" <<EOF
# Generated by scripts/stack.sh: private Dovecot for tests and benchmarks.
instance_name = caliopen-imap-stack
base_dir = $DOVE_DIR/run
state_dir = $DOVE_DIR/lib
log_path = $DOVE_DIR/dovecot.log
protocols = imap
listen = $HOST

ssl = yes
ssl_cert = <$TLS_DIR/server.pem
ssl_key = <$TLS_DIR/server.key
ssl_min_protocol = TLSv1.2
$dh
# LOGIN/AUTHENTICATE only over TLS (IMAPS, or after STARTTLS).
disable_plaintext_auth = yes
auth_mechanisms = plain login

# Every user name logs in with the same password; each gets its own Maildir.
passdb {
  driver = static
  args = password=$password
}
userdb {
  driver = static
  args = uid=mail gid=mail home=$mail_dir/%u
}
first_valid_uid = 8
mail_uid = mail
mail_gid = mail
mail_location = maildir:$mail_dir/%u
mail_fsync = never

namespace inbox {
  inbox = yes
  mailbox Sent {
    special_use = \\Sent
    auto = subscribe
  }
  mailbox Drafts {
    special_use = \\Drafts
    auto = subscribe
  }
  mailbox Trash {
    special_use = \\Trash
    auto = subscribe
  }
  mailbox Junk {
    special_use = \\Junk
    auto = subscribe
  }
}

# Room for hundreds of concurrent sessions (tests, benchmarks).
default_process_limit = 1024
default_client_limit = 4096
protocol imap {
  mail_max_userip_connections = 1000
}
service imap-login {
  inet_listener imap {
    address = $HOST
    port = $IMAP_PORT
  }
  inet_listener imaps {
    address = $HOST
    port = $IMAPS_PORT
    ssl = yes
  }
  # high-performance mode: a few long-lived login processes proxy all TLS
  service_count = 0
  process_min_avail = 4
  client_limit = 2048
}
# One process per IMAP session: the bench holds 1,000 in IDLE at once
# (scripts/bench.sh, live sync) while tests may run beside it.
service imap {
  process_limit = 2048
}
service anvil {
  client_limit = 4096
}
service auth {
  client_limit = 4096
}
EOF
}

dove_start() {
    require_free_ports "$IMAPS_PORT" "$IMAP_PORT"
    tls_generate
    dove_write_config
    log "starting Dovecot (log: $DOVE_DIR/dovecot.log)"
    setsid bash -c "$DETACH" - dovecot -c "$DOVE_CONF" >>"$DOVE_DIR/stdout.log" 2>&1 </dev/null ||
        { tail -n 20 "$DOVE_DIR/stdout.log" "$DOVE_DIR/dovecot.log" >&2 2>/dev/null || true
          die "Dovecot did not start, see $DOVE_DIR/dovecot.log"; }
    local i
    for i in $(seq 100); do
        dove_ready && break
        sleep 0.1
    done
    dove_ready || die "Dovecot does not answer on $HOST:$IMAP_PORT, see $DOVE_DIR/dovecot.log"
    # Full check: user lookup through the auth service, and a verified TLS
    # greeting on the IMAPS port.
    doveadm -c "$DOVE_CONF" user -u stack-probe >/dev/null ||
        die "doveadm user lookup failed, see $DOVE_DIR/dovecot.log"
    local out
    out=$(printf 'a LOGOUT\r\n' | timeout 10 openssl s_client -quiet -verify_return_error \
        -CAfile "$TLS_DIR/ca.pem" -connect "$HOST:$IMAPS_PORT" 2>/dev/null || true)
    [[ $out == "* OK"* ]] ||
        die "no verified IMAPS greeting on $HOST:$IMAPS_PORT, see $DOVE_DIR/dovecot.log"
}

dove_stop() {
    local pid; pid=$(read_pid "$DOVE_PID")
    pid_matches "$pid" dovecot || return 0
    doveadm -c "$DOVE_CONF" stop >/dev/null 2>&1 || kill -TERM "$pid" 2>/dev/null || true
    terminate "$pid" 15
}

# ---------------------------------------------------------------------- S3

s3_pid()     { read_pid "$S3_DIR/s3.pid"; }
s3_running() { pid_matches "$(s3_pid)" versitygw; }
# Ready when an unauthenticated request gets an S3 answer (403 XML).
s3_ready()   { curl -s -o /dev/null -m 2 -w '%{http_code}' "http://$HOST:$S3_PORT/" 2>/dev/null | grep -q '^[2-4]'; }
# A signed S3 request with curl (SigV4). usage: s3_curl METHOD PATH [curl args]
s3_curl() {
    local method=$1 path=$2; shift 2
    # S3 wants the payload hash; these requests have no body (SHA-256 of "").
    curl -s -m 10 -X "$method" --aws-sigv4 "aws:amz:$S3_REGION:s3" \
        --user "$S3_ACCESS_KEY:$S3_SECRET_KEY" \
        -H "x-amz-content-sha256: $EMPTY_SHA256" "$@" "http://$HOST:$S3_PORT$path"
}

s3_start() {
    require_free_ports "$S3_PORT"
    mkdir -p "$S3_DIR/data"
    rm -f "$S3_DIR/s3.pid"
    local iam=()
    if [ -n "$S3_ADMIN_PORT" ]; then
        require_free_ports "$S3_ADMIN_PORT"
        mkdir -p "$S3_DIR/iam"
        iam=(--iam-dir "$S3_DIR/iam" --admin-port "$HOST:$S3_ADMIN_PORT")
    fi
    # Credentials through the environment, not the command line (ps).
    ROOT_ACCESS_KEY="$S3_ACCESS_KEY" ROOT_SECRET_KEY="$S3_SECRET_KEY" \
        spawn "$S3_DIR/s3.pid" "$S3_DIR/s3.log" \
        "$S3_BIN" --port "$HOST:$S3_PORT" --region "$S3_REGION" "${iam[@]}" posix "$S3_DIR/data"
    local i
    for i in $(seq 100); do
        s3_ready && break
        s3_running || break
        sleep 0.1
    done
    s3_ready || { tail -n 20 "$S3_DIR/s3.log" >&2 2>/dev/null || true;
                  die "the S3 server did not start, see $S3_DIR/s3.log"; }
    s3_make_bucket
}

# The bucket the worker writes to (the worker also creates it when missing).
s3_make_bucket() {
    local code
    code=$(s3_curl HEAD "/$S3_BUCKET" -I -o /dev/null -w '%{http_code}') || code=000
    [ "$code" = 200 ] && return 0
    code=$(s3_curl PUT "/$S3_BUCKET" -o "$S3_DIR/bucket.out" -w '%{http_code}') || code=000
    [ "$code" = 200 ] || [ "$code" = 409 ] ||
        die "cannot create the bucket $S3_BUCKET (HTTP $code): $(head -c 300 "$S3_DIR/bucket.out" 2>/dev/null)"
}

s3_stop() {
    local pid; pid=$(s3_pid)
    pid_matches "$pid" versitygw && terminate "$pid" 15
    rm -f "$S3_DIR/s3.pid"
}

s3_status_row() {
    if s3_running && s3_ready; then printf '%-10s %-8s %s\n' s3 running "http://$HOST:$S3_PORT"
    else printf '%-10s %-8s %s\n' s3 stopped "http://$HOST:$S3_PORT"; return 3; fi
}

s3_env() {
    printf 'export %s=%q\n' \
        STACK_S3_ENDPOINT "$HOST:$S3_PORT" \
        STACK_S3_ACCESS_KEY "$S3_ACCESS_KEY" \
        STACK_S3_SECRET_KEY "$S3_SECRET_KEY" \
        STACK_S3_BUCKET "$S3_BUCKET" \
        STACK_S3_REGION "$S3_REGION" \
        STACK_S3_PYTHON "$S3_PYTHON"
}

# s3-up / s3-down / s3-status: the S3 server alone, in $STATE/s3.
cmd_s3_up() {
    mkdir -p "$LOG_DIR" "$S3_DIR"
    exec 8>"$S3_DIR/.lock"
    flock -w 600 8 || die "another stack.sh holds $S3_DIR/.lock"
    s3_install_locked
    if ! { s3_running && s3_ready; }; then
        s3_running && s3_stop
        s3_start
    else
        s3_make_bucket
    fi
    s3_env >"$S3_DIR/env"
    log "S3 up on http://$HOST:$S3_PORT (env: $S3_DIR/env)"
}

cmd_s3_down() {
    mkdir -p "$S3_DIR"
    exec 8>"$S3_DIR/.lock"
    flock -w 600 8 || die "another stack.sh holds $S3_DIR/.lock"
    s3_stop
    log "S3 down"
}

# ----------------------------------------------------------------- env file

write_env() {
    local tmp=$ENV_FILE.tmp
    {
        echo "# Generated by scripts/stack.sh up: source it to reach the local stack."
        printf 'export %s=%q\n' \
            CALIOPEN_IMAP_STACK_DIR "$STATE" \
            STACK_NATS_URL "nats://$HOST:$NATS_PORT" \
            STACK_CASSANDRA_HOSTS "$HOST:$CASS_NATIVE_PORT" \
            STACK_CASSANDRA_KEYSPACE "$KEYSPACE" \
            STACK_IMAP_HOST "$HOST" \
            STACK_IMAPS_PORT "$IMAPS_PORT" \
            STACK_IMAP_STARTTLS_PORT "$IMAP_PORT" \
            STACK_IMAP_CA_FILE "$TLS_DIR/ca.pem" \
            STACK_IMAP_PASSWORD "$(head -n 1 "$DOVE_PASSWORD_FILE")" \
            STACK_DOVECOT_CONF "$DOVE_CONF" \
            STACK_CQLSH "$CQLSH"
        s3_env
    } >"$tmp"
    mv "$tmp" "$ENV_FILE"
}

# ---------------------------------------------------------------- commands

all_running() {
    nats_running && nats_ready && cass_running && cass_ready && dove_running && dove_ready &&
        s3_running && s3_ready
}

cmd_up() {
    mkdir -p "$LOG_DIR"
    # One `up`/`down` at a time per state folder.
    exec 8>"$STATE/.lock"
    flock -w 600 8 || die "another stack.sh holds $STATE/.lock"

    # Fast path: everything already runs.
    if [ -f "$ENV_FILE" ] && [ -x "$CQLSH" ] && all_running; then
        cass_apply_schema
        log "stack already running (env: $ENV_FILE)"
        return 0
    fi

    install_all
    local started=()

    if ! { nats_running && nats_ready; }; then
        nats_running && terminate "$(nats_pid)" 10   # alive but not answering
        nats_start; started+=(nats)
    fi

    # Cassandra takes longest: launch it, start Dovecot meanwhile, then wait.
    if ! cass_running; then cass_start; started+=(cassandra); fi

    if ! { dove_running && dove_ready; }; then
        dove_running && dove_stop     # alive but not answering: restart
        dove_start; started+=(dovecot)
    fi

    if ! { s3_running && s3_ready; }; then
        s3_running && s3_stop
        s3_start; started+=(s3)
    else
        s3_make_bucket
    fi

    cass_wait_ready
    cass_apply_schema
    write_env
    log "stack up (started: ${started[*]:-nothing}); env: $ENV_FILE"
}

cmd_down() {
    exec 8>"$STATE/.lock"
    flock -w 600 8 || die "another stack.sh holds $STATE/.lock"
    local pid cass
    # Cassandra drains for a few seconds: signal it first, stop the others
    # meanwhile, then wait for it.
    cass=$(cass_pid); pid_matches "$cass" CassandraDaemon && kill -TERM "$cass" || cass=
    dove_stop
    s3_stop
    pid=$(nats_pid); pid_matches "$pid" nats-server && terminate "$pid" 10
    [ -z "$cass" ] || terminate "$cass" 60
    rm -f "$CASS_DIR/cassandra.pid" "$NATS_DIR/nats.pid"
    # Anything of this stack still alive (lost pid file)? Match our own state
    # path in the command line of the three server programs only.
    local left; left=$(pgrep -f -- "$STATE/" | while read -r pid; do
        case $(cat "/proc/$pid/comm" 2>/dev/null) in
            nats-server|java|dovecot|versitygw) echo "$pid" ;;
        esac
    done || true)
    for pid in $left; do
        log "stopping leftover stack process $pid"; terminate "$pid" 30
    done
    log "stack down"
}

cmd_status() {
    local rc=0
    row() { printf '%-10s %-8s %s\n' "$1" "$2" "$3"; }
    if nats_running && nats_ready; then row nats running "nats://$HOST:$NATS_PORT"
    else row nats stopped "nats://$HOST:$NATS_PORT"; rc=3; fi
    if cass_running && cass_ready; then row cassandra running "$HOST:$CASS_NATIVE_PORT"
    elif cass_running; then row cassandra starting "$HOST:$CASS_NATIVE_PORT"; rc=3
    else row cassandra stopped "$HOST:$CASS_NATIVE_PORT"; rc=3; fi
    if dove_running && dove_ready; then
        row dovecot running "imaps://$HOST:$IMAPS_PORT imap+starttls://$HOST:$IMAP_PORT"
    else row dovecot stopped "imaps://$HOST:$IMAPS_PORT imap+starttls://$HOST:$IMAP_PORT"; rc=3; fi
    s3_status_row || rc=3
    return $rc
}

# One service at a time, for the fault suite: it stops a service in the
# middle of a sync and starts it again. Nothing is installed here: `up` did.
cmd_stop() {
    exec 8>"$STATE/.lock"
    flock -w 600 8 || die "another stack.sh holds $STATE/.lock"
    local pid
    case ${1:-} in
        nats)
            pid=$(nats_pid); pid_matches "$pid" nats-server && terminate "$pid" 10
            rm -f "$NATS_DIR/nats.pid" ;;
        cassandra)
            pid=$(cass_pid); pid_matches "$pid" CassandraDaemon && terminate "$pid" 60
            rm -f "$CASS_DIR/cassandra.pid" ;;
        dovecot) dove_stop ;;
        s3) s3_stop ;;
        *) die "stop: expected nats, cassandra, dovecot or s3, found '${1:-}'" ;;
    esac
    log "${1} stopped"
}

cmd_start() {
    exec 8>"$STATE/.lock"
    flock -w 600 8 || die "another stack.sh holds $STATE/.lock"
    case ${1:-} in
        nats) nats_running && nats_ready || nats_start ;;
        cassandra)
            cass_running || cass_start
            cass_wait_ready ;;
        dovecot) dove_running && dove_ready || dove_start ;;
        s3) s3_running && s3_ready || s3_start ;;
        *) die "start: expected nats, cassandra, dovecot or s3, found '${1:-}'" ;;
    esac
    log "${1} running"
}

cmd_env() {
    [ -f "$ENV_FILE" ] || die "$ENV_FILE does not exist yet: run scripts/stack.sh up"
    cat "$ENV_FILE"
}

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
