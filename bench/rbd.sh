#!/usr/bin/env bash
# bench/rbd.sh: an rbd image served over NBD by our dom0 export and by
# qemu-nbd (qemu's own rbd driver), measured by one fio client in one run,
# job by job in turn, beside the cluster's own ceiling (rbd bench, no NBD).
#
# The cluster is scripts/ceph-dev.sh's single node (one monitor, one OSD on
# memstore): on a small machine it, not the servers, sets the ceiling, which
# is why its own figure is printed next to theirs. Each server gets its own
# copy of one image filled with random bytes (the exclusive lock lets only
# one writer at a time use an image).
#
# Under each job's line: CPU microseconds per I/O of the cluster (its own
# cluster only), of the server's processes and of the rest of the machine
# (fio, the kernel, anything else running), how busy the cores were, and
# the ratio ours would reach if our server cost no CPU at all: where that
# is below 1.2x, the machine, not the server, bounds the ratio.
#
# Knobs: SIZE (default 256M), RUNTIME seconds per job (default 5), ROUNDS
# (default 2: each server runs each job first once), JOBS (subset of randread-4k-qd32 randwrite-4k-qd32
# read-1m-qd8 write-1m-qd8), BLKTAP (a binary built with `make build-rbd`;
# built when missing), CEPH_CONF (use a running cluster instead).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
SIZE=${SIZE:-256M}
RUNTIME=${RUNTIME:-5}
ROUNDS=${ROUNDS:-2}
JOBS=${JOBS:-"randread-4k-qd32 randwrite-4k-qd32 read-1m-qd8 write-1m-qd8"}
BENCH=rbd
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
die() { echo "bench/rbd.sh: $*" >&2; exit 1; }
for tool in fio jq qemu-nbd rbd ceph-mon ceph-osd; do
	command -v $tool >/dev/null || die "$tool is missing (make oracles)"
done
work=$(mktemp -d /var/tmp/blktap-rbd-bench.XXXXXX)
pids=()
cleanup() {
	# shutdown before the kills: a daemon that gets SIGTERM leaves its
	# workers serving (by design), and they would outlive the bench.
	[[ -n ${BLKTAP_STATE-} ]] && "$BLKTAP" shutdown --state-dir "$BLKTAP_STATE" >/dev/null 2>&1 || true
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait "${pids[@]}" 2>/dev/null || true # qemu-nbd's watch must go before rbd rm
	if [[ -n ${own_cluster-} ]]; then
		"$REPO/scripts/ceph-dev.sh" stop "$work/ceph" >/dev/null 2>&1 || true
	elif [[ -n ${name-} ]]; then # a cluster of the caller's: leave it as found
		for s in ours qemu ceiling; do rbd -c "$CEPH_CONF" rm --no-progress "rbd/$name-$s" >/dev/null 2>&1 || true; done
	fi
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT # a signal's default would skip the EXIT trap and leave the cluster running
trap 'exit 143' TERM

if [[ -z ${BLKTAP-} ]]; then
	BLKTAP=$work/blktap
	(cd "$REPO" && go build -tags 'rbd pacific' -o "$BLKTAP" ./cmd/blktap)
fi
if [[ -z ${CEPH_CONF-} ]]; then
	CEPH_DEV_PORT=$((20000 + RANDOM % 20000)) CEPH_DEV_BYTES=$((3 << 30)) "$REPO/scripts/ceph-dev.sh" start "$work/ceph" | grep '^ceph-dev:'
	CEPH_CONF=$work/ceph/ceph.conf
	own_cluster=1
fi
r() { rbd -c "$CEPH_CONF" "$@" 2>/dev/null; }
name=bench$$
head -c "$SIZE" /dev/urandom >"$work/fill" 2>/dev/null || dd if=/dev/urandom of="$work/fill" bs=1M count=$(( ${SIZE%M} )) status=none
r import --no-progress "$work/fill" rbd/$name-ours
r import --no-progress "$work/fill" rbd/$name-qemu
r import --no-progress "$work/fill" rbd/$name-ceiling
rm -f "$work/fill"

BLKTAP_STATE=$work/state
mkdir -p "$BLKTAP_STATE"
cat >"$work/disks.yaml" <<YAML
disks:
  - {name: ours, format: rbd, image: "rbd/$name-ours:conf=$CEPH_CONF", domain: 0, device: xvdb}
YAML
"$BLKTAP" run -c "$work/disks.yaml" --state-dir "$BLKTAP_STATE" >"$work/daemon.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
	uri=$("$BLKTAP" ls --json --state-dir "$BLKTAP_STATE" 2>/dev/null | jq -r '.[] | select(.phase=="connected") | .export' || true)
	[[ -n $uri ]] && break
	sleep 0.2
done
[[ -n $uri ]] || { cat "$work/daemon.log" >&2; die "our export did not come up"; }
qemu-nbd -f raw -t -e 8 --cache=none -k "$work/qemu.sock" "rbd:rbd/$name-qemu:conf=$CEPH_CONF" &
pids+=($!)
for _ in $(seq 100); do [[ -S $work/qemu.sock ]] && break; sleep 0.1; done
declare -A uris=([ours]=$uri [qemu-nbd]="nbd+unix:///?socket=$work/qemu.sock")
worker=$("$BLKTAP" ls --json --state-dir "$BLKTAP_STATE" | jq -r '.[0].worker_pid')
declare -A server=([ours]="${pids[0]} $worker" [qemu-nbd]=${pids[1]})
cluster=""
[[ -n ${own_cluster-} ]] && cluster=$(cat "$work"/ceph/*.pid)

# CPU per I/O, to say what bounds a ratio: where the machine is busy,
# IOPS = capacity / CPU per I/O, and the cluster's share (monitor and
# OSD, on these same cores) and the rest (fio, the kernel, librbd's
# threads outside the server's process: none) cost both servers alike.
ticks() { # PID...: utime + stime of those processes, in clock ticks
	local t=0 p
	for p in "$@"; do
		[[ -r /proc/$p/stat ]] && t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
	done
	echo $t
}
lib_ticks() { # PID...: the part of ticks PID... spent in librbd's and librados's
	# threads, which name themselves (msgr-worker-0, io_context_pool, ...)
	# while the server's own threads keep the process's name. They live as
	# long as the image is open, so none of their time leaves with an
	# exited thread; the server's own part is then ticks minus this.
	local t=0 p f own comm
	for p in "$@"; do
		[[ -r /proc/$p/comm ]] || continue
		own=$(cat "/proc/$p/comm")
		for f in /proc/"$p"/task/*/stat; do
			comm=$(sed 's/^[0-9]* (\(.*\)) .*/\1/' "$f" 2>/dev/null) || continue
			[[ $comm == "$own" ]] && continue
			t=$((t + $(sed 's/.*) //' "$f" 2>/dev/null | awk '{print $12 + $13}')))
		done
	done
	echo $t
}
busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; } # the machine, all cores
hz=$(getconf CLK_TCK)

