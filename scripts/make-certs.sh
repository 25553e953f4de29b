#!/usr/bin/env bash
# Certificates for a small fleet: a CA, and for each agent one certificate that serves its HTTPS
# API, identifies it to its peers (mutual TLS) and carries qemu's TLS migration stream, both as
# server and as client. The agent's name or address must be in the certificate (peers check it).
#
#   scripts/make-certs.sh DIR NAME=ADDRESS [NAME=ADDRESS ...]
#   e.g. scripts/make-certs.sh /etc/kvm-migrate/tls hosta=10.0.0.1 hostb=10.0.0.2
#
# writes DIR/ca.pem and DIR/ca-key.pem (once: an existing CA is reused, so hosts can be added),
# and DIR/NAME.pem + DIR/NAME-key.pem per agent. Give each agent its own pair and ca.pem:
#   kvm-migrate agent --tls-cert NAME.pem --tls-key NAME-key.pem --tls-ca ca.pem ...
# Keep ca-key.pem off the agents.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,12p' "$0" >&2; exit 64; }
dir=$1; shift
mkdir -p "$dir"
umask 077
days=825

if [ -f "$dir/ca.pem" ] && [ ! -f "$dir/ca-key.pem" ]; then
  echo "make-certs: $dir/ca.pem is there but not its key ca-key.pem: new certificates cannot be signed" >&2
  exit 1
fi
if [ ! -f "$dir/ca.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
    -subj "/CN=kvm-migrate fleet CA" -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

for spec in "$@"; do
  name=${spec%%=*}
  address=${spec#*=}
  [ -n "$name" ] && [ -n "$address" ] && [ "$name" != "$spec" ] || { echo "make-certs: want NAME=ADDRESS, got $spec" >&2; exit 64; }
  if [[ $address =~ ^[0-9.]+$ || $address == *:* ]]; then san="IP:$address,DNS:$name"; else san="DNS:$address,DNS:$name"; fi
  ext=$(mktemp)
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=$san" > "$ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$name" \
    -keyout "$dir/$name-key.pem" -out "$dir/$name.csr" 2>/dev/null
  openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" -CAcreateserial \
    -days "$days" -extfile "$ext" -out "$dir/$name.pem" 2>/dev/null
  rm -f "$dir/$name.csr" "$ext"
  echo "$dir/$name.pem ($san)"
done
rm -f "$dir/ca.srl"
