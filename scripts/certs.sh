#!/usr/bin/env bash
# Demo identities for the mesh: a CA and one short-lived certificate per
# workload with a SPIFFE URI SAN, spiffe://<trust domain>/ns/<ns>/sa/<name>.
#
#   scripts/certs.sh [--out DIR] [--ns NS] [--trust-domain TD] [--hours H] name...
#
# DIR (default .txmesh/certs) gets ca.crt/ca.key and <name>.crt/<name>.key.
# Re-running reuses a CA valid for at least another hour and re-creates any
# workload certificate that is missing or expires within the hour; delete
# DIR to start over. Keys are EC P-256. In Istio, istiod issues these
# identities instead (docs/security.md).
set -euo pipefail
OUT=.txmesh/certs NS=shop TD=txmesh.local HOURS=24
names=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --ns) NS=$2; shift 2 ;;
    --trust-domain) TD=$2; shift 2 ;;
    --hours) HOURS=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "certs.sh: unknown option $1" >&2; exit 2 ;;
    *) names+=("$1"); shift ;;
  esac
done
[ ${#names[@]} -gt 0 ] || { echo "certs.sh: name at least one workload (e.g. order payment inventory)" >&2; exit 2; }
command -v openssl >/dev/null || { echo "certs.sh: openssl is needed (Debian package openssl)" >&2; exit 1; }
mkdir -p "$OUT"
chmod 700 "$OUT"
days=$(( (HOURS + 23) / 24 ))

valid() { [ -f "$1" ] && openssl x509 -in "$1" -noout -checkend 3600 >/dev/null 2>&1; }

if ! valid "$OUT/ca.crt"; then
  openssl ecparam -name prime256v1 -genkey -noout -out "$OUT/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$OUT/ca.key" -sha256 -days $((days + 7)) -subj "/O=txmesh/CN=txmesh demo CA ($TD)" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$OUT/ca.crt" 2>/dev/null
  echo "[certs] new CA $OUT/ca.crt ($TD)"
fi

for n in "${names[@]}"; do
  if ! [[ "$n" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]]; then
    echo "certs.sh: $n is not a valid workload name (lowercase letters, digits, -)" >&2; exit 2
  fi
  crt=$OUT/$n.crt key=$OUT/$n.key
  if valid "$crt" && openssl verify -CAfile "$OUT/ca.crt" "$crt" >/dev/null 2>&1; then
    continue
  fi
  id="spiffe://$TD/ns/$NS/sa/$n"
  openssl ecparam -name prime256v1 -genkey -noout -out "$key" 2>/dev/null
  ext=$(mktemp)
  printf 'subjectAltName=critical,URI:%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' "$id" >"$ext"
  openssl req -new -key "$key" -subj "/O=txmesh/CN=$n" 2>/dev/null |
    openssl x509 -req -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial -sha256 -days "$days" \
      -extfile "$ext" -out "$crt" 2>/dev/null
  rm -f "$ext"
  chmod 600 "$key"
  echo "[certs] $crt  $id  (valid $HOURS h)"
done
