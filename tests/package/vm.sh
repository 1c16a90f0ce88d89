# shellcheck shell=bash
# Helpers for the package test: a Debian 12 root booted under QEMU with
# software emulation (TCG), systemd as PID 1, reached over SSH on a
# forwarded port. Sourced by tests/package/run.sh.
#
# Slow things are cached outside the clone, in $NOVABACKUP_CI_CACHE
# (default /var/cache/novabackup-ci), and rebuilt only when missing:
#   qemu/         qemu-system-x86 7.2 from Debian, unpacked (never installed:
#                 it would replace the machine's qemu-utils 10)
#   root-v2/      the debootstrapped root (kernel, initramfs, systemd, sshd)
#   root-v2.img   that root as an ext4 image; each boot writes to a
#                 throwaway qcow2 overlay on top of it
#   id_ed25519    the key the test logs in with
#   tools/        cargo-deb and cargo-generate-rpm (scripts/package.sh)
#   package-target/  the release build of this checkout's package
#   packages/COMMIT/ the .deb of the previous release tag, and
#   old-target/      the build it came from

CACHE=${NOVABACKUP_CI_CACHE:-/var/cache/novabackup-ci}
ROOT_VERSION=v2
ROOT_DIR=$CACHE/root-$ROOT_VERSION
ROOT_IMG=$CACHE/root-$ROOT_VERSION.img
QEMU_DIR=$CACHE/qemu
SSH_KEY=$CACHE/id_ed25519
# Debian's packages for the guest root; qemu-utils gives the guest an NBD
# client (qemu-io, qemu-img) to write through the agent's socket.
GUEST_PACKAGES=man-db,jq,systemd-sysv,dbus,udev,kmod,linux-image-amd64,openssh-server,qemu-utils,curl,iproute2,procps,libnbd-bin

