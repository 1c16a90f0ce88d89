#!/usr/bin/env bash
# benches/restore.sh -- getting data back, novabackup against restic, rustic
# and borg on the corpus of ../shared/bench (vm.img: MBR + ext4), in one run.
#
# Part 1, restore without waiting (novabackup; the peers' way in brackets):
#   first-byte   POST /api/v1/mounts, then the first 4 KiB read over NBD
#                (a peer restores the whole image first)
#   small-file   restore --file of a small file (/usr/bin/ls)
#                [peer: full restore + `debugfs -R dump`, timed together]
#   big-file     the same for a 96 MiB file (/home/user/media/clip10.bin)
#   fio          4 KiB random reads through a fresh mount, 10 s (IOPS)
# Part 2, full restores measured fairly:
#   every tool restores the same snapshot to the same place and is followed
#   by `sync` inside the timing (same durability); into a tmpfs (no device
#   in the way) and onto this machine's disk; the device floor is the same
#   non-zero bytes written by `dd conv=sparse,fdatasync`; the tools'
#   order rotates from run to run; medians of RUNS (default 3). Same cache
#   state: before each timed step the tool's repository is read into the
#   page cache (novabackup writes its packs past the cache, the others
#   through it), or, with CACHE=cold, every cache is dropped.
#
#   ./benches/restore.sh                         # everything, RUNS=3
#   TOOLS="novabackup restic" RUNS=1 ./benches/restore.sh
#   SMOKE=1 ./benches/restore.sh                 # 256 MiB ext4 image, novabackup only
#
# Needs restic, borgbackup, fio (with its nbd engine), python3-libnbd,
# e2fsprogs; rustic from `cargo install rustic-rs` (RUSTIC=path, default
# /var/cache/novabackup-ci/tools/rustic/bin/rustic, skipped if absent).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
NB=${NBBENCH:-/tmp/nbbench}
SHARED=${SHARED_BENCH:-$ROOT/../shared/bench}
RUNS=${RUNS:-3}
TOOLS=${TOOLS:-"novabackup restic rustic borg"}
RUSTIC=${RUSTIC:-/var/cache/novabackup-ci/tools/rustic/bin/rustic}
BIN=${NOVABACKUP:-$ROOT/target/release/novabackup}
[ -n "${NOVABACKUP:-}" ] || (cd "$ROOT" && cargo build --release -q -p novabackup)
export HOME=$NB/home RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench RUSTIC_PASSWORD=bench
export RESTIC_CACHE_DIR=$NB/home/restic-cache BORG_BASE_DIR=$NB/home/borg
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
D=$NB/nova-restore
SHM=${SHM:-/dev/shm/nova-restore}
DISK=$D/disk
CSV=$D/results.csv
SMALL=/usr/bin/ls
BIG=/home/user/media/clip10.bin
PART_OFFSET=1048576
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
need() { command -v "$1" > /dev/null || { echo "restore.sh: $1 is missing (${2})" >&2; exit 1; }; }
rm -rf "$D" "$SHM"
mkdir -p "$D" "$SHM" "$DISK" "$NB/home"
trap 'stop_agent; rm -rf "$SHM"' EXIT

if [ "${SMOKE:-0}" = 1 ]; then
  TOOLS=novabackup RUNS=1
  CORPUS=$D/smoke
  mkdir -p "$CORPUS/tree/usr/bin" "$CORPUS/tree/home/user/media"
  cp /usr/bin/ls "$CORPUS/tree/usr/bin/ls"
  head -c $((96 << 20)) /dev/urandom > "$CORPUS/tree/home/user/media/clip10.bin"
  truncate -s $((255 << 20)) "$CORPUS/fs.img"
  mke2fs -q -F -t ext4 -b 4096 -d "$CORPUS/tree" "$CORPUS/fs.img"
  truncate -s $((256 << 20)) "$CORPUS/vm.img"
  printf 'label: dos\nstart=2048, type=83\n' | sfdisk -q "$CORPUS/vm.img" > /dev/null
  dd if="$CORPUS/fs.img" of="$CORPUS/vm.img" bs=1M seek=1 conv=notrunc status=none
  rm -rf "$CORPUS/fs.img" "$CORPUS/tree"
else
  CORPUS=$NB/corpus
  [ -f "$CORPUS/vm.img" ] || { log "building the corpus (about 3 minutes)"; "$SHARED/make-corpus.sh"; }
fi
IMG=$CORPUS/vm.img
for t in $TOOLS; do
  case $t in
    restic) need restic "apt-get install -y restic" ;;
    borg) need borg "apt-get install -y borgbackup" ;;
    rustic) [ -x "$RUSTIC" ] || { log "no rustic at $RUSTIC (cargo install rustic-rs --root ...): skipped"; TOOLS=${TOOLS/rustic/}; } ;;
  esac
done
need debugfs "apt-get install -y e2fsprogs"; need fio "apt-get install -y fio"
need nbdinfo "apt-get install -y libnbd-bin"

