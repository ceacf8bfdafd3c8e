#!/usr/bin/env bash
# Throwaway certificates for the tls/ paths in config/full.toml: a private CA,
# an ECDSA and an RSA server certificate, and a mesh certificate with a SPIFFE
# ID. For trying the examples only; never for production. Usage:
#   scripts/example-certs.sh [DIR]      (default: config/tls)
set -euo pipefail
dir=${1:-"$(dirname "$0")/../config/tls"}
mkdir -p "$dir"
cd "$dir"
command -v openssl >/dev/null || { echo "needs the openssl command (Debian: openssl)" >&2; exit 1; }

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -subj "/CN=meshgate example CA" -keyout mesh-ca.key -out mesh-ca.pem \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

leaf() { # name san key-options...
  local name=$1 san=$2; shift 2
  openssl req -newkey "$@" -nodes -subj "/CN=$name" -keyout "$name.key" -out "$name.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$san" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA mesh-ca.pem -CAkey mesh-ca.key -CAcreateserial \
    -days 30 -extfile "$name.ext" -out "$name.pem" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
leaf edge "DNS:edge.example,DNS:localhost" ec -pkeyopt ec_paramgen_curve:P-256
leaf edge-rsa "DNS:rsa.example" rsa:2048
leaf mesh "URI:spiffe://prod.example/ns/gateway/sa/edge-1,DNS:orders.mesh" ec -pkeyopt ec_paramgen_curve:P-256
rm -f mesh-ca.srl
echo "example certificates in $(pwd)"
