# shellcheck shell=bash
# scripts/stack/common.sh, sourced by scripts/stack.sh: what every service
# of the local stack needs (logging, pid files, detached servers, free
# ports, stopping a pid) and the installation of the Debian packages, so
# each service's file holds only what is its own.

HOME=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
LOG_DIR=$STATE/logs                   # logs of install steps

APT_PACKAGES=(nats-server dovecot-imapd dovecot-core openjdk-17-jre-headless
              maven python3-venv openssl curl)

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

# Everything `up` needs, each piece once (the caches are per user).
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
