# novabackup %postun ($1: 0 on removal, 1 on upgrade). rpm keeps an edited
# agent.toml as agent.toml.rpmsave; backup data and disk images are never
# touched.
if [ "$1" -eq 0 ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || :
    fi
    echo "novabackup: removed. Backup data and agent state in /var/lib/novabackup," \
        "any store folder configured elsewhere, and every disk image are kept;" \
        "delete them by hand once you no longer need them."
fi
