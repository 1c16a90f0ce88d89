#!/bin/bash
# Runs inside the Debian 12 guest of tests/package/run.sh, as root, with
# /root/new.deb (this checkout) and /root/old.deb (the previous release).
#
#   guest.sh install   first install, sandbox, reload, restart, watchdog,
#                      systemd-analyze, remove, purge
#   guest.sh upgrade   old package configured and used, then the new one
#
# Every check prints "ok: ..." or stops the run with the agent's journal.
set -euo pipefail

SOCK=/run/novabackup/nbd.sock
CONF=/etc/novabackup/agent.toml
MiB=$((1 << 20))

fail() {
    echo "GUEST CHECK FAILED: $*" >&2
    journalctl -u novabackup --no-pager -n 40 >&2 || true
    exit 1
}
ok() { echo "  ok: $*"; }
nbd() { echo "nbd+unix:///$1?socket=$SOCK"; }
main_pid() { systemctl show -p MainPID --value novabackup; }
disk() { novabackup disk list --json | jq -c --arg n "$1" '.[] | select(.name == $n)'; }
wait_healthy() {
    for _ in $(seq 90); do
        if [ "$(systemctl is-active novabackup)" = active ] &&
            curl -sf http://127.0.0.1:7810/api/v1/health >/dev/null; then
            return 0
        fi
        sleep 1
    done
    fail "the agent is not active and healthy after 90 s"
}
health_version() { curl -sf http://127.0.0.1:7810/api/v1/health | jq -r .version; }
deb_version() { dpkg-query -W -f '${Version}' "$1" | sed 's/-[0-9]*$//'; }
qemu_write() { # DISK PATTERN OFFSET LENGTH
    qemu-io -f raw "$(nbd "$1")" -c "write -P $2 $3 $4" >/dev/null || fail "qemu-io write to $1"
}
backup() { # DISK -> JSON report
    novabackup backup "$1" --json
}
new_image() { # PATH SIZE
    mkdir -p "$(dirname "$1")"
    truncate -s "$2" "$1"
}

install() {
    # ------------------------------------------------- installation ---
    out=$(dpkg -i /root/new.deb 2>&1) || fail "dpkg -i: $out"
    echo "$out" | grep -q "enabled but not started" || fail "no 'not started' notice: $out"
    [ "$(systemctl is-enabled novabackup)" = enabled ] || fail "unit not enabled"
    [ "$(systemctl is-active novabackup)" = inactive ] || fail "started although agent.toml did not ask"
    ok "installed: enabled, not started (start_on_install unset)"
    gid=$(getent group novabackup | cut -d: -f3)
    [ -n "$gid" ] || fail "no novabackup group"
    [ "$(stat -c '%a %U %G' /var/lib/novabackup)" = "700 root root" ] || fail "state folder: $(stat -c '%a %U %G' /var/lib/novabackup)"
    [ "$(stat -c '%a' /etc/novabackup)" = 750 ] || fail "config folder mode"
    [ "$(stat -c '%a' $CONF)" = 640 ] || fail "agent.toml mode"
    man -w novabackup-agent >/dev/null || fail "no man page novabackup-agent(1)"
    for f in /usr/share/bash-completion/completions/novabackup /usr/share/zsh/vendor-completions/_novabackup \
        /usr/share/fish/vendor_completions.d/novabackup.fish /usr/share/doc/novabackup/copyright \
        /usr/share/doc/novabackup/CHANGELOG.md; do
        [ -s "$f" ] || fail "missing $f"
    done
    bash -c 'source /usr/share/bash-completion/completions/novabackup && complete -p novabackup' >/dev/null ||
        fail "the bash completion does not load"
    ok "group novabackup ($gid), private folders, man pages, completions, licence, changelog"

    # ------------------------------------------------- configuration ---
    new_image /srv/vms/vm1.img 64M
    new_image /srv/vms/vm2.img 16M
    useradd --system --gid novabackup --no-create-home vmuser
    cat >>$CONF <<EOF

[[disk]]
name = "vm1"
image = "/srv/vms/vm1.img"
allow = ["gid:$gid"]
EOF
    novabackup config check | grep -q "ok (1 disk declared)" || fail "config check"
    systemctl daemon-reload
    grep -q '^ReadWritePaths=-/srv/vms$' /run/systemd/generator/novabackup.service.d/50-writable-paths.conf ||
        fail "the generator did not make /srv/vms writable"
    systemctl start novabackup
    wait_healthy
    [ "$(health_version)" = "$(deb_version novabackup)" ] || fail "health reports $(health_version)"
    ok "started; /api/v1/health answers with version $(health_version)"

    # ----------------------------------------------------- sandbox ---
    pid=$(main_pid)
    grep -q '^CapEff:[[:space:]]*000000000000000b$' /proc/"$pid"/status ||
        fail "capabilities: $(grep Cap /proc/"$pid"/status)"
    grep -q '^NoNewPrivs:[[:space:]]*1$' /proc/"$pid"/status || fail "NoNewPrivs"
    grep -q '^Seccomp:[[:space:]]*2$' /proc/"$pid"/status || fail "no seccomp filter"
    ok "agent runs with CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER only, no new privileges, seccomp"
    [ "$(stat -c '%a %U %G' $SOCK)" = "660 root novabackup" ] || fail "socket: $(stat -c '%a %U %G' $SOCK)"
    [ "$(stat -c '%a %U %G' /run/novabackup)" = "710 root novabackup" ] || fail "socket folder"
    if err=$(setpriv --reuid=nobody --regid=nogroup --clear-groups qemu-io -f raw "$(nbd vm1)" -c 'read 0 4k' 2>&1); then
        fail "nobody opened vm1: $err"
    fi
    echo "$err" | grep -q "Permission denied" || fail "nobody: $err"
    setpriv --reuid=vmuser --regid=novabackup --clear-groups qemu-io -f raw "$(nbd vm1)" \
        -c "write -P 0x22 0 $MiB" >/dev/null || fail "a novabackup group member cannot write vm1"
    ok "the NBD socket: nobody is refused, a member of group novabackup writes vm1"
    new_image /opt/outside.img 8M
    if err=$(novabackup disk attach outside --image /opt/outside.img 2>&1); then fail "attached /opt/outside.img"; fi
    echo "$err" | grep -q "image_dirs" || fail "attach outside the writable folders: $err"
    new_image /root/home.img 8M
    if novabackup disk attach home --image /root/home.img >/dev/null 2>&1; then fail "attached an image in /root"; fi
    ok "read-only outside the configured folders (and the hint says image_dirs); /root is hidden"

    # ------------------------------------------------------ backup ---
    r=$(backup vm1)
    [ "$(echo "$r" | jq -r .kind)" = full ] || fail "first backup: $r"
    ok "full backup $(echo "$r" | jq -r .snapshot)"

    # ------------------------------------------------------ reload ---
    cat >>$CONF <<'EOF'

[[disk]]
name = "vm2"
image = "/srv/vms/vm2.img"
EOF
    systemctl reload novabackup || fail "systemctl reload"
    [ -n "$(disk vm2)" ] || fail "reload did not attach vm2"
    pid=$(main_pid)
    echo 'bogus_option = 1' >>$CONF
    if systemctl reload novabackup 2>/dev/null; then fail "reload accepted a broken configuration"; fi
    [ "$(systemctl is-active novabackup)" = active ] && [ "$(main_pid)" = "$pid" ] ||
        fail "a refused reload disturbed the agent"
    journalctl -u novabackup --no-pager | grep -q "bogus_option" || fail "the journal does not name the mistake"
    sed -i '/^bogus_option/d' $CONF
    systemctl reload novabackup || fail "reload after the fix"
    ok "systemctl reload attaches new [[disk]] entries; a broken file is refused, the agent keeps running"

    # ----------------------------------------------------- restart ---
    qemu_write vm1 0x33 $((4 * MiB)) $MiB
    [ "$(disk vm1 | jq .cbt.dirty_bytes)" = "$MiB" ] || fail "dirty bytes before restart: $(disk vm1)"
    pid=$(main_pid)
    systemctl restart novabackup
    wait_healthy
    [ "$(main_pid)" != "$pid" ] || fail "restart kept the process"
    d=$(disk vm1)
    [ "$(echo "$d" | jq .cbt.trusted)" = true ] && [ "$(echo "$d" | jq .cbt.dirty_bytes)" = "$MiB" ] ||
        fail "after restart: $d"
    [ -n "$(disk vm2)" ] || fail "vm2 lost on restart"
    r=$(backup vm1)
    [ "$(echo "$r" | jq -r .kind)" = incremental ] || fail "backup after restart: $r"
    ok "systemctl restart: disks attached, bitmap trusted with 1 MiB dirty, next backup incremental"

    # ---------------------------------------------------- watchdog ---
    mkdir -p /etc/systemd/system/novabackup.service.d
    printf '[Service]\nEnvironment=NOVABACKUP_TEST_FAULTS=/run/novabackup\nWatchdogSec=6\n' \
        >/etc/systemd/system/novabackup.service.d/50-test-faults.conf
    systemctl daemon-reload
    systemctl restart novabackup
    wait_healthy
    pid=$(main_pid)
    restarts=$(systemctl show -p NRestarts --value novabackup)
    touch /run/novabackup/watchdog-hang
    for _ in $(seq 60); do
        [ "$(systemctl show -p NRestarts --value novabackup)" -gt "$restarts" ] && break
        sleep 1
    done
    [ "$(systemctl show -p NRestarts --value novabackup)" -gt "$restarts" ] || fail "the watchdog did not restart the agent"
    journalctl -u novabackup --no-pager | grep -q "Watchdog timeout" || fail "no watchdog timeout in the journal"
    wait_healthy
    [ "$(main_pid)" != "$pid" ] || fail "same process after the watchdog"
    [ "$(disk vm1 | jq .cbt.trusted)" = true ] || fail "bitmap after the watchdog: $(disk vm1)"
    rm /etc/systemd/system/novabackup.service.d/50-test-faults.conf
    systemctl daemon-reload
    systemctl restart novabackup
    wait_healthy
    ok "a hung agent (test fault point) is killed by the watchdog and restarted; bitmap still trusted"

    # ----------------------------------------------- systemd-analyze ---
    out=$(systemd-analyze verify /usr/lib/systemd/system/novabackup.service 2>&1) ||
        fail "systemd-analyze verify: $out"
    [ -z "$out" ] || fail "systemd-analyze verify warns: $out"
    exposure=$(systemd-analyze security novabackup.service | sed -n 's/.*Overall exposure level for novabackup.service: \([0-9.]*\).*/\1/p')
    [ -n "$exposure" ] || fail "no exposure score"
    awk -v e="$exposure" 'BEGIN { exit !(e <= 4.0) }' || fail "exposure $exposure > 4.0"
    echo "EXPOSURE $exposure"
    ok "systemd-analyze verify is clean; security exposure $exposure (<= 4.0)"

    # --------------------------------------------- remove and purge ---
    sums=$(sha256sum /srv/vms/*.img)
    snaps=$(novabackup snapshots --json | jq length)
    dpkg -r novabackup >/dev/null
    [ "$(systemctl is-active novabackup)" != active ] || fail "still running after remove"
    if pgrep -x novabackup >/dev/null; then fail "a novabackup process survived remove"; fi
    [ ! -e /etc/systemd/system/multi-user.target.wants/novabackup.service ] || fail "still enabled"
    [ -f $CONF ] || fail "remove deleted the configuration"
    ok "dpkg -r: stopped, disabled; configuration kept"
    out=$(dpkg -P novabackup 2>&1)
    echo "$out" | grep -q "are kept" || fail "purge does not say what it keeps: $out"
    [ ! -e /etc/novabackup ] || fail "purge left /etc/novabackup"
    [ "$(sha256sum /srv/vms/*.img)" = "$sums" ] || fail "disk images changed"
    [ "$(ls /var/lib/novabackup/store/snapshots/*/*.json 2>/dev/null | wc -l)" -eq "$snaps" ] ||
        fail "backup data lost: $(ls -R /var/lib/novabackup | head)"
    ok "dpkg -P: configuration gone, says so; $snaps snapshots and the images untouched"
    rm -rf /var/lib/novabackup /srv/vms /opt/outside.img /root/home.img
}

upgrade() {
    # The operator's configuration is in place before the package, as
    # configuration management would do; it asks for an immediate start.
    new_image /srv/vms/vm1.img 64M
    mkdir -p /etc/novabackup
    cat >$CONF <<'EOF'
start_on_install = true
nbd_socket = "/run/novabackup/nbd.sock"
nbd_socket_group = "novabackup"

[[disk]]
name = "vm1"
image = "/srv/vms/vm1.img"
EOF
    DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold /root/old.deb >/dev/null
    wait_healthy
    old=$(health_version)
    [ "$old" = "$(deb_version novabackup)" ] || fail "old agent reports $old"
    ok "old package $old installed and started at once (start_on_install = true)"
    qemu_write vm1 0x44 0 $((2 * MiB))
    r=$(backup vm1)
    [ "$(echo "$r" | jq -r .kind)" = full ] || fail "old agent's backup: $r"
    first=$(echo "$r" | jq -r .snapshot)
    novabackup schedule add backup --cron "0 3 * * *" --disk vm1 --id nightly >/dev/null
    qemu_write vm1 0x55 $((8 * MiB)) $((512 << 10))
    snaps_before=$(novabackup snapshots --json | jq -S '[.[] | .id]')
    sched_before=$(novabackup schedule list --json | jq -S '[.[] | {id, spec}]')
    [ "$(disk vm1 | jq .cbt.dirty_bytes)" = $((512 << 10)) ] || fail "dirty before upgrade: $(disk vm1)"
    pid=$(main_pid)

    DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold /root/new.deb >/dev/null
    wait_healthy
    new=$(health_version)
    [ "$new" = "$(deb_version novabackup)" ] && [ "$new" != "$old" ] || fail "after upgrade the agent reports $new"
    [ "$(main_pid)" != "$pid" ] || fail "the upgrade did not restart the agent"
    ok "upgraded $old -> $new; the agent was restarted on the new binary"
    [ "$(novabackup snapshots --json | jq -S '[.[] | .id]')" = "$snaps_before" ] || fail "snapshot list changed"
    sched_after=$(novabackup schedule list --json | jq -S '[.[] | {id, spec}]')
    [ "$sched_after" = "$sched_before" ] || fail "schedules changed: $sched_before -> $sched_after"
    echo "$sched_after" | grep -q nightly || fail "schedule lost: $sched_after"
    d=$(disk vm1)
    [ "$(echo "$d" | jq .cbt.trusted)" = true ] && [ "$(echo "$d" | jq .cbt.dirty_bytes)" = $((512 << 10)) ] ||
        fail "bitmap after upgrade: $d"
    ok "snapshots, schedules and the bitmap (trusted, 512 KiB dirty) survive"
    r=$(backup vm1)
    [ "$(echo "$r" | jq -r .kind)" = incremental ] && [ "$(echo "$r" | jq -r .parent)" = "$first" ] ||
        fail "first backup after upgrade: $r"
    snap=$(echo "$r" | jq -r .snapshot)
    novabackup restore "$snap" --to /var/lib/novabackup/restores/vm1.img >/dev/null
    cmp /var/lib/novabackup/restores/vm1.img /srv/vms/vm1.img || fail "restore differs from the disk"
    ok "the next backup is incremental on the old agent's snapshot; its restore equals the disk"
}

"$@"
