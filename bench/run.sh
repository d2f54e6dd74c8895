#!/usr/bin/env bash
# bench/run.sh: one fio client against every NBD server in one run, so only
# ratios measured side by side count (issue 10, docs/PERFORMANCE.md).
#
# What it does, in order:
#   1. makes a work dir, one image of SIZE filled with random bytes (so reads
#      hit real blocks, never holes), and one copy per server per format
#      (qemu-img convert for qcow2 and vhd: every cluster/block allocated);
#      syncs, so no server pays for another's dirty pages; the copies stay in
#      the page cache (warm);
#   2. starts the servers, each on its own copy, over unix sockets only:
#        ours-dom0   `blktap run` with one domain-0 disk: the worker's NBD export
#        ours-guest  `blktap run` with one domain-1 disk: the local frontend's
#                    guest view, every request through the blkif ring
#        qemu-nbd    -f raw|qcow2|vpc --cache=$QEMU_CACHE (writeback: page cache,
#                    flush = fdatasync, as our workers do) --aio=threads -e 8 -t
#        nbdkit      file plugin (raw only), page cache
#        io_uring    no server: fio's io_uring engine on the file (the limit)
#      each daemon serves one disk, so its CPU and RSS belong to that server;
#   3. runs the jobs interleaved job by job (for each job, every server in
#      turn), one fio client with ioengine=nbd, json output, no ramp (so the CPU
#      sampled around a run matches the bytes fio counts);
#   4. samples utime+stime of the server processes (ours: the daemon plus its
#      worker, found through `blktap ls --json`) around every run, RSS after
#      start (idle) and at the end (now and peak);
#   5. writes fio JSON, runs.tsv, rss.tsv, env.txt and table.txt to $RESULTS
#      and prints the table (bench/report.py).
#
# It measures, it does not judge: exit 0 even when targets are missed;
# non-zero when a server fails to start or dies, or fio reports an error.
# A format our daemon does not support yet (the disk fails with an
# "unsupported" error) is reported as n/a.
#
# Knobs (environment):
#   QUICK=1          256M image, 1 s per job (about 2 minutes in all)
#   RUNTIME=N        seconds per fio run (default 5; QUICK 1)
#   ROUNDS=N         repeat the whole interleaved sequence N times (default 1);
#                    the report shows the median and the spread per cell, the
#                    only defence against a noisy (shared, 2-core) machine
#   SIZE=1G          image size (M or G suffix; default 1G, QUICK 256M)
#   FORMATS="raw qcow2 vhd"      formats to measure
#   GUEST_FORMATS="raw"          formats that also get a guest view (ring path)
#   JOBS="..."       subset of: randread-4k-qd1 randread-4k-qd32
#                    randwrite-4k-qd1 randwrite-4k-qd32 read-1m-qd8
#                    write-1m-qd8 randrw70-4k-qd32x4
#   SERVERS="..."    subset of: ours-dom0 ours-guest qemu-nbd nbdkit io_uring
#   QEMU_CACHE=writeback         qemu-nbd --cache mode
#   RESULTS=DIR      results dir (default bench/results/UTC-TIMESTAMP)
#   WORKDIR=DIR      where images go (default a new dir under /var/tmp; it
#                    must be a disk file system, not tmpfs, to match issue 10)
#   BLKTAP=PATH      the binary (default bin/blktap; built into the work dir
#                    with `go build` when missing)
#   KEEP=1           keep the work dir (images, daemon logs)
#   IO=uring         our disks' io key (auto|threads|uring; default: none)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
	RUNTIME=${RUNTIME:-1}
	SIZE=${SIZE:-256M}
else
	RUNTIME=${RUNTIME:-5}
	SIZE=${SIZE:-1G}
