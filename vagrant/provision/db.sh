#!/bin/sh
# The lab's database machine (run as root by the Vagrantfile): PostgreSQL from Debian, a role
# `converge` whose password vagrant/lab prepared on the host (synced to /lab/db; it goes to psql
# on standard input, never on a command line), its database, and access from the two servers'
# addresses only (scram-sha-256). Arguments: the servers' addresses.
set -eu
fail() { echo "lab db: $*" >&2; exit 1; }
[ $# -eq 2 ] || fail "usage: db.sh SERVER_IP SERVER2_IP"
[ -f /lab/db/password ] || fail "no /lab/db/password: run vagrant/lab prepare on the host"
password="$(cat /lab/db/password)"
case "$password" in *[!0-9a-f]*) fail "/lab/db/password is not hex" ;; esac

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq -o DPkg::Lock::Timeout=600 postgresql >/dev/null
conf="$(ls -d /etc/postgresql/*/main | sort -V | tail -1)"
printf "listen_addresses = '*'\npassword_encryption = 'scram-sha-256'\n" >"$conf/conf.d/converge.conf"
hba="$conf/pg_hba.conf"
for ip in "$@"; do
    line="host converge converge $ip/32 scram-sha-256"
    grep -qxF "$line" "$hba" || echo "$line" >>"$hba"
done
systemctl restart postgresql

psql_() { runuser -u postgres -- psql -qAt -v ON_ERROR_STOP=1 "$@"; }
if [ "$(psql_ -c "SELECT 1 FROM pg_roles WHERE rolname = 'converge'")" != 1 ]; then
    echo "CREATE ROLE converge LOGIN PASSWORD '$password'" | psql_
else
    echo "ALTER ROLE converge PASSWORD '$password'" | psql_
fi
if [ "$(psql_ -c "SELECT 1 FROM pg_database WHERE datname = 'converge'")" != 1 ]; then
    psql_ -c "CREATE DATABASE converge OWNER converge"
fi
echo "lab db: PostgreSQL on $(hostname -I | awk '{print $NF}'):5432, database converge for $*"
