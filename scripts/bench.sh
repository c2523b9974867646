#!/usr/bin/env bash
# Benchmarks of caliopen-imap against its ceilings and against mbsync, on the
# local stack (NATS, Cassandra, Dovecot on loopback; scripts/stack.sh).
#
#   scripts/bench.sh            1k and 10k mailboxes, a large-message mailbox
#                               (10 % of 1-20 MB), 200 identities, poller
#   scripts/bench.sh --large    the same plus a 50k mailbox (one round)
#   scripts/bench.sh --rounds N rounds of every measurement (default 3)
#   scripts/bench.sh --only live
#                               only the live-sync scenarios (IDLE latency,
#                               1,000 IDLE sessions, 200-folder resync): their
#                               figures go to .stack/bench/LIVE.md, and
#                               BENCHMARKS.md is left alone
#
# Rewrites BENCHMARKS.md at the repository root. Scratch files (configs, logs,
# the raw figures in results.jsonl, mbsync's Maildir) live in .stack/bench/.
# BENCH_PROFILE=debug builds and runs debug binaries (to try the script
# out on a shared machine; its figures are not the benchmark's), and
# BENCH_IDLE_USERS, BENCH_IDLE_REST_SECS, BENCH_LIVE_MESSAGES shrink the
# live-sync runs (1000, 60, 100) for a quick try.
#
# Everything a Caliopen-side measurement writes goes to keyspace
# caliopen_bench (and the poller's 100k identities to caliopen_bench_poller),
# never to `caliopen`: the tests share that one, and the raw_message tables
# are truncated between rounds here so every round starts from the same
# Cassandra state.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
SCRIPT_START=$SECONDS

LARGE=0
ROUNDS=3
ONLY=
while [ $# -gt 0 ]; do
    case $1 in
        --large) LARGE=1 ;;
        --rounds) ROUNDS=$2; shift ;;
        --only) ONLY=$2; shift
            [ "$ONLY" = live ] || { echo "--only: live is the one subset" >&2; exit 2; } ;;
        *) echo "usage: scripts/bench.sh [--large] [--rounds N] [--only live]" >&2; exit 2 ;;
    esac
    shift
done
PROFILE=${BENCH_PROFILE:-release}

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------ setup

# (`up` starts what is not running; a stack that runs is left as it is)
bash scripts/stack.sh status >/dev/null 2>&1 || bash scripts/stack.sh up
# The peers and the meter come from Debian: mbsync (isync) and GNU time for
# peak RSS. Installed here so `make bench` works on a fresh machine too.
missing=()
command -v mbsync >/dev/null || missing+=(isync)
[ -x /usr/bin/time ] || missing+=(time)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
        install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
# shellcheck source=/dev/null
. "${CALIOPEN_IMAP_STACK_DIR:-$REPO_ROOT/.stack}/env"
STATE=$CALIOPEN_IMAP_STACK_DIR

log "building $PROFILE binaries and examples"
if [ "$PROFILE" = release ]; then
    cargo build --release --examples --bins -q
else
    cargo build --examples --bins -q
fi
OUT=$REPO_ROOT/target/$PROFILE
BIN=$OUT/caliopen-imap
TOOL=$OUT/examples/bench_tool
LDA=$OUT/examples/lda_standin

WORK=$STATE/bench
mkdir -p "$WORK"
RESULTS=$WORK/results${ONLY:+-$ONLY}.jsonl
: >"$RESULTS"
: >"$WORK/hangs.txt"
SUITE_START=$SECONDS

# Subjects of this run only, so no other worker, poller or test sees them.
TAG=bench$$
KS=caliopen_bench
KS_POLLER=caliopen_bench_poller
SEED=20261126
IMAPS=$STACK_IMAP_HOST:$STACK_IMAPS_PORT
CASS_HOST=${STACK_CASSANDRA_HOSTS%%:*}
CASS_PORT=${STACK_CASSANDRA_HOSTS##*:}
CASS_PID=$(tr -dc '0-9' <"$STATE/cassandra/cassandra.pid")
# The password reaches our tools through the environment, never argv.
export STACK_IMAP_PASSWORD

# The store ceiling's concurrency is tuned once (the best of these wins).
STORE_CONCURRENCY_CANDIDATES="16 64 256"
# Messages added for the incremental-sync measurement.
INCREMENT=100
# The poller's population and its need_job load.
POLLER_IDENTITIES=100000
NEED_JOB_RATE=1000
NEED_JOB_CLIENTS=10
NEED_JOB_SECS=10
# 200 identities of 100 to 200 small messages each.
MULTI_USERS=200
# The large-message mailbox: every tenth message 1-20 MB (object storage).
LARGE_MSGS=200
# Its objects go to a bucket of this run, removed at the end.
BENCH_BUCKET=caliopen-bench-$TAG

cqlsh() {
    "$STACK_CQLSH" --connect-timeout=20 --request-timeout=120 "$CASS_HOST" "$CASS_PORT" "$@"
}

doveadm_() { doveadm -c "$STACK_DOVECOT_CONF" "$@"; }

# Our keyspaces get the project's schema, as stack.sh gives `caliopen`.
apply_schema() {
    local ks=$1
    sed -E "s/\bcaliopen\./$ks./g; s/(KEYSPACE IF NOT EXISTS) caliopen\b/\1 $ks/" \
        config/schema.cql >"$WORK/schema-$ks.cql"
    cqlsh -f "$WORK/schema-$ks.cql" >/dev/null
}

truncate_raw() {
    cqlsh -e "TRUNCATE $KS.raw_message; TRUNCATE $KS.user_raw_lookup;" >/dev/null
}

# Bytes of the raw messages stored now, as JSON: in their Cassandra rows
# (`raw_data`) and in the object store (rows with a `uri`).
stored_split() {
    cqlsh -e "PAGING OFF; SELECT raw_size, uri FROM $KS.raw_message;" |
        awk -F'|' 'NF == 2 && $1 ~ /^ *[0-9]+ *$/ {
                if ($2 ~ /s3:/) { o += $1; no++ } else { c += $1; nc++ } }
            END { printf "{\"cass_bytes\": %d, \"cass_msgs\": %d, \"s3_bytes\": %d, \"s3_msgs\": %d}\n",
                  c, nc, o, no }'
}

# ------------------------------------------------------------------ processes

# Set by `pin on` (a taskset prefix) and for the pinned runs (a scenario
# suffix): empty otherwise.
PIN=
SUFFIX=

# Our background processes, stopped on exit whatever happens.
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    [ -z "$PIN" ] || pin off
}
trap cleanup EXIT

