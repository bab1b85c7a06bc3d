#!/bin/sh
# Writes the secrets all-in-one.yml mounts, once; existing files are kept.
# Run from anywhere: the files land in deploy/compose/secrets/.
set -eu
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$dir"
umask 077
new() { [ -s "$dir/$1" ] || python3 -c 'import secrets; print(secrets.token_hex(32))' > "$dir/$1"; }
new cluster_secret
new api_token
new postgres_password
new grafana_admin_password
if [ ! -s "$dir/storage_url" ]; then
    printf 'postgresql://raftmesh:%s@postgres:5432/raftmesh\n' "$(cat "$dir/postgres_password")" > "$dir/storage_url"
fi
# Compose without swarm bind-mounts these files unchanged: the peers run as
# uid 10001 and Grafana as 472, so give them read access (as root: chown).
chmod 0444 "$dir"/*
echo "secrets in $dir (readable by the containers; keep the directory private: mode 0700)"
chmod 0700 "$dir" 2>/dev/null || true
