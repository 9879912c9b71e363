#!/usr/bin/env bash
# POP3 figures on one machine, loopback: maildrop download throughput (mailbench pop3, 1000
# messages of 4.7 KB) and pop3-gateway peak RSS while serving a 25 MB RETR to poplib.
#
#   cargo build --release -p mailsuite-mailbox-store -p mailsuite-pop3-gateway -p mailsuite-bench
#   cargo build -p mailsuite-smtp-ingress -p mailctl      # debug: they only seed the maildrops
#   crates/pop3-gateway/scripts/measure.sh
#
# Uses a fresh database $DB on the local PostgreSQL and stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/../../.."
R=target/release; D=target/debug
PG=${PG:-postgres://postgres@127.0.0.1:5432}; DB=${DB:-pop3bench}
OUT=${OUT:-target/pop3bench}; mkdir -p $OUT
export MAILSUITE_LOG=warn
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$PG/postgres" -qAt -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
}
trap cleanup EXIT
wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0; sleep 0.1; done; echo "no $1" >&2; exit 1; }
psql "$PG/postgres" -qAt -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
STORE=127.0.0.1:50171; SMTP=127.0.0.1:2537; POP3=127.0.0.1:1117
$R/mailbox-store --set listen_grpc=$STORE --set listen_ops= --set database_url=$PG/$DB >$OUT/store.log 2>&1 & PIDS+=($!); STORE_PID=$!
wait_port $STORE
$D/smtp-ingress --set listen_smtp=$SMTP --set listen_submission= --set listen_submissions= --set listen_ops= \
  --set store_url=http://$STORE --set policy.verify_inbound=false --set limits.max_connections_per_ip=100000 \
  --set limits.max_messages_per_ip_per_minute=100000000 --set limits.max_messages_per_session=100000000 >$OUT/smtp.log 2>&1 & PIDS+=($!)
$R/pop3-gateway --set listen_pop3=$POP3 --set listen_pop3s= --set listen_ops= --set store_url=http://$STORE \
  --set auth.allow_plaintext_loopback=true >$OUT/pop3.log 2>&1 & PIDS+=($!); POP3_PID=$!
wait_port $SMTP; wait_port $POP3
CTL=($D/mailctl --store http://$STORE)
"${CTL[@]}" domain add mailbench.test >/dev/null
echo password | "${CTL[@]}" account add bench1@mailbench.test --password-stdin >/dev/null
echo password | "${CTL[@]}" account add big@mailbench.test --password-stdin >/dev/null
$R/mailbench --json seed --server $SMTP -c 4 --users 1 --per-user 1000 --size 4700 --pipelining >$OUT/seed.json
echo "== mailbench pop3 --server $POP3 --users 1 --messages 1000 --iterations 5"
$R/mailbench --json --pid pop3-gateway=$POP3_PID --pid mailbox-store=$STORE_PID \
  pop3 --server $POP3 --users 1 --messages 1000 --iterations 5 >$OUT/pop3.json || true
python3 - $OUT/pop3.json <<'PY'
import json,sys; r=json.load(open(sys.argv[1]))
print("%.1f %s/s, errors %s" % (r["ops_per_sec"], r["unit"], r["errors"]))
for k,v in r["latency"].items(): print("  %s p50 %.1f p99 %.1f ms" % (k, v["p50_ms"], v["p99_ms"]))
for c in r["cpu"]: print("  cpu %-14s %.3f ms/msg %.2f cores rss %s -> %s KiB" % (c["name"], c["cpu_ms_per_op"] or 0, c["cores"], c.get("rss_start_kib"), c.get("rss_peak_kib")))
PY
echo "== 25 MB message: SMTP in, POP3 RETR out"
$R/mailbench --json smtp --server $SMTP -c 1 -n 1 --size 25000000 --user-template big@mailbench.test --timeout 120 >$OUT/big-smtp.json
grep VmHWM /proc/$POP3_PID/status
python3 - $POP3 <<'PY'
import poplib, sys, time, hashlib
h, p = sys.argv[1].split(":")
c = poplib.POP3(h, int(p), timeout=120); c.user("big@mailbench.test"); c.pass_("password")
n, size = c.stat(); t = time.time(); resp, lines, octets = c.retr(1); dt = time.time() - t
print("RETR %d octets in %.2f s (%.1f MB/s), %s" % (size, dt, size / dt / 1e6, resp[:30])); c.quit()
PY
grep VmHWM /proc/$POP3_PID/status