log() { printf '[package-test %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

ensure_host_tools() {
    local need=()
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v rpm >/dev/null || need+=(rpm)
    command -v mke2fs >/dev/null || need+=(e2fsprogs)
    command -v ssh >/dev/null || need+=(openssh-client)
    # qemu-system-x86_64's libraries (its own package cannot be installed).
    for lib in libcapstone4 libfdt1 libslirp0 libvdeplug2; do
        dpkg -s "$lib" >/dev/null 2>&1 || need+=("$lib")
    done
    if ((${#need[@]})); then
        log "installing ${need[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
}

ensure_qemu() {
    [[ -x $QEMU_DIR/usr/bin/qemu-system-x86_64 ]] && return
    log "unpacking qemu-system-x86 from Debian into $QEMU_DIR"
    local debs
    debs=$(mktemp -d)
    (cd "$debs" && apt-get download qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu 2>/dev/null) \
        || die "apt-get download qemu-system-x86 failed"
    mkdir -p "$QEMU_DIR.tmp"
    for f in "$debs"/*.deb; do dpkg-deb -x "$f" "$QEMU_DIR.tmp"; done
    rm -rf "$debs" "$QEMU_DIR"
    mv "$QEMU_DIR.tmp" "$QEMU_DIR"
}

ensure_root() {
    [[ -f $ROOT_IMG && -f $SSH_KEY ]] && return
    mkdir -p "$CACHE"
    if [[ ! -x $ROOT_DIR/sbin/init ]]; then
        log "debootstrap Debian 12 into $ROOT_DIR (a few minutes, once)"
        rm -rf "$ROOT_DIR.tmp"
        debootstrap --variant=minbase --include="$GUEST_PACKAGES" bookworm "$ROOT_DIR.tmp" \
            http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 \
            || die "debootstrap failed; see $CACHE/debootstrap.log"
        rm -rf "$ROOT_DIR"
        mv "$ROOT_DIR.tmp" "$ROOT_DIR"
    fi
    [[ -f $SSH_KEY ]] || ssh-keygen -q -t ed25519 -N '' -f "$SSH_KEY"
    local r=$ROOT_DIR
    echo novabackup-test >"$r/etc/hostname"
    echo '/dev/vda / ext4 defaults,errors=remount-ro 0 1' >"$r/etc/fstab"
    mkdir -p "$r/root/.ssh" "$r/etc/systemd/network"
    install -m 0600 "$SSH_KEY.pub" "$r/root/.ssh/authorized_keys"
    chmod 0700 "$r/root/.ssh"
    printf '[Match]\nName=en* eth*\n[Network]\nDHCP=yes\n' >"$r/etc/systemd/network/10-wired.network"
    chroot "$r" systemctl enable systemd-networkd ssh >/dev/null 2>&1
    # Nothing the test does not need slows the boot down.
    chroot "$r" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
        fstrim.timer man-db.timer systemd-networkd-wait-online.service >/dev/null 2>&1 || true
    # A root shell on the serial console, for a person debugging a boot.
    mkdir -p "$r/etc/systemd/system/serial-getty@ttyS0.service.d"
    printf '[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --keep-baud 115200 %%I $TERM\n' \
        >"$r/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf"
    log "making the root image $ROOT_IMG"
    rm -f "$ROOT_IMG.tmp"
    mke2fs -q -t ext4 -d "$r" -L novabackup-root "$ROOT_IMG.tmp" 3G || die "mke2fs -d failed"
    mv "$ROOT_IMG.tmp" "$ROOT_IMG"
}

# vm_boot NAME SSH_PORT: boots a fresh overlay of the root; waits for SSH.
vm_boot() {
    local name=$1 port=$2
    VM_WORK=${VM_WORK:-$(mktemp -d /tmp/novabackup-vm.XXXXXX)}
    VM_PORT=$port
    local kernel initrd
    kernel=$(ls "$ROOT_DIR"/boot/vmlinuz-* | sort -V | tail -1)
    initrd=$(ls "$ROOT_DIR"/boot/initrd.img-* | sort -V | tail -1)
    qemu-img create -q -f qcow2 -F raw -b "$ROOT_IMG" "$VM_WORK/$name.qcow2"
    log "booting $name (TCG, ssh on 127.0.0.1:$port, console in $VM_WORK/$name.console)"
    QEMU_MODULE_DIR=$QEMU_DIR/usr/lib/x86_64-linux-gnu/qemu \
        "$QEMU_DIR/usr/bin/qemu-system-x86_64" \
        -L "$QEMU_DIR/usr/share/qemu" -L "$QEMU_DIR/usr/share/seabios" -L "$QEMU_DIR/usr/lib/ipxe/qemu" \
        -machine q35,accel=tcg -cpu max -smp 2 -m 2048 \
        -kernel "$kernel" -initrd "$initrd" \
        -append "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=0 net.ifnames=0" \
        -drive "file=$VM_WORK/$name.qcow2,if=virtio,format=qcow2,cache=unsafe" \
        -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:22" -device virtio-net-pci,netdev=n0 \
        -serial "file:$VM_WORK/$name.console" -display none -monitor none \
        -pidfile "$VM_WORK/$name.pid" -daemonize \
        || die "qemu did not start"
    local deadline=$((SECONDS + 300))
    until vm true 2>/dev/null; do
        ((SECONDS < deadline)) || { tail -30 "$VM_WORK/$name.console" >&2; die "$name: no SSH after 300 s"; }
        sleep 3
    done
    log "$name is up after $((SECONDS - deadline + 300)) s"
}

vm_stop() {
    local name=$1
    [[ -f $VM_WORK/$name.pid ]] || return 0
    local pid
    pid=$(cat "$VM_WORK/$name.pid")
    vm poweroff >/dev/null 2>&1 || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill "$pid" 2>/dev/null || true
    rm -f "$VM_WORK/$name.pid" "$VM_WORK/$name.qcow2"
}

# vm CMD...: runs a command in the guest as root.
vm() {
    ssh -q -i "$SSH_KEY" -p "$VM_PORT" -o BatchMode=yes -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null -o ConnectTimeout=10 -o LogLevel=ERROR root@127.0.0.1 "$@"
}

# vm_copy FILE... DEST: copies files into the guest.
vm_copy() {
    scp -q -i "$SSH_KEY" -P "$VM_PORT" -o BatchMode=yes -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR "${@:1:$#-1}" "root@127.0.0.1:${!#}"
}