fi
FORMATS=${FORMATS:-raw qcow2 vhd}
GUEST_FORMATS=${GUEST_FORMATS:-raw}
ALL_JOBS="randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32 read-1m-qd8 write-1m-qd8 randrw70-4k-qd32x4"
JOBS=${JOBS:-$ALL_JOBS}
SERVERS=${SERVERS:-ours-dom0 ours-guest qemu-nbd nbdkit io_uring}
QEMU_CACHE=${QEMU_CACHE:-writeback}
ROUNDS=${ROUNDS:-1}
RESULTS=${RESULTS:-$HERE/results/$(date -u +%Y%m%dT%H%M%SZ)}
KEEP=${KEEP:-0}
IO=${IO:-}
CLK_TCK=$(getconf CLK_TCK)

BENCH=bench
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

[[ $RUNTIME =~ ^[0-9]+$ && $RUNTIME -gt 0 ]] || die "RUNTIME must be a positive integer (seconds), got '$RUNTIME'"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -gt 0 ]] || die "ROUNDS must be a positive integer, got '$ROUNDS'"
case $SIZE in
*G) SIZE_MB=$((${SIZE%G} * 1024)) ;;
*M) SIZE_MB=${SIZE%M} ;;
*) die "SIZE must end in M or G, got '$SIZE'" ;;
esac
[[ $SIZE_MB =~ ^[0-9]+$ && $SIZE_MB -ge 16 ]] || die "SIZE must be at least 16M, got '$SIZE'"
for j in $JOBS; do [[ " $ALL_JOBS " == *" $j "* ]] || die "unknown job '$j' (known: $ALL_JOBS)"; done

for tool in fio jq qemu-img qemu-nbd nbdkit nbdinfo python3 timeout; do
	command -v "$tool" >/dev/null || die "$tool not found (make oracles installs the test programs)"
done
engines=$(fio --enghelp 2>&1 || true)
grep -qx '[[:space:]]*nbd' <<<"$engines" || die "this fio has no nbd ioengine"

# ---------------------------------------------------------------- cleanup
STARTED=() # pids of every process this script started
WORKERS=() # our daemons' worker processes (they should exit with the daemon)
WORKDIR_MADE=""
cleanup() {
	local rc=$?
	set +e
	local p
	stop_pids "${STARTED[@]}"
	wait 2>/dev/null
	# A worker still running after its daemon is gone (a daemon that
	# leaves workers for adoption, or one killed above) goes too, if the
	# pid still names a process serving from our work dir.
	for p in "${WORKERS[@]}"; do
		if [[ -n $WORKDIR_MADE ]] && tr '\0' ' ' 2>/dev/null <"/proc/$p/cmdline" | grep -qF "$WORKDIR_MADE"; then
			kill -TERM "$p" 2>/dev/null
		elif [[ -n $WORKDIR_MADE ]] && ls -l "/proc/$p/fd" 2>/dev/null | grep -qF "$WORKDIR_MADE"; then
			kill -TERM "$p" 2>/dev/null
		fi
	done
	if [[ -n $WORKDIR_MADE && $KEEP != 1 ]]; then
		rm -rf "$WORKDIR_MADE"
	elif [[ -n $WORKDIR_MADE ]]; then
		log "kept work dir $WORKDIR_MADE"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- setup
if [[ -n ${WORKDIR:-} ]]; then
	mkdir -p "$WORKDIR"
	W=$(mktemp -d "$WORKDIR/bb.XXXXXX")
else
	W=$(mktemp -d /var/tmp/bb.XXXXXX)
fi
WORKDIR_MADE=$W
mkdir -p "$RESULTS/fio"
RESULTS=$(cd "$RESULTS" && pwd)
log "work dir $W, results $RESULTS, size $SIZE, ${RUNTIME}s per run"

build_blktap "$W"

want_server() { [[ " $SERVERS " == *" $1 "* ]]; }

# Servers per format, in the order they run within a job.
declare -A FMT_SERVERS
for fmt in $FORMATS; do
	list=""
	want_server ours-dom0 && list+=" ours-dom0"
	if want_server ours-guest && [[ " $GUEST_FORMATS " == *" $fmt "* ]]; then list+=" ours-guest"; fi
	want_server qemu-nbd && list+=" qemu-nbd"
	if [[ $fmt == raw ]]; then
		want_server nbdkit && list+=" nbdkit"
		want_server io_uring && list+=" io_uring"
	fi
	case $fmt in raw | qcow2 | vhd) ;; *) die "unknown format '$fmt' (raw qcow2 vhd)" ;; esac
	FMT_SERVERS[$fmt]=${list# }
done

log "writing ${SIZE_MB} MiB of random data"
# A 64 MiB random chunk repeated: every block holds data (nothing reads as
# a hole or zero), without waiting on /dev/urandom for the whole image.
chunk=$((SIZE_MB < 64 ? SIZE_MB : 64))
dd if=/dev/urandom of="$W/chunk" bs=1M count="$chunk" status=none
: >"$W/base.raw"
for ((i = 0; i < SIZE_MB / chunk; i++)); do cat "$W/chunk" >>"$W/base.raw"; done
rest=$((SIZE_MB % chunk))
((rest == 0)) || head -c "$((rest * 1024 * 1024))" "$W/chunk" >>"$W/base.raw"
rm -f "$W/chunk"

declare -A IMG # key fmt/server -> image path
for fmt in $FORMATS; do
	case $fmt in
	raw) src=$W/base.raw ;;
	qcow2)
		src=$W/base.qcow2
		qemu-img convert -f raw -O qcow2 "$W/base.raw" "$src"
		;;
	vhd)
		# dynamic: the BAT lookup is what we compare; force_size keeps the
		# exact byte size instead of a CHS-rounded one.
		src=$W/base.vhd
		qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$W/base.raw" "$src"
		;;
	esac
	for srv in ${FMT_SERVERS[$fmt]}; do
		IMG[$fmt/$srv]=$W/$srv.$fmt
		cp "$src" "${IMG[$fmt/$srv]}"
	done
