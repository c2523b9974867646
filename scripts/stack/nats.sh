# shellcheck shell=bash
# scripts/stack/nats.sh, sourced by scripts/stack.sh: the NATS server
# (Debian's nats-server), its pid, readiness and start.

NATS_DIR=$STATE/nats

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
    for _ in $(seq 100); do
        nats_ready && return 0
        nats_running || break
        sleep 0.1
    done
    tail -n 20 "$NATS_DIR/nats.log" "$NATS_DIR/stdout.log" >&2 2>/dev/null || true
    die "NATS did not start, see $NATS_DIR/nats.log"
}
