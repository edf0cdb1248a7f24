#!/bin/sh
# The lab's server machine (run as root by the Vagrantfile, again by `vagrant provision server`):
# the converge-server package, the state vagrant/lab prepared on the host (synced to
# /lab/server), the agent packages for /bootstrap.sh, and the operator repository (synced to
# /lab/repo from the host, committed here).
set -eu
fail() { echo "lab server: $*" >&2; exit 1; }
STATE=/var/lib/converge-server
REPO=/srv/converge/repo
deb="$(ls /lab/packages/converge-server_*.deb 2>/dev/null | head -1)"
[ -n "$deb" ] || fail "no converge-server .deb in /lab/packages: run vagrant/lab prepare on the host"
[ -f /lab/server/server.toml ] || fail "no server state in /lab/server: run vagrant/lab prepare on the host"

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq -o DPkg::Lock::Timeout=600 "$deb" >/dev/null

# The state moves in once; later provisions never overwrite a live server's database.
if [ ! -f "$STATE/state.db" ]; then
    cp -a /lab/server/. "$STATE/"
fi
mkdir -p "$STATE/packages"
for p in /lab/packages/converge_*.deb /lab/packages/converge-[0-9]*.rpm; do
    [ -f "$p" ] && cp "$p" "$STATE/packages/"
done
chown -R converge-server:converge-server "$STATE"
chmod 0700 "$STATE"

# The repository: the host's copy, committed, so that the server compiles what the host has.
as() { runuser -u converge-server -- "$@"; }
install -d -o converge-server -g converge-server /srv/converge "$REPO"
[ -d "$REPO/.git" ] || as git -C "$REPO" init -q -b main
as find "$REPO" -mindepth 1 -maxdepth 1 ! -name .git -exec rm -rf {} +
as cp -r /lab/repo/. "$REPO/"
as git -C "$REPO" add -A
if ! as git -C "$REPO" diff --cached --quiet; then
    as git -C "$REPO" -c user.name="converge lab" -c user.email=lab@converge.invalid commit -q -m "the host's repository"
fi

# Started once its state is here; a new commit needs no restart (the server watches the
# branch), and an upgraded package restarts it itself.
systemctl enable --now converge-server.service >/dev/null 2>&1
i=0
until curl -fsk https://127.0.0.1:8443/healthz >/dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -lt 100 ] || { journalctl -u converge-server --no-pager | tail -20 >&2; fail "the server did not answer"; }
    sleep 0.2
done
echo "lab server: serving $(as git -C "$REPO" log -1 --format='%h %s')"
