#!/usr/bin/env bash
# Runs every test of novabackup: formatting, clippy, unit and property
# tests, integration tests against real NBD clients (qemu-io, qemu-img,
# nbdinfo, nbdcopy, nbdsh, fio, loop devices), and a smoke run of each
# benchmark and of each fuzz target, then the package test (the .deb and
# .rpm built, the .deb installed, upgraded and removed under systemd in a
# Debian 12 guest booted with QEMU: tests/package/run.sh). Installs the peer tools with apt-get
# when they are missing and we are root, schemathesis with pip, and
# cargo-fuzz with cargo.
set -euo pipefail
cd "$(dirname "$0")/.."

# A full run writes about 10 GB (debug and release builds, fuzz targets,
# the package test's guest); a full disk shows up as compiler crashes, so
# say so first.
free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
if [ "${free_kb:-0}" -lt $((15 * 1024 * 1024)) ]; then
  echo "warning: only $((free_kb / 1024 / 1024)) GB free here; the tests need about 10 GB (target folders, ../fuzz-target, /var/cache/novabackup-ci): free some space if the build fails with 'No space left on device'" >&2
fi

need=()
have() { command -v "$1" > /dev/null 2>&1; }
have qemu-io || need+=(qemu-utils)
have nbdinfo || need+=(libnbd-bin)
have nbdsh || need+=(python3-libnbd)
have nbdkit || need+=(nbdkit)
have fio || need+=(fio)
have losetup || need+=(mount)
have openssl || need+=(openssl)
have mke2fs || need+=(e2fsprogs)
have bc || need+=(bc)
have sfdisk || need+=(fdisk)
have mkfs.vfat || need+=(dosfstools)
have mdir || need+=(mtools)
have mkntfs && have ntfs-3g || need+=(ntfs-3g)
have restic || need+=(restic)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && have apt-get; then
    echo "== installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" > /dev/null
  else
    echo "missing test tools: ${need[*]}; install them (apt-get install -y ${need[*]}) and rerun" >&2
    exit 1
  fi
fi

# schemathesis (PyPI) fuzzes the served OpenAPI document (tests/openapi.rs).
if ! have st; then
  echo "== installing schemathesis"
  python3 -m pip --version > /dev/null 2>&1 || python3 -m ensurepip -q
  python3 -m pip install -q schemathesis
  hash -r
fi

# The object-store tests run a 3-node Garage cluster; its binary is built
# once into /var/cache/novabackup-ci/tools/garage (about 12 minutes here).
echo "== garage for the object-store tests: $(bash tests/garage/cluster.sh bin)"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
cargo test
echo "== benchmark smoke runs"
SMOKE=1 bash benches/nbd.sh
SMOKE=1 bash benches/backup.sh
SMOKE=1 FIO_SECONDS=3 bash benches/restore.sh
SMOKE=1 bash benches/pipeline.sh
SMOKE=1 bash benches/remote.sh
SMOKE=1 TLS=1 bash benches/remote.sh
SMOKE=1 bash benches/sync.sh
echo "== fuzz smoke runs"
if rustup toolchain list | grep -q nightly; then
  SECONDS_PER_TARGET="${FUZZ_SECONDS:-8}" bash scripts/fuzz.sh
else
  echo "no nightly toolchain: fuzz targets skipped (rustup toolchain install nightly)" >&2
  exit 1
fi
echo "== package test (Debian 12 guest under QEMU; caches in ${NOVABACKUP_CI_CACHE:-/var/cache/novabackup-ci})"
if [ "$(id -u)" = 0 ]; then
  bash tests/package/run.sh
else
  echo "the package test needs root (debootstrap, dpkg-deb -x of QEMU): run as root" >&2
  exit 1
fi
echo "== all tests passed"
