#!/usr/bin/env bash
# bench/percall.sh: what one request costs each process of our server, in
# system calls and context switches, under one fio job.
#
#   bench/percall.sh SERVER JOB [SECONDS]
#     SERVER  ours-dom0 | ours-guest
#     JOB     a job name of bench/run.sh (randread-4k-qd1, ...)
#
# Starts `blktap run` with one disk (domain 0: the worker's NBD export;
# domain 1: the guest view, every request through the blkif ring) on a
# fresh raw image of SIZE_MB (default 256, random data, page cache warm),
# runs fio (nbd engine) for SECONDS (default 3) while one `perf stat` per
# process counts context switches and the system calls that are waits or
# signals (read, write, writev, epoll_pwait, futex, nanosleep), and prints
# each count divided by the requests fio made. Counts of calls measure a
# mechanism, so they separate two binaries on a loaded machine where
# IOPS do not (docs/PERFORMANCE.md, "Session 3"). Compare binaries with
# BLKTAP=..., alternating runs. Everything it starts it stops.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
BENCH=percall
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
(($# == 2 || $# == 3)) || die "usage: percall.sh SERVER JOB [SECONDS]"
SERVER=$1 JOB=$2 SECS=${3:-3} SIZE_MB=${SIZE_MB:-256}
for t in perf fio jq; do command -v "$t" >/dev/null || die "$t not found"; done
[[ $SECS =~ ^[0-9]+$ && $SECS -gt 0 ]] || die "SECONDS must be a positive integer"
case $SERVER in
ours-dom0) dom=0 ;;
ours-guest) dom=1 ;;
*) die "unknown server $SERVER" ;;
esac
read -ra JA <<<"$(job_args "$JOB")"

# The daemon is stopped with `blktap shutdown` (its SIGTERM would leave
# the worker running for adoption), then the work dir goes.
DAEMON=""
W=$(mktemp -d /var/tmp/bpc.XXXXXX)
trap 'rc=$?; set +e; shutdown_daemon "$W/st"; rm -rf "$W"; exit "$rc"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
build_blktap "$W"
head -c "$((SIZE_MB << 20))" /dev/urandom >"$W/disk.raw"
sync
mkdir -p "$W/st"
printf 'disks:\n  - name: p\n    image: %s\n    format: raw\n    mode: w\n    domain: %s\n    device: xvdb\n' \
	"$W/disk.raw" "$dom" >"$W/disks.yaml"
"$BLKTAP" run -c "$W/disks.yaml" --state-dir "$W/st" >"$W/daemon.log" 2>&1 &
DAEMON=$!
js=""
for _ in $(seq 300); do
	js=$("$BLKTAP" ls --json --state-dir "$W/st" 2>/dev/null || true)
	[[ $(jq -r '.[0].phase // empty' <<<"$js" 2>/dev/null) == connected ]] && break
	sleep 0.1
done
[[ $(jq -r '.[0].phase // empty' <<<"$js") == connected ]] || die "disk not connected: $(cat "$W/daemon.log")"
URI=$(jq -r '.[0].export' <<<"$js")
WORKER=$(jq -r '.[0].worker_pid' <<<"$js")

fio_run() {
	fio --name="$JOB" --ioengine=nbd --uri="$URI" "${JA[@]}" --time_based --runtime="$1" \
		--norandommap --randrepeat=0 --group_reporting --output-format=json --output="$2" >/dev/null
}
fio_run 1 /dev/null # warm up: the connection path and the page cache
events=context-switches,task-clock
for s in read write writev epoll_pwait futex nanosleep; do events+=,syscalls:sys_enter_$s; done
stats=()
for p in "$DAEMON" "$WORKER"; do
	perf stat -x, -e "$events" -p "$p" -o "$W/stat.$p" -- sleep "$((SECS + 4))" &
	stats+=("$!")
done
# perf takes a while to attach on a loaded machine; a request made before
# it counts would make every figure too low.
sleep 2
fio_run "$SECS" "$W/fio.json"
wait "${stats[@]}" || true

ios=$(jq '[.jobs[] | .read.total_ios + .write.total_ios] | add' "$W/fio.json")
iops=$(jq '[.jobs[] | .read.iops + .write.iops] | add | floor' "$W/fio.json")
echo "$SERVER $JOB: $iops IOPS, $ios requests in ${SECS}s; per request:"
for p in "$DAEMON" "$WORKER"; do
	who=daemon
	[[ $p == "$WORKER" ]] && who=worker
	awk -F, -v n="$ios" -v who="$who" '
		$1 ~ /^[0-9.]+$/ && $3 != "" {
			name = $3; sub("syscalls:sys_enter_", "", name)
			v = $1 / n
			if (name == "task-clock") { name = "cpu_us"; v = $1 * 1000 / n }
			line = line sprintf(" %s=%.2f", name, v)
		}
		END { print "  " who ":" line }' "$W/stat.$p"
done