done
# base.raw stays: the reference the exports are checked against.
rm -f "$W/base.qcow2" "$W/base.vhd"
sync
# Warm: every copy read once into the page cache.
cat "$W"/*.raw "$W"/*.qcow2 "$W"/*.vhd >/dev/null 2>&1 || true

{
	echo "date: $(date -u +%FT%TZ)"
	echo "host: $(uname -srm), $(nproc) cpus, $(awk '/MemTotal/{print $2" kB"}' /proc/meminfo)"
	echo "cpu: $(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)"
	echo "fs: $(df -PT "$W" | awk 'NR==2{print $2" on "$1}')"
	echo "fio: $(fio --version)"
	echo "qemu-nbd: $(qemu-nbd --version | head -1)"
	echo "nbdkit: $(nbdkit --version)"
	echo "blktap: $BLKTAP (binary of $(date -u -r "$BLKTAP" +%FT%TZ); tree now at $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown))"
	echo "settings: QUICK=$QUICK SIZE=$SIZE RUNTIME=$RUNTIME ROUNDS=$ROUNDS FORMATS='$FORMATS' GUEST_FORMATS='$GUEST_FORMATS' QEMU_CACHE=$QEMU_CACHE"
	echo "jobs: $JOBS"
} >"$RESULTS/env.txt"

# ---------------------------------------------------------------- servers
declare -A URI   # key -> NBD URI ("" for io_uring)
declare -A PID   # key -> main pid (ours: the daemon)
declare -A STATE # key -> our daemon's state dir
declare -A NA    # key -> why it is not measured
FAILED=0

wait_nbd() { # uri pid name: wait until the server answers
	local uri=$1 pid=$2 name=$3
	for _ in $(seq 300); do
		kill -0 "$pid" 2>/dev/null || die "$name exited while starting (see $W/$name.log)"
		if nbdinfo --size "$uri" >/dev/null 2>&1; then return 0; fi
		sleep 0.1
	done
	die "$name did not answer on $uri within 30 s"
}

ours_pids() { # key: the daemon plus the worker(s) it reports
	local key=$1
	echo "${PID[$key]}"
	"$BLKTAP" ls --json --state-dir "${STATE[$key]}" 2>/dev/null |
		jq -r '.[] | select(.worker_pid > 0) | .worker_pid' 2>/dev/null || true
}

server_pids() {
	local key=$1
	case ${key#*/} in
	ours-*) ours_pids "$key" ;;
	io_uring) ;;
	*) echo "${PID[$key]}" ;;
	esac
}

