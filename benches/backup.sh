#!/usr/bin/env bash
# benches/backup.sh -- novabackup against restic and borg on the corpus of
# ../shared/bench, in one run, on the same data and the same steps as
# ../shared/bench/peers.sh:
#   full     backup of a fresh (non-sparse) copy of corpus/vm.img
#   inc1     1% of the 64 KiB blocks changed (mutate.sh 1 101; for novabackup
#            the same bytes go through its NBD export with mutate-nbd.sh, so
#            change tracking sees them), then backup
#   inc10    10% more (mutate 10 110), then backup
#   vm2      corpus/vm2.img backed up into the same store (a second disk)
#   restore  the latest vm.img snapshot to a file; sha256 must match
# and prints wall times, store growth and novabackup's ratios to the peers.
#
#   ./benches/backup.sh                      # all three tools, 1 run
#   RUNS=3 TOOLS="novabackup restic" ./benches/backup.sh
#   SMOKE=1 ./benches/backup.sh              # 256 MiB synthetic disk, novabackup only
#   CHUNK_SIZE=256K ZSTD_LEVEL=3 TOOLS=novabackup ./benches/backup.sh
#
# Page cache warm, as in BASELINE.md (inputs are read once before each step).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
NB=${NBBENCH:-/tmp/nbbench}
SHARED=${SHARED_BENCH:-$ROOT/../shared/bench}
RUNS=${RUNS:-1}
TOOLS=${TOOLS:-"novabackup restic borg-lz4"}
BIN=${NOVABACKUP:-$ROOT/target/release/novabackup}
[ -n "${NOVABACKUP:-}" ] || (cd "$ROOT" && cargo build --release -q -p novabackup)
export HOME=$NB/home RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench
export RESTIC_CACHE_DIR=$NB/home/restic-cache BORG_BASE_DIR=$NB/home/borg
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
D=$NB/nova-backup
WORK=$D/work
CSV=$D/results.csv
mkdir -p "$D" "$WORK" "$NB/home"
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }

if [ "${SMOKE:-0}" = 1 ]; then
  TOOLS=novabackup
  CORPUS=$D/smoke
  mkdir -p "$CORPUS"
  head -c $((128 << 20)) /dev/urandom > "$CORPUS/vm.img"
  head -c $((64 << 20)) /dev/zero | tr '\0' 'a' >> "$CORPUS/vm.img"
  truncate -s 256M "$CORPUS/vm.img"
  cp "$CORPUS/vm.img" "$CORPUS/vm2.img"
  dd if=/dev/urandom of="$CORPUS/vm2.img" bs=64K count=80 seek=100 conv=notrunc status=none
else
  CORPUS=$NB/corpus
  [ -f "$CORPUS/vm.img" ] || { log "building the corpus (about 2 minutes)"; "$SHARED/make-corpus.sh"; }
fi
need() { command -v "$1" > /dev/null || { echo "backup.sh: $1 is missing (apt-get install -y $2)" >&2; exit 1; }; }
for t in $TOOLS; do
  case $t in restic) need restic restic ;; borg-*) need borg borgbackup ;; esac
done
need nbdsh python3-libnbd; need nbdinfo libnbd-bin

AGENT=
stop_agent() { [ -n "$AGENT" ] && kill "$AGENT" 2>/dev/null && wait "$AGENT" 2>/dev/null; AGENT=; }
trap stop_agent EXIT
store_bytes() { du -sb "$1" | cut -f1; }
prep() { cat "$@" > /dev/null; }

