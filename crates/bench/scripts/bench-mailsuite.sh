#!/usr/bin/env bash
# Reproduces the "Performance" figures of crates/bench/README.md on one machine, loopback only.
#
#   cargo build --release -p mailsuite-mailbox-store -p mailsuite-smtp-ingress -p mailsuite-imap-gateway \
#     -p mailsuite-pop3-gateway -p mailctl -p mailsuite-bench
#   crates/bench/scripts/bench-mailsuite.sh [smtp|imap|pop3|bigmsg|idle|all|serve][,STEP...]
#
# Starts mailbox-store, smtp-ingress, imap-gateway and pop3-gateway as separate processes on
# 127.0.0.1 against a fresh database `mailbench` on the local PostgreSQL, creates the test
# accounts with mailctl, runs mailbench with the pids of every process (PostgreSQL as a
# process tree), writes one JSON report per step into $OUT and stops what it started.
set -euo pipefail
cd "$(dirname "$0")/../../.."

BIN=${BIN:-target/release}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
DB=${DB:-mailbench}
OUT=${OUT:-target/mailbench}
USERS=${USERS:-10}
SMTP_MESSAGES=${SMTP_MESSAGES:-20000}
SMTP_CONNECTIONS=${SMTP_CONNECTIONS:-50}
PER_USER=${PER_USER:-1000}
IDLE_SESSIONS=${IDLE_SESSIONS:-10000}
# Accounts the IDLE sessions spread over (bench1..benchN; needs USERS >= IDLE_USERS): 1 puts
# every session on one account, 1000 with 10000 sessions gives 10 per account.
IDLE_USERS=${IDLE_USERS:-1}
DURATION=${DURATION:-20}
# Seconds over which the SMTP sessions open (0: all at once). Only needed to dodge the queue-id
# collision smtp-ingress had before c9824ad.
RAMP_UP=${RAMP_UP:-0}
# One step or several separated by commas (e.g. smtp,imap,pop3: one database, one seeding).
STEP=${1:-all}
want() {
  [[ ,$STEP, == *,all,* ]] && [[ $1 != serve ]] && return 0
  local s
  for s in "$@"; do [[ ,$STEP, == *,$s,* ]] && return 0; done
  return 1
}
# Per-event INFO logging would be measured as server CPU.
export MAILSUITE_LOG=${MAILSUITE_LOG:-warn}

# Overridable, so two runs (or a run and another benchmark) can share the machine.
STORE_GRPC=${STORE_GRPC:-127.0.0.1:50151}
SMTP=${SMTP:-127.0.0.1:2525}
IMAP=${IMAP:-127.0.0.1:1143}
POP3=${POP3:-127.0.0.1:1110}

mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

start() {
  local name=$1
  shift
  "$@" >"$OUT/$name.log" 2>&1 &
  PIDS+=($!)
  eval "PID_${name//-/_}=$!"
}

