#!/bin/sh
# Check the unit files with `systemd-analyze verify`, pointing ExecStart at
# a built binary (the units name /usr/local/bin, where `make install` puts
# it). Usage: deploy/verify.sh [BINARY]   (default: target/debug/caliopen-imap)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin=$(realpath "${1:-$here/../target/debug/caliopen-imap}")
command -v systemd-analyze >/dev/null || { echo "systemd-analyze not found (apt-get install systemd)" >&2; exit 2; }
[ -x "$bin" ] || { echo "no binary at $bin: cargo build first" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
ln -s "$bin" "$tmp/imapworker"
ln -s "$bin" "$tmp/idpoller"
for u in imapworker.service idpoller.service; do
    sed "s#/usr/local/bin/#$tmp/#" "$here/$u" >"$tmp/$u"
done
# verify prints nothing when the units are fine.
out=$(systemd-analyze verify "$tmp/imapworker.service" "$tmp/idpoller.service" 2>&1) || true
if [ -n "$out" ]; then
    echo "$out" | sed "s#$tmp/##g" >&2
    exit 1
fi
echo "systemd-analyze verify: imapworker.service and idpoller.service accepted"