start_ours() { # fmt srv
	local fmt=$1 srv=$2 key=$1/$2 dom=0
	[[ $srv == ours-guest ]] && dom=1
	local d=$W/$fmt-$srv
	mkdir -p "$d/st"
	cat >"$d/disks.yaml" <<-EOF
		disks:
		  - name: bench
		    image: ${IMG[$key]}
		    format: $fmt
		    mode: w
		    domain: $dom
		    device: xvdb
	EOF
	[[ -n $IO ]] && echo "    io: $IO" >>"$d/disks.yaml"
	"$BLKTAP" run -c "$d/disks.yaml" --state-dir "$d/st" >"$W/$fmt-$srv.log" 2>&1 &
	PID[$key]=$!
	STARTED+=("$!")
	STATE[$key]=$d/st
	local js phase err
	for _ in $(seq 600); do
		kill -0 "${PID[$key]}" 2>/dev/null || die "blktap run for $key exited (see log below)
$(tail -20 "$W/$fmt-$srv.log")"
		js=$("$BLKTAP" ls --json --state-dir "$d/st" 2>/dev/null || true)
		phase=$(jq -r '.[0].phase // empty' <<<"$js" 2>/dev/null || true)
		err=$(jq -r '.[0].error // empty' <<<"$js" 2>/dev/null || true)
		if [[ $phase == connected ]]; then
			URI[$key]=$(jq -r '.[0].export' <<<"$js")
			WORKERS+=("$(jq -r '.[0].worker_pid' <<<"$js")")
			wait_nbd "${URI[$key]}" "${PID[$key]}" "$fmt-$srv"
			log "$key: ${URI[$key]} (daemon ${PID[$key]}, worker $(jq -r '.[0].worker_pid' <<<"$js"))"
			return 0
		fi
		if [[ $phase == failed ]]; then
			if grep -qiE 'unsupported|not built in|not supported|not implemented' <<<"$err"; then
				NA[$key]="format not supported yet: $err"
				log "$key: n/a ($err)"
				stop_pid "${PID[$key]}"
				return 0
			fi
			die "$key: disk failed: $err"
		fi
		sleep 0.1
	done
	die "$key: disk not connected within 60 s (phase '$phase', error '$err')"
}

stop_pid() {
	kill -TERM "$1" 2>/dev/null || true
	for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
	kill -KILL "$1" 2>/dev/null || true
}

start_qemu() {
	local fmt=$1 key=$1/qemu-nbd qfmt=$1
	[[ $fmt == vhd ]] && qfmt=vpc
	local sock=$W/$fmt-qemu.sock
	qemu-nbd -f "$qfmt" --cache="$QEMU_CACHE" --aio=threads -e 8 -t -k "$sock" \
		"${IMG[$key]}" >"$W/$fmt-qemu-nbd.log" 2>&1 &
	PID[$key]=$!
	STARTED+=("$!")
	URI[$key]="nbd+unix:///?socket=$sock"
	wait_nbd "${URI[$key]}" "${PID[$key]}" "$fmt-qemu-nbd"
	log "$key: ${URI[$key]} (pid ${PID[$key]})"
}

