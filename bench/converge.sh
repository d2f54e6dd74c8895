#!/usr/bin/env bash
# bench/converge.sh: how long `blktap run` takes to serve N YAML disks
# (issue 18 item 4: convergence linear in the number of disks; 256 disks
# in < 3 s, 1024 in < 12 s).
#
# For each N in NS: N sparse raw images (made here, outside the clock), one
# YAML with N `domain: 0` disks (each served by its worker's NBD export on
# a unix socket under the state dir), then:
#   start    from launching `blktap run -c FILE` (embedded xenstored) to
#            every export answering. The clock is a poller (python, one
#            process) that connects to each socket in turn until it reads
#            the NBD server greeting (NBDMAGIC IHAVEOPT): the greeting comes
#            from the worker itself, since the daemon only holds the
#            listening socket. After the clock stops, `nbdinfo --size` is
#            run once on every socket and must print the image's size (a
#            check, not timed).
#   connected  the same start, until `blktap ls --json` shows every disk in
#            phase connected (status written back); polled after the
#            exports answer, so it is never earlier than start.
#   remove   from writing `disks: []` over the file to `ls --json` showing
#            no device (every worker flushed, closed and gone).
#   add      from writing the N disks back to every export answering again.
#   cpu-daemon, cpu-workers  CPU seconds the daemon and its workers had
#            used once every disk was connected: on a host others load,
#            the wall clock measures their load as much as our work.
# The daemon notices file edits by polling every 300 ms, which remove and
# add include.
#
# It prints a table N -> seconds and milliseconds per disk and writes it
# with the daemon logs under $RESULTS. It measures, it does not judge: exit
# 0 even when a target is missed; non-zero when the daemon dies, a disk
# never answers within LIMIT seconds, or nbdinfo disagrees on a size.
#
# Limits: the daemon holds a few descriptors per disk (the export's
# listening socket, the worker's control socket) and each disk is a
# process, so 1024 disks need RLIMIT_NOFILE well above 1024 in the daemon
# (it raises its soft limit to the hard one at start) and 1025 processes
# under RLIMIT_NPROC. This script raises its own soft fd limit to the hard
# one and refuses to start when either limit is too low for the largest N.
#
# Knobs (environment):
#   NS="16 64 256 1024"  disk counts
#   SIZE=64M             each image's size (sparse)
#   FORMAT=raw           raw or qcow2 (qcow2 made with qemu-img)
#   EDITS=1              also time the remove-all and add-all edits (0: skip)
#   LIMIT=120            seconds before a phase counts as failed
#   BLKTAP=PATH          the binary (default bin/blktap; built when missing)
#   RESULTS=DIR          (default bench/results/converge-UTC-TIMESTAMP)
#   KEEP=1               keep the work dir (images, daemon logs)
#   STATE_TMPFS=1        the daemon's state dir (its sockets) on tmpfs
#                        (/dev/shm), as /run/blktap is on a host; 0: on
#                        the work dir's file system. Binding a socket on
#                        ext4 allocates an inode, which after many runs
#                        that each delete a thousand costs about 2 ms
#                        (ext4 skips recently deleted inodes).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
read -ra NS <<<"${NS:-16 64 256 1024}"
SIZE=${SIZE:-64M}
FORMAT=${FORMAT:-raw}
EDITS=${EDITS:-1}
LIMIT=${LIMIT:-120}
RESULTS=${RESULTS:-$HERE/results/converge-$(date -u +%Y%m%dT%H%M%SZ)}
KEEP=${KEEP:-0}
STATE_TMPFS=${STATE_TMPFS:-1}

BENCH=converge
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
for n in "${NS[@]}"; do [[ $n =~ ^[1-9][0-9]*$ ]] || die "NS must hold positive integers, got '$n'"; done
[[ $LIMIT =~ ^[1-9][0-9]*$ ]] || die "LIMIT must be a positive integer"
[[ $FORMAT == raw || $FORMAT == qcow2 ]] || die "FORMAT must be raw or qcow2"
for tool in jq python3 nbdinfo; do
	command -v "$tool" >/dev/null || die "$tool not found (make oracles installs the test programs)"