ceiling() { # rbd bench on the third copy: the cluster without NBD
	local type=read pattern=rand size=4K threads=32
	case $1 in
	randwrite-4k-qd32) type=write ;;
	read-1m-qd8) pattern=seq size=1M threads=8 ;;
	write-1m-qd8) type=write pattern=seq size=1M threads=8 ;;
	esac
	rbd -c "$CEPH_CONF" bench --io-type $type --io-pattern $pattern --io-size $size --io-threads $threads \
		--io-total $((RUNTIME * 64))M rbd/$name-ceiling 2>/dev/null | awk '/^elapsed/ {print $6}'
}
printf '%-18s %12s %12s %8s %14s\n' job ours qemu-nbd ratio "rbd bench"
# The server that runs a job first pays for what the cluster still does
# after the job before (4k writes right after a write job's rbd bench:
# 0.84-0.92x with ours first, 0.91-1.14x with qemu-nbd first), so the
# order alternates from round to round.
order=(ours qemu-nbd)
for _ in $(seq "$ROUNDS"); do
	for job in $JOBS; do
		declare -A iops=()
		declare -A cpu=()
		for s in "${order[@]}"; do
			# shellcheck disable=SC2086
			c0=$(ticks $cluster) s0=$(ticks ${server[$s]}) l0=$(lib_ticks ${server[$s]}) m0=$(busy) t0=$(date +%s.%N)
			# shellcheck disable=SC2046
			fio --name=$job --ioengine=nbd --uri="${uris[$s]}" $(job_args "$job") --time_based \
				--runtime="$RUNTIME" --output-format=json --output="$work/$s-$job.json" >/dev/null
			# shellcheck disable=SC2086
			c1=$(ticks $cluster) s1=$(ticks ${server[$s]}) l1=$(lib_ticks ${server[$s]}) m1=$(busy) t1=$(date +%s.%N)
			iops[$s]=$(jq '.jobs[0] | (.read.iops + .write.iops) | floor' "$work/$s-$job.json")
			ios=$(jq '.jobs[0] | .read.total_ios + .write.total_ios' "$work/$s-$job.json")
			cpu[$s]=$(awk -v c=$((c1 - c0)) -v s=$((s1 - s0)) -v l=$((l1 - l0)) -v m=$((m1 - m0)) -v n="$ios" -v hz="$hz" -v t="$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b - a}')" \
				-v cores="$(nproc)" 'BEGIN {u = 1e6 / hz / (n > 0 ? n : 1)
				printf "%d %d %d %d %d", c * u, s * u, (m - c - s) * u, 100 * m / hz / t / cores, l * u}')
		done
		ratio=$(awk "BEGIN {printf \"%.2f\", ${iops[ours]} / (${iops[qemu-nbd]} > 0 ? ${iops[qemu-nbd]} : 1)}")
		printf '%-18s %12s %12s %7sx %14s\n' "$job" "${iops[ours]} IOPS" "${iops[qemu-nbd]} IOPS" "$ratio" "$(ceiling "$job") IOPS"
		# CPU us per I/O: cluster / server / rest, and how busy the cores
		# were; "no server" is the ratio ours would reach against qemu-nbd
		# if our server cost nothing and the cores stayed as busy.
		read -r oc os oo ob ol <<<"${cpu[ours]}"
		read -r qc qs qo qb ql <<<"${cpu[qemu-nbd]}"
		printf '%-18s cpu us/io cluster/server/rest: ours %d/%d/%d (%d%% busy), qemu-nbd %d/%d/%d (%d%% busy); no server: %.2fx\n' \
			"" "$oc" "$os" "$oo" "$ob" "$qc" "$qs" "$qo" "$qb" "$(awk -v a="$((qc + qs + qo))" -v b="$((qc + qo))" 'BEGIN {print a / (b > 0 ? b : 1)}')"
		# The server's part split into librbd's threads and the server's
		# own; "no own code" is the ratio ours would reach if everything
		# but librbd in our server cost nothing.
		printf '%-18s server us/io librbd/own: ours %d/%d, qemu-nbd %d/%d; no own code: %.2fx\n' \
			"" "$ol" "$((os - ol))" "$ql" "$((qs - ql))" "$(awk -v a="$((qc + qs + qo))" -v b="$((oc + ol + oo))" 'BEGIN {print a / (b > 0 ? b : 1)}')"
	done
	order=("${order[1]}" "${order[0]}")
done
