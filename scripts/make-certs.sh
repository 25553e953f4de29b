#!/usr/bin/env bash
# Certificates for a small fleet: a CA, and for each agent one certificate that serves its HTTPS
# API, identifies it to its peers (mutual TLS) and carries qemu's TLS migration stream, both as
# server and as client. The agent's names and addresses must be in the certificate (peers check
# the one they use).
#
#   scripts/make-certs.sh DIR NAME=ADDR[,ADDR...] [NAME=ADDR[,ADDR...] ...]
#   e.g. scripts/make-certs.sh /etc/kvm-migrate/tls hosta=10.0.0.1,hosta.example,fd00::1 hostb=10.0.0.2
#   scripts/make-certs.sh DIR --revoke NAME [NAME ...]   revoke DIR/NAME.pem, write DIR/crl.pem
#   scripts/make-certs.sh DIR --crl                      write DIR/crl.pem afresh (before it expires)
#
# writes DIR/ca.pem and DIR/ca-key.pem (once: an existing CA is reused, so hosts can be added),
# and DIR/NAME.pem + DIR/NAME-key.pem per agent; ADDR is an IPv4 or IPv6 address or a DNS name,
# each goes into subjectAltName (and NAME as a DNS name). Give each agent its own pair and ca.pem:
#   kvm-migrate agent --tls-cert NAME.pem --tls-key NAME-key.pem --tls-ca ca.pem [--tls-crl crl.pem] ...
# Revocations are kept in DIR/index.txt (openssl's CA database); crl.pem is valid for 30 days.
# Keep ca-key.pem off the agents.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,18p' "$0" >&2; exit 64; }
dir=$1; shift
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
umask 077
days=825
crl_days=30

if [ -f "$dir/ca.pem" ] && [ ! -f "$dir/ca-key.pem" ]; then
  echo "make-certs: $dir/ca.pem is there but not its key ca-key.pem: nothing can be signed" >&2
  exit 1
fi
if [ ! -f "$dir/ca.pem" ]; then
  [ "$1" != --revoke ] && [ "$1" != --crl ] || { echo "make-certs: $dir has no CA: nothing to revoke" >&2; exit 1; }
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days "$days" \
    -subj "/CN=kvm-migrate fleet CA" -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

# openssl ca's configuration for revoking and CRLs, rewritten every run (DIR may have moved).
[ -f "$dir/index.txt" ] || : > "$dir/index.txt"
[ -f "$dir/crlnumber" ] || echo 01 > "$dir/crlnumber"
printf '%s\n' '[ca]' 'default_ca = fleet' '[fleet]' "database = $dir/index.txt" "crlnumber = $dir/crlnumber" \
  "certificate = $dir/ca.pem" "private_key = $dir/ca-key.pem" 'default_md = sha256' "default_crl_days = $crl_days" > "$dir/ca.cnf"

write_crl() {
  openssl ca -config "$dir/ca.cnf" -gencrl -out "$dir/crl.pem" 2>/dev/null
  chmod 644 "$dir/crl.pem"
  echo "$dir/crl.pem ($(openssl crl -in "$dir/crl.pem" -noout -nextupdate)): give it to every agent (--tls-crl) and restart them"
}

case $1 in
  --crl)
    [ $# -eq 1 ] || { echo "make-certs: --crl takes no names" >&2; exit 64; }
    write_crl
    exit 0 ;;
  --revoke)
    shift
    [ $# -ge 1 ] || { echo "make-certs: --revoke wants the NAMEs to revoke" >&2; exit 64; }
    for name in "$@"; do
      [ -f "$dir/$name.pem" ] || { echo "make-certs: no certificate $dir/$name.pem to revoke" >&2; exit 1; }
      serial=$(openssl x509 -in "$dir/$name.pem" -noout -serial); serial=${serial#serial=}
      if grep -q "^R.*	$serial	" "$dir/index.txt"; then echo "$dir/$name.pem: already revoked"; continue; fi
      openssl ca -config "$dir/ca.cnf" -revoke "$dir/$name.pem" 2>/dev/null
      echo "$dir/$name.pem: revoked (serial $serial)"
    done
    write_crl
    exit 0 ;;
esac

for spec in "$@"; do
  name=${spec%%=*}
  addresses=${spec#*=}
  [ -n "$name" ] && [ -n "$addresses" ] && [ "$name" != "$spec" ] || { echo "make-certs: want NAME=ADDR[,ADDR...], got $spec" >&2; exit 64; }
  san=""
  IFS=, read -ra list <<< "$addresses"
  for address in "${list[@]}" "$name"; do
    address=${address#[}; address=${address%]}
    [ -n "$address" ] || { echo "make-certs: an empty address in $spec" >&2; exit 64; }
    if [[ $address =~ ^[0-9.]+$ || $address == *:* ]]; then entry="IP:$address"; else entry="DNS:$address"; fi
    [[ ",$san," == *",$entry,"* ]] || san=${san:+$san,}$entry
  done
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
