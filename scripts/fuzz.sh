#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/) with nightly Rust.
#   scripts/fuzz.sh                 each target for SECONDS_PER_TARGET (default 20)
#   RUNS=10000000 scripts/fuzz.sh   each target for that many executions
#   scripts/fuzz.sh chunk pack      only those targets
# The corpus in fuzz/corpus/TARGET grows as it runs (commit what a long run
# adds after `cargo fuzz cmin`); a crash stops the run, is kept in
# fuzz/artifacts/TARGET/ and must become a regression test before it is
# fixed. Built in $FUZZ_TARGET_DIR (default ../fuzz-target beside the clone)
# so that CI runs reuse the build.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$(pwd)/../fuzz-target}"
if ! command -v cargo-fuzz > /dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
cd fuzz
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build -O "${targets[@]:0:0}" > /dev/null
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  if [ -n "${RUNS:-}" ]; then
    limit=(-runs="$RUNS")
  else
    limit=(-max_total_time="${SECONDS_PER_TARGET:-20}")
  fi
  echo "== fuzz $t ${limit[*]}"
  start=$(date +%s)
  log=$(mktemp)
  if ! cargo +nightly fuzz run -O "$t" "corpus/$t" -- "${limit[@]}" -max_len=65536 -print_final_stats=1 > "$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz target $t crashed: see fuzz/artifacts/$t/" >&2
    exit 1
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  echo "   $t: $execs executions in $(( $(date +%s) - start )) s, no crash"
  rm -f "$log"
done
