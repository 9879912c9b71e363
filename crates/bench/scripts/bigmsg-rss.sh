#!/usr/bin/env bash
# Peak memory for one large message: in over SMTP, out over IMAP (FETCH BODY.PEEK[]) and POP3
# (RETR), byte-exact. Counts, not timings, so it is repeatable on a busy machine.
#
#   cargo build -p mailsuite -p mailctl        # debug is fine: the allocation pattern is the same
#   BIN=target/debug crates/bench/scripts/bigmsg-rss.sh [SIZE]    # default 50000000 bytes
#   SPLIT=1 BIN=... crates/bench/scripts/bigmsg-rss.sh            # one process per service
#
# Default: `mailsuite up`, one process with every service, so a phase's growth is the sum of
# what every service on the path holds at once. SPLIT=1: mailbox-store, smtp-ingress,
# imap-gateway and pop3-gateway as separate processes (their binaries in BIN), each measured
# (the README's budget is per process).
# Before each phase the kernel's peak-RSS mark of each process is reset (`/proc/PID/clear_refs`,
# root only); after it, VmHWM - VmRSS(before) is that phase's growth. PostgreSQL is a fresh
# private cluster (its memory is not counted). Prints one line per phase and process, growth
# in MiB and as a multiple of the message.
set -euo pipefail
cd "$(dirname "$0")/../../.."

BIN=${BIN:-target/release}
SIZE=${1:-50000000}
OUT=${OUT:-target/bigmsg-rss}
PGPORT=${PGPORT:-55441}
BASE=${BASE:-27}   # ports ${BASE}025 (SMTP), ${BASE}143 (IMAP), ${BASE}110 (POP3), ${BASE}051/052 (gRPC)
export MAILSUITE_LOG=${MAILSUITE_LOG:-warn}
SPLIT=${SPLIT:-0}
BINS=(mailsuite mailctl)
[[ $SPLIT == 1 ]] && BINS=(mailbox-store smtp-ingress imap-gateway pop3-gateway mailctl)
for b in "${BINS[@]}"; do
  [[ -x $BIN/$b ]] || { echo "$BIN/$b missing" >&2; exit 1; }
done
BIN=$(cd "$BIN" && pwd)
PGBIN=${PGBIN:-$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)")}

rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PGDATA=$OUT/pgdata
RUNAS=()
if [[ $(id -u) == 0 ]]; then
  RUNAS=(runuser -u postgres --)
  chown postgres "$OUT"
fi
"${RUNAS[@]}" "$PGBIN/initdb" -D "$PGDATA" -U postgres -A trust >"$OUT/initdb.log"
"${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -l "$OUT/postgres.log" -w \
  -o "-p $PGPORT -k $PGDATA -c listen_addresses=127.0.0.1" start >/dev/null
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -m fast stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
psql -X -q -h 127.0.0.1 -p "$PGPORT" -U postgres -d postgres -c "CREATE DATABASE mailsuite"

SMTP=127.0.0.1:${BASE}025
IMAP=127.0.0.1:${BASE}143
POP3=127.0.0.1:${BASE}110
DB_URL=postgres://postgres@127.0.0.1:$PGPORT/mailsuite
STORE=127.0.0.1:${BASE}051
NAMES=()
if [[ $SPLIT == 1 ]]; then
  "$BIN/mailbox-store" --set "listen_grpc=$STORE" --set listen_ops= --set "database_url=$DB_URL" \
    >"$OUT/mailbox-store.log" 2>&1 &
  PIDS+=($!); NAMES+=(mailbox-store)
  for _ in $(seq 1 600); do (exec 3<>"/dev/tcp/${STORE%:*}/${STORE#*:}") 2>/dev/null && break; sleep 0.1; done
  "$BIN/smtp-ingress" --set "listen_smtp=$SMTP" --set listen_submission= --set listen_submissions= \
    --set listen_ops= --set "store_url=http://$STORE" --set policy.verify_inbound=false \
    >"$OUT/smtp-ingress.log" 2>&1 &
  PIDS+=($!); NAMES+=(smtp-ingress)
  "$BIN/imap-gateway" --set "listen_imap=$IMAP" --set listen_imaps= --set listen_ops= \
    --set "store_url=http://$STORE" --set auth.allow_plaintext_loopback=true \
    >"$OUT/imap-gateway.log" 2>&1 &
  PIDS+=($!); NAMES+=(imap-gateway)
  "$BIN/pop3-gateway" --set "listen_pop3=$POP3" --set listen_pop3s= --set listen_ops= \
    --set "store_url=http://$STORE" --set auth.allow_plaintext_loopback=true \
    >"$OUT/pop3-gateway.log" 2>&1 &
  PIDS+=($!); NAMES+=(pop3-gateway)
  CTL=("$BIN/mailctl" --store "http://$STORE")
