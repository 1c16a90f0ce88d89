#!/usr/bin/env bash
# benches/nbd.sh -- NBD data path: novabackup (CBT on) against nbdkit (file
# plugin) and qemu-nbd, serving the same image over a unix socket, with
# identical fio jobs (fio's nbd engine):
#   sequential 1 MiB read and write, iodepth 8   -> MB/s
#   random 4 KiB read and write, iodepth 16 and 1 -> IOPS
# Prints one markdown table: each server's median over RUNS runs and
# novabackup's ratio to the best peer.
#
#   RUNS=3 RUNTIME=5 SIZE=1G ./benches/nbd.sh
#   SMOKE=1 ./benches/nbd.sh        # seconds-long check that it all runs
#   TLS=1 ./benches/nbd.sh          # every server on loopback TCP with TLS and
#                                   # X.509 client certificates: sequential
#                                   # copies with nbdcopy (fio's libnbd may not
#                                   # read certificate files)
#
# Page cache: the image is read into the page cache first, so every server
# serves from RAM, as in ../shared/bench/BASELINE.md. Scratch goes under
# $NBBENCH/nova-nbd (default /tmp/nbbench/nova-nbd).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
RUNS=${RUNS:-3}
RUNTIME=${RUNTIME:-5}
SIZE=${SIZE:-1G}
ENGINE=${ENGINE:-auto}
if [ "${SMOKE:-0}" = 1 ]; then RUNS=1; RUNTIME=1; SIZE=64M; fi
NB=${NBBENCH:-/tmp/nbbench}
D=$NB/nova-nbd
mkdir -p "$D"
for t in fio nbdkit qemu-nbd nbdinfo; do
  command -v $t >/dev/null || { echo "nbd.sh: $t is missing (apt-get install -y fio nbdkit libnbd-bin qemu-utils)" >&2; exit 1; }
done
BIN=${NOVABACKUP:-$ROOT/target/release/novabackup}
if [ -z "${NOVABACKUP:-}" ]; then (cd "$ROOT" && cargo build --release -q -p novabackup); fi

IMG=$D/export.img
bytes=$(numfmt --from=iec "$SIZE")
if [ "$(stat -c %s "$IMG" 2>/dev/null || echo 0)" != "$bytes" ]; then
  head -c "$bytes" /dev/zero | openssl enc -aes-256-ctr -nosalt -K "$(printf nbd | sha256sum | cut -c1-64)" -iv 0 2>/dev/null > "$IMG"
fi
SOCK=$D/sock
PID=
TLS=${TLS:-0}
if [ "$TLS" = 1 ]; then
  # One CA; the server's and the client's folders in the layout QEMU,
  # nbdkit, libnbd and novabackup all read.
  P=$D/pki; rm -rf "$P"; mkdir -p "$P/server" "$P/client"
  ossl() { (cd "$P" && openssl "$@" 2>/dev/null); }
  ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca-key.pem -out ca-cert.pem \
    -days 30 -subj "/CN=bench CA" -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
  for who in server client; do
    if [ $who = server ]; then ext="subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"; subj=/CN=localhost
    else ext="extendedKeyUsage=clientAuth"; subj="/O=bench/CN=fio"; fi
    printf "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n$ext\n" > "$P/$who.ext"
    ossl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$who/$who-key.pem" -out "$who.csr" -subj "$subj"
    ossl x509 -req -in "$who.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -out "$who/$who-cert.pem" -days 30 -extfile "$who.ext"
    cp "$P/ca-cert.pem" "$P/$who/"
  done
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
fi
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

