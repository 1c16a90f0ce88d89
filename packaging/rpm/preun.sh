# novabackup %preun ($1: 0 on removal, 1 on upgrade). Removal stops and
# disables the agent; an upgrade leaves it running for %post to restart.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl stop novabackup.service || :
    fi
    systemctl disable novabackup.service >/dev/null 2>&1 || :
fi
