#!/bin/sh
# A lab server machine (run as root by the Vagrantfile, again by `vagrant provision server` or
# `server2`): the converge-server package, the state vagrant/lab prepared on the host (synced to
# /lab/server), the agent packages for /bootstrap.sh, and the operator repository (synced to
# /lab/repo from the host, committed here). Both servers share their state in PostgreSQL on
# db.lab: the first moves its embedded database in (`db import`) when it first starts.
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

# The state moves in once; later provisions never overwrite a live server's.
if [ ! -f "$STATE/server.toml" ]; then
    cp -a /lab/server/. "$STATE/"
fi
mkdir -p "$STATE/packages"
for p in /lab/packages/converge_*.deb /lab/packages/converge-[0-9]*.rpm; do
    [ -f "$p" ] && cp "$p" "$STATE/packages/"
done
chown -R converge-server:converge-server "$STATE"
chmod 0700 "$STATE"

# The database: waited for (db.lab may come up after this machine), brought up to date, and
# given the first server's embedded state once.
i=0
until converge-server db migrate --config "$STATE/server.toml" >/dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -lt 120 ] || fail "PostgreSQL on db.lab did not answer: $(converge-server db migrate --config "$STATE/server.toml" 2>&1)"
    sleep 5
done
if [ -f "$STATE/state.db" ] && [ ! -f "$STATE/imported" ]; then
    out="$(converge-server db import --config "$STATE/server.toml" 2>&1)" ||
        echo "$out" | grep -q "import only into an empty database" || fail "$out"
    touch "$STATE/imported"
fi

# The repository: the host's copy, committed, so that the server compiles what the host has.
# Both servers commit the same tree with the same parent, author and date: the same commit, so
# that whichever server sees it first proposes it and the other holds it too.
as() { runuser -u converge-server -- "$@"; }
install -d -o converge-server -g converge-server /srv/converge "$REPO"
[ -d "$REPO/.git" ] || as git -C "$REPO" init -q -b main
as find "$REPO" -mindepth 1 -maxdepth 1 ! -name .git -exec rm -rf {} +
as cp -r /lab/repo/. "$REPO/"
as git -C "$REPO" add -A
if ! as git -C "$REPO" diff --cached --quiet; then
    as env GIT_AUTHOR_DATE=2026-01-01T00:00:00Z GIT_COMMITTER_DATE=2026-01-01T00:00:00Z \
        git -C "$REPO" -c user.name="converge lab" -c user.email=lab@converge.invalid commit -q -m "the host's repository"
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
