#!/usr/bin/env bash
# benches/sync.sh -- replication between two stores (issue 28's benchmark):
# `novabackup sync` from one local store to another against `restic copy`
# between two repositories holding the same data, in one run: a full and
# then a 1% incremental. Prints wall time and bytes that reached the target.
#
#   ./benches/sync.sh              RUNS=3 ./benches/sync.sh
#   SMOKE=1 ./benches/sync.sh      (64 MiB synthetic disk)
#
# Same work for both: the source holds the full and the 1% change as two
# snapshots; each sync copies what the target lacks into a local folder
# (both fsync what they write: our store syncfs's its packs, restic's
# local backend fsyncs each file); page cache dropped before every timed
# step; the order of the two tools alternates between runs. restic's
# target repository shares the source's chunker parameters (`init
# --copy-chunker-params`), so restic deduplicates across the copy too;
# restic decrypts and re-encrypts what it copies, novabackup's store is
# not encrypted: that difference is part of what is measured.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
NB=${NBBENCH:-/tmp/nbbench}
SHARED=${SHARED_BENCH:-$ROOT/../shared/bench}
RUNS=${RUNS:-1}
BIN=${NOVABACKUP:-$ROOT/target/release/novabackup}
[ -n "${NOVABACKUP:-}" ] || (cd "$ROOT" && cargo build --release -q -p novabackup)
command -v restic > /dev/null || { echo "sync.sh: restic is needed (apt-get install restic)" >&2; exit 1; }
D=$NB/nova-sync
mkdir -p "$D"
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null || true; wait "$p" 2> /dev/null || true; done; PIDS=(); }
trap cleanup EXIT
export RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$D/restic-cache
echo bench > "$D/pw"

if [ "${SMOKE:-0}" = 1 ]; then
  SRC=$D/smoke.img
  head -c $((48 << 20)) /dev/urandom > "$SRC"
  head -c $((16 << 20)) /dev/zero | tr '\0' 'b' >> "$SRC"
  mutate() {
    PATH=/usr/bin:$PATH nbdsh -u "$2" -c "
import random
r = random.Random($1); n = h.get_size() // 65536
for b in r.sample(range(n), max(1, n // 100)):
    h.pwrite(r.randbytes(65536), b * 65536)
h.flush()"
  }
else
  SRC=$NB/corpus/vm.img
  [ -f "$SRC" ] || { log "building the corpus (about 2 minutes)"; "$SHARED/make-corpus.sh"; }
  mutate() { NBBENCH=$NB "$SHARED/mutate-nbd.sh" 1 "$1" "$2"; }
fi
size=$(stat -c %s "$SRC")
changed=$(( size / 65536 / 100 * 65536 ))
CSV=$D/results.csv
echo "tool,run,step,seconds,bytes" > "$CSV"
du_b() { du -sb "$1" | cut -f1; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }

nova_sync() { # step run
  local before t0 t1
  before=$(du_b "$D/nova-dst")
  cold
  t0=$(date +%s.%N)
  "$BIN" sync --from "$D/state/store" --to "$D/nova-dst" --json > "$D/nova.$1.json"
  t1=$(date +%s.%N)
  echo "nova,$2,$1,$(echo "$t1 - $t0" | bc),$(( $(du_b "$D/nova-dst") - before ))" >> "$CSV"
}
restic_copy() { # step run
  local before t0 t1
  before=$(du_b "$D/restic-dst")
  cold
  t0=$(date +%s.%N)
  restic -q -r "$D/restic-dst" copy --from-repo "$D/restic-src" --from-password-file "$D/pw" > /dev/null
  t1=$(date +%s.%N)
  echo "restic,$2,$1,$(echo "$t1 - $t0" | bc),$(( $(du_b "$D/restic-dst") - before ))" >> "$CSV"
}

for run in $(seq "$RUNS"); do
  rm -rf "$D/state" "$D/nova-dst" "$D/restic-src" "$D/restic-dst" "$D/restic-cache" "$D/vm.img"
  cp --sparse=never "$SRC" "$D/vm.img"
  "$BIN" --data-dir "$D/state" agent --nbd-listen none --api-listen 127.0.0.1:0 2> "$D/agent.log" &
  PIDS+=($!)
  for _ in $(seq 100); do [ -f "$D/state/agent.json" ] && break; sleep 0.05; done
  nb() { "$BIN" --data-dir "$D/state" "$@"; }
  nb disk attach vm --image "$D/vm.img" > /dev/null
  log "run $run: sources (novabackup backup, restic backup of the same image)"
  nb backup vm > /dev/null
  restic -q init --repository-version 2 -r "$D/restic-src" > /dev/null
  restic -q -r "$D/restic-src" backup --host bench "$D/vm.img" > /dev/null
  mkdir -p "$D/nova-dst"
  restic -q init -r "$D/restic-dst" --from-repo "$D/restic-src" --from-password-file "$D/pw" --copy-chunker-params > /dev/null
  for step in full inc; do
    if [ $step = inc ]; then
      mutate $((200 + run)) "nbd+unix:///vm?socket=$D/state/nbd.sock" 2>> "$D/mutate.log"
      sleep 1
      nb backup vm > /dev/null
      restic -q -r "$D/restic-src" backup --host bench "$D/vm.img" > /dev/null
    fi
    if [ $((run % 2)) = 1 ]; then nova_sync $step "$run"; restic_copy $step "$run"
    else restic_copy $step "$run"; nova_sync $step "$run"; fi
    log "run $run $step: $(tail -2 "$CSV" | tr '\n' ' ')"
  done
  cleanup
done
python3 - "$CSV" "$size" "$changed" <<'PY'
import csv, statistics, sys
from collections import defaultdict
t, b = defaultdict(list), defaultdict(list)
for r in csv.DictReader(open(sys.argv[1])):
    t[(r["tool"], r["step"])].append(float(r["seconds"]))
    b[(r["tool"], r["step"])].append(int(r["bytes"]))
size, changed = int(sys.argv[2]), int(sys.argv[3])
m = lambda v: statistics.median(v)
print(f"\nmedians of {len(t[('nova', 'full')])} run(s); image {size / 2**20:.0f} MiB, 1% change {changed / 2**20:.1f} MiB;")
print("bytes: growth of the target folder\n")
print("| step | novabackup s | restic s | restic / novabackup | novabackup MiB | restic MiB | novabackup / changed |")
print("|---|---|---|---|---|---|---|")
for st in ("full", "inc"):
    n, r = m(t[("nova", st)]), m(t[("restic", st)])
    nb, rb = m(b[("nova", st)]), m(b[("restic", st)])
    ratio = f"{nb / changed:.2f}" if st == "inc" else "-"
    print(f"| {st} | {n:.2f} | {r:.2f} | {r / n:.1f}x | {nb / 2**20:.1f} | {rb / 2**20:.1f} | {ratio} |")
PY