start_nbdkit() {
	local key=raw/nbdkit sock=$W/raw-nbdkit.sock
	nbdkit -f -U "$sock" file file="${IMG[$key]}" >"$W/raw-nbdkit.log" 2>&1 &
	PID[$key]=$!
	STARTED+=("$!")
	URI[$key]="nbd+unix:///?socket=$sock"
	wait_nbd "${URI[$key]}" "${PID[$key]}" raw-nbdkit
	log "$key: ${URI[$key]} (pid ${PID[$key]})"
}

for fmt in $FORMATS; do
	for srv in ${FMT_SERVERS[$fmt]}; do
		# Ours start first: when our daemon cannot serve the format yet
		# there is nothing to compare, so its peers are not run either.
		if [[ $srv != ours-* && -n ${NA[$fmt/ours-dom0]:-} ]]; then
			NA[$fmt/$srv]="ours-dom0 is n/a on $fmt: nothing to compare"
			continue
		fi
		case $srv in
		ours-*) start_ours "$fmt" "$srv" ;;
		qemu-nbd) start_qemu "$fmt" ;;
		nbdkit) start_nbdkit ;;
		io_uring) URI[$fmt/$srv]="" ;;
		esac
	done
done

# A server that answers fast with the wrong bytes must fail the run, not
# win it: spot-check every export against the reference before any job.
if /usr/bin/python3 -c 'import nbd' 2>/dev/null; then
	for fmt in $FORMATS; do
		for srv in ${FMT_SERVERS[$fmt]}; do
			key=$fmt/$srv
			[[ -z ${NA[$key]:-} && $srv != io_uring ]] || continue
			/usr/bin/python3 "$HERE/verify.py" "$W/base.raw" "${URI[$key]}" ||
				die "$key does not serve the image's bytes"
		done
	done
	log "every export serves the image's bytes (32 chunks of 64 KiB each)"
else
	log "python3-libnbd missing: exports not checked against the image"
fi
rm -f "$W/base.raw"

# ---------------------------------------------------------------- sampling
cpu_ticks() { # pids...: utime+stime summed (fields 14 and 15 of /proc/PID/stat)
	local p t=0 v
	for p in "$@"; do
		# Fields after the ")" that closes comm: state is the first, utime the 12th.
		v=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || v=0
		t=$((t + ${v:-0}))
	done
	echo "$t"
}

