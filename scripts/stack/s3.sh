# shellcheck shell=bash
# scripts/stack/s3.sh, sourced by scripts/stack.sh: the S3 server
# (versitygw, built once from the Go module proxy), Python's minio client
# the tests read objects back with, the bucket, and the commands that run
# the S3 server alone (s3-up, s3-down, s3-status).

# versitygw, a maintained S3 gateway (Apache-2.0) whose posix backend keeps
# objects as plain files. Built from the Go module proxy, cached per user.
S3_VERSION=v1.8.0
S3_CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/caliopen-imap/versitygw-$S3_VERSION
S3_BIN=$S3_CACHE_DIR/bin/versitygw
# Python's `minio` client, the one Caliopen's reader uses: tests read objects
# back through it.
S3_PY_VENV=$S3_CACHE_DIR/minio-venv
S3_PYTHON=$S3_PY_VENV/bin/python
S3_PY_MINIO_VERSION=7.2.20
S3_REGION=us-east-1
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855

S3_DIR=$STATE/s3

# --------------------------------------------------------------- installing

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

# ------------------------------------------------------------------- server

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
    for _ in $(seq 100); do
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
