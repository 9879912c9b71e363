#!/usr/bin/env bash
# Mail intake side by side with the incumbent: Postfix's own load generator `smtp-source`
# against `mailsuite up`, 4 KB messages, one message per connection, spread over 100
# accounts, at 1 / 10 / 50 concurrent sessions. Prints delivered msg/s and the server CPU per
# message (the mailsuite process + every PostgreSQL backend).
#
#   cargo build --release -p mailsuite -p mailctl -p mailsuite-bench
#   apt-get install postfix      # only for /usr/sbin/smtp-source; the daemon need not run
#   crates/bench/scripts/smtp-source-bench.sh [SESSIONS ...]      # default: 1 10 50
#
# PostgreSQL is a fresh private cluster with initdb's stock settings (fsync and
# synchronous_commit on), as the incumbent ran with stock settings. Inbound SPF/DKIM checks
# are off (the incumbent does none); per-client limits are lifted because every session comes
# from 127.0.0.1. A message counts when it is stored: the count of entries in PostgreSQL
# before and after each run (250 is sent only after commit, so the two agree unless a
# session failed; failures show as smtp-source's exit status in the report).
#
# smtp-source numbers recipients with -N (1bench@, 2bench@, ...: no two alike, as in the
# incumbent's run); aliases map them onto bench1..bench$ACCOUNTS, so every delivery also
# resolves an alias, which the incumbent's run did not have to do. ONE_ACCOUNT=1 sends every
# message to bench1 instead (no -N, no alias): many sessions into one mailbox, whose UID
# counter they all share.
set -euo pipefail
cd "$(dirname "$0")/../../.."

BIN=${BIN:-target/release}
OUT=${OUT:-target/smtp-source-bench}
ACCOUNTS=${ACCOUNTS:-100}
SIZE=${SIZE:-4096}
MESSAGES=${MESSAGES:-20000}
PGPORT=${PGPORT:-55439}
SMTP=127.0.0.1:${SMTP_PORT:-2525}
ONE_ACCOUNT=${ONE_ACCOUNT:-0}
SESSIONS=("$@")
[[ ${#SESSIONS[@]} -gt 0 ]] || SESSIONS=(1 10 50)
SMTP_SOURCE=${SMTP_SOURCE:-$(command -v smtp-source || echo /usr/sbin/smtp-source)}
export MAILSUITE_LOG=${MAILSUITE_LOG:-warn}

[[ -x $SMTP_SOURCE ]] || { echo "smtp-source not found: apt-get install postfix" >&2; exit 1; }
for b in mailsuite mailctl mailbench; do
  [[ -x $BIN/$b ]] || { echo "$BIN/$b missing: cargo build --release -p mailsuite -p mailctl -p mailsuite-bench" >&2; exit 1; }
done
PGBIN=${PGBIN:-$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)")}
[[ -x $PGBIN/initdb ]] || { echo "no initdb: apt-get install postgresql" >&2; exit 1; }

rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ulimit -n "$(ulimit -Hn)"
PGDATA=$OUT/pgdata
RUNAS=()
# initdb refuses to run as root: run the cluster as the postgres user when we are root.
if [[ $(id -u) == 0 ]]; then
  RUNAS=(runuser -u postgres --)
  chown postgres "$OUT"
fi
"${RUNAS[@]}" "$PGBIN/initdb" -D "$PGDATA" -U postgres -A trust >"$OUT/initdb.log"
"${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -l "$OUT/postgres.log" -w \
  -o "-p $PGPORT -k $PGDATA -c listen_addresses=127.0.0.1" start >/dev/null
UP_PID=
cleanup() {
  [[ -n $UP_PID ]] && kill "$UP_PID" 2>/dev/null && wait "$UP_PID" 2>/dev/null
  "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -m fast stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
PG_PID=$(head -1 "$PGDATA/postmaster.pid")
PSQL=(psql -X -q -h 127.0.0.1 -p "$PGPORT" -U postgres)
"${PSQL[@]}" -d postgres -c "CREATE DATABASE mailsuite"
DB_URL=postgres://postgres@127.0.0.1:$PGPORT/mailsuite

"$BIN/mailsuite" up --data-dir "$OUT/var" \
  --set "database_url=$DB_URL" \
  --set "smtp.listen_smtp=$SMTP" \
  --set smtp.policy.verify_inbound=false \
  --set smtp.limits.max_connections_per_ip=100000 \
  --set smtp.limits.max_messages_per_ip_per_minute=100000000 \
  --set smtp.limits.max_messages_per_session=100000000 \
  >"$OUT/mailsuite.log" 2>&1 &
UP_PID=$!
for _ in $(seq 1 600); do
  (exec 3<>"/dev/tcp/${SMTP%:*}/${SMTP#*:}") 2>/dev/null && break
  kill -0 "$UP_PID" 2>/dev/null || { echo "mailsuite up exited; see $OUT/mailsuite.log" >&2; exit 1; }
  sleep 0.1
done

CTL=("$BIN/mailctl" --store http://127.0.0.1:50051 --token-file "$OUT/var/internal-token")
"${CTL[@]}" domain add mailbench.test >/dev/null
for n in $(seq 1 "$ACCOUNTS"); do
  echo password | "${CTL[@]}" account add "bench$n@mailbench.test" --password-stdin >/dev/null
done
# A benchmark fixture, written in SQL because mailctl would take minutes for 20,000 aliases.
"${PSQL[@]}" -d mailsuite -c "
  INSERT INTO mailbox.aliases (domain_id, address, kind, targets)
  SELECT d.id, g || 'bench@mailbench.test', 0,
         ARRAY['bench' || ((g - 1) % $ACCOUNTS + 1) || '@mailbench.test']
    FROM mailbox.domains d, generate_series(1, $MESSAGES) g
   WHERE d.name = 'mailbench.test'"

TO=(-N -t bench@mailbench.test)
[[ $ONE_ACCOUNT == 1 ]] && TO=(-t bench1@mailbench.test)
COUNT="${PSQL[*]} -d mailsuite -tAc 'SELECT count(*) FROM mailbox.messages'"
printf '%-9s %10s %14s %12s %12s %8s  %s\n' sessions msg/s "server ms/msg" "mailsuite" "postgres" errors load >"$OUT/summary.txt"
for s in "${SESSIONS[@]}"; do
  echo "== $s sessions: smtp-source -s $s -m $MESSAGES -l $SIZE (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  "$BIN/mailbench" --json --pid "mailsuite=$UP_PID" --pid "postgres=$PG_PID+" \
    exec --count "$COUNT" -- \
    "$SMTP_SOURCE" -s "$s" -m "$MESSAGES" -l "$SIZE" "${TO[@]}" -M client.example \
    -f loadgen@remote.example "$SMTP" \
    >"$OUT/s$s.json" 2>"$OUT/s$s.log" || echo "   (exit $?: see $OUT/s$s.log)" >&2
  python3 - "$OUT/s$s.json" "$s" "$(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/summary.txt" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
cpu = {c["name"]: c for c in r["cpu"]}
per = lambda n: "%.3f" % (cpu[n]["cpu_ms_per_op"] or 0) if n in cpu else "-"
print("%-9s %10.1f %14s %12s %12s %8d  %s" % (sys.argv[2], r["ops_per_sec"],
      r["notes"].get("server_cpu_ms_per_op", "-"), per("mailsuite"), per("postgres+"),
      r["error_total"], sys.argv[3]))
PY
  tail -1 "$OUT/summary.txt" >&2
done
cat "$OUT/summary.txt"
