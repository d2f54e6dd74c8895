#!/usr/bin/env bash
# bench/restart.sh: how long does a killed worker take to come back, round
# after round? (issue 16: in the crash matrix it grew from 1.4 s in round 1
# to 4.3 s in round 5.)
#
# One `blktap run` on the embedded default (no Xen) serves DISKS raw disks
# for domain 0. Each of ROUNDS rounds SIGKILLs every worker, measures the
# time until `blktap ls --json` shows every disk connected again with a new
# worker, and waits GAP seconds before the next round. Per round it prints
# the time back and the restart delays the daemon chose ("worker
# restarted ... after=") from its log; the table goes to $RESULTS too.
#
# It measures, it does not judge: exit 0 whatever the times; non-zero when
# the daemon fails or a disk does not come back within 60 s.
#
# Knobs (environment):
#   DISKS=4     disks (all killed each round)
#   ROUNDS=6    kill rounds
#   GAP=10      seconds between a round's end and the next kill
#   RESULTS=DIR (default bench/results/restart-UTC-TIMESTAMP)
#   BLKTAP=PATH the binary (default bin/blktap; built when missing)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
DISKS=${DISKS:-4}
ROUNDS=${ROUNDS:-6}
GAP=${GAP:-10}
RESULTS=${RESULTS:-$HERE/results/restart-$(date -u +%Y%m%dT%H%M%SZ)}

BENCH=restart
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
for v in DISKS ROUNDS GAP; do
	[[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 1 ]] || die "$v must be a positive integer"
done
command -v jq >/dev/null || die "jq not found (make oracles installs the test programs)"

W=$(mktemp -d /var/tmp/restart.XXXXXX)
DAEMON=""
cleanup() {
	local rc=$?
	set +e
	shutdown_daemon "$W/st"
	rm -rf "$W"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

build_blktap "$W"
mkdir -p "$RESULTS" "$W/st"
{
	echo "disks:"
	for ((i = 0; i < DISKS; i++)); do
		echo "  - {name: d$i, image: $W/d$i.raw, format: raw, domain: 0, device: d$((i + 1)), create: {size: 64M}}"
	done
} >"$W/disks.yaml"

"$BLKTAP" run -c "$W/disks.yaml" --state-dir "$W/st" >"$W/daemon.log" 2>&1 &
DAEMON=$!
# pids: "name pid" of every connected disk, one a line.
pids() { "$BLKTAP" ls --json --state-dir "$W/st" 2>/dev/null | jq -r '.[] | select(.phase == "connected" and .state == 4 and .worker_pid != 0) | "\(.name) \(.worker_pid)"'; }
wait_all() { # old-pids-file: until every disk is connected with another pid
	local t0=$1 n
	while :; do
		kill -0 "$DAEMON" 2>/dev/null || die "blktap run exited: $(tail -5 "$W/daemon.log")"
		n=$(pids | grep -cvxFf "$2" || true)
		[[ $n == "$DISKS" ]] && return
		(($(date +%s) - t0 < 60)) || die "only $n of $DISKS disks back after 60 s"
		sleep 0.05
	done
}
: >"$W/none"
wait_all "$(date +%s)" "$W/none"

TABLE=$RESULTS/table.txt
printf '%-6s %8s  %s\n' round "back s" "restart delays the daemon chose" | tee "$TABLE"
for ((r = 1; r <= ROUNDS; r++)); do
	pids >"$W/old"
	lines=$(wc -l <"$W/daemon.log")
	t0=$(date +%s%N)
	while read -r _ pid; do kill -KILL "$pid"; done <"$W/old"
	wait_all "$(date +%s)" "$W/old"
	t1=$(date +%s%N)
	delays=$(tail -n +"$((lines + 1))" "$W/daemon.log" | grep 'worker restarted' | sed -n 's/.* after=\([^ ]*\).*/\1/p' | tr '\n' ' ')
	printf '%-6s %8.2f  %s\n' "$r" "$(echo "($t1 - $t0) / 1000000000" | bc -l)" "$delays" | tee -a "$TABLE"
	((r == ROUNDS)) || sleep "$GAP"
done
log "results in $RESULTS"
