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
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

start() {
  rm -f "$SOCK"
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
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=; }

JOBS="read:1m:8 write:1m:8 randread:4k:16 randwrite:4k:16 randread:4k:1 randwrite:4k:1"
CSV=$D/results.csv
echo "server,job,run,value" > "$CSV"
for s in nbdkit qemu-nbd novabackup; do
  cat "$IMG" > /dev/null
  start $s
  for j in $JOBS; do
    IFS=: read -r rw bs qd <<< "$j"
    for run in $(seq "$RUNS"); do
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
python3 - "$CSV" "$RUNS" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
med = {}
for key in {(r["server"], r["job"]) for r in rows}:
    med[key] = statistics.median(float(r["value"]) for r in rows if (r["server"], r["job"]) == key)
jobs = list(dict.fromkeys(r["job"] for r in rows))
print(f"\nfio nbd engine, unix socket, median of {sys.argv[2]} run(s)\n")
print("| job | unit | nbdkit | qemu-nbd | novabackup | novabackup / best peer |")
print("|---|---|---|---|---|---|")
for j in jobs:
    unit = "MB/s" if "1m" in j else "IOPS"
    k, q, n = med[("nbdkit", j)], med[("qemu-nbd", j)], med[("novabackup", j)]
    print(f"| {j} | {unit} | {k:.0f} | {q:.0f} | {n:.0f} | {n / max(k, q):.2f} |")
PY
