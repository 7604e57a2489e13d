#!/bin/sh
# edge-ad system set-up, run by the .deb's postinst (and by hand after unpacking the .tar.gz):
# the `edgead` system user in the gpio, video and dialout groups, the data folder for banks
# (/var/lib/edge-ad, never removed by the package), udev and systemd reloaded. Idempotent.
# The service is not enabled here: it starts once /etc/edge-ad/line.toml exists and
# `systemctl enable --now edge-ad` is run (docs/deploy.md).
set -e
for g in gpio video dialout; do
    getent group "$g" >/dev/null || groupadd --system "$g"
done
if ! getent passwd edgead >/dev/null; then
    useradd --system --user-group --home-dir /var/lib/edge-ad --no-create-home \
        --shell /usr/sbin/nologin --comment "edge-ad inspection service" edgead
fi
usermod --append --groups gpio,video,dialout edgead
install -d -o edgead -g edgead -m 0750 /var/lib/edge-ad
if command -v udevadm >/dev/null 2>&1 && [ -d /run/udev ]; then
    udevadm control --reload || true
    udevadm trigger --subsystem-match=gpio --subsystem-match=video4linux || true
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
