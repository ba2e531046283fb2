#!/bin/sh
# Create a private CA and a TLS certificate for the Flower SuperLink.
#   deployments/flower/certs/generate.sh [OUT_DIR] [EXTRA_SAN ...]
# EXTRA_SAN: more names the SuperNodes use to reach the SuperLink, e.g.
#   DNS:flower-superlink.oncoflow.svc.cluster.local  or  IP:10.0.0.5
# Writes ca.crt, ca.key, server.pem, server.key (keys mode 600). SuperNodes get ca.crt only.
# FLOWER_CERT_DAYS (default 365) and FLOWER_KEY_BITS (RSA, default 4096) tune the output.
# Nothing here is committed: the directory's .gitignore keeps keys and certificates out of git.
set -eu
OUT="${1:-$(dirname "$0")}"
[ "$#" -gt 0 ] && shift
DAYS="${FLOWER_CERT_DAYS:-365}"
BITS="${FLOWER_KEY_BITS:-4096}"
SAN="DNS:superlink,DNS:flower-superlink,DNS:flower-superlink.oncoflow.svc,DNS:flower-superlink.oncoflow.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:::1"
for extra in "$@"; do SAN="$SAN,$extra"; done

mkdir -p "$OUT"
umask 077
openssl req -x509 -newkey rsa:$BITS -sha256 -days "$DAYS" -nodes \
    -keyout "$OUT/ca.key" -out "$OUT/ca.crt" -subj "/CN=oncoflow-flower-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl req -newkey rsa:$BITS -sha256 -nodes \
    -keyout "$OUT/server.key" -out "$OUT/server.csr" -subj "/CN=flower-superlink"
EXT="$(mktemp)"
trap 'rm -f "$EXT"' EXIT
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$SAN" > "$EXT"
openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" \
    -CAcreateserial -out "$OUT/server.pem" -days "$DAYS" -sha256 -extfile "$EXT"
rm -f "$OUT/server.csr" "$OUT/ca.srl"
chmod 644 "$OUT/ca.crt" "$OUT/server.pem"
echo "wrote $OUT/ca.crt $OUT/server.pem $OUT/server.key (SAN: $SAN)"
