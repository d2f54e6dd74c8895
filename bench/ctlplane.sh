#!/usr/bin/env bash
# bench/ctlplane.sh: does the control plane answer while every disk is busy?
# (issue 16 item 6: `ls`, attach and detach within 200 ms under fio.)
#
# One `blktap run` on the embedded default (no Xen) serves DISKS raw disks,
# by default alternately domain 0 (the worker's NBD export) and domain 1 (the local
# frontend's guest view, every request through the blkif ring). One fio per
# disk (ioengine=nbd, 4 KiB random read/write, queue depth 16) runs for the
# whole measurement; meanwhile REPS rounds each time `blktap version` (the
# cost of starting a process at all), GET /v1/stats with curl (the daemon's
# own answer, no Go process to start), `blktap ls`,
# `blktap ls --json`, `blktap attach` of one more domain-0 disk and its
# `blktap detach`. It prints p50/p99/max per command and fio's throughput
# during it, and writes them to $RESULTS.
#
# Whole commands pay their process start, 200-450 ms at p99 on a busy
# shared machine, so beside them it reports the daemon's part alone:
#   api ping rtt, api stats rtt   the HTTP round trip over the control
#       socket as curl times it (%{time_total}: connect to last byte, curl's
#       own start excluded); stats is what `ls` asks the daemon, ping is the
#       API with no worker behind it
#   attach (daemon), detach (daemon)   from the daemon's log: its first
#       action on the new device (start-worker; frontend-close) to "disk
#       connected" (the worker's "image closed"); the xenstore watch that
#       wakes it is not included
#
# It measures, it does not judge: exit 0 even when 200 ms is missed;
# non-zero when the daemon or fio fails, or a command fails.
#
# Knobs (environment):
#   DISKS=8       disks under load
#   DOMAINS="0 1" their domains, in turn (0: the NBD export; 1: the guest view)
#   REPS=30       rounds of the four commands
#   SIZE=256M     size of each disk (sparse, made by the daemon's create:)
#   FIO_ARGS=...  fio job options (default: randrw 4k qd16)
#   RESULTS=DIR   (default bench/results/ctlplane-UTC-TIMESTAMP)
#   BLKTAP=PATH   the binary (default bin/blktap; built when missing)
#   KEEP=1        keep the work dir (daemon log, images)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
DISKS=${DISKS:-8}
read -ra DOMS <<<"${DOMAINS:-0 1}"
REPS=${REPS:-30}
SIZE=${SIZE:-256M}
FIO_ARGS=${FIO_ARGS:---rw=randrw --rwmixread=50 --bs=4k --iodepth=16}
RESULTS=${RESULTS:-$HERE/results/ctlplane-$(date -u +%Y%m%dT%H%M%SZ)}
KEEP=${KEEP:-0}