AGENT=
stop_agent() { if [ -n "$AGENT" ]; then kill "$AGENT" 2> /dev/null || true; wait "$AGENT" 2> /dev/null || true; AGENT=; fi; }
nb() { "$BIN" --data-dir "$D/state" "$@"; }
echo "tool,run,step,seconds" > "$CSV"
record() { echo "$1,$2,$3,$4" >> "$CSV"; log "$1 $3 (run $2): $4"; }
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }

# ---------------------------------------------------------------- setup ---
log "backing up $IMG with each tool (not timed)"
cp --sparse=always "$IMG" "$SHM/src.img"
want=$(sha256sum "$SHM/src.img" | cut -d' ' -f1)
nbyte=$(du -B1 "$SHM/src.img" | cut -f1)
for tool in $TOOLS; do
  case $tool in
    novabackup)
      "$BIN" --data-dir "$D/state" agent --nbd-listen none --api-listen 127.0.0.1:0 \
        --restore-dir "$SHM" --restore-dir "$DISK" 2> "$D/agent.log" &
      AGENT=$!
      for _ in $(seq 200); do [ -f "$D/state/agent.json" ] && break; sleep 0.05; done
      nb disk attach vm --image "$SHM/src.img" --read-only > /dev/null
      SNAP=$(nb backup vm --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["snapshot"])')
      nb disk detach vm > /dev/null ;;
    restic|rustic)
      if [ ! -d "$D/restic" ]; then
        restic init --repository-version 2 -r "$D/restic" > /dev/null
        (cd "$SHM" && restic -r "$D/restic" backup --host bench src.img > /dev/null)
      fi ;;
    borg)
      borg init -e repokey "$D/borg" > /dev/null 2>&1
      (cd "$SHM" && borg create --compression lz4 "$D/borg::s1" src.img) ;;
  esac
done

# same_cache TOOL: the tool's repository warm in the page cache (or, with
# CACHE=cold, nothing cached), whatever the tool did before.
same_cache() {
  sync
  if [ "${CACHE:-warm}" = cold ]; then
    echo 3 > /proc/sys/vm/drop_caches
    return
  fi
  case $1 in
    novabackup) find "$D/state/store" -type f -exec cat {} + > /dev/null ;;
    restic|rustic) find "$D/restic" -type f -exec cat {} + > /dev/null ;;
    borg) find "$D/borg" -type f -exec cat {} + > /dev/null ;;
  esac
}

# restore_to TOOL DIR: the whole image to DIR/out.img, then sync.
restore_to() {
  local tool=$1 dir=$2
  rm -rf "$dir/out.img" "$dir/r"
  case $tool in
    novabackup) nb restore "$SNAP" --to "$dir/out.img" > /dev/null ;;
    restic) restic -r "$D/restic" restore latest --target "$dir/r" > /dev/null && mv "$dir/r/src.img" "$dir/out.img" ;;
    rustic) "$RUSTIC" -r "$D/restic" restore latest "$dir/r" > /dev/null 2>&1 && mv "$dir/r/src.img" "$dir/out.img" ;;
    borg) (mkdir -p "$dir/r" && cd "$dir/r" && borg extract "$D/borg::s1" src.img) && mv "$dir/r/src.img" "$dir/out.img" ;;
  esac
  sync
  rm -rf "$dir/r"
}

# --------------------------------------------- part 1: without waiting ---
FB=$D/first_byte.py
cat > "$FB" <<'PY'
import json, sys, time, urllib.request
import nbd
state, snap, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
info = json.load(open(f"{state}/agent.json"))
token = open(f"{state}/api.token").read().strip()
def api(method, path, body=None):
    req = urllib.request.Request(f"http://{info['api']}{path}", method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")
for i in range(n):
    t0 = time.perf_counter()
    m = api("POST", "/api/v1/mounts", {"snapshot": snap, "name": f"fb{i}"})
    h = nbd.NBD()
    h.connect_uri(m["uris"][0])
    buf = h.pread(4096, 1048576)
    t1 = time.perf_counter()
    h.shutdown()
    api("DELETE", f"/api/v1/mounts/fb{i}")
    assert len(buf) == 4096
    print(f"{(t1 - t0) * 1000:.1f}")
PY
for run in $(seq "$RUNS"); do
  for tool in $TOOLS; do
    case $tool in
      novabackup)
        sync; echo 3 > /proc/sys/vm/drop_caches 2> /dev/null || true
        for ms in $(/usr/bin/python3 "$FB" "$D/state" "$SNAP" 5); do
          record novabackup "$run" first-byte-ms "$ms"
        done
        for f in "$SMALL:small-file" "$BIG:big-file"; do
          rm -rf "$D/files"; mkdir -p "$D/files"
          same_cache novabackup
          t0=$(now)
          nb restore "$SNAP" --file "${f%%:*}" --partition 1 --to "$D/files" > /dev/null
          record novabackup "$run" "${f##*:}" "$(since "$t0")"
        done
        nb mount "$SNAP" --name fio > /dev/null
        iops=$(fio --name=rr --ioengine=nbd --uri="nbd+unix:///fio?socket=$D/state/nbd.sock" \
          --rw=randread --bs=4k --iodepth=8 --runtime="${FIO_SECONDS:-10}" --time_based \
          --output-format=json --output="$D/fio.json" > /dev/null \
          && python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"]))' "$D/fio.json")
        record novabackup "$run" fio-randread-iops "$iops"
        nb unmount fio > /dev/null ;;
      *)
        for f in "$SMALL:small-file" "$BIG:big-file"; do
          same_cache "$tool"
          t0=$(now)
          restore_to "$tool" "$SHM"
          debugfs -R "dump ${f%%:*} $SHM/file" "$SHM/out.img?offset=$PART_OFFSET" > /dev/null 2>&1
          [ -s "$SHM/file" ] || { log "$tool: debugfs dump of ${f%%:*} failed"; exit 1; }
          record "$tool" "$run" "${f##*:}" "$(since "$t0")"
          rm -f "$SHM/file" "$SHM/out.img"
        done ;;
    esac
  done
