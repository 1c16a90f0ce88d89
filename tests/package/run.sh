#!/usr/bin/env bash
# The package test: builds the .deb and the .rpm from this checkout, checks
# that both carry the same files, metadata and valid scriptlets, then proves
# the .deb under real systemd: a Debian 12 root booted under QEMU (TCG, no
# KVM), systemd as PID 1, driven from the host over SSH on a forwarded port.
#
#   tests/package/run.sh            # everything (about 6 minutes with caches)
#   KEEP_VM=1 tests/package/run.sh  # leave the guest running for a look
#
# First install: enabled, not started until agent.toml asks; the sandbox
# (writable folders from agent.toml, the NBD socket's group); health; a
# backup; `systemctl reload` rereads the configuration (and refuses a broken
# one); `systemctl restart` keeps disks and bitmaps trusted; the watchdog
# restarts a hung agent; systemd-analyze verify and security; remove and
# purge keep backup data and images. Upgrade: the package of the previous
# release tag, configured before install with start_on_install = true, a
# disk backed up and a schedule; then this package over it: snapshots,
# bitmap and schedules survive and the next backup is incremental.
#
# Caches (outside the clone): see tests/package/vm.sh.
set -Eeuo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
# shellcheck source=tests/package/vm.sh
source tests/package/vm.sh

SSH_PORT=${SSH_PORT:-$((20000 + RANDOM % 10000))}
VM_WORK=$(mktemp -d /tmp/novabackup-vm.XXXXXX)
cleanup() {
    if [[ -z ${KEEP_VM:-} ]]; then
        vm_stop guest || true
        rm -rf "$VM_WORK"
    else
        log "guest left running: ssh -i $SSH_KEY -p $SSH_PORT root@127.0.0.1"
    fi
}
trap cleanup EXIT
# A command failing under set -e must not end the test without a word.
trap 'log "FAILED: line $LINENO: $BASH_COMMAND (exit $?)"' ERR

ensure_host_tools
ensure_qemu
ensure_root

log "building the packages"
# The release build is kept outside the clone, so CI recompiles only the
# workspace's own crates.
CARGO_TARGET_DIR=${NOVABACKUP_PACKAGE_TARGET:-$CACHE/package-target} \
    scripts/package.sh >"$VM_WORK/package.log" 2>&1 || { tail -30 "$VM_WORK/package.log"; die "scripts/package.sh"; }
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
DEB=target/packages/novabackup_${VERSION}-1_amd64.deb
RPM=target/packages/novabackup-${VERSION}-1.x86_64.rpm
[[ -f $DEB && -f $RPM ]] || die "scripts/package.sh did not make $DEB and $RPM"

# ---------------------------------------------------------------- rpm ---
log "checking the .rpm against the .deb"
# The same files; only the distributions' conventions differ: zsh's
# completion folder, and the licence (Debian's copyright file).
norm() { sed -e 's|^\./|/|' -e 's|/usr/share/zsh/vendor-completions/|/usr/share/zsh/site-functions/|' \
    -e 's|^/usr/share/doc/novabackup/copyright$|LICENSE|' -e 's|^/usr/share/licenses/novabackup/LICENSE$|LICENSE|' | sort; }