BENCH=ctlplane
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
[[ $DISKS =~ ^[0-9]+$ && $DISKS -ge 1 ]] || die "DISKS must be a positive integer"
[[ $REPS =~ ^[0-9]+$ && $REPS -ge 1 ]] || die "REPS must be a positive integer"
LETTERS=bcdefghijklmnopqrstuvwxy # xvdz is the attached one
((DISKS <= ${#LETTERS})) || die "DISKS must be at most ${#LETTERS}"
for tool in fio jq python3 nbdinfo; do
	command -v "$tool" >/dev/null || die "$tool not found (make oracles installs the test programs)"
done
fio --enghelp 2>&1 | grep -qx '[[:space:]]*nbd' || die "this fio has no nbd ioengine"

W=$(mktemp -d /var/tmp/ctlplane.XXXXXX)
DAEMON=""
FIOS=()
cleanup() {
	local rc=$? p
	set +e
	for p in "${FIOS[@]}"; do kill -TERM "$p" 2>/dev/null; done
	shutdown_daemon "$W/st"
	wait 2>/dev/null
	if [[ $KEEP == 1 ]]; then log "kept work dir $W"; else rm -rf "$W"; fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

build_blktap "$W"
mkdir -p "$RESULTS" "$W/st" "$W/img"
RESULTS=$(cd "$RESULTS" && pwd)

{
	echo "disks:"
	for ((i = 0; i < DISKS; i++)); do
		cat <<-EOF
			  - name: d$i
			    image: $W/img/d$i.raw
			    format: raw
			    mode: w
			    domain: ${DOMS[i % ${#DOMS[@]}]}
			    device: xvd${LETTERS:i:1}
			    create: {size: $SIZE}
		EOF
	done
} >"$W/disks.yaml"
truncate -s "$SIZE" "$W/img/extra.raw"

"$BLKTAP" run -c "$W/disks.yaml" --state-dir "$W/st" >"$W/daemon.log" 2>&1 &
DAEMON=$!
ls_json() { "$BLKTAP" ls --json --state-dir "$W/st" 2>/dev/null; }
for ((t = 0; ; t++)); do
	kill -0 "$DAEMON" 2>/dev/null || die "blktap run exited: $(tail -5 "$W/daemon.log")"
	n=$(ls_json | jq '[.[] | select(.phase == "connected")] | length' 2>/dev/null || echo 0)
	[[ $n == "$DISKS" ]] && break
	((t < 600)) || die "$n of $DISKS disks connected after 60 s"
	sleep 0.1
done
mapfile -t URIS < <(ls_json | jq -r '.[].export')
log "$DISKS disks connected (daemon $DAEMON); starting fio on each"

# Long enough for every round; fio is stopped once the rounds are done.
for ((i = 0; i < DISKS; i++)); do
	# shellcheck disable=SC2086
	fio --name="d$i" --ioengine=nbd --uri="${URIS[$i]}" $FIO_ARGS \
		--time_based --runtime=3600 --norandommap --randrepeat=0 \
		--output-format=json --output="$RESULTS/fio-d$i.json" >"$RESULTS/fio-d$i.log" 2>&1 &
	FIOS+=("$!")
done
sleep 3 # fio at full speed before the first command

TIMES=$RESULTS/times.tsv
printf 'command\tms\n' >"$TIMES"
now_ns() { date +%s%N; }
timed() { # name cmd...: run it, record its wall time; a failure fails the bench
	local name=$1 t0 t1
	shift
	t0=$(now_ns)
	"$@" >/dev/null 2>"$W/cmd.err" || die "$name failed: $(cat "$W/cmd.err")"
	t1=$(now_ns)
	printf '%s\t%s\n' "$name" "$(((t1 - t0) / 1000))" >>"$TIMES"
}
rtt() { # name url: curl's own time for the round trip over the control socket
	local name=$1 s
	s=$(curl -sf -o /dev/null -w '%{time_total}' --unix-socket "$W/st/blktap.sock" "$2") || die "$name failed"
	printf '%s\t%s\n' "$name" "$(awk -v s="$s" 'BEGIN { printf "%d", s * 1000000 }')" >>"$TIMES"
}
T0=$(date +%s.%N)
for ((r = 1; r <= REPS; r++)); do
	# The floor: starting the binary at all on a machine this busy.
	timed version "$BLKTAP" version
	# The daemon's own answer, with no Go process to start: every
	# worker's counters over the API socket (what ls asks for).
	if command -v curl >/dev/null; then
		timed "api stats" curl -sf --unix-socket "$W/st/blktap.sock" http://blktap/v1/stats
		rtt "api stats rtt" http://blktap/v1/stats
		rtt "api ping rtt" http://blktap/v1/ping
	fi
	timed ls "$BLKTAP" ls --state-dir "$W/st"
	timed "ls --json" "$BLKTAP" ls --json --state-dir "$W/st"
	timed attach "$BLKTAP" attach --state-dir "$W/st" 0 "raw:$W/img/extra.raw" xvdz w
	timed detach "$BLKTAP" detach --state-dir "$W/st" 0 xvdz
	for p in "${FIOS[@]}"; do kill -0 "$p" 2>/dev/null || die "a fio exited early (see $RESULTS)"; done
done
T1=$(date +%s.%N)
log "$REPS rounds in $(python3 -c "print(round($T1 - $T0, 1))") s; stopping fio"
for p in "${FIOS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
for p in "${FIOS[@]}"; do wait "$p" || true; done
FIOS=()

# The daemon's own attach and detach times, from its log.
python3 - "$W/daemon.log" >>"$TIMES" <<'EOF'
import re, sys
from datetime import datetime
dev = "device=vbd3/0/%d" % (1 << 28 | 25 << 8)  # xvdz: disk 25, the extended numbering
def when(line):
    return datetime.fromisoformat(re.search(r"time=(\S+)", line).group(1).replace("Z", "+00:00"))
began = name = None
for line in open(sys.argv[1]):
    words = line.split()
    if dev in words and "action=start-worker" in words and name is None:
        began = when(line)
    elif began and name is None and dev in words and 'msg="disk connected"' in line:
        name = re.search(r"disk=(\S+)", line).group(1)
        print("attach (daemon)\t%d" % ((when(line) - began).total_seconds() * 1e6))
        began = None
    elif name and dev in words and "action=frontend-close" in words:
        began = when(line)
    elif name and began and "disk=" + name in words and 'msg="worker: image closed"' in line:
        print("detach (daemon)\t%d" % ((when(line) - began).total_seconds() * 1e6))
        began = name = None
EOF

python3 - "$RESULTS" "$DISKS" <<'EOF' | tee "$RESULTS/table.txt"
import json, sys, collections
res, disks = sys.argv[1], int(sys.argv[2])
ms = collections.OrderedDict()
for line in open(res + "/times.tsv").read().splitlines()[1:]:
    name, us = line.split("\t")
    ms.setdefault(name, []).append(int(us) / 1000)
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
print(f"{'command':<16} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
for name, v in ms.items():
    print(f"{name:<16} {len(v):>4} {pct(v, 50):>8.1f} {pct(v, 99):>8.1f} {max(v):>8.1f}")
rd = wr = iops = 0.0
errs = 0
for i in range(disks):
    try:
        # fio writes "terminating on signal" before the JSON.
        text = open(f"{res}/fio-d{i}.json").read()
        j = json.loads(text[text.index("{"):])
    except Exception as e:
        print(f"fio d{i}: no JSON ({e})"); errs += 1; continue
    for job in j["jobs"]:
        errs += job["error"] != 0
        rd += job["read"]["bw"]; wr += job["write"]["bw"]
        iops += job["read"]["iops"] + job["write"]["iops"]
print(f"fio, {disks} disks together during it: {iops:.0f} IOPS, read {rd/1024:.1f} MiB/s, write {wr/1024:.1f} MiB/s" +
      (f", {errs} with errors" if errs else ""))
EOF
log "results in $RESULTS"
