# bench/lib.sh: what the bench scripts share. Source it after setting
# BENCH (the name on log lines) and REPO; a script that wants other
# messages defines its own die after sourcing this.

log() { printf '%s %s: %s\n' "$(date -u +%H:%M:%S)" "$BENCH" "$*" >&2; }
die() {
	log "FATAL: $*"
	exit 1
}

# job_args prints fio's arguments for a named job, so that every script
# means the same by randread-4k-qd32.
job_args() {
	case $1 in
	randread-4k-qd1) echo "--rw=randread --bs=4k --iodepth=1" ;;
	randread-4k-qd32) echo "--rw=randread --bs=4k --iodepth=32" ;;
	randwrite-4k-qd1) echo "--rw=randwrite --bs=4k --iodepth=1" ;;
	randwrite-4k-qd32) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
	read-1m-qd8) echo "--rw=read --bs=1M --iodepth=8" ;;
	write-1m-qd8) echo "--rw=write --bs=1M --iodepth=8" ;;
	randrw70-4k-qd32x4) echo "--rw=randrw --rwmixread=70 --bs=4k --iodepth=32 --numjobs=4" ;;
	*) die "unknown job $1" ;;
	esac
}

# stop_pids stops the processes it is given: politely first (our daemon
# flushes and closes its disks on SIGTERM), then forcefully for whatever
# is still there after 10 s.
stop_pids() {
	local p
	for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
	for _ in $(seq 100); do
		local alive=0
		for p in "$@"; do if kill -0 "$p" 2>/dev/null; then alive=1; fi; done
		((alive)) || break
		sleep 0.1
	done
	for p in "$@"; do kill -KILL "$p" 2>/dev/null || true; done
}

# shutdown_daemon stops the daemon DAEMON whose state dir is $1 with
# `blktap shutdown`, which flushes and stops every worker (the daemon's
# SIGTERM would leave them running for adoption); SIGKILL if that fails.
shutdown_daemon() {
	[[ -n $DAEMON ]] || return 0
	"$BLKTAP" shutdown --state-dir "$1" --timeout 30s >/dev/null 2>&1 || kill -KILL "$DAEMON" 2>/dev/null || true
	wait "$DAEMON" 2>/dev/null || true
}

# build_blktap sets BLKTAP: the one given, else $REPO/bin/blktap, else a
# build of this tree (blktap and its worker) into the work dir $1.
build_blktap() {
	BLKTAP=${BLKTAP:-$REPO/bin/blktap}
	[[ -x $BLKTAP ]] && return 0
	log "$BLKTAP is missing: go build into the work dir"
	nice -n 19 "$REPO/scripts/build.sh" "$1" || die "scripts/build.sh failed"
	BLKTAP=$1/blktap
}

# setup_workdir NAME makes the work dir W under /var/tmp and arranges
# that any exit stops the daemon DAEMON (whose state dir is $W/st) and
# removes W, unless KEEP=1.
setup_workdir() {
	W=$(mktemp -d "/var/tmp/$1.XXXXXX")
	DAEMON=""
	trap cleanup_workdir EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
}

cleanup_workdir() {
	local rc=$?
	set +e
	shutdown_daemon "$W/st"
	if [[ ${KEEP:-0} == 1 ]]; then log "kept work dir $W"; else rm -rf "$W"; fi
	exit "$rc"
}
