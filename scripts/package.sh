#!/usr/bin/env bash
# Builds the .deb and the .rpm of novabackup from this checkout:
#
#   scripts/package.sh            # -> target/packages/novabackup_VERSION-1_amd64.deb
#                                 #    target/packages/novabackup-VERSION-1.x86_64.rpm
#
# The version is the workspace's (Cargo.toml). cargo-deb and
# cargo-generate-rpm are installed when missing, into $NOVABACKUP_TOOLS
# (default /var/cache/novabackup-ci/tools, outside the clone, so CI builds
# them once). Set CARGO_TARGET_DIR to build elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=${NOVABACKUP_TOOLS:-/var/cache/novabackup-ci/tools}
export PATH="$TOOLS/bin:$PATH"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=$ROOT/target/packages
log() { printf '[package %s] %s\n' "$(date +%T)" "$*" >&2; }

for tool in cargo-deb cargo-generate-rpm; do
    if ! command -v "$tool" >/dev/null; then
        log "installing $tool into $TOOLS (once)"
        cargo install --locked --quiet --root "$TOOLS" "$tool"
    fi
done
command -v dpkg-shlibdeps >/dev/null || {
    log "installing dpkg-dev (dpkg-shlibdeps finds the .deb's library dependencies)"
    apt-get install -y -qq dpkg-dev >/dev/null
}

log "building the release binary"
cargo build --release --locked -p novabackup
# Both tools read assets from target/release/pkg: the stripped binary, the
# man pages and the completions it renders of itself.
STAGE=$TARGET/release/pkg
rm -rf "$STAGE"
mkdir -p "$STAGE/man" "$STAGE/completions"
objcopy --strip-debug --strip-unneeded "$TARGET/release/novabackup" "$STAGE/novabackup"
"$STAGE/novabackup" man --dir "$STAGE/man"
gzip -9n "$STAGE"/man/*.1
"$STAGE/novabackup" completions bash >"$STAGE/completions/novabackup.bash"
"$STAGE/novabackup" completions zsh >"$STAGE/completions/_novabackup"
"$STAGE/novabackup" completions fish >"$STAGE/completions/novabackup.fish"

mkdir -p "$OUT"
VERSION=$(cargo metadata --no-deps --format-version 1 |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="novabackup"))')
log "packaging novabackup $VERSION"
# Both tools resolve target/release/... in the target folder.
CARGO_TARGET_DIR=$TARGET cargo deb --no-build --no-strip -p novabackup -o "$OUT/" >/dev/null
cargo generate-rpm -p agent --target-dir "$TARGET" -o "$OUT/"
# Scriptlets are plain sh: a syntax error would only show on a customer's
# machine.
for s in packaging/deb/* packaging/rpm/*.sh packaging/novabackup-generator; do
    sh -n "$s" || { log "$s: syntax error"; exit 1; }
done
ls -1 "$OUT"/novabackup[_-]"$VERSION"*
