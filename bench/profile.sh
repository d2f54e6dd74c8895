#!/usr/bin/env bash
# bench/profile.sh: where one server spends its CPU under one fio job.
#
#   bench/profile.sh SERVER JOB [SECONDS]
#     SERVER  ours-dom0 | ours-guest | qemu-nbd | nbdkit
#     JOB     a job name of bench/run.sh (randread-4k-qd32, randrw70-4k-qd32x4, ...)
#
# Starts the server on a fresh raw image of SIZE (default 256M, random
# data, page cache warm) over a unix socket, runs fio (nbd engine) for
# SECONDS (default 10) while `perf stat` counts task-clock and context
# switches of the server's processes (ours: daemon + worker) and `perf
# record -g` samples them, then prints per-I/O figures (CPU us and context
# switches per request) and the hottest symbols. Output goes to $OUT
# (default bench/results/profile-SERVER-JOB-TIMESTAMP): fio.json,
# perf-stat.txt, perf.data, perf-report.txt. Everything it starts it stops.
# The daemon has no pprof hook, so perf is the profiler here; Go binaries
# keep frame pointers and symbols, so `perf report` names Go functions.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
SERVER=${1:?usage: profile.sh SERVER JOB [SECONDS]}
JOB=${2:?usage: profile.sh SERVER JOB [SECONDS]}
SECS=${3:-10}
SIZE_MB=${SIZE_MB:-256}
BLKTAP=${BLKTAP:-$REPO/bin/blktap}
OUT=${OUT:-$HERE/results/profile-$SERVER-$JOB-$(date -u +%Y%m%dT%H%M%SZ)}

BENCH=profile
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
die() {
	echo "profile: $*" >&2
	exit 1
}
for t in perf fio jq nbdinfo; do command -v "$t" >/dev/null || die "$t not found"; done
[[ $SECS =~ ^[0-9]+$ && $SECS -gt 0 ]] || die "SECONDS must be a positive integer"

JA_WORDS=$(job_args "$JOB")
read -ra JA <<<"$JA_WORDS"

STARTED=()
W=""
cleanup() {
	local rc=$? p
	set +e
	# shutdown first: a daemon that gets SIGTERM leaves its workers
	# serving, for the next daemon to adopt (by design).
	[[ -n $W && -d $W/st ]] && "$BLKTAP" shutdown --state-dir "$W/st" >/dev/null 2>&1
	stop_pids "${STARTED[@]}"
	wait 2>/dev/null
	[[ -n $W ]] && rm -rf "$W"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

W=$(mktemp -d /var/tmp/bp.XXXXXX)
mkdir -p "$OUT"
head -c "$((SIZE_MB << 20))" /dev/urandom >"$W/disk.raw"
sync

if [[ $SERVER == ours-* && ! -x $BLKTAP ]]; then
	(cd "$REPO" && go build -o "$W/blktap" ./cmd/blktap) || die "go build failed"
	BLKTAP=$W/blktap
fi

PIDS=()
case $SERVER in
ours-dom0 | ours-guest)
	dom=0
	[[ $SERVER == ours-guest ]] && dom=1
	mkdir -p "$W/st"
	printf 'disks:\n  - name: p\n    image: %s\n    format: raw\n    mode: w\n    domain: %s\n    device: xvdb\n' \
		"$W/disk.raw" "$dom" >"$W/disks.yaml"
	"$BLKTAP" run -c "$W/disks.yaml" --state-dir "$W/st" >"$OUT/daemon.log" 2>&1 &
	STARTED+=("$!")
	PIDS+=("$!")
	for _ in $(seq 300); do
		js=$("$BLKTAP" ls --json --state-dir "$W/st" 2>/dev/null || true)
		[[ $(jq -r '.[0].phase // empty' <<<"$js" 2>/dev/null) == connected ]] && break
		sleep 0.1
	done
	[[ $(jq -r '.[0].phase // empty' <<<"$js") == connected ]] || die "disk not connected: $(jq -r '.[0].error' <<<"$js")"
	URI=$(jq -r '.[0].export' <<<"$js")
	PIDS+=("$(jq -r '.[0].worker_pid' <<<"$js")")
	;;
qemu-nbd)
	qemu-nbd -f raw --cache=writeback --aio=threads -e 8 -t -k "$W/s.sock" "$W/disk.raw" >"$OUT/server.log" 2>&1 &
	STARTED+=("$!")
	PIDS+=("$!")
	URI="nbd+unix:///?socket=$W/s.sock"
	;;
nbdkit)
	nbdkit -f -U "$W/s.sock" file file="$W/disk.raw" >"$OUT/server.log" 2>&1 &
	STARTED+=("$!")
	PIDS+=("$!")
	URI="nbd+unix:///?socket=$W/s.sock"
	;;
*) die "unknown server $SERVER" ;;
esac
for _ in $(seq 300); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
nbdinfo --size "$URI" >/dev/null || die "$SERVER does not answer on $URI"
plist=$(
	IFS=,
	echo "${PIDS[*]}"
)
echo "profile: $SERVER pids $plist, $URI, $JOB for ${SECS}s -> $OUT" >&2

perf stat -e task-clock,context-switches,cpu-migrations -p "$plist" -o "$OUT/perf-stat.txt" -- sleep "$((SECS + 1))" &
stat_pid=$!
perf record -q -F 499 -g -p "$plist" -o "$OUT/perf.data" -- sleep "$((SECS + 1))" >/dev/null 2>&1 &
rec_pid=$!
fio --name="$JOB" --ioengine=nbd --uri="$URI" "${JA[@]}" --time_based --runtime="$SECS" \
	--norandommap --randrepeat=0 --group_reporting --output-format=json --output="$OUT/fio.json" >/dev/null
wait "$stat_pid" "$rec_pid" || true

ios=$(jq '[.jobs[] | .read.total_ios + .write.total_ios] | add' "$OUT/fio.json")
iops=$(jq '[.jobs[] | .read.iops + .write.iops] | add | floor' "$OUT/fio.json")
clock_ms=$(awk '/task-clock/ {gsub(",", "", $1); print $1}' "$OUT/perf-stat.txt")
cs=$(awk '/context-switches/ {gsub(",", "", $1); print $1}' "$OUT/perf-stat.txt")
perf report -i "$OUT/perf.data" --stdio --no-children --sort comm,dso,symbol --percent-limit 1.5 \
	2>/dev/null | grep -v '^$' | grep -E '^ +[0-9]' >"$OUT/perf-report.txt" || true
{
	echo "$SERVER $JOB: $iops IOPS, $ios requests in ${SECS}s"
	awk -v c="$clock_ms" -v n="$ios" -v s="$cs" 'BEGIN {
		if (n > 0) printf "server CPU %.1f us per request, %.2f context switches per request (perf stat over %s ms CPU)\n", c * 1000 / n, s / n, c
	}'
	echo "hottest symbols (self time, >=1.5%):"
	head -25 "$OUT/perf-report.txt"
} | tee "$OUT/summary.txt"
