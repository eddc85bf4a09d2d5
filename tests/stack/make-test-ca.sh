#!/usr/bin/env bash
# A throwaway certificate authority and a loopback server certificate for the
# https test servers (source_server.py), shaped so that rustls/webpki accepts
# them.
#
#   make-test-ca.sh <dir>
#
# Creates <dir> if needed and leaves in it:
#   ca.pem      test CA certificate (EC P-256, basicConstraints critical
#               CA:TRUE, keyUsage critical keyCertSign,cRLSign)
#   ca.key      its private key (PKCS#8 PEM, mode 0600)
#   server.pem  server certificate signed by the CA: SAN DNS:localhost,
#               IP:127.0.0.1, IP:::1; basicConstraints CA:FALSE; keyUsage
#               digitalSignature,keyEncipherment; extendedKeyUsage serverAuth
#   server.key  its private key (PKCS#8 PEM, mode 0600)
# Both certificates are valid for 30 days from the moment they are made.
#
# Idempotent: if the four files are there, match each other, verify and have
# more than a day of validity left, nothing is touched. Otherwise all four are
# made afresh (the old CA is then no longer trusted by the new server cert).
# Concurrent runs on the same <dir> are serialised with flock on
# <dir>/.make-test-ca.lock.
#
# Prints nothing on success; errors go to stderr with a non-zero exit.
set -euo pipefail

readonly VALID_DAYS=30
# Existing material is reused only while it stays valid this much longer (s).
readonly MIN_REMAINING=86400

die() {
    printf 'make-test-ca: %s\n' "$*" >&2
    exit 1
}

# run CMD...: run CMD with its output captured; show it only if CMD fails.
run() {
    local out
    if ! out=$("$@" 2>&1); then
        printf 'make-test-ca: failed: %s\n%s\n' "$*" "$out" >&2
        return 1
    fi
}

# quiet CMD...: true if CMD succeeds; its output is discarded.
quiet() {
    "$@" >/dev/null 2>&1
}

# same_key CERT KEY: the certificate's public key is the key's.
same_key() {
    local from_cert from_key
    from_cert=$(openssl x509 -in "$1" -noout -pubkey 2>/dev/null) || return 1
    from_key=$(openssl pkey -in "$2" -pubout 2>/dev/null) || return 1
    [[ -n $from_cert && $from_cert == "$from_key" ]]
}

# still_good DIR: the four files exist and are usable for another day.
still_good() {
    local d=$1 f san
    for f in ca.pem ca.key server.pem server.key; do
        [[ -s $d/$f ]] || return 1
    done
    quiet openssl x509 -in "$d/ca.pem" -noout -checkend "$MIN_REMAINING" || return 1
    quiet openssl x509 -in "$d/server.pem" -noout -checkend "$MIN_REMAINING" || return 1
    same_key "$d/ca.pem" "$d/ca.key" || return 1
    same_key "$d/server.pem" "$d/server.key" || return 1
    quiet openssl verify -x509_strict -purpose sslserver -CAfile "$d/ca.pem" "$d/server.pem" || return 1
    san=$(openssl x509 -in "$d/server.pem" -noout -ext subjectAltName 2>/dev/null) || return 1
    [[ $san == *DNS:localhost* && $san == *"IP Address:127.0.0.1"* ]]
}

# make_all DIR: new CA and server certificate, moved into DIR at the end.
make_all() {
    local d=$1 tmp ca_serial server_serial suffix
    tmp=$(mktemp -d "$d/.make-test-ca.XXXXXX")
    # shellcheck disable=SC2064 # expand $tmp now: it is local to this function
    trap "rm -rf '$tmp'" EXIT

    cat >"$tmp/openssl.cnf" <<'EOF'
[req]
distinguished_name = req_dn
prompt = no
utf8 = yes

[req_dn]
CN = unused

[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF

    # 15 random bytes: a positive serial well under the 20-octet limit.
    ca_serial=$(openssl rand -hex 15)
    server_serial=$(openssl rand -hex 15)
    suffix=$(openssl rand -hex 4)

    run openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
        -out "$tmp/ca.key"
    run openssl req -config "$tmp/openssl.cnf" -new -x509 -sha256 \
        -key "$tmp/ca.key" -subj "/O=Plugin Delivery tests/CN=Plugin Delivery Test CA $suffix" \
        -days "$VALID_DAYS" -set_serial "0x$ca_serial" -extensions v3_ca \
        -out "$tmp/ca.pem"

    run openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
        -out "$tmp/server.key"
    run openssl req -config "$tmp/openssl.cnf" -new -sha256 \
        -key "$tmp/server.key" -subj "/O=Plugin Delivery tests/CN=localhost" \
        -out "$tmp/server.csr"
    run openssl x509 -req -sha256 -in "$tmp/server.csr" \
        -CA "$tmp/ca.pem" -CAkey "$tmp/ca.key" -set_serial "0x$server_serial" \
        -days "$VALID_DAYS" -extfile "$tmp/openssl.cnf" -extensions v3_server \
        -out "$tmp/server.pem"

    run openssl verify -x509_strict -purpose sslserver -CAfile "$tmp/ca.pem" "$tmp/server.pem"

    chmod 0600 "$tmp/ca.key" "$tmp/server.key"
    chmod 0644 "$tmp/ca.pem" "$tmp/server.pem"
    # Each rename is atomic, the four together are not: readers that may run
    # while certificates are being replaced should hold the same flock.
    mv -f "$tmp/ca.key" "$d/ca.key"
    mv -f "$tmp/server.key" "$d/server.key"
    mv -f "$tmp/ca.pem" "$d/ca.pem"
    mv -f "$tmp/server.pem" "$d/server.pem"

    rm -rf "$tmp"
    trap - EXIT
}

main() {
    [[ $# -eq 1 && -n $1 ]] || die "usage: make-test-ca.sh <dir>"
    command -v openssl >/dev/null 2>&1 || die "openssl is not installed"
    local dir=$1
    mkdir -p "$dir" || die "cannot create $dir"
    umask 077

    if command -v flock >/dev/null 2>&1; then
        exec 9>"$dir/.make-test-ca.lock"
        flock 9
    fi

    if still_good "$dir"; then
        return 0
    fi
    make_all "$dir"
}

main "$@"
