#!/usr/bin/env bash
# Benchmarks of caliopen-imap against its ceilings and against mbsync, on the
# local stack (NATS, Cassandra, Dovecot, S3 on loopback; scripts/stack.sh).
# The suite is examples/bench/ (docs/development.md, "How the bench is
# built"); this installs its Debian peers, builds, and runs it.
#
#   scripts/bench.sh            1k and 10k mailboxes, a large-message mailbox
#                               (10 % of 1-20 MB), 200 identities, poller,
#                               live sync
#   scripts/bench.sh --large    the same plus a 50k mailbox (one round)
#   scripts/bench.sh --rounds N rounds of every measurement (default 3)
#   scripts/bench.sh --only live
#                               only the live-sync scenarios (IDLE latency,
#                               1,000 IDLE sessions, 200-folder resync): their
#                               figures go to .stack/bench/LIVE.md, and
#                               BENCHMARKS.md is left alone
#
# Rewrites BENCHMARKS.md at the repository root and its pictures in
# docs/bench/. Scratch files (configs, logs, the raw figures in
# results.jsonl, mbsync's Maildir) live in .stack/bench/.
# BENCH_PROFILE=debug builds and runs debug binaries (to try the suite out
# on a shared machine; its figures are not the benchmark's), and
# BENCH_IDLE_USERS, BENCH_IDLE_REST_SECS, BENCH_LIVE_MESSAGES shrink the
# live-sync runs (1000, 60, 100) for a quick try.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO_ROOT"
# (the suite reports the time in all, the build included, from here)
BENCH_T0=$(date +%s)
export BENCH_T0

usage() { echo "usage: scripts/bench.sh [--large] [--rounds N] [--only live]" >&2; exit 2; }
args=("$@")
while [ $# -gt 0 ]; do
    case $1 in
        --large) ;;
        --rounds) [ $# -ge 2 ] || usage; shift ;;
        --only) [ "${2:-}" = live ] || { echo "--only: live is the one subset" >&2; exit 2; }; shift ;;
        *) usage ;;
    esac
    shift
done
PROFILE=${BENCH_PROFILE:-release}
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

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
# The stack's STACK_* variables, for the suite and the tools it runs (the
# password reaches them through the environment, never argv).
set -a
# shellcheck source=/dev/null
. "${CALIOPEN_IMAP_STACK_DIR:-$REPO_ROOT/.stack}/env"
set +a

log "building $PROFILE binaries and examples"
if [ "$PROFILE" = release ]; then
    cargo build --release --examples --bins -q
else
    cargo build --examples --bins -q
fi
BENCH_PROFILE=$PROFILE exec "target/$PROFILE/examples/bench" "${args[@]}"
