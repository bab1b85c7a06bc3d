#!/usr/bin/env bash
# Lint and run the whole test suite, on a fresh machine too: installs the
# project into .venv and makes sure PostgreSQL answers on 127.0.0.1:5432
# (starting or installing it when needed), because the storage and end-to-end
# tests run against a real PostgreSQL. Extra arguments go to pytest; the exit
# status is pytest's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '[test.sh] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

setup_venv() {
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[test]'
}

postgres_ready() { pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; }

postgres_installed() {
  command -v pg_ctlcluster >/dev/null 2>&1 && [ -n "$(ls -A /etc/postgresql 2>/dev/null)" ]
}

cluster_version() { ls /etc/postgresql | sort -V | tail -n 1; }

pg_cluster() {
  as_root pg_ctlcluster --skip-systemctl-redirect "$(cluster_version)" main "$@"
}

wait_for_postgres() {
  for _ in $(seq 1 30); do
    postgres_ready && return 0
    sleep 1
  done
  log "PostgreSQL does not answer on 127.0.0.1:5432"
  return 1
}

install_postgres() {
  log "PostgreSQL is not installed: installing it"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql
  local hba
  hba="/etc/postgresql/$(cluster_version)/main/pg_hba.conf"
  # The tests connect as postgres without a password: trust it on loopback
  # only, as the first rule so that it wins over the packaged ones.
  if ! as_root grep -qE '^host[[:space:]]+all[[:space:]]+postgres[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
  fi
  # The package may or may not have started the cluster (no systemd here).
  if postgres_ready; then pg_cluster reload; else pg_cluster start; fi
}

ensure_postgres() {
  if postgres_ready; then
    return 0
  fi
  if postgres_installed; then
    log "starting PostgreSQL"
    pg_cluster start || true
  else
    install_postgres
  fi
  wait_for_postgres
}

ensure_test_database() {
  local exists
  if ! exists=$(psql -w -h 127.0.0.1 -U postgres -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'test'"); then
    log "cannot connect to PostgreSQL as postgres on 127.0.0.1 without a password:" \
      "trust it in pg_hba.conf, or point RAFTMESH_TEST_POSTGRES_URL at a database"
    exit 1
  fi
  if [ "$exists" != "1" ]; then
    log "creating database test"
    psql -w -h 127.0.0.1 -U postgres -d postgres -qc 'CREATE DATABASE test'
  fi
}

# The browser tests drive Debian's chromium through Playwright (browser
# downloads are unreachable, so never `playwright install`); promtool, from
# Debian's prometheus package, checks the alert rules and the /metrics text.
apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    as_root apt-get update
    apt_updated=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

ensure_chromium() {
  if [ ! -x /usr/bin/chromium ]; then
    log "chromium is not installed: installing it"
    apt_install chromium
  fi
}

ensure_promtool() {
  if ! command -v promtool >/dev/null 2>&1; then
    log "promtool is not installed: installing Debian's prometheus package"
    apt_install prometheus
  fi
}

# The bench smoke compares against Celery on Redis: Debian's redis-server
# (the benchmark starts its own server; it only needs the binary).
ensure_redis() {
  if ! command -v redis-server >/dev/null 2>&1; then
    log "redis-server is not installed: installing it"
    apt_install redis-server
  fi
}

# mypy cannot follow the editable install's import hook, so it reads the
# folders through a tree of links named as they install: raftmesh/<folder>.
typecheck() {
  local tree=.venv/typecheck
  mkdir -p "$tree/raftmesh"
  for pkg in consensus storage runner mesh cli chaos bench; do
    ln -sfn "../../../$pkg" "$tree/raftmesh/$pkg"
  done
  (cd "$tree" && ../bin/mypy --config-file ../../pyproject.toml -p raftmesh)
}

setup_venv
ensure_chromium
ensure_promtool
ensure_redis
# A suite pointed at another PostgreSQL needs no local one.
if [ -z "${RAFTMESH_TEST_POSTGRES_URL:-}" ]; then
  ensure_postgres
  ensure_test_database
fi

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports
typecheck

status=0
.venv/bin/python -m pytest -q -ra "$@" || status=$?
if [ "$status" -eq 5 ]; then
  log "pytest collected no tests: that is a failure"
fi
exit "$status"
