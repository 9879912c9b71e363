#!/usr/bin/env bash
# The body-fetch measurement of crates/bench/README.md ("Body fetches", 2026-11-28): seeds
# 10 x 1,000 messages of 4.7 KB, then runs `imap --mode body`, `imap --mode envelope` and a
# pipelined POP3 download of a 1,000-message maildrop, each with the CPU of every process and
# the PostgreSQL statements it caused (pg_stat_statements, reset before each step).
#
# Needs a PostgreSQL with pg_stat_statements preloaded, which needs a restart: use a private
# cluster, never restart a shared server. As root, for example:
#   mkdir -p /tmp/pgbench && chown postgres /tmp/pgbench
#   runuser -u postgres -- /usr/lib/postgresql/15/bin/initdb -D /tmp/pgbench/data -U postgres --auth=trust
#   printf '%s\n' "port = 55432" "listen_addresses = '127.0.0.1'" "unix_socket_directories = '/tmp/pgbench'" \
#     "shared_preload_libraries = 'pg_stat_statements'" "pg_stat_statements.track = all" \
#     "max_connections = 200" >> /tmp/pgbench/data/postgresql.conf
#   runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D /tmp/pgbench/data -l /tmp/pgbench/log -w start
#   psql -h 127.0.0.1 -p 55432 -U postgres -c 'CREATE EXTENSION pg_stat_statements'
# then
#   BIN=/tmp/bench-target/release OUT=/tmp/body-fetch PG=postgres://postgres@127.0.0.1:55432 \
#     crates/bench/scripts/bench-body-fetch.sh
# Reports: $OUT/<step>.json (mailbench) and $OUT/<step>.stmts.tsv (calls, total ms, mean ms,
# rows, shared buffers hit+read, query), and a summary on stdout.
set -uo pipefail
cd "$(dirname "$0")/../../.."
BIN=${BIN:-target/release}
OUT=${OUT:-target/body-fetch}
PG=${PG:-postgres://postgres@127.0.0.1:55432}
PER_USER=${PER_USER:-1000}
mkdir -p "$OUT"
PSQL=(psql "$PG/postgres" -qAt)
"${PSQL[@]}" -c "SELECT 1 FROM pg_stat_statements LIMIT 1" >/dev/null ||
  { echo "pg_stat_statements is not available on $PG (see the header)" >&2; exit 1; }

BIN=$BIN OUT=$OUT PG=$PG USERS=10 crates/bench/scripts/bench-mailsuite.sh serve 2>"$OUT/serve.err" &
SERVE=$!
trap 'kill $SERVE 2>/dev/null; wait $SERVE 2>/dev/null' EXIT
for _ in $(seq 1 300); do grep -q "^smtp " "$OUT/serve.err" 2>/dev/null && break; sleep 0.2; done
LINE=$(grep "^smtp " "$OUT/serve.err") || { echo "the services did not start: $OUT/serve.err" >&2; exit 1; }
read -ra PIDARGS <<<"${LINE#*; }"
MB=("$BIN/mailbench" --json "${PIDARGS[@]}")

statements() {
  "${PSQL[@]}" -F $'\t' -c "SELECT calls, round(total_exec_time::numeric, 1), round(mean_exec_time::numeric, 4),
      rows, shared_blks_hit + shared_blks_read, left(regexp_replace(query, '\s+', ' ', 'g'), 230)
    FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'mailbench')
    ORDER BY total_exec_time DESC LIMIT 12" >"$OUT/$1.stmts.tsv"
}
step() {
  local name=$1
  shift
  echo "== $name: load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  "${PSQL[@]}" -c "SELECT pg_stat_statements_reset()" >/dev/null
  "${MB[@]}" "$@" >"$OUT/$name.json" 2>/dev/null || echo "   (exit $?)" >&2
  statements "$name"
  echo "   after: load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
}
step seed seed --server 127.0.0.1:2525 -c 20 --users 10 --per-user "$PER_USER" --size 4700 --pipelining
step imap-body imap --server 127.0.0.1:1143 --users 10 --clients 10 --mode body --duration 15
step imap-envelope imap --server 127.0.0.1:1143 --users 10 --clients 10 --mode envelope --duration 10
step pop3 pop3 --server 127.0.0.1:1110 --users 1 -n 1000 --iterations 3 --timeout 120

python3 - "$OUT" <<'PY'
import json, os, sys
d = sys.argv[1]
for n in ["seed", "imap-body", "imap-envelope", "pop3"]:
    try:
        r = json.load(open(os.path.join(d, n + ".json")))
    except ValueError:
        print(n, "no report")
        continue
    k, v = next(iter(r["latency"].items()))
    cpu = ", ".join("%s %.3f" % (c["name"], c["cpu_ms_per_op"] or 0) for c in r["cpu"])
    print("%-13s %10.1f %s/s, %d errors, %s p50 %.2f p99 %.2f ms; CPU ms/op: %s"
          % (n, r["ops_per_sec"], r["unit"], r["error_total"], k, v["p50_ms"], v["p99_ms"], cpu))
    for line in open(os.path.join(d, n + ".stmts.tsv")).read().splitlines()[:4]:
        f = line.split("\t")
        calls = int(f[0]) or 1
        print("    %7s calls  %8s ms/call  %6.1f buffers/call  %s" % (f[0], f[2], int(f[4]) / calls, f[5][:90]))
PY