wait_port() {
  local hp=$1
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/${hp%:*}/${hp#*:}") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "nothing listens on $hp; see $OUT/*.log" >&2
  exit 1
}

psql "$PG/postgres" -qAt -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
DATABASE_URL="$PG/$DB"
PGDATA_DIR=$(psql "$PG/postgres" -qAt -c "show data_directory")
PID_postgres=$(head -1 "$PGDATA_DIR/postmaster.pid")

start mailbox-store "$BIN/mailbox-store" \
  --set listen_grpc=$STORE_GRPC --set listen_ops= --set "database_url=$DATABASE_URL"
wait_port $STORE_GRPC
start smtp-ingress "$BIN/smtp-ingress" \
  --set listen_smtp=$SMTP --set listen_submission= --set listen_submissions= --set listen_ops= \
  --set store_url=http://$STORE_GRPC --set policy.verify_inbound=false \
  --set limits.max_connections_per_ip=100000 --set limits.max_messages_per_ip_per_minute=100000000 \
  --set limits.max_messages_per_session=100000000
start imap-gateway "$BIN/imap-gateway" \
  --set listen_imap=$IMAP --set listen_imaps= --set listen_ops= --set store_url=http://$STORE_GRPC \
  --set auth.allow_plaintext_loopback=true --set limits.connections.max_connections=100000 \
  --set limits.connections.max_per_ip=100000 --set limits.commands_per_second=0 \
  --set limits.max_sessions_per_account=0
start pop3-gateway "$BIN/pop3-gateway" \
  --set listen_pop3=$POP3 --set listen_pop3s= --set listen_ops= --set store_url=http://$STORE_GRPC \
  --set auth.allow_plaintext_loopback=true --set limits.connections.max_per_ip=100000
wait_port $SMTP
wait_port $IMAP
wait_port $POP3

CTL=("$BIN/mailctl" --store http://$STORE_GRPC)
"${CTL[@]}" domain add mailbench.test >/dev/null
echo password | "${CTL[@]}" account add big@mailbench.test --password-stdin >/dev/null
for n in $(seq 1 "$USERS"); do
  echo password | "${CTL[@]}" account add "bench$n@mailbench.test" --password-stdin >/dev/null
done

PIDARGS=(--pid "smtp-ingress=$PID_smtp_ingress" --pid "mailbox-store=$PID_mailbox_store"
  --pid "imap-gateway=$PID_imap_gateway" --pid "pop3-gateway=$PID_pop3_gateway" --pid "postgres=$PID_postgres+")
MB=("$BIN/mailbench" --json "${PIDARGS[@]}")

run() {
  local name=$1
  shift
  echo "== $name: mailbench $*" >&2
  # The machine may be shared: the load average belongs next to every figure.
  echo "   before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  "${MB[@]}" "$@" >"$OUT/$name.json" || echo "   (exit $?: see $OUT/$name.json)" >&2
  echo "   after:  $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  python3 - "$OUT/$name.json" >&2 <<'PY' || true
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except ValueError:
    sys.exit("   no report")
print("   %.1f %s/s, %d errors %s" % (r["ops_per_sec"], r["unit"], r["error_total"], r["errors"]))
for k, v in r["latency"].items():
    print("   %-20s p50 %8.2f  p99 %8.2f  max %8.2f ms" % (k, v["p50_ms"], v["p99_ms"], v["max_ms"]))
for c in r["cpu"]:
    peak = ""
    if c.get("rss_peak_kib") is not None:
        peak = "  rss %d -> peak %d KiB" % (c["rss_start_kib"], c["rss_peak_kib"])
    print("   cpu %-20s %8.3f ms/op %5.2f cores%s" % (c["name"], c["cpu_ms_per_op"] or 0, c["cores"], peak))
if r.get("memory"):
    print("   memory", r["memory"])
for k, v in r["notes"].items():
    print("   %s: %s" % (k, v))
PY
}

if want smtp; then
  # Two sessions opened in the same millisecond once shared queue ids (= Deliver idempotency
  # keys) and lost mail after 250: every accepted message must be visible and stored once.
  run smtp-check smtp --server $SMTP -c 2 -n 200 --size 4096 --users "$USERS" --pipelining \
    --verify-imap $IMAP --verify-timeout 60
  echo "   stored: $(psql "$DATABASE_URL" -qAt -c 'SELECT count(*) FROM mailbox.messages') mailbox entries," \
    "$(psql "$DATABASE_URL" -qAt -c 'SELECT count(*) FROM mailbox.deliveries') deliveries" >&2
  run smtp-max smtp --server $SMTP -c "$SMTP_CONNECTIONS" -n "$SMTP_MESSAGES" --size 4096 --users "$USERS" \
    --pipelining --ramp-up "$RAMP_UP" --verify-imap $IMAP --verify-timeout 120
  RATE=$(python3 -c 'import json,sys; print(max(1, int(json.load(open(sys.argv[1]))["ops_per_sec"] / 2)))' "$OUT/smtp-max.json")
  run smtp-half-rate smtp --server $SMTP -c "$SMTP_CONNECTIONS" -n $((RATE * 20)) --size 4096 --users "$USERS" \
    --pipelining --ramp-up "$RAMP_UP" --rate "$RATE"
fi
if want imap pop3; then
  run seed seed --server $SMTP -c 20 --users "$USERS" --per-user "$PER_USER" --size 4700 --pipelining
fi
if want imap; then
  run imap-envelope imap --server $IMAP --users "$USERS" --clients 10 --mode envelope --duration "$DURATION"
  run imap-body imap --server $IMAP --users "$USERS" --clients 10 --mode body --duration "$DURATION"
  run imap-search imap --server $IMAP --users "$USERS" --clients 10 --mode search --duration "$DURATION"
  run imap-flags imap --server $IMAP --users "$USERS" --clients 10 --mode flags --duration "$DURATION"
fi
if want pop3; then
  run pop3 pop3 --server $POP3 --users 1 --messages 1000 --iterations "${POP3_ITERATIONS:-1}" --timeout 120
fi
if want bigmsg; then
  # One 50 MB message through SMTP -> store -> IMAP FETCH; the reports carry each process's peak RSS.
  run bigmsg-smtp smtp --server $SMTP -c 1 -n 1 --size 50000000 --user-template big@mailbench.test --timeout 120
  run bigmsg-fetch imap --server $IMAP --user-template big@mailbench.test --clients 1 --mode body --requests 2 \
    --timeout 120
fi
if want idle; then
  # Logins are argon2id verifications: a small ramp keeps the store's memory bounded.
  run idle idle --server $IMAP --users "$IDLE_USERS" -n "$IDLE_SESSIONS" --ramp "${IDLE_RAMP:-16}" --server-pid "$PID_imap_gateway" --smtp $SMTP \
    --deliveries 3
fi
if want serve; then
  # Keep the system up for manual runs; Ctrl-C (or SIGTERM) stops it.
  echo "smtp $SMTP imap $IMAP pop3 $POP3; ${PIDARGS[*]}" >&2
  wait
fi
echo "reports in $OUT" >&2
