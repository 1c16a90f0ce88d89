# novabackup %post ($1: 1 on install, 2 on upgrade). As the .deb's postinst:
# group, private state folder; a first install enables the unit and starts
# it only when agent.toml says start_on_install = true; an upgrade restarts
# a running agent on the new binary.
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers novabackup.conf || :
elif ! getent group novabackup >/dev/null; then
    groupadd -r novabackup || :
fi
systemd-tmpfiles --create novabackup.conf >/dev/null 2>&1 || :
if [ "$1" -eq 1 ]; then
    systemctl enable novabackup.service >/dev/null 2>&1 || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || :
    if [ "$1" -ge 2 ]; then
        systemctl try-restart novabackup.service || :
    elif [ "$(novabackup config get start_on_install 2>/dev/null)" = "true" ]; then
        systemctl start novabackup.service || :
    else
        echo "novabackup: the agent is enabled but not started. Edit /etc/novabackup/agent.toml," \
            "then: systemctl start novabackup"
    fi
fi