done
MAXN=$(printf '%s\n' "${NS[@]}" | sort -n | tail -1)
ulimit -Sn "$(ulimit -Hn)"
# Per disk: the daemon's listening socket and control socket, the
# poller's connections (one at a time), nbdinfo (one at a time).
(($(ulimit -Sn) >= 4 * MAXN + 256)) || die "RLIMIT_NOFILE $(ulimit -Hn) is too low for $MAXN disks (need $((4 * MAXN + 256)))"
nproc_lim=$(ulimit -u)
[[ $nproc_lim == unlimited ]] || ((nproc_lim >= MAXN + 512)) || die "RLIMIT_NPROC $nproc_lim is too low for $MAXN workers"

setup_workdir converge
build_blktap "$W"
# The state dir: $W/st, a link to a tmpfs directory unless STATE_TMPFS=0.
ST=$W/st
if [[ $STATE_TMPFS == 1 ]]; then
	[[ $(stat -f -c %T /dev/shm 2>/dev/null) == tmpfs ]] || die "STATE_TMPFS=1 needs a tmpfs on /dev/shm (or STATE_TMPFS=0)"
	ST=$(mktemp -d /dev/shm/converge-st.XXXXXX)
	ln -s "$ST" "$W/st"
	cleanup_converge() {
		local rc=$?
		set +e
		shutdown_daemon "$W/st"
		rm -rf "$ST"
		(exit "$rc")
		cleanup_workdir
	}
	trap cleanup_converge EXIT
fi
mkdir -p "$ST"
log "state dir on $(stat -f -c %T "$ST/")"
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }

write_yaml() { # n file: n domain-0 disks d1..dn, or disks: [] for 0
	local n=$1 i
	{
		((n > 0)) || echo "disks: []"
		((n == 0)) || echo "disks:"
		for ((i = 1; i <= n; i++)); do
			printf '  - {name: d%d, image: %s/img/d%d.img, format: %s, mode: w, domain: 0, device: d%d}\n' \
				"$i" "$W" "$i" "$FORMAT" "$i"
		done
	} >"$2.tmp"
	mv "$2.tmp" "$2"
}

make_images() { # n
	local i
	mkdir -p "$W/img"
	for ((i = 1; i <= $1; i++)); do
		[[ -e $W/img/d$i.img ]] && continue
		if [[ $FORMAT == raw ]]; then
			truncate -s "$SIZE" "$W/img/d$i.img"
		else
			qemu-img create -q -f qcow2 "$W/img/d$i.img" "$SIZE"
		fi
	done
}

