#!/usr/bin/env bash
# benches/pipeline.sh -- runs the criterion bench of the chunk pipeline and
# prints MB/s of SHA-256 alone, zstd alone, hash-then-compress on one core,
# and the whole pipeline on all cores, with the pipeline's share of the
# ideal (one core's hash-then-compress rate x the number of cores); and on
# random bytes (an encrypted disk), zstd alone against encoding a chunk file,
# which stores such chunks raw without asking zstd.
#   ./benches/pipeline.sh          SMOKE=1 ./benches/pipeline.sh (runs each once)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ "${SMOKE:-0}" = 1 ]; then
  cargo bench -q -p novabackup-engine --bench pipeline -- --test
  exit 0
fi
cargo bench -q -p novabackup-engine --bench pipeline -- --noplot > /dev/null
python3 - "$ROOT/target/criterion/pipeline" "$(nproc)" <<'PY'
import json, os, sys
base, cores = sys.argv[1], int(sys.argv[2])
mbs = {}
for name in ["sha256", "sha256_pairs", "zstd", "ideal_one_core", "backup_pipeline", "zstd_random", "encode_random"]:
    est = json.load(open(os.path.join(base, name, "new", "estimates.json")))
    ns = est["median"]["point_estimate"]
    mbs[name] = (64 << 20) / ns * 1e3  # bytes per ns -> MB/s
print("| measure | MB/s (median) |")
print("|---|---|")
for k, v in mbs.items():
    print(f"| {k} | {v:.0f} |")
ideal = mbs["ideal_one_core"] * cores
print(f"\nideal = ideal_one_core x {cores} cores = {ideal:.0f} MB/s; pipeline reaches {mbs['backup_pipeline'] / ideal:.0%} of it")
PY