else
  "$BIN/mailsuite" up --data-dir "$OUT/var" --set "database_url=$DB_URL" \
    --set "store.listen_grpc=$STORE" --set "queue.listen_grpc=127.0.0.1:${BASE}052" \
    --set "smtp.listen_smtp=$SMTP" --set smtp.listen_submission= --set smtp.listen_submissions= \
    --set "imap.listen_imap=$IMAP" --set imap.listen_imaps= \
    --set "pop3.listen_pop3=$POP3" --set pop3.listen_pop3s= \
    --set smtp.policy.verify_inbound=false \
    --set imap.auth.allow_plaintext_loopback=true --set pop3.auth.allow_plaintext_loopback=true \
    >"$OUT/mailsuite.log" 2>&1 &
  PIDS+=($!); NAMES+=(mailsuite)
  CTL=("$BIN/mailctl" --store "http://$STORE" --token-file "$OUT/var/internal-token")
fi
for hp in $SMTP $IMAP $POP3; do
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/${hp%:*}/${hp#*:}") 2>/dev/null && break
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null || { echo "a server exited; see $OUT/*.log" >&2; exit 1; }; done
    sleep 0.1
  done
done
"${CTL[@]}" domain add mailbench.test >/dev/null
echo password | "${CTL[@]}" account add big@mailbench.test --password-stdin >/dev/null

PROCS=""
for i in "${!PIDS[@]}"; do PROCS+="${NAMES[$i]}=${PIDS[$i]},"; done
python3 - "${PROCS%,}" "$SIZE" "$SMTP" "$IMAP" "$POP3" <<'PY'
import imaplib, poplib, smtplib, sys
procs = [(p.split("=")[0], int(p.split("=")[1])) for p in sys.argv[1].split(",")]
size = int(sys.argv[2])
hp = lambda s: (s.rsplit(":", 1)[0], int(s.rsplit(":", 1)[1]))

def status(pid, key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])  # KiB

def phase(name, run):
    before = {}
    for who, pid in procs:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        before[who] = status(pid, "VmRSS")
    run()
    for who, pid in procs:
        hwm = status(pid, "VmHWM")
        grow = (hwm - before[who]) / 1024
        print(f"{name:9s} {who:14s} RSS before {before[who]/1024:7.1f} MiB  peak {hwm/1024:7.1f} MiB  "
              f"growth {grow:6.1f} MiB = {grow * 1024 * 1024 / size:4.2f}x the message", flush=True)

head = (b"From: sender@remote.example\r\nTo: big@mailbench.test\r\n"
        b"Subject: big\r\nMessage-ID: <big@mailbench>\r\n\r\n")
line = bytes(range(33, 33 + 76)) + b"\r\n"    # no dot at the start of a line
msg = head + line * ((size - len(head)) // len(line))
msg += b"x" * (size - len(msg) - 2) + b"\r\n"
assert len(msg) == size

def send():
    s = smtplib.SMTP(*hp(sys.argv[3]), timeout=600)
    s.sendmail("sender@remote.example", ["big@mailbench.test"], msg)
    s.quit()

def imap():
    c = imaplib.IMAP4(*hp(sys.argv[4]), timeout=600)
    c.login("big@mailbench.test", "password")
    c.select("INBOX", readonly=True)
    typ, data = c.fetch("1", "(BODY.PEEK[])")
    got = data[0][1]
    c.logout()
    assert got.endswith(msg) and len(got) - len(msg) < 2000, ("IMAP body differs", len(got))

def pop3():
    p = poplib.POP3(*hp(sys.argv[5]), timeout=600)
    p._max_line = 1 << 20
    p.user("big@mailbench.test")
    p.pass_("password")
    resp, lines, octets = p.retr(1)
    p.quit()
    got = b"\r\n".join(lines) + b"\r\n"
    assert got.endswith(msg), ("POP3 body differs", len(got))

phase("smtp-in", send)
phase("imap-out", imap)
phase("pop3-out", pop3)
print("byte-exact over IMAP and POP3: yes")
PY
