#!/usr/bin/env bash
# The main job end to end, on the local stack:
#   stack up -> build -> start the processor stand-in, imapworker and idpoller
#   -> a demo Caliopen user and a demo Dovecot mailbox -> imapctl addremote
#   -> imapctl syncremote --wait -> a readable summary of what is in Cassandra.
# Safe to run again: the demo identity is removed and added anew each time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:/root/.cargo/bin:$PATH"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Local stack (NATS, Cassandra, Dovecot, S3)"
bash scripts/stack.sh up
# shellcheck disable=SC1091
source .stack/env

say "Build (release)"
cargo build --release --quiet --bins --examples
BIN=$PWD/target/release/caliopen-imap
CONFIG=config/imapworker.yaml
DEMO_DIR=.stack/demo
mkdir -p "$DEMO_DIR"

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

say "Daemons: processor stand-in and imapworker (logs in $DEMO_DIR)"
# The stand-in answers process_raw as Caliopen's message processor would:
# that component is not part of this project.
target/release/examples/lda_standin "$STACK_NATS_URL" inboundSMTP >"$DEMO_DIR/lda.log" 2>&1 &
pids+=($!)
# metrics_addr from the environment: /metrics, /healthz and /readyz.
METRICS=127.0.0.1:19464
CALIOPEN_IMAP_METRICS_ADDR=$METRICS "$BIN" worker -c "$CONFIG" start >"$DEMO_DIR/worker.log" 2>&1 &
pids+=($!)
sleep 1

say "Demo Caliopen user 'demo' and Dovecot mailbox 'demo@caliopen.test'"
DEMO_USER_ID=6c6f6361-6c00-4000-8000-000000000001   # fixed: the demo is repeatable
"$STACK_CQLSH" 127.0.0.1 19042 -e \
  "INSERT INTO caliopen.user (user_id, name) VALUES ($DEMO_USER_ID, 'demo');
   INSERT INTO caliopen.user_name (name, user_id) VALUES ('demo', $DEMO_USER_ID);"
MAILBOX_USER=demo@caliopen.test
count=$(doveadm -c "$STACK_DOVECOT_CONF" -f flow mailbox status -u "$MAILBOX_USER" messages INBOX |
        sed 's/.*messages=//')
if [ "${count:-0}" -lt 40 ]; then
    for i in $(seq 1 40); do
        printf 'From: Zoé Exemple <zoe@example.test>\r\nTo: %s\r\nSubject: Demo message %d, café ☕\r\nDate: %s\r\nMessage-ID: <demo-%d@example.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nBonjour ! This is demo message %d.\r\n' \
            "$MAILBOX_USER" "$i" "$(date -R)" "$i" "$i" |
            doveadm -c "$STACK_DOVECOT_CONF" save -u "$MAILBOX_USER" -m INBOX
    done
    count=40
fi
if [ "${count:-0}" -lt 41 ]; then
    # One message with a 3 MB attachment: over raw_size_limit (1 MiB), so it
    # goes to the S3 bucket and its row keeps only the uri.
    {
        printf 'From: Zoé Exemple <zoe@example.test>\r\nTo: %s\r\nSubject: Demo large message, 3 MB attachment\r\nDate: %s\r\nMessage-ID: <demo-large@example.test>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe attachment is too large for a Cassandra row.\r\n--b1\r\nContent-Type: application/octet-stream; name="data.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\n' \
            "$MAILBOX_USER" "$(date -R)"
        head -c 2300000 /dev/urandom | base64 -w 76 | sed 's/$/\r/'
        printf -- '--b1--\r\n'
    } | doveadm -c "$STACK_DOVECOT_CONF" save -u "$MAILBOX_USER" -m INBOX
fi
doveadm -c "$STACK_DOVECOT_CONF" mailbox status -u "$MAILBOX_USER" "messages uidnext uidvalidity" INBOX

say "imapctl addremote (password from the environment, never on the command line)"
export DEMO_IMAP_PASSWORD=$STACK_IMAP_PASSWORD
if "$BIN" ctl -c "$CONFIG" listremotes --username demo --json | grep -q "\"$MAILBOX_USER\""; then
    echo "already added by an earlier run: this sync fetches only what is new (nothing doubled)"
else
    "$BIN" ctl -c "$CONFIG" addremote --username demo --login "$MAILBOX_USER" \
        --pass-env DEMO_IMAP_PASSWORD --server 127.0.0.1:10993 --display "Demo account"
fi

say "imapctl syncremote --wait"
"$BIN" ctl -c "$CONFIG" syncremote --username demo --identifier "$MAILBOX_USER" --wait

say "idpoller: schedules every active remote identity (first scan)"
"$BIN" poller -c config/idpoller.yaml start >"$DEMO_DIR/poller.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 60); do
    grep -q "scan applied" "$DEMO_DIR/poller.log" && break
    sleep 0.5
done
grep -E "leader|scan applied" "$DEMO_DIR/poller.log" | sed 's/\x1b\[[0-9;]*m//g' || true

say "imapctl listremotes"
"$BIN" ctl -c "$CONFIG" listremotes --username demo

say "What landed in Cassandra and S3"
target/release/examples/demo_summary "$CONFIG" demo

say "imapctl status (exit 1 if any identity is unhealthy)"
"$BIN" ctl -c "$CONFIG" status --username demo || true

say "A few lines of the worker's /metrics ($METRICS)"
# Plain bash HTTP: no client needed.
exec 3<>"/dev/tcp/${METRICS%:*}/${METRICS#*:}"
printf 'GET /metrics HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$METRICS" >&3
grep -E '^caliopen_imap_(syncs_ended_total|messages_(fetched|handed_off|already_delivered)_total|fetched_bytes_total|sync_seconds_(sum|count)|jobs_in_flight|job_slots)( |\{)' <&3 || true
exec 3<&-

say "Where a real Prometheus would find it"
echo "scrape http://$METRICS/metrics with the rules in $PWD/deploy/prometheus/caliopen-imap.rules.yml (README \"Alerts\")"
