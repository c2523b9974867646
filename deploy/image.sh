#!/usr/bin/env bash
# Build the OCI image caliopen-imap:<version of Cargo.toml> from the release
# binary (make image builds it first), with podman, or docker where a Docker
# engine answers. No base image is pulled: the root file system is assembled
# here and added to a FROM scratch image (see Containerfile).
#
#   deploy/image.sh [BINARY]     default target/release/caliopen-imap
#
# Environment: IMAGE (default caliopen-imap:<version>), CONTAINERS_CONF
# (default deploy/containers.conf: runc and the ulimits this machine allows).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bin=${1:-target/release/caliopen-imap}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
image=${IMAGE:-caliopen-imap:$version}
uid=10001 # the image's user; owns the two pid files and nothing else

if command -v podman >/dev/null; then
    engine=podman
    export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/containers.conf}
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    engine=docker
else
    echo "image: neither podman nor a running Docker engine found" >&2
    exit 1
fi
[ -x "$bin" ] || { echo "image: $bin not built (cargo build --release)" >&2; exit 1; }

ctx=target/image
rm -rf "$ctx"
root=$ctx/rootfs
mkdir -p "$root"/{usr/local/bin,etc/caliopen,etc/ssl/certs,tmp}

# The binary, stripped (the release profile keeps line tables), and its names.
strip -o "$root/usr/local/bin/caliopen-imap" "$bin"
for name in imapworker imapctl idpoller; do
    ln -s caliopen-imap "$root/usr/local/bin/$name"
done
# The shared libraries it links (libc, libm, libgcc_s, the loader), at the
# paths ldd gives, as files rather than symlinks.
ldd "$bin" | grep -o '/[^ ]*' | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
# Defaults for the local stack; deployments mount their own /etc/caliopen.
cp config/imapworker.yaml config/idpoller.yaml "$root/etc/caliopen/"
echo "root:x:0:0:root:/:/nonexistent" >"$root/etc/passwd"
echo "caliopen:x:$uid:$uid:caliopen-imap:/tmp:/nonexistent" >>"$root/etc/passwd"
printf 'root:x:0:\ncaliopen:x:%s:\n' "$uid" >"$root/etc/group"
chmod 1777 "$root/tmp"
# Everything root's, except the entrypoints' pid files, which the user may
# write (/ itself is not writable by it). Owners are set in the tarball, so
# building as a non-root user gives the same image.
tar --numeric-owner --owner=0 --group=0 -C "$root" -cf "$ctx/rootfs.tar" .
pids=$ctx/pids
mkdir -p "$pids"
: >"$pids/imapworker.pid"
: >"$pids/idpoller.pid"
chmod 644 "$pids"/*.pid
tar --numeric-owner --owner=$uid --group=$uid -C "$pids" \
    -rf "$ctx/rootfs.tar" ./imapworker.pid ./idpoller.pid
rm -rf "$pids"
rm -rf "$root"

$engine build -q -f Containerfile -t "$image" \
    --label org.opencontainers.image.version="$version" "$ctx" >/dev/null
size=$($engine image inspect --format '{{.Size}}' "$image")
echo "image: built $image ($((size / 1024 / 1024)) MB) with $engine"
