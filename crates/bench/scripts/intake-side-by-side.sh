#!/usr/bin/env bash
# Mail intake of several mailsuite builds and of the incumbent, interleaved: round after
# round, each build (and Postfix + Dovecot) runs the same smtp-source load in turn, so a
# machine whose speed drifts (this one swung ±40 % between identical runs) affects all of
# them alike. Each run is a fresh setup by smtp-source-bench.sh / incumbent-bench.sh.
#
#   BUILDS="before=/tmp/bin-old after=target/release" INCUMBENT=1 ROUNDS=3 MESSAGES=3000 \
#     crates/bench/scripts/intake-side-by-side.sh 1 10 50
#
# A build is NAME=DIR, DIR holding mailsuite, mailctl and mailbench (release builds: copy
# target/release/{mailsuite,mailctl,mailbench} aside after building each commit). Every line
# of every run goes to $SIDE_OUT/runs.txt (default target/intake-side-by-side), prefixed with
# the round and the build; the table of means per build and session count is printed at the
# end (msg/s, and server CPU ms per message: mailsuite + PostgreSQL, or Postfix + Dovecot).
set -euo pipefail
cd "$(dirname "$0")/../../.."

BUILDS=${BUILDS:-"current=target/release"}
INCUMBENT=${INCUMBENT:-1}
ROUNDS=${ROUNDS:-3}
SIDE_OUT=${SIDE_OUT:-target/intake-side-by-side}
export MESSAGES=${MESSAGES:-3000}
SESSIONS=("$@")
[[ ${#SESSIONS[@]} -gt 0 ]] || SESSIONS=(1 10 50)

mkdir -p "$SIDE_OUT"
SIDE_OUT=$(cd "$SIDE_OUT" && pwd)
: >"$SIDE_OUT/runs.txt"
names=()
for r in $(seq 1 "$ROUNDS"); do
  for b in $BUILDS; do
    name=${b%%=*}
    dir=${b#*=}
    [[ $r == 1 ]] && names+=("$name")
    echo "== round $r: $name ($dir)" >&2
    BIN=$dir crates/bench/scripts/smtp-source-bench.sh "${SESSIONS[@]}" >"$SIDE_OUT/last.log" 2>&1 ||
      { echo "   failed: see $SIDE_OUT/last.log" >&2; continue; }
    tail -n +2 target/smtp-source-bench/summary.txt | sed "s/^/$r $name /" >>"$SIDE_OUT/runs.txt"
  done
  if [[ $INCUMBENT == 1 ]]; then
    [[ $r == 1 ]] && names+=(incumbent)
    echo "== round $r: incumbent" >&2
    first=${BUILDS%% *}
    BIN=${first#*=} crates/bench/scripts/incumbent-bench.sh "${SESSIONS[@]}" >"$SIDE_OUT/last.log" 2>&1 ||
      { echo "   failed: see $SIDE_OUT/last.log" >&2; continue; }
    tail -n +2 target/incumbent-bench/summary.txt | sed "s/^/$r incumbent /" >>"$SIDE_OUT/runs.txt"
  fi
done

python3 - "$SIDE_OUT/runs.txt" "${names[@]}" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    runs[(f[1], f[2])].append((float(f[3]), float(f[4])))
sessions = sorted({s for _, s in runs}, key=int)
print("%-12s %8s %22s %16s" % ("build", "sessions", "msg/s: mean (runs)", "server ms/msg"))
for name in sys.argv[2:]:
    for s in sessions:
        r = runs.get((name, s))
        if not r:
            continue
        print("%-12s %8s %10.1f (%s) %10.2f" % (name, s, statistics.mean(x for x, _ in r),
              " / ".join("%.0f" % x for x, _ in r), statistics.mean(c for _, c in r)))
PY