done

# ------------------------------------------- part 2: full restores, fair ---
ROT=($TOOLS floor)
for run in $(seq "$RUNS"); do
  # Rotate the order each run, so no tool always follows the same one.
  order=("${ROT[@]:$(( (run - 1) % ${#ROT[@]} ))}" "${ROT[@]:0:$(( (run - 1) % ${#ROT[@]} ))}")
  for where in tmpfs disk; do
    dir=$SHM; [ $where = disk ] && dir=$DISK
    for tool in "${order[@]}"; do
      [ "$tool" = floor ] || same_cache "$tool"
      t0=$(now)
      if [ "$tool" = floor ]; then
        [ $where = tmpfs ] && continue
        dd if="$SHM/src.img" of="$dir/out.img" bs=4M conv=sparse,fdatasync status=none
      else
        restore_to "$tool" "$dir"
      fi
      record "$tool" "$run" "full-$where" "$(since "$t0")"
      if [ "$tool" != floor ]; then
        got=$(sha256sum "$dir/out.img" | cut -d' ' -f1)
        [ "$got" = "$want" ] || { log "$tool: restored image differs from the source"; exit 1; }
      fi
      rm -f "$dir/out.img"
    done
  done
done
stop_agent

python3 - "$CSV" "$nbyte" <<'PY'
import csv, statistics, sys
from collections import defaultdict
rows = list(csv.DictReader(open(sys.argv[1])))
v = defaultdict(list)
for r in rows:
    v[(r["tool"], r["step"])].append(float(r["seconds"]))
med = lambda k: statistics.median(v[k]) if k in v else None
tools = list(dict.fromkeys(r["tool"] for r in rows if r["tool"] != "floor"))
nb = "novabackup"
runs = max(len(v[k]) for k in v if k[1] == "full-tmpfs") if any(k[1] == "full-tmpfs" for k in v) else 1
print(f"\nnon-zero bytes in the image: {int(sys.argv[2]) / (1 << 20):.0f} MiB; medians of {runs} run(s) (first byte: of 5 mounts per run, the first after dropping the page cache)\n")
print("| step | " + " | ".join(tools) + " |")
print("|---|" + "---|" * len(tools))
for st, unit in [("first-byte-ms", "ms"), ("small-file", "s"), ("big-file", "s"), ("fio-randread-iops", "IOPS"),
                 ("full-tmpfs", "s"), ("full-disk", "s")]:
    fmt = lambda x: f"{x:.0f}" if unit == "IOPS" else f"{x:.3g}"
    cells = [(f"{fmt(med((t, st)))} {unit}" if med((t, st)) is not None else "-") for t in tools]
    print(f"| {st} | " + " | ".join(cells) + " |")
if med(("floor", "full-disk")):
    print(f"| device floor (dd conv=sparse,fdatasync) | {med(('floor', 'full-disk')):.3g} s |")
if nb in tools:
    print()
    fr = med((nb, "full-tmpfs"))
    for st in ["small-file", "big-file"]:
        if med((nb, st)) and fr:
            print(f"- {st}: {med((nb, st)):.3f} s = {100 * med((nb, st)) / fr:.2f}% of novabackup's full restore (tmpfs)")
    if med((nb, "first-byte-ms")):
        print(f"- first byte of a mount: {med((nb, 'first-byte-ms')):.1f} ms (goal < 50 ms)")
    for p in [t for t in tools if t != nb]:
        for st in ["small-file", "full-tmpfs", "full-disk"]:
            if med((p, st)) and med((nb, st)):
                print(f"- vs {p}, {st}: {med((p, st)) / med((nb, st)):.2f}x faster")
    if med(("floor", "full-disk")) and med((nb, "full-disk")):
        print(f"- full restore to disk: {med((nb, 'full-disk')) / med(('floor', 'full-disk')):.2f}x the device floor (goal <= 1.10)")
PY