start() {
  rm -f "$SOCK"
  if [ "$TLS" = 1 ]; then start_tls "$1"; return; fi
  case $1 in
    nbdkit)   nbdkit -f -U "$SOCK" file file="$IMG" & PID=$!; URI="nbd+unix:///?socket=$SOCK" ;;
    qemu-nbd) qemu-nbd -f raw -k "$SOCK" -t -e 8 "$IMG" & PID=$!; URI="nbd+unix:///?socket=$SOCK" ;;
    novabackup)
      rm -rf "$D/state"
      "$BIN" --data-dir "$D/state" agent --nbd-listen none --nbd-socket "$SOCK" --api-listen 127.0.0.1:0 --io-engine "$ENGINE" 2> "$D/agent.log" & PID=$!
      for _ in $(seq 100); do [ -S "$SOCK" ] && [ -f "$D/state/agent.json" ] && break; sleep 0.05; done
      "$BIN" --data-dir "$D/state" disk attach vm --image "$IMG" > /dev/null
      URI="nbd+unix:///vm?socket=$SOCK" ;;
  esac
  for _ in $(seq 100); do nbdinfo --size "$URI" > /dev/null 2>&1 && return; sleep 0.05; done
  echo "nbd.sh: $1 did not come up" >&2; exit 1
}
start_tls() {
  case $1 in
    nbdkit)   nbdkit -f -i 127.0.0.1 -p "$PORT" --tls=require --tls-certificates="$P/server" --tls-verify-peer file file="$IMG" & PID=$! ;;
    qemu-nbd) qemu-nbd -f raw -b 127.0.0.1 -p "$PORT" -t -e 8 -x vm \
                --object "tls-creds-x509,id=tls0,endpoint=server,dir=$P/server,verify-peer=on" --tls-creds tls0 "$IMG" & PID=$! ;;
    novabackup)
      rm -rf "$D/state"
      "$BIN" --data-dir "$D/state" agent --nbd-listen "127.0.0.1:$PORT" --nbd-tls-dir "$P/server" --nbd-socket none \
        --api-listen 127.0.0.1:0 --io-engine "$ENGINE" 2> "$D/agent.log" & PID=$!
      for _ in $(seq 100); do [ -f "$D/state/agent.json" ] && break; sleep 0.05; done
      "$BIN" --data-dir "$D/state" disk attach vm --image "$IMG" --allow "CN=fio,O=bench" > /dev/null ;;
  esac
  URI="nbds://127.0.0.1:$PORT/vm?tls-certificates=$P/client"
  for _ in $(seq 100); do nbdinfo --size "$URI" > /dev/null 2>&1 && return; sleep 0.05; done
  echo "nbd.sh: $1 did not come up with TLS" >&2; exit 1
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; }

JOBS="read:1m:8 write:1m:8 randread:4k:16 randwrite:4k:16 randread:4k:1 randwrite:4k:1"
if [ "$TLS" = 1 ]; then
  JOBS="read:copy:0 write:copy:0"
  # The data the write copies send: a file in the page cache.
  [ "$(stat -c %s "$D/src.img" 2>/dev/null || echo 0)" = "$bytes" ] || cp "$IMG" "$D/src.img"
  cat "$D/src.img" > /dev/null
fi
CSV=$D/results.csv
echo "server,job,run,value" > "$CSV"
for s in nbdkit qemu-nbd novabackup; do
  cat "$IMG" > /dev/null
  start $s
  for j in $JOBS; do
    IFS=: read -r rw bs qd <<< "$j"
    for run in $(seq "$RUNS"); do
      if [ "$TLS" = 1 ]; then
        # nbdcopy's defaults (4 connections, 64 requests in flight, 256 KiB
        # requests) for every server; MB/s of the whole copy.
        t0=$(date +%s.%N)
        if [ "$rw" = read ]; then nbdcopy "$URI" null: ; else nbdcopy "$D/src.img" "$URI"; fi
        v=$(python3 -c "print('%.1f' % ($bytes / 1e6 / ($(date +%s.%N) - $t0)))")
        echo "$s,$rw copy,$run,$v" >> "$CSV"
        continue
      fi
      out=$(fio --name=nbd --ioengine=nbd --uri="$URI" --rw="$rw" --bs="$bs" --iodepth="$qd" \
              --size="$SIZE" --time_based --ramp_time=1 --runtime="$RUNTIME" --randseed="$run" \
              --output-format=json 2>/dev/null)
      v=$(printf '%s' "$out" | python3 -c '
import json, sys
s = sys.stdin.read(); j = json.loads(s[s.index("{"):])["jobs"][0]
k = "write" if "write" in sys.argv[1] else "read"
print("%.1f" % (j[k]["bw_bytes"] / 1e6) if sys.argv[2] == "1m" else "%.0f" % j[k]["iops"])' "$rw" "$bs")
      echo "$s,$rw $bs qd$qd,$run,$v" >> "$CSV"
    done
  done
  if [ $s = novabackup ]; then
    "$BIN" --data-dir "$D/state" disk cbt vm | sed 's/^/  /' >&2
  fi
  stop
done
python3 - "$CSV" "$RUNS" "$TLS" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
med = {}
for key in {(r["server"], r["job"]) for r in rows}:
    med[key] = statistics.median(float(r["value"]) for r in rows if (r["server"], r["job"]) == key)
jobs = list(dict.fromkeys(r["job"] for r in rows))
where = "nbdcopy, loopback TCP with TLS (X.509 client certificates)" if sys.argv[3] == "1" else "fio nbd engine, unix socket"
print(f"\n{where}, median of {sys.argv[2]} run(s)\n")
print("| job | unit | nbdkit | qemu-nbd | novabackup | novabackup / best peer |")
print("|---|---|---|---|---|---|")
for j in jobs:
    unit = "MB/s" if ("1m" in j or "copy" in j) else "IOPS"
    k, q, n = med[("nbdkit", j)], med[("qemu-nbd", j)], med[("novabackup", j)]
    print(f"| {j} | {unit} | {k:.0f} | {q:.0f} | {n:.0f} | {n / max(k, q):.2f} |")
PY
