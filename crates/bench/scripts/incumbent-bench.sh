#!/usr/bin/env bash
# The incumbent, Postfix + Dovecot, under exactly the load of smtp-source-bench.sh, on this
# machine: Postfix's own load generator `smtp-source`, 4 KB messages, one message per
# connection, spread over 100 accounts, at 1 / 10 / 50 concurrent sessions. Postfix delivers
# over LMTP (unix socket) to Dovecot, which stores in Maildir. Prints delivered msg/s and the
# server CPU per message (the Postfix master with all its daemons + the Dovecot master with
# all its processes), in the same table as smtp-source-bench.sh, so the two can be read side
# by side.
#
#   cargo build --release -p mailsuite-bench                  # only for target/release/mailbench
#   apt-get install postfix dovecot-core dovecot-lmtpd        # the daemons need not run
#   crates/bench/scripts/incumbent-bench.sh [SESSIONS ...]    # default: 1 10 50; as root
#
# Both daemons are private instances started from config dirs under $OUT (default
# target/incumbent-bench) and stopped on exit: `postfix -c $OUT/postfix` with its own queue
# and data directories, listening on 127.0.0.1:$SMTP_PORT (2526) only, and `dovecot -c
# $OUT/dovecot/dovecot.conf` with its own base_dir; /etc/postfix, /etc/dovecot and the system
# services are not touched. Postfix must be started as root, so the script runs as root.
#
# Settings are Debian's stock ones (postfix 3.7: /usr/share/postfix/main.cf.debian and
# master.cf.dist plus the lines its postinst adds; dovecot 2.3: built-in defaults plus what
# `doveconf -n` shows Debian setting), changed only where a private instance or this delivery
# path needs it: the domain mailbench.test as a Postfix virtual mailbox domain with accounts
# bench1..bench$ACCOUNTS, delivered with `virtual_transport = lmtp:unix:private/dovecot-lmtp`;
# Dovecot with those accounts in a passwd-file (all mapped to the unprivileged $VMAIL_USER),
# mail_location = maildir:~/Maildir (Debian's stock is mbox), ssl = no (LMTP over the unix
# socket uses no TLS). mail_fsync stays at its default (optimized: fsync on), Postfix fsyncs
# its queue files as always, Postfix's services stay chrooted as in Debian's master.cf (the
# chroot is prepared by Debian's own /usr/lib/postfix/configure-instance.sh). Postfix's
# per-client anvil limits are not changed: 127.0.0.1 is in mynetworks, which is exempt
# (smtpd_client_event_limit_exceptions), so 50 sessions from 127.0.0.1 are not throttled.
#
# smtp-source numbers recipients with -N (1bench@, 2bench@, ...), as in smtp-source-bench.sh;
# a three-line regexp table in virtual_alias_maps maps N onto bench((N-1) mod $ACCOUNTS + 1),
# the same mapping as smtp-source-bench.sh's SQL aliases, so every delivery also resolves an
# alias. ONE_ACCOUNT=1 sends every message to bench1 instead (no -N, no alias).
#
# A message counts only once it is DELIVERED into a Maildir: Postfix sends 250 after the queue
# file is fsynced and delivers later, so the measured command is smtp-source followed by a wait
# until Postfix's queue is empty (deadline $DRAIN_TIMEOUT s); msg/s = files that appeared in
# the Maildirs' new/ and cur/ / (start until the queue had drained, i.e. the last delivery,
# within ~10 ms of polling). The queue is polled by listing its directories from this side,
# not with postqueue, whose showq daemon would be charged to Postfix's CPU. After each run
# `postqueue -p` must report an empty queue, and delivered must equal $MESSAGES (the
# `delivered` column; a shortfall is also printed as a warning). Logs: $OUT/postfix.log
# (maillog_file via postlogd), $OUT/dovecot.log, and per run $OUT/s$SESSIONS.{json,log}.
set -euo pipefail
cd "$(dirname "$0")/../../.."