# timed TOOL RUN STEP STORE -- CMD...
timed() {
  local tool=$1 run=$2 step=$3 store=$4; shift 5
  local t0 t1
  t0=$(date +%s.%N)
  "$@" > "$D/$tool.$step.log" 2>&1 || { log "$tool $step failed:"; cat "$D/$tool.$step.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  echo "$tool,$run,$step,$(echo "$t1 - $t0" | bc),$(store_bytes "$store")" >> "$CSV"
  log "$tool $step: $(echo "$t1 - $t0" | bc) s, store $(store_bytes "$store") bytes"
}

echo "tool,run,step,seconds,store_bytes" > "$CSV"
for run in $(seq "$RUNS"); do
  for tool in $TOOLS; do
    rm -rf "$D/repo" "$D/state" "$D/restore"
    mkdir -p "$D/restore"
    cp --sparse=never "$CORPUS/vm.img" "$WORK/vm.img"
    sync
    case $tool in
      novabackup)
        store=$D/state/store
        "$BIN" --data-dir "$D/state" agent --nbd-listen none --api-listen 127.0.0.1:0 \
          --chunk-size "${CHUNK_SIZE:-64K}" ${ZSTD_LEVEL:+--zstd-level "$ZSTD_LEVEL"} 2> "$D/agent.log" &
        AGENT=$!
        for _ in $(seq 100); do [ -f "$D/state/agent.json" ] && break; sleep 0.05; done
        nb() { "$BIN" --data-dir "$D/state" "$@"; }
        nb disk attach vm --image "$WORK/vm.img" > /dev/null
        nb disk attach vm2 --image "$CORPUS/vm2.img" --read-only > /dev/null
        URI="nbd+unix:///vm?socket=$D/state/nbd.sock"
        backup() { nb backup "$1"; }
        if [ "${SMOKE:-0}" = 1 ]; then
          # Self-contained: the shared scripts may not sit beside a CI clone.
          mutate() {
            PATH=/usr/bin:$PATH nbdsh -u "$URI" -c "
import random
r = random.Random($2); n = h.get_size() // 65536
for b in r.sample(range(n), max(1, n * $1 // 100)):
    h.pwrite(r.randbytes(65536), b * 65536)
h.flush()"
          }
        else
          mutate() { NBBENCH=$NB "$SHARED/mutate-nbd.sh" "$1" "$2" "$URI"; }
        fi
        restore() { nb restore "$(nb snapshots vm --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')" --to "$D/restore/vm.img"; }
        restored=$D/restore/vm.img ;;
      restic)
        store=$D/repo
        restic init --repository-version 2 -r "$store" > /dev/null
        backup() { restic -r "$store" backup --host bench "$( [ "$1" = vm2 ] && echo "$CORPUS/vm2.img" || echo "$WORK/vm.img")"; }
        mutate() { NBBENCH=$NB "$SHARED/mutate.sh" "$1" "$2" "$WORK/vm.img"; }
        restore() { restic -r "$store" restore latest --host bench --path "$WORK/vm.img" --target "$D/restore"; }
        restored=$D/restore$WORK/vm.img ;;
      borg-lz4)
        store=$D/repo
        borg init -e repokey "$store" > /dev/null 2>&1
        n=0
        backup() { n=$((n + 1)); borg create --compression lz4 "$store::s$n" "$( [ "$1" = vm2 ] && echo "$CORPUS/vm2.img" || echo "$WORK/vm.img")"; }
        mutate() { NBBENCH=$NB "$SHARED/mutate.sh" "$1" "$2" "$WORK/vm.img"; }
        restore() { (cd "$D/restore" && borg extract "$store::s3" "${WORK#/}/vm.img"); }
        restored=$D/restore$WORK/vm.img ;;
    esac
    prep "$WORK/vm.img"
    timed "$tool" "$run" full "$store" -- backup vm
    mutate 1 101 2>> "$D/mutate.log"; sync; prep "$WORK/vm.img"
    timed "$tool" "$run" inc1 "$store" -- backup vm
    mutate 10 110 2>> "$D/mutate.log"; sync; prep "$WORK/vm.img"
    timed "$tool" "$run" inc10 "$store" -- backup vm
    prep "$CORPUS/vm2.img"
    timed "$tool" "$run" vm2 "$store" -- backup vm2
    want=$(sha256sum "$WORK/vm.img" | cut -d' ' -f1)
    timed "$tool" "$run" restore "$store" -- restore
    got=$(sha256sum "$restored" | cut -d' ' -f1)
    [ "$got" = "$want" ] || { log "$tool: restored image differs from the source"; exit 1; }
    log "$tool: restore verified (sha256 $want)"
    [ "$tool" = novabackup ] && stop_agent
    rm -rf "$D/restore" "$D/repo" "$D/state"
  done
done
python3 - "$CSV" "$(stat -c %s "$CORPUS/vm.img")" <<'PY'
import csv, statistics, sys
from collections import defaultdict
rows = list(csv.DictReader(open(sys.argv[1])))
t = defaultdict(list); s = defaultdict(list)
for r in rows:
    t[(r["tool"], r["step"])].append(float(r["seconds"]))
    s[(r["tool"], r["step"])].append(int(r["store_bytes"]))
tools = list(dict.fromkeys(r["tool"] for r in rows))
steps = ["full", "inc1", "inc10", "vm2", "restore"]
med = lambda d, k: statistics.median(d[k]) if k in d else None
MiB = 1 << 20
print(f"\nwall seconds (median of {max(len(v) for v in t.values())} run(s)) and store size after each step, MiB\n")
print("| step | " + " | ".join(f"{x} s | {x} store" for x in tools) + " |")
print("|---|" + "---|---|" * len(tools))
for st in steps:
    cells = []
    for x in tools:
        a, b = med(t, (x, st)), med(s, (x, st))
        cells += [f"{a:.2f}" if a is not None else "-", f"{b / MiB:.0f}" if b is not None else "-"]
    print(f"| {st} | " + " | ".join(cells) + " |")
nb = "novabackup"
if nb in tools:
    def added(x, st):
        prev = {"inc1": "full", "inc10": "inc1", "vm2": "inc10"}[st]
        return med(s, (x, st)) - med(s, (x, prev))
    print("\nnovabackup:")
    changed = int(int(sys.argv[2]) // 65536 * 1 // 100) * 65536
    print(f"- store growth after the 1% change: {added(nb, 'inc1') / MiB:.1f} MiB for {changed / MiB:.1f} MiB changed ({added(nb, 'inc1') / changed:.2f}x)")
    print(f"- inc10 / inc1 time: {med(t, (nb, 'inc10')) / med(t, (nb, 'inc1')):.1f}x for 10x the changed bytes")
    for peer in [x for x in tools if x != nb]:
        print(f"- vs {peer}: full {med(t, (peer, 'full')) / med(t, (nb, 'full')):.2f}x faster, "
              f"inc1 {med(t, (peer, 'inc1')) / med(t, (nb, 'inc1')):.1f}x faster, "
              f"restore {med(t, (peer, 'restore')) / med(t, (nb, 'restore')):.2f}x faster, "
              f"vm2 adds {added(nb, 'vm2') / MiB:.0f} MiB against {added(peer, 'vm2') / MiB:.0f} MiB "
              f"({added(nb, 'vm2') / added(peer, 'vm2'):.2f}x)")
PY
