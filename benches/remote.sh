#!/usr/bin/env bash
# benches/remote.sh -- the same full and 1% backups to a store server over
# loopback as to a local store, in one run, on the corpus of ../shared/bench
# (issue 4's benchmark). Prints wall times and remote / local throughput.
#
#   ./benches/remote.sh            RUNS=3 ./benches/remote.sh
#   SMOKE=1 ./benches/remote.sh    (64 MiB synthetic disk, no shared scripts)
#   TLS=1 ./benches/remote.sh      (the store server serves TLS, the agent pins it)
#   PIN=1 ./benches/remote.sh      (agent on CPU 0, store server on CPU 1: the
#                                   server's own host, as in a fleet, on one box)
#   INCS=3 ./benches/remote.sh     (1% backups per run after the full one, each
#                                   after its own change; default 3: one 1% backup
#                                   takes ~0.1 s, and single ones scatter by ±15%)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
NB=${NBBENCH:-/tmp/nbbench}
SHARED=${SHARED_BENCH:-$ROOT/../shared/bench}
RUNS=${RUNS:-1}
INCS=${INCS:-$([ "${SMOKE:-0}" = 1 ] && echo 1 || echo 3)}
BIN=${NOVABACKUP:-$ROOT/target/release/novabackup}
[ -n "${NOVABACKUP:-}" ] || (cd "$ROOT" && cargo build --release -q -p novabackup)
D=$NB/nova-remote
mkdir -p "$D"
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null || true; wait "$p" 2> /dev/null || true; done; }
trap cleanup EXIT
# With PIN=1 the agent gets CPU 0 in both modes and the server CPU 1, so
# the server's digest checks do not eat the agent's cores: on one 2-core
# box that is the nearest model of a store server on its own host.
AGENT_CPU=(); SERVER_CPU=()
[ "${PIN:-0}" = 1 ] && { AGENT_CPU=(taskset -c 0); SERVER_CPU=(taskset -c 1); }

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
CSV=$D/results.csv
echo "mode,run,step,seconds" > "$CSV"

for run in $(seq "$RUNS"); do
  for mode in local remote; do
    rm -rf "$D/state" "$D/store" "$D/vm.img"
    cp --sparse=never "$SRC" "$D/vm.img"
    sync
    extra=()
    if [ $mode = remote ]; then
      tls=(); scheme=http
      [ "${TLS:-0}" = 1 ] && { tls=(--tls); scheme=https; }
      "${SERVER_CPU[@]}" "$BIN" store serve --dir "$D/store" --listen 127.0.0.1:7829 "${tls[@]}" 2> "$D/server.log" &
      PIDS+=($!)
      for _ in $(seq 100); do (: > /dev/tcp/127.0.0.1/7829) 2> /dev/null && [ -f "$D/store/server.token" ] && break; sleep 0.05; done
      [ "${TLS:-0}" = 1 ] && for _ in $(seq 100); do [ -f "$D/store/server.fingerprint" ] && break; sleep 0.05; done
      extra=(--store $scheme://127.0.0.1:7829 --store-token-file "$D/store/server.token")
      [ "${TLS:-0}" = 1 ] && extra+=(--store-fingerprint "$(cat "$D/store/server.fingerprint")")
    fi
    "${AGENT_CPU[@]}" "$BIN" --data-dir "$D/state" agent --nbd-listen none --api-listen 127.0.0.1:0 "${extra[@]}" 2> "$D/agent.log" &
    PIDS+=($!)
    for _ in $(seq 100); do [ -f "$D/state/agent.json" ] && break; sleep 0.05; done
    nb() { "$BIN" --data-dir "$D/state" "$@"; }
    nb disk attach vm --image "$D/vm.img" > /dev/null
    for step in full $(seq -f 'inc%g' "$INCS"); do
      # inc1's change is the one earlier versions of this bench made.
      k=${step#inc}
      [ $step != full ] && mutate $((100 + run + 10 * (k - 1))) "nbd+unix:///vm?socket=$D/state/nbd.sock" 2>> "$D/mutate.log"
      cat "$D/vm.img" > /dev/null
      # Snapshot ids have one-second resolution: a backup in the second of
      # the last one waits for the next (the smoke's full takes 0.1 s, a
      # 1% backup and the change before it less than a second).
      sleep 1
      t0=$(date +%s.%N)
      nb backup vm > "$D/$mode.$step.log"
      t1=$(date +%s.%N)
      s=$(echo "$t1 - $t0" | bc)
      echo "$mode,$run,$step,$s" >> "$CSV"
      log "$mode $step: $s s"
    done
    cleanup; PIDS=()
  done
done
python3 - "$CSV" "$size" <<'PY'
import csv, statistics, sys
from collections import defaultdict
t = defaultdict(list)
for r in csv.DictReader(open(sys.argv[1])):
    t[(r["mode"], r["step"])].append(float(r["seconds"]))
size = int(sys.argv[2])
incs = sorted({s for _, s in t if s != "full"}, key=lambda s: int(s[3:]))
for mode in ("local", "remote"):
    t[(mode, "1% all")] = [x for s in incs for x in t[(mode, s)]]
print(f"\nmedian wall seconds of {len(t[('local', 'full')])} run(s); throughput = image size / time;")
print("incN: the Nth 1% backup after the full one; 1% all: every 1% backup\n")
print("| step | local s | local MB/s | remote s | remote MB/s | remote / local |")
print("|---|---|---|---|---|---|")
for st in ["full", *incs, "1% all"]:
    l, r = statistics.median(t[("local", st)]), statistics.median(t[("remote", st)])
    print(f"| {st} | {l:.3f} | {size / l / 1e6:.0f} | {r:.3f} | {size / r / 1e6:.0f} | {l / r:.2f} |")
PY