BIN=${BIN:-target/release}
OUT=${OUT:-target/incumbent-bench}
ACCOUNTS=${ACCOUNTS:-100}
SIZE=${SIZE:-4096}
MESSAGES=${MESSAGES:-20000}
SMTP=127.0.0.1:${SMTP_PORT:-2526}
ONE_ACCOUNT=${ONE_ACCOUNT:-0}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-900}
VMAIL_USER=${VMAIL_USER:-nobody}
SESSIONS=("$@")
[[ ${#SESSIONS[@]} -gt 0 ]] || SESSIONS=(1 10 50)
SMTP_SOURCE=${SMTP_SOURCE:-$(command -v smtp-source || echo /usr/sbin/smtp-source)}

[[ $(id -u) == 0 ]] || { echo "run as root: Postfix's master must be started by root" >&2; exit 1; }
for b in "$SMTP_SOURCE" /usr/sbin/postfix /usr/sbin/postconf /usr/sbin/postqueue /usr/sbin/dovecot \
  /usr/lib/dovecot/lmtp; do
  [[ -x $b ]] || { echo "$b missing: apt-get install postfix dovecot-core dovecot-lmtpd" >&2; exit 1; }
done
for f in /usr/share/postfix/main.cf.debian /usr/share/postfix/master.cf.dist \
  /usr/lib/postfix/configure-instance.sh; do
  [[ -r $f ]] || { echo "$f missing: apt-get install postfix (Debian's package)" >&2; exit 1; }
done
[[ -x $BIN/mailbench ]] || { echo "$BIN/mailbench missing: cargo build --release -p mailsuite-bench" >&2; exit 1; }
BIN=$(cd "$BIN" && pwd)
VMAIL_UID=$(id -u "$VMAIL_USER")
VMAIL_GID=$(id -g "$VMAIL_USER")

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PC=$OUT/postfix               # Postfix config directory
Q=$OUT/postfix-queue          # Postfix queue directory (and chroot)
DC=$OUT/dovecot               # Dovecot config, base_dir, state_dir
MAIL=$OUT/mail                # the Maildirs
# A previous run that was killed may have left its instances running in $OUT.
[[ -f $PC/main.cf ]] && postfix -c "$PC" stop >/dev/null 2>&1 || true
[[ -f $DC/dovecot.conf ]] && dovecot -c "$DC/dovecot.conf" stop >/dev/null 2>&1 || true
rm -rf "$OUT"
mkdir -p "$OUT" "$PC" "$DC" "$MAIL"
ulimit -n "$(ulimit -Hn)"

POSTFIX_UP=0
DOVECOT_UP=0
cleanup() {
  if [[ $POSTFIX_UP == 1 ]]; then postfix -c "$PC" stop >/dev/null 2>&1 || true; fi
  if [[ $DOVECOT_UP == 1 ]]; then dovecot -c "$DC/dovecot.conf" stop >/dev/null 2>&1 || true; fi
  # Wait (bounded) for both masters to be gone, so the next run can bind and rm -rf.
  for _ in $(seq 1 100); do
    { [[ -n ${PF_PID:-} ]] && kill -0 "$PF_PID" 2>/dev/null; } ||
      { [[ -n ${DV_PID:-} ]] && kill -0 "$DV_PID" 2>/dev/null; } || break
    sleep 0.1
  done
}
trap cleanup EXIT

# --- Dovecot: LMTP into Maildir ------------------------------------------------------------
: >"$DC/users"
for n in $(seq 1 "$ACCOUNTS"); do
  echo "bench$n@mailbench.test:{PLAIN}password:$VMAIL_UID:$VMAIL_GID::$MAIL/bench$n::" >>"$DC/users"
  mkdir -p "$MAIL/bench$n/Maildir"/{cur,new,tmp}
done
chown -R "$VMAIL_UID:$VMAIL_GID" "$MAIL"
cat >"$DC/dovecot.conf" <<EOF
# Private instance for incumbent-bench.sh. Everything not set here is Dovecot's built-in
# default (as in Debian's stock conf.d, which mostly lists defaults commented out).
instance_name = dovecot-bench
base_dir = $DC/run
state_dir = $DC/state
log_path = $OUT/dovecot.log
protocols = lmtp
ssl = no

# Debian stock: mail_location = mbox:~/mail:INBOX=/var/mail/%u; the reference ran Maildir.
mail_location = maildir:~/Maildir
# Debian stock (10-mail.conf, 15-mailboxes.conf).
mail_privileged_group = mail
namespace inbox {
  inbox = yes
  location =
  mailbox Drafts {
    special_use = \Drafts
  }
  mailbox Junk {
    special_use = \Junk
  }
  mailbox Trash {
    special_use = \Trash
  }
  mailbox Sent {
    special_use = \Sent
  }
  mailbox "Sent Messages" {
    special_use = \Sent
  }
}

# Debian stock is PAM + system users; here the benchmark accounts in a passwd-file.
passdb {
  driver = passwd-file
  args = $DC/users
}
userdb {
  driver = passwd-file
  args = $DC/users
}

# Postfix's lmtp client connects to private/dovecot-lmtp in its queue directory.
service lmtp {
  unix_listener $Q/private/dovecot-lmtp {
    mode = 0600
    user = postfix
    group = postfix
  }
}
EOF

# --- Postfix: a private instance, virtual domain delivered over LMTP ---------------------------
cp /usr/share/postfix/main.cf.debian "$PC/main.cf"
cp /usr/share/postfix/master.cf.dist "$PC/master.cf"
PCONF=(postconf -c "$PC")
# What Debian's postinst appends to main.cf on a fresh install ("Internet Site").
"${PCONF[@]}" -e \
  'smtpd_tls_cert_file=/etc/ssl/certs/ssl-cert-snakeoil.pem' \
  'smtpd_tls_key_file=/etc/ssl/private/ssl-cert-snakeoil.key' \
  'smtpd_tls_security_level=may' \
  'smtp_tls_CApath=/etc/ssl/certs' \
  'smtp_tls_security_level=may' \
  'smtp_tls_session_cache_database=btree:${data_directory}/smtp_scache' \
  'smtpd_relay_restrictions=permit_mynetworks permit_sasl_authenticated defer_unauth_destination' \
  'myhostname=incumbent.localdomain' \
  'mydestination=$myhostname, localhost.localdomain, localhost' \
  'relayhost=' \
  'mynetworks=127.0.0.0/8 [::ffff:127.0.0.0]/104 [::1]/128' \
  'mailbox_size_limit=0' \
  'recipient_delimiter=+'
# The private instance: its own queue, data, logs, loopback only, no /etc/aliases.
"${PCONF[@]}" -e \
  "queue_directory=$Q" \
  "data_directory=$OUT/postfix-data" \
  'inet_interfaces=127.0.0.1' \
  'syslog_name=postfix-bench' \
  "maillog_file=$OUT/postfix.log" \
  "maillog_file_prefixes=$OUT" \
  'alias_maps=' \
  'alias_database='
# The delivery path: the benchmark domain, its accounts, the aliases, LMTP to Dovecot.
: >"$PC/vmailbox"
for n in $(seq 1 "$ACCOUNTS"); do echo "bench$n@mailbench.test OK" >>"$PC/vmailbox"; done
if [[ $ACCOUNTS == 100 ]]; then
  # (N-1) mod 100 + 1 is N's last two digits, 00 -> 100 (regexp tables are case-insensitive).
  cat >"$PC/virtual_alias.regexp" <<'EOF'
/^[0-9]*00bench@mailbench\.test$/ bench100@mailbench.test
/^[0-9]*([1-9][0-9])bench@mailbench\.test$/ bench${1}@mailbench.test
/^([0-9]*0)?([1-9])bench@mailbench\.test$/ bench${2}@mailbench.test
EOF
  ALIAS_MAP=regexp:$PC/virtual_alias.regexp
else
  # No regexp for another modulus: one line per message, as smtp-source-bench.sh's SQL.
  awk -v m="$MESSAGES" -v a="$ACCOUNTS" 'BEGIN { for (g = 1; g <= m; g++)
    printf "%dbench@mailbench.test bench%d@mailbench.test\n", g, (g - 1) % a + 1 }' >"$PC/virtual_alias"
  ALIAS_MAP=texthash:$PC/virtual_alias
fi
"${PCONF[@]}" -e \
  'virtual_mailbox_domains=mailbench.test' \
  "virtual_mailbox_maps=texthash:$PC/vmailbox" \
  "virtual_alias_maps=$ALIAS_MAP" \
  'virtual_transport=lmtp:unix:private/dovecot-lmtp'
# master.cf: the stock smtpd entry (chrooted, as Debian ships it) moved to 127.0.0.1:$port.
"${PCONF[@]}" -M# smtp/inet
"${PCONF[@]}" -Me "$SMTP/inet=$SMTP inet n - y - - smtpd"
[[ $("${PCONF[@]}" -h mail_version) == 3.* ]] || echo "warning: not Postfix 3.x" >&2

# Queue directory (+ chroot) as `postfix start` would create it, then Debian's chroot copy.
mkdir -p "$Q"
postfix -c "$PC" check >"$OUT/postfix-check.log" 2>&1 ||
  { cat "$OUT/postfix-check.log" >&2; exit 1; }
MAIL_CONFIG=$PC /usr/lib/postfix/configure-instance.sh - >>"$OUT/postfix-check.log" 2>&1 ||
  { cat "$OUT/postfix-check.log" >&2; exit 1; }

dovecot -c "$DC/dovecot.conf" || { echo "dovecot did not start; see $OUT/dovecot.log" >&2; exit 1; }
DOVECOT_UP=1
postfix -c "$PC" start >>"$OUT/postfix-check.log" 2>&1 ||
  { cat "$OUT/postfix-check.log" >&2; echo "see $OUT/postfix.log" >&2; exit 1; }
POSTFIX_UP=1
ready=0
for _ in $(seq 1 100); do
  [[ -s $Q/pid/master.pid && -s $DC/run/master.pid && -S $Q/private/dovecot-lmtp ]] &&
    (exec 3<>"/dev/tcp/${SMTP%:*}/${SMTP#*:}") 2>/dev/null && { ready=1; break; }
  sleep 0.1
done
[[ $ready == 1 ]] ||
  { echo "Postfix or Dovecot not ready; see $OUT/postfix.log and $OUT/dovecot.log" >&2; exit 1; }
PF_PID=$(tr -d ' ' <"$Q/pid/master.pid")
DV_PID=$(cat "$DC/run/master.pid")
kill -0 "$PF_PID" && kill -0 "$DV_PID"

# The measured command: smtp-source, then wait until Postfix's queue is empty (every accepted
# message delivered, or the deadline). Runs as mailbench exec's child, so the clock includes it.
# Exit status: smtp-source's if it failed, 3 if the queue did not drain.
send_and_drain() {
  echo "$EPOCHREALTIME" >"$START_FILE"
  local rc=0
  "$@" || rc=$?
  local deadline=$((SECONDS + DRAIN_TIMEOUT)) q
  shopt -s nullglob
  while :; do
    q=("$Q"/incoming/* "$Q"/active/* "$Q"/maildrop/* "$Q"/hold/* "$Q"/deferred/*/*)
    [[ ${#q[@]} == 0 ]] && break
    if ((SECONDS >= deadline)); then
      echo "queue not empty ${DRAIN_TIMEOUT}s after smtp-source: ${#q[@]} files" >&2
      return 3
    fi
    sleep 0.01
  done
  return "$rc"
}
export -f send_and_drain
export Q DRAIN_TIMEOUT

TO=(-N -t bench@mailbench.test)
[[ $ONE_ACCOUNT == 1 ]] && TO=(-t bench1@mailbench.test)
COUNT="find '$MAIL' -path '*/Maildir/new/*' -type f -o -path '*/Maildir/cur/*' -type f | wc -l"
printf '%-9s %10s %14s %12s %12s %8s %10s  %s\n' sessions msg/s "server ms/msg" "postfix" "dovecot" \
  errors delivered load >"$OUT/summary.txt"
for s in "${SESSIONS[@]}"; do
  echo "== $s sessions: smtp-source -s $s -m $MESSAGES -l $SIZE, then until delivered (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  START_FILE=$OUT/s$s.start "$BIN/mailbench" --json --pid "postfix=$PF_PID+" --pid "dovecot=$DV_PID+" \
    exec --count "$COUNT" -- \
    bash -c 'send_and_drain "$@"' send_and_drain \
    "$SMTP_SOURCE" -s "$s" -m "$MESSAGES" -l "$SIZE" "${TO[@]}" -M client.example \
    -f loadgen@remote.example "$SMTP" \
    >"$OUT/s$s.json" 2>"$OUT/s$s.log" || echo "   (exit $?: see $OUT/s$s.log)" >&2
  queue=$(postqueue -c "$PC" -p 2>&1 | tail -1)
  [[ $queue == *"queue is empty"* ]] || echo "   warning: Postfix queue not empty: $queue" >&2
  # Cross-check of the clock: the newest Maildir entry's ctime (set by its rename into new/).
  last=$(find "$MAIL" \( -path '*/Maildir/new/*' -o -path '*/Maildir/cur/*' \) -type f -printf '%C@\n' |
    sort -n | tail -1)
  python3 - "$OUT/s$s.json" "$s" "$(cut -d' ' -f1-3 /proc/loadavg)" "$MESSAGES" \
    "$(cat "$OUT/s$s.start" 2>/dev/null)" "$last" >>"$OUT/summary.txt" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
start, last = sys.argv[5], sys.argv[6]
if start and last and r["ops"]:
    t = float(last.replace(",", ".")) - float(start.replace(",", "."))
    print("   last delivery %.3f s after smtp-source started (%.1f msg/s); measured %.3f s" %
          (t, r["ops"] / t, r["elapsed_secs"]), file=sys.stderr)
cpu = {c["name"]: c for c in r["cpu"]}
per = lambda n: "%.3f" % (cpu[n]["cpu_ms_per_op"] or 0) if n in cpu else "-"
delivered = r["notes"]["count_after"] - r["notes"]["count_before"]
if delivered != int(sys.argv[4]):
    print("   warning: %d of %s messages delivered" % (delivered, sys.argv[4]), file=sys.stderr)
print("%-9s %10.1f %14s %12s %12s %8d %10d  %s" % (sys.argv[2], r["ops_per_sec"],
      r["notes"].get("server_cpu_ms_per_op", "-"), per("postfix+"), per("dovecot+"),
      r["error_total"], delivered, sys.argv[3]))
PY
  tail -1 "$OUT/summary.txt" >&2
done
cat "$OUT/summary.txt"
