#!/bin/sh
# The image's entrypoint: runs `mesh ARGS` (default `mesh up`).
#
# Secrets arrive as files, never as literals in a compose file or a manifest:
# settings with a file variant (MESH_SECRET_FILE, MESH_API_TOKEN_FILE) read
# their files themselves; for the others (the storage URL) a file
# /run/secrets/MESH_<NAME> (a compose secret whose target is the variable's
# name) sets MESH_<NAME> unless that or MESH_<NAME>_FILE is already set.
#
# A peer given no MESH_ID or MESH_HTTP (an executor of a scaled compose
# service) takes its container's hostname as its id and its container's IP as
# its HTTP address: the address is advertised to the other peers, so it must
# be one they can reach, never 0.0.0.0.
set -eu

for file in "${RAFTMESH_SECRETS_DIR:-/run/secrets}"/MESH_*; do
    [ -f "$file" ] || continue
    name=$(basename "$file")
    # A variable already set, or read by the peer from a file of its own
    # (its name with _FILE appended), wins.
    if [ -z "$(printenv "$name" || true)" ] && [ -z "$(printenv "${name}_FILE" || true)" ]; then
        value=$(cat "$file")
        export "$name=$value"
    fi
done

if [ -z "${MESH_ID:-}" ]; then
    MESH_ID=$(hostname)
    export MESH_ID
fi
if [ -z "${MESH_HTTP:-}" ]; then
    MESH_HTTP="$(hostname -i | cut -d' ' -f1):8001"
    export MESH_HTTP
fi

exec mesh "$@"
