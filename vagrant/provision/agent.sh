#!/bin/sh
# A lab agent machine (run as root by the Vagrantfile): joins the server as a new on-premise
# machine would, with the line `converge-server init` prints (in /lab/join/join.sh, synced from
# vagrant/lab prepare: the server's key pin and this machine's one-time token). Provisioned
# again, it runs the agent at once.
set -eu
if [ -f /etc/converge/agent.toml ]; then
    systemctl reload converge.service
    echo "lab agent: already joined; the agent runs now (journalctl -u converge -f)"
    exit 0
fi
[ -f /lab/join/join.sh ] || { echo "lab agent: no /lab/join/join.sh: run vagrant/lab prepare on the host" >&2; exit 1; }
sh /lab/join/join.sh
# A lab wants quick feedback: a run every 2 minutes (a fleet's default is 30).
sed -i 's/^interval = .*/interval = "2m"/' /etc/converge/agent.toml
# The second server, tried when the first cannot be reached (vagrant halt server, and watch).
[ -f /lab/join/servers ] && cat /lab/join/servers >>/etc/converge/agent.toml
systemctl restart converge.service
echo "lab agent: joined; the agent runs every 2 minutes (converge status, journalctl -u converge)"
