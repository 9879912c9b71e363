#!/bin/bash
# First start: initdb into $PGDATA with the password for $POSTGRES_USER, password (scram)
# authentication over TCP, and the database $POSTGRES_DB. Every start: run postgres in the
# foreground as PID 1's only child (exec), listening on every address of the container.
set -euo pipefail
bin="/usr/lib/postgresql/${PG_MAJOR}/bin"
user="${POSTGRES_USER:-postgres}"
db="${POSTGRES_DB:-$user}"
: "${PGDATA:=/var/lib/postgresql/data}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "postgres-entrypoint: set POSTGRES_PASSWORD (the database would be open otherwise)" >&2
    exit 1
  fi
  pwfile="$(mktemp)"
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  "$bin/initdb" -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  # Any address may connect with the password: the container's network is the boundary.
  printf 'host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n' >> "$PGDATA/pg_hba.conf"
  "$bin/pg_ctl" -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  if [ "$db" != "postgres" ]; then
    psql -v ON_ERROR_STOP=1 -U "$user" -d postgres -q -c "CREATE DATABASE \"$db\" OWNER \"$user\""
  fi
  "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
  echo "postgres-entrypoint: initialised $PGDATA (user $user, database $db)"
fi

exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' "$@"