dpkg-deb -c "$DEB" | awk '$1 !~ /^d/ {print $6}' | norm >"$VM_WORK/deb.files"
rpm -qpl "$RPM" | norm >"$VM_WORK/rpm.files"
diff -u "$VM_WORK/deb.files" "$VM_WORK/rpm.files" || die ".deb and .rpm carry different files"
(($(wc -l <"$VM_WORK/deb.files") > 20)) || die "too few files in the packages"
grep -qx /usr/bin/novabackup "$VM_WORK/rpm.files" || die "no binary in the .rpm"
grep -q '^/usr/share/man/man1/novabackup-agent.1.gz$' "$VM_WORK/rpm.files" || die "no man pages"
debf() { dpkg-deb -f "$DEB" "$1"; }
rpmf() { rpm -qp --qf "%{$1}" "$RPM"; }
[[ $(rpmf NAME) == "$(debf Package)" ]] || die "names differ"
[[ "$(rpmf VERSION)-$(rpmf RELEASE)" == "$(debf Version)" ]] || die "versions differ: $(rpmf VERSION) vs $(debf Version)"
[[ $(rpmf ARCH) == x86_64 && $(debf Architecture) == amd64 ]] || die "architectures"
[[ $(rpmf LICENSE) == Apache-2.0 ]] || die "rpm licence $(rpmf LICENSE)"
[[ $(rpmf SUMMARY) == "$(debf Description | head -1)" ]] || die "summaries differ: $(rpmf SUMMARY)"
# (grep -q on a pipe would end the writer with SIGPIPE, which pipefail
# reports; the listings are read whole first.)
copyright=$(dpkg-deb --fsys-tarfile "$DEB" | tar -xO ./usr/share/doc/novabackup/copyright)
grep -q 'License: Apache-2.0' <<<"$copyright" || die "deb licence"
[[ $(rpm -qpc "$RPM") == /etc/novabackup/agent.toml ]] || die "rpm config files: $(rpm -qpc "$RPM")"
dpkg-deb -e "$DEB" "$VM_WORK/control"
[[ $(cat "$VM_WORK/control/conffiles") == /etc/novabackup/agent.toml ]] || die "deb conffiles"
modes=$(rpm -qp --qf '[%{FILEMODES:perms} %{FILENAMES}\n]' "$RPM")
grep -qx -- '-rw-r----- /etc/novabackup/agent.toml' <<<"$modes" || die "rpm: agent.toml is not 0640"
listing=$(dpkg-deb -c "$DEB")
grep -q -- '^-rw-r----- 0/0 .* ./etc/novabackup/agent.toml$' <<<"$listing" || die "deb: agent.toml is not 0640"
for s in POSTIN PREUN POSTUN; do
    body=$(rpmf "$s")
    [[ -n $body && $body != "(none)" ]] || die "rpm has no $s scriptlet"
    sh -n <<<"$body" || die "rpm $s scriptlet: syntax error"
done
for s in postinst prerm postrm; do sh -n "$VM_WORK/control/$s" || die "deb $s: syntax error"; done
log "rpm: $(rpm -qp "$RPM"), $(wc -l <"$VM_WORK/rpm.files") files, same as the .deb; scriptlets parse"

# ------------------------------------------------------ the old release ---
# The package of the newest release tag other than this version, built once
# with that tag's own scripts and cached by commit.
old_package() {
    local tag commit dir
    if [[ -n ${NOVABACKUP_OLD_RELEASE:-} ]]; then
        tag=$NOVABACKUP_OLD_RELEASE
        commit=$(git rev-parse --verify --quiet "$tag^{commit}") || die "no commit $tag in this clone"
    else
        read -r tag commit < <(grep -v '^#' packaging/previous-release)
        [[ -n $commit ]] || die "packaging/previous-release names no release"
    fi
    dir=$CACHE/packages/$commit
    if ! ls "$dir"/*.deb >/dev/null 2>&1; then
        git cat-file -e "$commit^{commit}" 2>/dev/null \
            || die "$tag ($commit) is neither cached in $dir nor in this clone; fetch it (git fetch --tags) or set NOVABACKUP_OLD_RELEASE"
        log "building the package of $tag ($commit) once, into $dir"
        local src=$CACHE/src-$commit
        rm -rf "$src" && mkdir -p "$src"
        git archive "$commit" | tar -x -C "$src"
        (cd "$src" && CARGO_TARGET_DIR=$CACHE/old-target scripts/package.sh) >"$VM_WORK/old-package.log" 2>&1 \
            || { tail -30 "$VM_WORK/old-package.log"; die "building $tag's package"; }
        mkdir -p "$dir"
        cp "$src"/target/packages/*.deb "$dir/"
        rm -rf "$src"
    fi
    OLD_TAG=$tag
    OLD_DEB=$(ls "$dir"/*.deb | head -1)
}
old_package

# -------------------------------------------------------------- guest ---
vm_boot guest "$SSH_PORT"
vm_copy "$DEB" "$OLD_DEB" tests/package/guest.sh /root/
vm "mv /root/$(basename "$DEB") /root/new.deb && mv /root/$(basename "$OLD_DEB") /root/old.deb"
log "guest: first install"
vm bash /root/guest.sh install || die "first install (see above)"
log "guest: upgrade from $OLD_TAG"
vm bash /root/guest.sh upgrade || die "upgrade (see above)"
log "all package checks passed"