# SIGTERM, then wait (bounded: SECS, default 40) for the process to go.
stop_pid() {
    local pid=$1 secs=${2:-40} i
    kill -TERM "$pid" 2>/dev/null || return 0
    for i in $(seq $((secs * 10))); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# Wait until FILE contains PATTERN (a grep -E pattern), at most SECS.
wait_log() {
    local file=$1 pattern=$2 secs=$3 i
    for i in $(seq $((secs * 10))); do
        grep -qE "$pattern" "$file" 2>/dev/null && return 0
        sleep 0.1
    done
    tail -n 20 "$file" >&2
    die "no /$pattern/ in $file after ${secs}s"
}

# Peak and current resident memory (kB) and CPU seconds of a process.
hwm_kb()  { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
rss_kb()  { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
cpu_s()   { awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / t}' "/proc/$1/stat"; }
# busy and total jiffies of the whole machine, for a CPU-saturation figure.
sys_jiffies() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }

# measure_begin / measure_end bracket a measured step: they add the
# Cassandra JVM's CPU seconds and the machine's busy share to the figures.
measure_begin() {
    M_CASS0=$(cpu_s "$CASS_PID")
    read -r M_BUSY0 M_TOT0 < <(sys_jiffies)
}
# usage: measure_end JSON → JSON with cass_cpu_s and busy_pct added
measure_end() {
    local cass1 busy1 tot1
    cass1=$(cpu_s "$CASS_PID")
    read -r busy1 tot1 < <(sys_jiffies)
    jq -c --argjson c "$(echo "$cass1 - $M_CASS0" | bc)" \
        --argjson b "$(echo "scale=1; 100 * ($busy1 - $M_BUSY0) / ($tot1 - $M_TOT0 + 1)" | bc)" \
        '. + {cass_cpu_s: $c, busy_pct: $b}' <<<"$1"
}

# Wait until Cassandra runs no compaction and has none pending (left
# behind by earlier rounds or tests, it would bill its CPU to whoever runs
# next), and until the kernel has written back dirty pages. Records the
# wait as scenario `settle`. usage: settle LABEL ROUND
settle() {
    local label=$1 round=$2 t0=$SECONDS running pending dirty i
    for i in $(seq 600); do
        read -r running pending < <(cqlsh -e "SELECT count(*) FROM system_views.sstable_tasks;
                SELECT pending_tasks, active_tasks FROM system_views.thread_pools
                WHERE name = 'CompactionExecutor';" |
            awk -F'|' 'NF == 1 && $1 ~ /^ *[0-9]+ *$/ && r == "" {r = $1 + 0}
                       NF == 2 && $1 ~ /^ *[0-9]+ *$/ && p == "" {p = $1 + $2}
                       END {print (r == "" ? 1 : r), (p == "" ? 1 : p)}')
        [ "${running:-1}" = 0 ] && [ "${pending:-1}" = 0 ] && break
        sleep 1
    done
    sync
    for i in $(seq 100); do
        dirty=$(awk '/^Dirty:/ {print $2}' /proc/meminfo)
        [ "$dirty" -lt 10240 ] && break
        sleep 0.1
    done
    record settle "$label" "$round" "$(jq -nc --argjson s $((SECONDS - t0)) \
        --argjson r "${running:-0}" --argjson p "${pending:-0}" \
        '{secs: $s, running_at_end: $r, pending_at_end: $p}')"
}

# usage: record SCENARIO MAILBOX ROUND JSON [jq-expression adding fields]
record() {
    local scenario=$1 mailbox=$2 round=$3 json=$4
    jq -c --arg s "$scenario" --arg m "$mailbox" --argjson r "$round" \
        '{scenario: $s, mailbox: $m, round: $r} + .' <<<"$json" >>"$RESULTS"
    log "$scenario $mailbox round $round: $(jq -c '{messages, bytes, secs, rss_kb}' <<<"$json")"
}

start_lda() {
    "$LDA" "$STACK_NATS_URL" "inboundSMTP.$TAG" >"$WORK/lda.log" 2>&1 &
    LDA_PID=$!
    PIDS+=("$LDA_PID")
    wait_log "$WORK/lda.log" "answering" 10
}

# usage: worker_yaml FILE WORKERS IN_TOPIC (the same writer as the tests')
worker_yaml() {
    "$TOOL" worker-yaml --tag "$TAG" --workers "$2" --in-topic "$3" --keyspace "$KS" \
        --bucket "$BENCH_BUCKET" >"$1"
    # Syncs on order only: live sync is measured on its own (run_live).
    printf '  idle: "off"\n' >>"$1"
}

# A fresh worker process per measured sync, so its peak RSS is its own.
# usage: start_worker YAML NAME; sets WORKER_PID
start_worker() {
    local log=$WORK/worker-$2.log
    CALIOPEN_IMAP_LOG=info $PIN "$BIN" worker -c "$1" start >"$log" 2>&1 &
    WORKER_PID=$!
    PIDS+=("$WORKER_PID")
    wait_log "$log" "imapworker ready" 60
}

# A Caliopen user (the API's job in production) and, through the real
# `ctl addremote`, a fresh remote identity for Dovecot user LOGIN: a new
# identity makes the next sync a first sync. Sets C_USER and C_IDENTITY.
new_identity() {
    local yaml=$1 login=$2
    C_USER=$(cat /proc/sys/kernel/random/uuid)
    cqlsh -e "INSERT INTO $KS.user (user_id, name) VALUES ($C_USER, 'bench-$C_USER');
              INSERT INTO $KS.user_name (name, user_id) VALUES ('bench-$C_USER', $C_USER);"
    C_IDENTITY=$("$BIN" ctl -c "$yaml" addremote --login "$login" \
        --pass-env STACK_IMAP_PASSWORD --server "$IMAPS" --userid "$C_USER")
}

# The worker's report of one sync, with its timing. A sync that has not
# reported within SYNC_TIMEOUT seconds is recorded as hung (the suite goes
# on with a fresh worker) rather than stalling the whole run.
SYNC_TIMEOUT=60
tool_sync() {
    "$TOOL" sync --nats "$STACK_NATS_URL" --subject "outboundIMAP.$TAG" \
        --user "$C_USER" --identity "$C_IDENTITY" --timeout "$SYNC_TIMEOUT" ||
        jq -nc --argjson t "$SYNC_TIMEOUT" '{secs: $t, ok: false, hung: true,
            error: "no final report within the timeout (worker hung?)"}'
}

# usage: hung SCENARIO LABEL ROUND JSON → true (and records it) if the sync hung
hung() {
    jq -e '.hung == true' <<<"$4" >/dev/null || return 1
    record "$1" "$2" "$3" "$4"
    log "$1 $2 round $3: HUNG, see $(ls -t "$WORK"/worker-*.log | head -1)"
    # Evidence: requests the worker's Cassandra connections have made so far.
    cqlsh -e "SELECT port, request_count FROM system_views.clients;" >>"$WORK/hangs.txt" 2>&1 || true
    # A hung job keeps the worker for its whole shutdown grace: no need.
    stop_pid "$WORKER_PID" 5
    return 0
}

# ------------------------------------------------------------------ corpus

maildir_of() { doveadm_ user -f mail "$1" | sed 's/^maildir://; s/:.*//'; }
mailbox_field() {
    doveadm_ -f flow mailbox status -u "$1" "$2" INBOX | grep -o "$2=[0-9]*" | cut -d= -f2
}

# Make Dovecot user USER hold exactly COUNT generated messages; a mailbox
# that already does is kept (the corpus is reproducible: same seed, same
# bytes), anything else is rebuilt from scratch.
ensure_corpus() {
    local user=$1 count=$2 profile=${3:-mixed} dir
    [ "$(mailbox_field "$user" messages)" = "$count" ] && return 0
    dir=$(maildir_of "$user")
    [ "$profile" = small ] || log "generating $count messages ($profile) for $user in $dir"
    rm -rf "$dir"
    "$TOOL" corpus --dir "$dir" --count "$count" --seed "$SEED" --profile "$profile" >/dev/null
    chown -R mail:mail "$dir"
    doveadm_ force-resync -u "$user" INBOX
    [ "$(mailbox_field "$user" messages)" = "$count" ] ||
        die "$user: Dovecot does not see $count messages after the resync"
}

# ------------------------------------------------------------------ scenarios

# Fetch ceiling: one bare UID FETCH 1:* BODY.PEEK[] of the whole mailbox.
run_fetch() {
    local user=$1 label=$2 round=$3 out
    measure_begin
    out=$("$TOOL" fetch --server "$IMAPS" --login "$user" --password-env STACK_IMAP_PASSWORD \
        --ca "$STACK_IMAP_CA_FILE")
    record fetch_ceiling "$label" "$round" "$(measure_end "$out")"
}

# Store ceiling: the same bytes into raw_message + user_raw_lookup, no IMAP.
# With MARK=yes every row is then marked delivered by an UPDATE of its own,
# the second write a hand-off makes (scenario store_ceiling_marked).
run_store() {
    local user=$1 label=$2 round=$3 conc=$4 scenario=${5:-store_ceiling} mark=${6:-no} out
    truncate_raw
    measure_begin
    out=$($PIN "$TOOL" store --dir "$(maildir_of "$user")" --hosts "$STACK_CASSANDRA_HOSTS" \
        --keyspace "$KS" --concurrency "$conc" --mark "$mark")
    record "$scenario$SUFFIX" "$label" "$round" "$(measure_end "$out")"
}

# mbsync: one-way pull into a fresh Maildir. It matches the certificate's
# CN, not IP SANs (STACK.md), hence `localhost` and the server certificate.
# Bytes are the mailbox's (mbsync stores LF line ends, a little less).
# FSync off: neither Dovecot (mail_fsync=never) nor Cassandra (periodic
# commit log) syncs per message in this setup.
run_mbsync() {
    local user=$1 label=$2 round=$3 near=$WORK/mbsync-near conf=$WORK/mbsyncrc t0 t1 n rss u s
    rm -rf "$near"
    mkdir -p "$near"
    cat >"$conf" <<EOF
FSync no

IMAPAccount bench
Host localhost
Port $STACK_IMAPS_PORT
User $user
PassCmd "printenv STACK_IMAP_PASSWORD"
SSLType IMAPS
SystemCertificates no
CertificateFile $STATE/tls/server.pem

IMAPStore far
Account bench

MaildirStore near
Path $near/
Inbox $near/INBOX

Channel pull
Far :far:
Near :near:
Patterns INBOX
Sync Pull
Create Near
SyncState *
EOF
    measure_begin
    t0=$(date +%s.%N)
    /usr/bin/time -f '%M %U %S' -o "$WORK/mbsync.time" $PIN mbsync -q -c "$conf" pull
    t1=$(date +%s.%N)
    n=$(find "$near/INBOX/cur" "$near/INBOX/new" -type f | wc -l)
    read -r rss u s <"$WORK/mbsync.time"
    record "mbsync$SUFFIX" "$label" "$round" "$(measure_end "$(jq -nc --argjson n "$n" \
        --argjson b "$(mailbox_field "$user" vsize)" --argjson t "$(echo "$t1 - $t0" | bc)" \
        --argjson rss "$rss" --argjson cpu "$(echo "$u + $s" | bc)" \
        '{messages: $n, bytes: $b, secs: $t, rss_kb: $rss, proc_cpu_s: $cpu}')")"
}

# caliopen-imap, with the hand-off to the processor stand-in: initial sync,
# then on the same identity and worker a no-change resync (timed by us, and
# through `ctl syncremote --wait` as an operator sees it), then an
# incremental sync of INCREMENT new messages.
run_caliopen() {
    local user=$1 label=$2 round=$3 yaml=$WORK/worker-handoff.yaml out hwm cpu0 t0 t1
    local uidnext dir
    worker_yaml "$yaml" 10 "inboundSMTP.$TAG"
    truncate_raw
    start_worker "$yaml" "handoff-$label-$round"
    new_identity "$yaml" "$user"
    cpu0=$(cpu_s "$WORKER_PID")
    measure_begin
    out=$(tool_sync)
    hung "caliopen_initial$SUFFIX" "$label" "$round" "$out" && return 0
    out=$(measure_end "$out")
    hwm=$(hwm_kb "$WORKER_PID")
    record "caliopen_initial$SUFFIX" "$label" "$round" "$(jq -c --argjson rss "$hwm" \
        --argjson cpu "$(echo "$(cpu_s "$WORKER_PID") - $cpu0" | bc)" \
        '. + {messages: .fetched, bytes: null, rss_kb: $rss, proc_cpu_s: $cpu}' <<<"$out")"
    if [ -n "$SUFFIX" ]; then
        stop_pid "$WORKER_PID"
        return 0
    fi

    out=$(tool_sync)
    hung caliopen_nochange "$label" "$round" "$out" && return 0
    record caliopen_nochange "$label" "$round" "$(jq -c '. + {messages: .fetched}' <<<"$out")"
    t0=$(date +%s.%N)
    "$BIN" ctl -c "$yaml" syncremote --userid "$C_USER" --remoteid "$C_IDENTITY" --wait \
        --timeout "$SYNC_TIMEOUT" >/dev/null || true
    t1=$(date +%s.%N)
    record caliopen_nochange_ctl "$label" "$round" \
        "$(jq -nc --argjson t "$(echo "$t1 - $t0" | bc)" '{messages: 0, secs: $t}')"

    # INCREMENT new messages, put in place before the clock starts, taken
    # away afterwards so the mailbox stays the cached corpus.
    uidnext=$(mailbox_field "$user" uidnext)
    dir=$(maildir_of "$user")
    # (numbered apart from every earlier run: Dovecot remembers the names of
    # expunged files and warns when one comes back)
    "$TOOL" corpus --dir "$dir" --count "$INCREMENT" --seed "$SEED" \
        --first $((10000000 + ($(date +%s) % 100000) * 1000 + round * INCREMENT)) >/dev/null
    chown -R mail:mail "$dir"
    doveadm_ force-resync -u "$user" INBOX
    out=$(tool_sync)
    doveadm_ expunge -u "$user" mailbox INBOX uid "$uidnext:*"
    hung caliopen_incremental "$label" "$round" "$out" && return 0
    record caliopen_incremental "$label" "$round" "$(jq -c '. + {messages: .fetched}' <<<"$out")"

    record caliopen_worker_end "$label" "$round" \
        "$(jq -nc --argjson rss "$(hwm_kb "$WORKER_PID")" '{rss_kb: $rss}')"
    stop_pid "$WORKER_PID"
}

# One first sync by a fresh worker of a fresh identity, recorded as SCENARIO
# with the worker's peak RSS and CPU, and with SPLIT=yes where the bytes
# went. usage: first_sync SCENARIO IN_TOPIC SPLIT USER LABEL ROUND
first_sync() {
    local scenario=$1 topic=$2 split=$3 user=$4 label=$5 round=$6 out cpu0 extra='{}'
    local yaml=$WORK/worker-$scenario.yaml
    worker_yaml "$yaml" 10 "$topic"
    truncate_raw
    start_worker "$yaml" "$scenario-$label-$round"
    new_identity "$yaml" "$user"
    cpu0=$(cpu_s "$WORKER_PID")
    measure_begin
    out=$(tool_sync)
    hung "$scenario" "$label" "$round" "$out" && return 0
    out=$(measure_end "$out")
    if [ "$split" = yes ]; then extra=$(stored_split); fi
    record "$scenario" "$label" "$round" "$(jq -c --argjson rss "$(hwm_kb "$WORKER_PID")" \
        --argjson cpu "$(echo "$(cpu_s "$WORKER_PID") - $cpu0" | bc)" --argjson extra "$extra" \
        '. + {messages: .fetched, rss_kb: $rss, proc_cpu_s: $cpu} + $extra' <<<"$out")"
    stop_pid "$WORKER_PID"
}

# caliopen-imap in store-only mode (LDAConfig.in_topic empty): no hand-off.
run_caliopen_store_only() { first_sync caliopen_store_only "" no "$@"; }

# caliopen-imap on the large-message mailbox: initial sync with hand-off,
# and where the bytes went (Cassandra rows or the S3 bucket).
run_caliopen_large() { first_sync caliopen_large "inboundSMTP.$TAG" yes "$@"; }

# The production shape: Cassandra alone on core 0 (as on machines of its
# own), the worker, Dovecot, NATS, the stand-in and mbsync on core 1.
# usage: pin on|off
pin() {
    local cass=0 rest=1 p
    [ "$1" = off ] && cass=0-$(($(nproc) - 1)) rest=$cass
    taskset -a -p -c "$cass" "$CASS_PID" >/dev/null
    for p in $(pgrep -x dovecot) $(pgrep -f '^dovecot/') $(tr -dc '0-9' <"$STATE/nats/nats.pid") "$LDA_PID"; do
        taskset -a -p -c "$rest" "$p" >/dev/null 2>&1 || true
    done
    PIN=$([ "$1" = on ] && echo "taskset -c $rest" || true)
}

# 200 identities ordered at once to one worker with WORKERS job slots.
run_multi() {
    local workers=$1 round=$2 yaml=$WORK/worker-multi.yaml out cpu0
    worker_yaml "$yaml" "$workers" "inboundSMTP.$TAG"
    truncate_raw
    start_worker "$yaml" "multi-$workers-$round"
    "$TOOL" users --hosts "$STACK_CASSANDRA_HOSTS" --keyspace "$KS" --logins bench200u \
        --count "$MULTI_USERS" --server "$IMAPS" --password-env STACK_IMAP_PASSWORD \
        --list "$WORK/multi.list" >/dev/null
    cpu0=$(cpu_s "$WORKER_PID")
    measure_begin
    out=$("$TOOL" sync-many --nats "$STACK_NATS_URL" --subject "outboundIMAP.$TAG" \
        --hosts "$STACK_CASSANDRA_HOSTS" --keyspace "$KS" --list "$WORK/multi.list" \
        --timeout "$SYNC_TIMEOUT") ||
        out=$(jq -nc --argjson t "$SYNC_TIMEOUT" '{secs: $t, ok: 0, hung: true}')
    hung "multi_w$workers" 200x "$round" "$out" && return 0
    out=$(measure_end "$out")
    record "multi_w$workers" "200x" "$round" "$(jq -c --argjson rss "$(hwm_kb "$WORKER_PID")" \
        --argjson cpu "$(echo "$(cpu_s "$WORKER_PID") - $cpu0" | bc)" \
        --argjson b "$MULTI_BYTES" '. + {bytes: $b, rss_kb: $rss, proc_cpu_s: $cpu}' <<<"$out")"
    stop_pid "$WORKER_PID"
}

# The poller over 100k identities: full scan time from its own log, its
# memory with everything scheduled, then need_job latency under load.
run_poller() {
    local round=$1
    local yaml=$WORK/poller.yaml log=$WORK/poller-$round.log pid scan out
    cat >"$yaml" <<EOF
# Generated by scripts/bench.sh: its own keyspace, subjects and lease.
scan_interval: 180
remote_protocols: [email, imap, twitter, mastodon]
store_name: cassandra
store_settings:
  hosts: ["$STACK_CASSANDRA_HOSTS"]
  keyspace: $KS_POLLER
  consistency_level: 1
nats_url: $STACK_NATS_URL
nats_queue: IDpoller.$TAG
nats_topics:
  id_cache: idCache.$TAG
  imap: imapJobs.$TAG
  twitter: twitterJobs.$TAG
  mastodon: mastodonJobs.$TAG
poller:
  lease_name: $TAG-$round
EOF
    CALIOPEN_IMAP_LOG=info "$BIN" poller -c "$yaml" start >"$log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_log "$log" "scan applied" 300
    # (the log is coloured: strip the escapes before reading the field)
    scan=$(grep -m1 "scan applied" "$log" | sed 's/\x1b\[[0-9;]*m//g' |
        grep -o 'elapsed_ms=[0-9]*' | cut -d= -f2)
    sleep 1   # let the schedule settle before reading memory
    record poller_scan 100k "$round" "$(jq -nc --argjson ms "$scan" --argjson rss "$(rss_kb "$pid")" \
        --argjson hwm "$(hwm_kb "$pid")" --argjson n "$POLLER_IDENTITIES" \
        '{messages: $n, secs: ($ms / 1000), rss_kb: $rss, hwm_kb: $hwm}')"
    measure_begin
    out=$("$TOOL" need-job --nats "$STACK_NATS_URL" --subject "imapJobs.$TAG" \
        --rate "$NEED_JOB_RATE" --clients "$NEED_JOB_CLIENTS" --secs "$NEED_JOB_SECS")
    record poller_need_job 100k "$round" "$(jq -c --argjson hwm "$(hwm_kb "$pid")" \
        '. + {rss_kb: $hwm}' <<<"$(measure_end "$out")")"
    stop_pid "$pid"
    # The harness's own floor: the same load against a responder that does
    # nothing (the processor stand-in answers anything at once), so the
    # poller's share of the latency can be told from NATS's and ours.
    out=$("$TOOL" need-job --nats "$STACK_NATS_URL" --subject "inboundSMTP.$TAG" \
        --rate "$NEED_JOB_RATE" --clients "$NEED_JOB_CLIENTS" --secs "$NEED_JOB_SECS")
    record need_job_floor 100k "$round" "$out"
}

# ------------------------------------------------------------------ live sync

# Live sync (IDLE push, cheap multi-folder resync) runs in a keyspace of its
# own: a worker with `imap.idle: all` holds a session for every active
# remote identity it finds, so only the identities of the scenario may be
# there (reset_live empties the identity tables first).
KS_LIVE=caliopen_bench_live
# Latency: few sessions (Dovecot's instant IDLE wake-ups are capped by the
# mail user's inotify instances), 100 messages appended one by one.
LIVE_ACCOUNTS=10
LIVE_MESSAGES=${BENCH_LIVE_MESSAGES:-100}
# Seconds a message may take to reach the stand-in: past Dovecot's 30 s
# polling fallback, so a slow wake-up is measured rather than lost.
LIVE_TIMEOUT=40
IDLE_USERS=${BENCH_IDLE_USERS:-1000}
# How long the 1,000 sessions may take to be established.
IDLE_RAMP_SECS=180
# Seconds of rest over which the worker's CPU is measured.
IDLE_REST_SECS=${BENCH_IDLE_REST_SECS:-60}
FOLDERS=200
# Resyncs of the 200 folders (no change, one new message) measured each.
LIVE_REPEAT=3

reset_live() {
    cqlsh -e "TRUNCATE $KS_LIVE.user_identity; TRUNCATE $KS_LIVE.identity_lookup;
              TRUNCATE $KS_LIVE.identity_type_lookup; TRUNCATE $KS_LIVE.imap_idle_lease;
              TRUNCATE $KS_LIVE.imap_idle_worker;" >/dev/null
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# usage: live_yaml FILE IN_TOPIC IDLE(all|off); sets METRICS_ADDR
live_yaml() {
    "$TOOL" worker-yaml --tag "$TAG" --workers 10 --in-topic "$2" --keyspace "$KS_LIVE" \
        --bucket "$BENCH_BUCKET" >"$1"
    # (the file ends inside its `imap:` block)
    if [ "$3" = all ]; then
        printf '  idle: all\n  idle_max: %d\n' "$IDLE_USERS" >>"$1"
    else
        printf '  idle: "off"\n' >>"$1"
    fi
    METRICS_ADDR=127.0.0.1:$(free_port)
    printf 'metrics_addr: %s\n' "$METRICS_ADDR" >>"$1"
}

scrape() { curl -sf --max-time 5 "http://$METRICS_ADDR/metrics" || true; }

# IMAP sessions the worker holds in IDLE now; null while it has no such
# gauge, empty when /metrics did not answer.
idle_gauge() {
    local text
    text=$(scrape)
    [ -n "$text" ] || return 0
    awk '$1 == "caliopen_imap_idle_sessions" {v = $2} END {print (v == "" ? "null" : v + 0)}' <<<"$text"
}

# Syncs the worker ended ok so far (empty when /metrics did not answer).
syncs_ok() {
    local text
    text=$(scrape)
    [ -n "$text" ] || return 0
    awk '$1 == "caliopen_imap_syncs_ended_total{outcome=\"ok\"}" {v = $2}
         END {print v + 0}' <<<"$text"
}

# The worker's IMAP commands so far, by command, as JSON ({"EXAMINE": 203,
# ...}); null while it does not count them.
commands_json() {
    local text
    text=$(scrape)
    grep -q '^# TYPE caliopen_imap_imap_commands' <<<"$text" || { echo null; return; }
    { grep -E '^caliopen_imap_imap_commands(_total)+[{].*command="' <<<"$text" || true; } |
        sed -E 's/.*command="([^"]*)".* ([0-9.e+]+)$/\1\t\2/' |
        jq -Rn 'reduce (inputs | split("\t")) as $l ({}; .[$l[0]] += ($l[1] | tonumber))'
}

# usage: commands_delta BEFORE AFTER → the commands sent in between, and
# their sum. (Before a worker's first command its /metrics has no such
# family yet: a null BEFORE counts as none sent.)
commands_delta() {
    jq -nc --argjson a "$1" --argjson b "$2" 'if $b == null
        then {commands: null, commands_total: null}
        else ($b | to_entries | map({key, value: (.value - (($a // {})[.key] // 0))})
              | map(select(.value > 0)) | from_entries) as $d
             | {commands: $d, commands_total: ([$d[]] | add // 0)} end'
}

# Dovecot user USER with FOLDERS folders f001... of 2 to 5 small messages
# each, kept between runs like the other corpora.
ensure_folders() {
    local user=$1 dir i n=0
    if [ -f "$WORK/folders-$SEED.done" ] &&
        [ "$(doveadm_ mailbox list -u "$user" 'f*' | wc -l)" = "$FOLDERS" ]; then
        return 0
    fi
    log "generating $FOLDERS folders for $user"
    dir=$(maildir_of "$user")
    rm -rf "$dir"
    for i in $(seq -f '%03g' "$FOLDERS"); do
        "$TOOL" corpus --dir "$dir/.f$i" --count $((2 + 10#$i % 4)) --seed "$SEED" \
            --first $((10#$i * 10)) --profile small >/dev/null
        n=$((n + 2 + 10#$i % 4))
    done
    chown -R mail:mail "$dir"
    doveadm_ force-resync -u "$user" '*'
    [ "$(doveadm_ mailbox list -u "$user" 'f*' | wc -l)" = "$FOLDERS" ] ||
        die "$user: Dovecot does not list $FOLDERS folders"
    touch "$WORK/folders-$SEED.done"
}

# usage: folders_sync LABEL SCENARIO ROUND → records worker time, messages
# and the commands sent by one sync order
folders_sync() {
    local c0 c1 out
    c0=$(commands_json)
    out=$(tool_sync)
    hung "$2" "$1" "$3" "$out" && return 1
    c1=$(commands_json)
    record "$2" "$1" "$3" "$(jq -c --argjson d "$(commands_delta "$c0" "$c1")" \
        '. + {messages: .fetched} + $d' <<<"$out")"
}

# mbsync on the same folders (Junk and Trash left out, as `mailboxes: *`
# does); the lines it sends are counted from its network debug output.
# usage: mbsync_folders USER SCENARIO ROUND (the near store is kept between calls)
mbsync_folders() {
    local user=$1 scenario=$2 round=$3 near=$WORK/mbsync-folders conf=$WORK/mbsyncrc-folders t0 t1 sent
    mkdir -p "$near"
    cat >"$conf" <<EOF
FSync no

IMAPAccount folders
Host localhost
Port $STACK_IMAPS_PORT
User $user
PassCmd "printenv STACK_IMAP_PASSWORD"
SSLType IMAPS
SystemCertificates no
CertificateFile $STATE/tls/server.pem

IMAPStore far
Account folders

MaildirStore near
Path $near/
Inbox $near/INBOX
SubFolders Verbatim

Channel pull
Far :far:
Near :near:
Patterns * !Junk !Trash
Sync Pull
Create Near
SyncState *
EOF
    t0=$(date +%s.%N)
    mbsync -Dn -c "$conf" pull >"$WORK/$scenario.mbsync.log" 2>&1 || die "mbsync failed, see $WORK/$scenario.mbsync.log"
    t1=$(date +%s.%N)
    # mbsync -Dn prints what it sends as `>>> TAG COMMAND...`.
    sent=$(grep -c '^>>> ' "$WORK/$scenario.mbsync.log" || true)
    record "$scenario" 200f "$round" "$(jq -nc --argjson t "$(echo "$t1 - $t0" | bc)" --argjson n "$sent" \
        --argjson sel "$(grep -cE '^>>> [0-9]+ (SELECT|EXAMINE) ' "$WORK/$scenario.mbsync.log" || true)" \
        '{secs: $t, commands_total: $n, selects: $sel}')"
}

# One identity with `mailboxes: *` over FOLDERS folders: first sync, then
# LIVE_REPEAT times a no-change resync and a resync after 1 new message in
# 1 folder; commands from the worker's counter. mbsync does the same on the
# same account.
run_folders() {
    local user=bench200f1 yaml=$WORK/worker-folders.yaml uidnext r
    ensure_folders "$user"
    reset_live
    live_yaml "$yaml" "inboundSMTP.$TAG" off
    start_worker "$yaml" folders
    "$TOOL" users --hosts "$STACK_CASSANDRA_HOSTS" --keyspace "$KS_LIVE" --logins bench200f \
        --count 1 --server "$IMAPS" --password-env STACK_IMAP_PASSWORD \
        --infos 'mailboxes=*' --list "$WORK/folders.list" >/dev/null
    read -r C_USER C_IDENTITY _ <"$WORK/folders.list"
    uidnext=$(doveadm_ -f flow mailbox status -u "$user" uidnext f100 | grep -o '[0-9]*$')
    folders_sync 200f live_folders_first 1 || return 0
    for r in $(seq "$LIVE_REPEAT"); do
        folders_sync 200f live_folders_nochange "$r" || return 0
        add_one "$user" f100
        folders_sync 200f live_folders_one_new "$r" || return 0
    done
    stop_pid "$WORKER_PID"
    doveadm_ expunge -u "$user" mailbox f100 uid "$uidnext:*"

    rm -rf "$WORK/mbsync-folders"
    mbsync_folders "$user" mbsync_folders_first 1
    # (its first run after the pull took 0.3 to 1.3 s in trial runs, its
    # later ones 0.3 to 0.6 s, with the same commands: that one is kept apart)
    mbsync_folders "$user" mbsync_folders_nochange_after_pull 1
    for r in $(seq "$LIVE_REPEAT"); do
        mbsync_folders "$user" mbsync_folders_nochange "$r"
        add_one "$user" f100
        mbsync_folders "$user" mbsync_folders_one_new "$r"
    done
    doveadm_ expunge -u "$user" mailbox f100 uid "$uidnext:*"
}

# One new small message in FOLDER of USER, through Dovecot.
add_one() {
    local user=$1 folder=$2 one=$WORK/one-new
    rm -rf "$one"
    "$TOOL" corpus --dir "$one" --count 1 --seed "$SEED" \
        --first $((90000000 + $(date +%s%N) % 1000000)) --profile small >/dev/null
    doveadm_ save -u "$user" -m "$folder" <"$(find "$one/cur" -type f | head -1)"
    rm -rf "$one"
}

# Wait until the worker holds WANT IDLE sessions, at most SECS, giving up
# earlier when the count has not moved for 30 s; then until each session's
# first sync (a session syncs INBOX once before its first IDLE) has ended.
# Prints the count reached (null when the worker has no IDLE gauge) and the
# seconds it took.
wait_idle() {
    local want=$1 secs=$2 t0=$SECONDS last=-1 moved=$SECONDS n= ok
    while [ $((SECONDS - t0)) -lt "$secs" ]; do
        n=$(idle_gauge)
        if [ "$n" = null ]; then
            [ $((SECONDS - t0)) -ge 10 ] && break
        elif [ -n "$n" ]; then
            [ "$n" -ge "$want" ] && break
            if [ "$n" != "$last" ]; then last=$n moved=$SECONDS; fi
            [ $((SECONDS - moved)) -ge 30 ] && break
        fi
        sleep 1
    done
    [ -n "$n" ] || n=$([ "$last" -ge 0 ] && echo "$last" || echo null)
    if [ "$n" != null ]; then
        while [ $((SECONDS - t0)) -lt "$secs" ]; do
            ok=$(syncs_ok)
            [ -n "$ok" ] && [ "$ok" -ge "$n" ] && break
            sleep 1
        done
    fi
    echo "$n $((SECONDS - t0))"
}

# Empty INBOX of Dovecot users PREFIX1..N (the latency accounts get 10
# messages a run; a fresh identity would fetch them all first).
empty_inboxes() {
    local i
    for i in $(seq "$2"); do
        doveadm_ expunge -u "$1$i" mailbox INBOX all 2>/dev/null || true
    done
}

# Latency from APPEND to the processor stand-in, LIVE_MESSAGES messages
# over LIVE_ACCOUNTS accounts: a worker with `imap.idle: all` (no poller, no
# orders), then the on-demand peer (a `sync` order sent right after each
# APPEND, to a worker without IDLE). The stand-in is served by bench_tool
# itself on a subject of its own, so it sees each hand-off the moment the
# worker sends it.
run_live_latency() {
    local yaml=$WORK/worker-live.yaml topic=inboundSMTP.$TAG.live list=$WORK/live.list out n secs
    reset_live
    empty_inboxes benchlive "$LIVE_ACCOUNTS"
    "$TOOL" users --hosts "$STACK_CASSANDRA_HOSTS" --keyspace "$KS_LIVE" --logins benchlive \
        --count "$LIVE_ACCOUNTS" --server "$IMAPS" --password-env STACK_IMAP_PASSWORD \
        --infos 'idle=true' --list "$list" >/dev/null
    live_yaml "$yaml" "$topic" all
    start_worker "$yaml" live-idle
    # (each session syncs its INBOX once before its first IDLE: the
    # accounts are then synced ones)
    read -r n secs < <(wait_idle "$LIVE_ACCOUNTS" 60)
    if [ "$n" = null ] || [ "$n" -lt 1 ]; then
        record live_latency_idle "${LIVE_ACCOUNTS}acc" 1 "$(jq -nc --argjson n "$n" \
            '{messages: 0, sessions: $n, skipped: "the worker holds no IDLE session"}')"
    else
        out=$("$TOOL" live-latency --nats "$STACK_NATS_URL" --in-topic "$topic" --server "$IMAPS" \
            --ca "$STACK_IMAP_CA_FILE" --password-env STACK_IMAP_PASSWORD --list "$list" \
            --messages "$LIVE_MESSAGES" --mode idle --timeout "$LIVE_TIMEOUT")
        record live_latency_idle "${LIVE_ACCOUNTS}acc" 1 "$(jq -c --argjson n "$n" \
            --argjson s "$secs" --argjson lim "$(cat /proc/sys/fs/inotify/max_user_instances)" \
            '. + {sessions: $n, ramp_secs: $s, inotify_max_user_instances: $lim}' <<<"$out")"
    fi
    stop_pid "$WORKER_PID"

    live_yaml "$yaml" "$topic" off
    start_worker "$yaml" live-order
    out=$("$TOOL" live-latency --nats "$STACK_NATS_URL" --in-topic "$topic" --server "$IMAPS" \
        --ca "$STACK_IMAP_CA_FILE" --password-env STACK_IMAP_PASSWORD --list "$list" \
        --messages "$LIVE_MESSAGES" --mode order --subject "outboundIMAP.$TAG" --timeout "$LIVE_TIMEOUT")
    record live_latency_order "${LIVE_ACCOUNTS}acc" 1 "$out"
    stop_pid "$WORKER_PID"
}

# Sockets a process holds, and its established TCP connections to Dovecot.
socket_count() { find "/proc/$1/fd" -lname 'socket:*' 2>/dev/null | wc -l; }
imap_conns() { ss -Htnp state established "( dport = :$STACK_IMAPS_PORT )" 2>/dev/null | grep -c "pid=$1," || true; }
dovecot_imap_procs() { pgrep -c -x imap || true; }
# Dovecot's sessions that found the inotify limit reached (and poll instead).
inotify_warnings() {
    grep -c 'Inotify instance limit' "$STATE/dovecot/dovecot.log" 2>/dev/null || true
}

# IDLE_USERS identities, one worker with `imap.idle: all`: sessions reached,
# RSS against the same worker configuration without IDLE, connections, CPU
# at rest, Dovecot's processes.
run_idle_1k() {
    local yaml=$WORK/worker-idle1k.yaml rss0 n m secs rss1 cpu0 cpu1 cass0 cass1 socks conns
    local procs0 procs1 warn0
    reset_live
    "$TOOL" users --hosts "$STACK_CASSANDRA_HOSTS" --keyspace "$KS_LIVE" --logins benchidle \
        --count "$IDLE_USERS" --server "$IMAPS" --password-env STACK_IMAP_PASSWORD \
        --infos 'idle=true' --list "$WORK/idle1k.list" >/dev/null
    # The baseline: the same identities, IDLE off, at rest after start-up.
    live_yaml "$yaml" "inboundSMTP.$TAG" off
    start_worker "$yaml" idle1k-off
    sleep 5
    rss0=$(rss_kb "$WORKER_PID")
    stop_pid "$WORKER_PID"

    procs0=$(dovecot_imap_procs)
    warn0=$(inotify_warnings)
    live_yaml "$yaml" "inboundSMTP.$TAG" all
    start_worker "$yaml" idle1k
    read -r n secs < <(wait_idle "$IDLE_USERS" "$IDLE_RAMP_SECS")
    sleep 5
    # (the sessions held when the readings are taken)
    m=$(idle_gauge)
    [ -z "$m" ] || n=$m
    rss1=$(rss_kb "$WORKER_PID")
    socks=$(socket_count "$WORKER_PID")
    conns=$(imap_conns "$WORKER_PID")
    procs1=$(dovecot_imap_procs)
    # At rest means Cassandra too: the sessions' first syncs leave
    # compactions behind, which would be billed to the leases.
    settle idle 1
    cpu0=$(cpu_s "$WORKER_PID")
    cass0=$(cpu_s "$CASS_PID")
    # (no session held, nothing to measure at rest)
    if [ "$n" != null ] && [ "$n" -gt 0 ]; then sleep "$IDLE_REST_SECS"; fi
    cpu1=$(cpu_s "$WORKER_PID")
    cass1=$(cpu_s "$CASS_PID")
    record live_idle_1k "${IDLE_USERS}id" 1 "$(jq -nc --argjson id "$IDLE_USERS" --argjson n "$n" \
        --argjson s "$secs" --argjson rss0 "$rss0" --argjson rss1 "$rss1" \
        --argjson hwm "$(hwm_kb "$WORKER_PID")" --argjson rss_end "$(rss_kb "$WORKER_PID")" \
        --argjson socks "$socks" --argjson conns "$conns" \
        --argjson procs "$((procs1 - procs0))" --argjson procs_all "$procs1" \
        --argjson cpu "$(echo "$cpu1 - $cpu0" | bc)" --argjson rest "$IDLE_REST_SECS" \
        --argjson cass "$(echo "$cass1 - $cass0" | bc)" \
        --argjson warn "$(($(inotify_warnings) - warn0))" \
        --argjson lim "$(cat /proc/sys/fs/inotify/max_user_instances)" \
        '{identities: $id, sessions: $n, ramp_secs: $s, rss_base_kb: $rss0, rss_kb: $rss1,
          rss_end_kb: $rss_end, hwm_kb: $hwm,
          per_session_kb: (if ($n // 0) > 0 then ($rss1 - $rss0) / $n else null end),
          sockets: $socks, imap_conns: $conns, dovecot_imap_procs: $procs,
          dovecot_imap_procs_all: $procs_all, rest_secs: $rest, rest_cpu_s: $cpu,
          rest_cass_cpu_s: $cass, dovecot_inotify_warnings: $warn,
          inotify_max_user_instances: $lim}')"
    stop_pid "$WORKER_PID" 60
}

run_live() {
    log "live sync: 200 folders, IDLE latency, $IDLE_USERS IDLE sessions"
    apply_schema "$KS_LIVE"
    settle live 1
    run_folders
    run_live_latency
    run_idle_1k
}

# ------------------------------------------------------------------ the run

machine_json() {
    jq -nc \
        --arg date "$(date -u '+%Y-%m-%d %H:%M UTC')" \
        --arg cpu "$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)" \
        --arg cores "$(nproc)" \
        --arg mem "$(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)" \
        --arg kernel "$(uname -sr)" \
        --arg os "$(. /etc/os-release && echo "$PRETTY_NAME")" \
        --arg rustc "$(rustc --version)" \
        --arg dovecot "$(dovecot --version)" \
        --arg cassandra "$(cqlsh -e 'SELECT release_version FROM system.local' 2>/dev/null |
            grep -oE '^ *[0-9]+\.[0-9]+\.[0-9]+ *$' | tr -d ' ')" \
        --arg java "$("$(dirname "$(readlink -f "/proc/$CASS_PID/exe")")/java" -version 2>&1 | head -1)" \
        --arg nats "$(nats-server --version)" \
        --arg mbsync "$(mbsync --version)" \
        --arg commit "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml || echo ' + uncommitted changes')" \
        '$ARGS.named'
}

if [ "$ONLY" = live ]; then
    start_lda
    run_live
    rm -rf "${STATE:?}/s3/data/$BENCH_BUCKET"
    stop_pid "$LDA_PID"
    machine_json >"$WORK/machine.json"
    python3 scripts/bench_report.py "$RESULTS" "$WORK/machine.json" --only live \
        --wall $((SECONDS - SUITE_START)) --total $((SECONDS - SCRIPT_START)) --rounds 1 >"$WORK/LIVE.md"
    log "$WORK/LIVE.md written: $((SECONDS - SCRIPT_START)) s in all, $((SECONDS - SUITE_START)) s after the build"
    exit 0
fi

log "preparing keyspaces $KS and $KS_POLLER"
apply_schema "$KS"
apply_schema "$KS_POLLER"

log "preparing mailboxes (cached between runs)"
ensure_corpus bench1k 1000
ensure_corpus bench10k 10000
ensure_corpus bench200L "$LARGE_MSGS" large
[ $LARGE = 1 ] && ensure_corpus bench50k 50000
# 200 small mailboxes: quick to make, the test is about concurrency.
log "preparing $MULTI_USERS small mailboxes bench200u1..$MULTI_USERS"
for i in $(seq "$MULTI_USERS"); do
    n=$((100 + (i * 37) % 101))
    if [ ! -f "$WORK/multi-$SEED.done" ] || [ "$i" = "$MULTI_USERS" ]; then
        ensure_corpus "bench200u$i" "$n" small
    fi
done
touch "$WORK/multi-$SEED.done"
MULTI_BYTES=0
for i in $(seq "$MULTI_USERS"); do
    MULTI_BYTES=$((MULTI_BYTES + $(mailbox_field "bench200u$i" vsize)))
done

log "seeding $POLLER_IDENTITIES identities into $KS_POLLER (kept between runs)"
record poller_seed 100k 0 "$("$TOOL" seed-identities --hosts "$STACK_CASSANDRA_HOSTS" \
    --keyspace "$KS_POLLER" --count "$POLLER_IDENTITIES")"

start_lda

# The store ceiling is "as fast as the driver allows": pick the best
# concurrency on the 1k mailbox first.
best=0 STORE_CONCURRENCY=64
for c in $STORE_CONCURRENCY_CANDIDATES; do
    run_store bench1k 1k 0 "$c" store_tuning
    rate=$(tail -n 1 "$RESULTS" | jq '.messages / .secs | floor')
    if [ "$rate" -gt "$best" ]; then best=$rate STORE_CONCURRENCY=$c; fi
done
log "store ceiling concurrency: $STORE_CONCURRENCY"

# Rounds interleave every scenario, each round in a rotated order, so a
# drift of the machine (compaction, page cache, JIT) spreads over all.
SCENARIOS=(fetch store storemark mbsync caliopen storeonly)
for round in $(seq "$ROUNDS"); do
    log "round $round of $ROUNDS"
    for k in $(seq 0 $((${#SCENARIOS[@]} - 1))); do
        s=${SCENARIOS[$(((k + round - 1) % ${#SCENARIOS[@]}))]}
        for mb in "bench1k 1k" "bench10k 10k"; do
            set -- $mb
            settle "$2" "$round"
            case $s in
                fetch) run_fetch "$1" "$2" "$round" ;;
                store) run_store "$1" "$2" "$round" "$STORE_CONCURRENCY" ;;
                storemark) run_store "$1" "$2" "$round" "$STORE_CONCURRENCY" store_ceiling_marked yes ;;
                mbsync) run_mbsync "$1" "$2" "$round" ;;
                caliopen) run_caliopen "$1" "$2" "$round" ;;
                storeonly) run_caliopen_store_only "$1" "$2" "$round" ;;
            esac
        done
    done
    log "production shape (Cassandra on core 0, the rest on core 1), round $round"
    pin on
    SUFFIX=_pinned
    settle 10k "$round"
    run_store bench10k 10k "$round" "$STORE_CONCURRENCY"
    settle 10k "$round"
    run_store bench10k 10k "$round" "$STORE_CONCURRENCY" store_ceiling_marked yes
    settle 10k "$round"
    run_mbsync bench10k 10k "$round"
    settle 10k "$round"
    run_caliopen bench10k 10k "$round"
    SUFFIX=
    pin off
    log "large messages, round $round"
    settle 200L "$round"
    run_fetch bench200L 200L "$round"
    run_mbsync bench200L 200L "$round"
    settle 200L "$round"
    run_caliopen_large bench200L 200L "$round"
    run_multi 10 "$round"
    run_multi 50 "$round"
    run_poller "$round"
done

# Live sync: one round (its figures are per-message latencies and
# at-rest readings, not throughputs that need several rounds).
run_live

if [ $LARGE = 1 ]; then
    log "large mailbox (one round)"
    run_fetch bench50k 50k 1
    run_store bench50k 50k 1 "$STORE_CONCURRENCY"
    run_mbsync bench50k 50k 1
    run_caliopen bench50k 50k 1
    run_caliopen_store_only bench50k 50k 1
fi
truncate_raw
# The run's bucket (versitygw's posix backend keeps a bucket as a directory).
rm -rf "${STATE:?}/s3/data/$BENCH_BUCKET"

stop_pid "$LDA_PID"
machine_json >"$WORK/machine.json"
python3 scripts/bench_report.py "$RESULTS" "$WORK/machine.json" \
    --wall $((SECONDS - SUITE_START)) --total $((SECONDS - SCRIPT_START)) --rounds "$ROUNDS" --large "$LARGE" >BENCHMARKS.md
log "BENCHMARKS.md written: $((SECONDS - SCRIPT_START)) s in all, $((SECONDS - SUITE_START)) s after the build"