# wait_answer n: until every export d1..dn sends the NBD greeting.
wait_answer() {
	python3 - "$W/st" "$1" "$LIMIT" "$DAEMON" <<'EOF'
import os, socket, sys, time
st, n, limit, daemon = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
left = [f"{st}/d{i}.sock" for i in range(1, n + 1)]
deadline = time.monotonic() + limit
def greets(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        got = b""
        while len(got) < 16:
            b = s.recv(16 - len(got))
            if not b:
                return False
            got += b
        return got == b"NBDMAGICIHAVEOPT"
    except OSError:
        return False
    finally:
        s.close()
while left:
    left = [p for p in left if not greets(p)]
    if not left:
        break
    try:
        os.kill(daemon, 0)
    except OSError:
        sys.exit("the daemon exited")
    if time.monotonic() > deadline:
        sys.exit(f"{len(left)} of {n} exports silent after {limit:.0f} s, e.g. {left[0]}")
    time.sleep(0.02)
EOF
}

ls_count() { # jq filter over ls --json -> number
	"$BLKTAP" ls --json --state-dir "$W/st" 2>/dev/null | jq "$1" 2>/dev/null || echo -1
}

wait_ls() { # jq-filter want: until the filter over ls --json prints want
	local t0 got
	t0=$SECONDS
	while :; do
		got=$(ls_count "$1")
		[[ $got == "$2" ]] && return 0
		kill -0 "$DAEMON" 2>/dev/null || die "blktap run exited: $(tail -5 "$W/daemon.log")"
		((SECONDS - t0 < LIMIT)) || die "ls --json: $1 is $got, not $2, after $LIMIT s"
		sleep 0.05
	done
}

check_sizes() { # n: nbdinfo --size on every export
	local i want got
	want=$(python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$SIZE")
	for ((i = 1; i <= $1; i++)); do
		got=$(nbdinfo --size "nbd+unix:///?socket=$W/st/d$i.sock") || die "nbdinfo d$i failed"
		[[ $got == "$want" ]] || die "nbdinfo d$i: size $got, want $want"
	done
}

# cpu_seconds: CPU time so far of the daemon (every thread) and, summed,
# of its children (the workers), from /proc/PID/task/*/schedstat: on a
# loaded host the wall clock is mostly the others' CPU, this is ours.
cpu_seconds() {
	python3 - "$DAEMON" <<'EOF'
import os, sys
d = sys.argv[1]
def cpu(pid):
    t = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            t += int(open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[0])
        except OSError:
            pass
    return t / 1e9
def ppid(pid):
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
kids = 0.0
for p in filter(str.isdigit, os.listdir("/proc")):
    try:
        if ppid(p) == d:
            kids += cpu(p)
    except OSError:
        pass
print(f"{cpu(d):.3f} {kids:.3f}")
EOF
}

TABLE=$RESULTS/converge.tsv
printf 'n\tphase\tseconds\tms_per_disk\n' >"$TABLE"
record() { # n phase seconds
	printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(python3 -c "import sys; print(f'{1000*float(sys.argv[1])/int(sys.argv[2]):.2f}')" "$3" "$1")" >>"$TABLE"
	log "N=$1 $2: $3 s"
}

for n in "${NS[@]}"; do
	make_images "$n"
	rm -rf "$ST"
	mkdir -p "$ST"
	write_yaml "$n" "$W/disks.yaml"
	t0=$(now)
	"$BLKTAP" run -c "$W/disks.yaml" --state-dir "$W/st" >"$W/daemon.log" 2>&1 &
	DAEMON=$!
	wait_answer "$n" || die "start N=$n: exports did not answer ($(tail -3 "$W/daemon.log"))"
	t1=$(now)
	wait_ls '[.[] | select(.phase == "connected")] | length' "$n"
	t2=$(now)
	read -r cpu_d cpu_w < <(cpu_seconds)
	record "$n" start "$(elapsed "$t0" "$t1")"
	record "$n" connected "$(elapsed "$t0" "$t2")"
	record "$n" cpu-daemon "$cpu_d"
	record "$n" cpu-workers "$cpu_w"
	check_sizes "$n"
	if [[ $EDITS == 1 ]]; then
		t0=$(now)
		write_yaml 0 "$W/disks.yaml"
		wait_ls 'length' 0
		record "$n" remove "$(elapsed "$t0" "$(now)")"
		t0=$(now)
		write_yaml "$n" "$W/disks.yaml"
		wait_answer "$n" || die "add N=$n: exports did not answer"
		record "$n" add "$(elapsed "$t0" "$(now)")"
	fi
	shutdown_daemon "$W/st"
	cp "$W/daemon.log" "$RESULTS/daemon-$n.log"
	DAEMON=""
done

{
	echo "load: $(uptime)"
	printf '%-6s %-10s %9s %11s\n' N phase seconds ms/disk
	tail -n +2 "$TABLE" | while IFS=$'\t' read -r n phase s per; do
		printf '%-6s %-10s %9s %11s\n' "$n" "$phase" "$s" "$per"
	done
} | tee "$RESULTS/table.txt"
log "results in $RESULTS"
