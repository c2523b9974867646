# shellcheck shell=bash
# scripts/stack/tls.sh, sourced by scripts/stack.sh: the test CA and the
# server certificate Dovecot presents (and the CA file the clients trust).

TLS_DIR=$STATE/tls

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
