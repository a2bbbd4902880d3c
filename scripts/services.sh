#!/usr/bin/env bash
# Starts or stops the private Postgres cluster and Redis that `make run` and `make test` use.
#   scripts/services.sh start OWNER_FILE   start what is not running; list what we started in OWNER_FILE
#   scripts/services.sh stop OWNER_FILE    stop only what OWNER_FILE says we started
# DATABASE_URL / REDIS_URL, when set, point at external services: then nothing is started for them.
set -euo pipefail

VAR_DIR=${ICH_VAR_DIR:-$(pwd)/var}
PG_DIR=$VAR_DIR/pg
PG_PORT=${ICH_PG_PORT:-5432}
REDIS_PORT=${ICH_REDIS_PORT:-6390}
DB_NAME=${ICH_DB_NAME:-ichweb}
ME=$(id -un)

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

pg_bin() {
  local name=$1 candidate
  for candidate in "$(command -v "$name" || true)" /usr/lib/postgresql/*/bin/"$name"; do
    [ -n "$candidate" ] && [ -x "$candidate" ] && { echo "$candidate"; return; }
  done
  die "PostgreSQL server binary '$name' not found (install postgresql 15 or set DATABASE_URL)"
}

# Postgres refuses to run as root: as root, run it as the 'postgres' system user.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

pg_prepare_dir() {
  mkdir -p "$VAR_DIR"
  if [ "$(id -u)" != 0 ]; then mkdir -p "$PG_DIR"; return; fi
  id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/sh postgres
  if [ ! -e "$PG_DIR" ]; then
    mkdir -p "$PG_DIR"
    if ! runuser -u postgres -- test -x "$PG_DIR"; then
      # The checkout lies where the postgres user cannot reach (a private home or temp dir):
      # keep the cluster in a postgres-owned place and link it under var/.
      rmdir "$PG_DIR"
      local elsewhere=/var/lib/ichtriage/$(printf '%s' "$VAR_DIR" | sha256sum | cut -c1-16)/pg
      mkdir -p "$elsewhere" && ln -s "$elsewhere" "$PG_DIR"
      log "postgres cannot reach $VAR_DIR; cluster kept in $elsewhere (linked as var/pg)"
    fi
  fi
  chown postgres: "$(readlink -f "$PG_DIR")"
}

pg_psql() { as_pg "$(pg_bin psql 2>/dev/null || echo psql)" -h "$PG_DIR/run" -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 -qtAc "$1"; }

pg_start() {
  pg_prepare_dir
  if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
    log "creating a private PostgreSQL cluster in $PG_DIR/data"
    as_pg mkdir -p "$PG_DIR/data" "$PG_DIR/run"
    as_pg "$(pg_bin initdb)" -D "$PG_DIR/data" -E UTF8 --locale=C.UTF-8 \
      --auth-local=peer --auth-host=reject >"$VAR_DIR/initdb.log" 2>&1 \
      || die "initdb failed: see $VAR_DIR/initdb.log"
  fi
  as_pg mkdir -p "$PG_DIR/run"
  if as_pg "$(pg_bin pg_ctl)" -D "$PG_DIR/data" status >/dev/null 2>&1; then
    log "PostgreSQL already running (socket in $PG_DIR/run)"
  else
    log "starting PostgreSQL (unix socket only, in $PG_DIR/run)"
    as_pg "$(pg_bin pg_ctl)" -D "$PG_DIR/data" -l "$PG_DIR/postgres.log" -w -t 60 \
      -o "-k $PG_DIR/run -p $PG_PORT -c listen_addresses=''" start >/dev/null \
      || die "PostgreSQL did not start: see $PG_DIR/postgres.log"
    echo postgres >>"$OWNER"
  fi
  if [ "$(id -u)" = 0 ]; then
    pg_psql "SELECT 1 FROM pg_roles WHERE rolname = '$ME'" | grep -q 1 \
      || pg_psql "CREATE ROLE \"$ME\" LOGIN CREATEDB"
  fi
  pg_psql "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'" | grep -q 1 \
    || pg_psql "CREATE DATABASE \"$DB_NAME\" OWNER \"$ME\""
}

pg_stop() { as_pg "$(pg_bin pg_ctl)" -D "$PG_DIR/data" -m fast -w stop >/dev/null && log "PostgreSQL stopped"; }

redis_install() {
  command -v redis-server >/dev/null && return
  [ "$(id -u)" = 0 ] || die "redis-server is missing: install Debian's redis-server or set REDIS_URL"
  log "installing redis-server (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
}

redis_start() {
  redis_install
  mkdir -p "$VAR_DIR/redis"
  if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    log "Redis already running on 127.0.0.1:$REDIS_PORT"; return
  fi
  log "starting Redis on 127.0.0.1:$REDIS_PORT"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --daemonize yes --dir "$VAR_DIR/redis" \
    --pidfile "$VAR_DIR/redis/redis.pid" --logfile "$VAR_DIR/redis/redis.log" >/dev/null
  for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 || die "Redis did not start: see $VAR_DIR/redis/redis.log"
  echo redis >>"$OWNER"
}

redis_stop() { redis-cli -p "$REDIS_PORT" shutdown >/dev/null 2>&1 || true; log "Redis stopped"; }

command=${1:-}; OWNER=${2:-$VAR_DIR/run/services.started}
mkdir -p "$(dirname "$OWNER")"
case "$command" in
  start)
    : >"$OWNER"
    [ -n "${DATABASE_URL:-}" ] && log "DATABASE_URL is set: using it" || pg_start
    [ -n "${REDIS_URL:-}" ] && log "REDIS_URL is set: using it" || redis_start
    ;;
  stop)
    [ -f "$OWNER" ] || exit 0
    grep -qx postgres "$OWNER" && pg_stop
    grep -qx redis "$OWNER" && redis_stop
    rm -f "$OWNER"
    ;;
  *) die "usage: $0 start|stop [OWNER_FILE]" ;;
esac