mem_kb() { # field pids...: VmRSS or VmHWM summed
	local f=$1 p t=0 v
	shift
	for p in "$@"; do
		v=$(awk -v f="$f:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null) || v=0
		t=$((t + ${v:-0}))
	done
	echo "$t"
}

alive() { # key: is the server (every pid of it) still running
	local p
	for p in $(server_pids "$1"); do kill -0 "$p" 2>/dev/null || return 1; done
}

printf 'format\tserver\tstate\tidle_rss_kb\tend_rss_kb\tpeak_rss_kb\tidle_rss_kb_by_pid\n' >"$RESULTS/rss.tsv.tmp"
declare -A IDLE_RSS IDLE_BY_PID
for fmt in $FORMATS; do
	for srv in ${FMT_SERVERS[$fmt]}; do
		key=$fmt/$srv
		[[ -z ${NA[$key]:-} && $srv != io_uring ]] || continue
		# shellcheck disable=SC2046
		IDLE_RSS[$key]=$(mem_kb VmRSS $(server_pids "$key"))
		IDLE_BY_PID[$key]=""
		for p in $(server_pids "$key"); do
			IDLE_BY_PID[$key]+="$(awk '/^Name:/{print $2}' "/proc/$p/status"):$p=$(mem_kb VmRSS "$p") "
		done
	done
done

# ---------------------------------------------------------------- jobs
# job_args (bench/lib.sh) names each job's fio arguments.

printf 'round\tjob\tformat\tserver\tstatus\tcpu_ticks\tclk_tck\tpids\tjson\n' >"$RESULTS/runs.tsv"
FIO_ERRORS=0
TMO=$((RUNTIME * 3 + 60))
for ((round = 1; round <= ROUNDS; round++)); do
for job in $JOBS; do
	log "round $round/$ROUNDS job $job"
	for fmt in $FORMATS; do
		for srv in ${FMT_SERVERS[$fmt]}; do
			key=$fmt/$srv
			out=fio/$job.$fmt.$srv.r$round.json
			if [[ -n ${NA[$key]:-} ]]; then
				printf '%s\t%s\t%s\t%s\tn/a\t\t\t\t%s\n' "$round" "$job" "$fmt" "$srv" "${NA[$key]}" >>"$RESULTS/runs.tsv"
				continue
			fi
			if [[ $srv == io_uring ]]; then
				target=(--ioengine=io_uring --direct=0 --filename="${IMG[$key]}" --size="${SIZE_MB}M")
			else
				target=(--ioengine=nbd --uri="${URI[$key]}")
			fi
			pids=$(server_pids "$key" | tr '\n' ' ')
			# shellcheck disable=SC2086
			t0=$(cpu_ticks $pids)
			rc=0
			# shellcheck disable=SC2046
			timeout "$TMO" fio --name="$job" "${target[@]}" $(job_args "$job") \
				--time_based --runtime="$RUNTIME" --norandommap --randrepeat=0 \
				--group_reporting --output-format=json --output="$RESULTS/$out" \
				>"$RESULTS/$out.log" 2>&1 || rc=$?
			# shellcheck disable=SC2086
			t1=$(cpu_ticks $pids)
			status=ok
			if ((rc != 0)) || ! jq -e '[.jobs[].error] | all(. == 0)' "$RESULTS/$out" >/dev/null 2>&1; then
				status="fio-error(rc=$rc)"
				FIO_ERRORS=$((FIO_ERRORS + 1))
				log "$key $job: fio failed (rc $rc): $(tail -3 "$RESULTS/$out.log" | tr '\n' ' ')"
			fi
			if [[ $srv != io_uring ]] && ! alive "$key"; then
				status="server-died"
				NA[$key]="server died during $job"
				FAILED=1
				log "$key died during $job"
			elif [[ $srv == ours-* && "$(server_pids "$key" | tr '\n' ' ')" != "$pids" ]]; then
				status="worker-restarted"
				log "$key: worker restarted during $job"
			fi
			printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$job" "$fmt" "$srv" "$status" \
				"$((t1 - t0))" "$CLK_TCK" "$pids" "$out" >>"$RESULTS/runs.tsv"
			# Writes leave dirty pages; flush them now so the next server
			# does not pay for this one's writeback.
			if [[ $job == *write* || $job == randrw* ]]; then sync; fi
		done
	done
done
done

for fmt in $FORMATS; do
	for srv in ${FMT_SERVERS[$fmt]}; do
		key=$fmt/$srv
		[[ $srv != io_uring ]] || continue
		if [[ -z ${IDLE_RSS[$key]:-} ]]; then
			printf '%s\t%s\t%s\t\t\t\t\n' "$fmt" "$srv" "${NA[$key]:-n/a}" >>"$RESULTS/rss.tsv.tmp"
			continue
		fi
		pids=$(server_pids "$key" | tr '\n' ' ')
		# shellcheck disable=SC2086
		printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$fmt" "$srv" "${NA[$key]:-ok}" "${IDLE_RSS[$key]}" \
			"$(mem_kb VmRSS $pids)" "$(mem_kb VmHWM $pids)" "${IDLE_BY_PID[$key]% }" >>"$RESULTS/rss.tsv.tmp"
	done
done
mv "$RESULTS/rss.tsv.tmp" "$RESULTS/rss.tsv"

python3 "$HERE/report.py" "$RESULTS" | tee "$RESULTS/table.txt"
log "results in $RESULTS"

if ((FAILED)); then
	log "a server died during the run"
	exit 1
fi
if ((FIO_ERRORS)); then
	log "$FIO_ERRORS fio run(s) failed"
	exit 1
fi
exit 0
