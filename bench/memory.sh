#!/usr/bin/env bash
# bench/memory.sh: what an idle disk really costs in memory, and whether
# that memory comes back after load (issue 10's memory target,
# docs/PERFORMANCE.md "Memory").
#
# RSS counts every page a process maps, so the blktap binary's text, shared
# by the daemon and every worker, is counted once per process. This script
# therefore reports, per process, from /proc/PID/smaps_rollup and
# /proc/PID/status:
#   Rss        resident pages, shared ones included in full
#   Pss        each shared page divided among the processes mapping it
#   Uss        pages no other process maps (Private_Clean + Private_Dirty):
#              what killing the process would give back
#   Anonymous  private heap and stacks (the Go runtime's share)
#   Shmem      RssShmem: resident shared memory (a guest disk's grant
#              table memfd, mapped by the daemon AND its worker)
#   Pss_Shmem  that shared memory's proportional share
#   File       RssFile: resident file pages, mostly the blktap binary's
#              text and rodata, the same pages in every process's Rss
# and, per kind of disk, the MARGINAL cost of one more disk:
#   (total(N=9) - total(N=1)) / 8, in RSS, PSS and USS (issue 18's targets:
#   <= 2 MiB PSS and <= 4 MiB USS for an idle disk).
#
# What it does, for KIND in dom0 and guest and for N in 1 and 9:
#   1. N sparse raw images, one `blktap run` (embedded xenstored) serving
#      them (domain 0: each worker's NBD export; domain 1: the local
#      frontend's guest view, every request through the blkif ring);
#   2. waits until every disk is connected and every export answers nbdinfo,
#      then SETTLE seconds, and measures the daemon and every worker
#      (`blktap ls --json` names the workers) -> phase "idle";
#   3. a short load on every export at once (fio nbd engine: LOAD_SECONDS
#      of 1M sequential read at QD8, then LOAD_SECONDS of 4k random write
#      at QD16), measures right after -> "after-load", and again after
#      AFTER_IDLE seconds without I/O -> "after-idle".
#
# Output: a table on stdout, and procs.tsv (one row per process and phase),
# totals.tsv (per configuration and phase), marginal.tsv and env.txt under
# $RESULTS (default bench/results/memory-UTC-TIMESTAMP).
#
# It measures, it does not judge: exit 0 even when a target is missed;
# non-zero when a daemon fails to start or dies, or fio fails.
#
# Knobs (environment):
#   NS="1 9"             disk counts (the marginal cost uses the first and last)
#   KINDS="dom0 guest"
#   SIZE_MB=64           image size
#   LOAD_SECONDS=2       per fio job (two jobs)
#   AFTER_IDLE=10        seconds of idle before the last measurement
#   SETTLE=2             seconds between "every export answers" and "idle"
#   WAKE_SECONDS=60      after "after-idle", seconds over which every
#                        process's context switches are counted
#                        (wakeups.tsv; 0 skips it)
#   BLKTAP=PATH          the binary (default: `go build` of this tree into
#                        the work dir, so the figures are this tree's)
#   RESULTS=DIR          results dir
#   KEEP=1               keep the work dir (images, daemon logs)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")

NS=${NS:-1 9}
KINDS=${KINDS:-dom0 guest}
SIZE_MB=${SIZE_MB:-64}
LOAD_SECONDS=${LOAD_SECONDS:-2}
AFTER_IDLE=${AFTER_IDLE:-10}
SETTLE=${SETTLE:-2}
WAKE_SECONDS=${WAKE_SECONDS:-60}
RESULTS=${RESULTS:-$HERE/results/memory-$(date -u +%Y%m%dT%H%M%SZ)}
KEEP=${KEEP:-0}

BENCH=memory
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"

for v in SIZE_MB LOAD_SECONDS AFTER_IDLE SETTLE WAKE_SECONDS; do
	[[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer, got '${!v}'"
done
((SIZE_MB >= 16)) || die "SIZE_MB must be at least 16"
((LOAD_SECONDS >= 1)) || die "LOAD_SECONDS must be at least 1"
for n in $NS; do [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 26 ]] || die "NS: '$n' is not in 1..26"; done
for k in $KINDS; do [[ $k == dom0 || $k == guest ]] || die "KINDS: '$k' (dom0 guest)"; done
for tool in fio jq nbdinfo python3 timeout; do
	command -v "$tool" >/dev/null || die "$tool not found (make oracles installs the test programs)"
done
grep -qx '[[:space:]]*nbd' <<<"$(fio --enghelp 2>&1 || true)" || die "this fio has no nbd ioengine"

# ---------------------------------------------------------------- cleanup
STARTED=() # daemons this script started
WORKERS=() # their workers (they should exit with the daemon)
W=""
cleanup() {
	local rc=$?
	set +e
	local p
	for p in "${STARTED[@]}"; do stop_pid "$p"; done
	# A worker left behind goes too, if it still serves from our work dir.
	for p in "${WORKERS[@]}"; do
		if [[ -n $W ]] && ls -l "/proc/$p/fd" 2>/dev/null | grep -qF "$W"; then
			kill -TERM "$p" 2>/dev/null
		fi
	done
	if [[ -n $W && $KEEP != 1 ]]; then
		rm -rf "$W"
	elif [[ -n $W ]]; then
		log "kept work dir $W"
	fi
	exit "$rc"
}
stop_pid() { # polite, then forceful after 10 s
	kill -TERM "$1" 2>/dev/null || return 0
	for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || { wait "$1" 2>/dev/null; return 0; }; sleep 0.1; done
	kill -KILL "$1" 2>/dev/null
	wait "$1" 2>/dev/null
	return 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

W=$(mktemp -d /var/tmp/bm.XXXXXX)
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
log "work dir $W, results $RESULTS"

BLKTAP=${BLKTAP:-}
if [[ -z $BLKTAP ]]; then
	(cd "$REPO" && go build -o "$W/blktap" ./cmd/blktap) || die "go build ./cmd/blktap failed"
	BLKTAP=$W/blktap
fi
[[ -x $BLKTAP ]] || die "$BLKTAP is not executable"

{
	echo "date: $(date -u +%FT%TZ)"
	echo "host: $(uname -srm), $(nproc) cpus, $(awk '/MemTotal/{print $2" kB"}' /proc/meminfo)"
	echo "fio: $(fio --version)"
	echo "blktap: $BLKTAP ($(stat -c %s "$BLKTAP") bytes; tree at $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown))"
	echo "settings: NS='$NS' KINDS='$KINDS' SIZE_MB=$SIZE_MB LOAD_SECONDS=$LOAD_SECONDS AFTER_IDLE=$AFTER_IDLE SETTLE=$SETTLE"
} >"$RESULTS/env.txt"

printf 'kind\tn\trole\tpid\tctxsw_per_s\n' >"$RESULTS/wakeups.tsv"
printf 'kind\tn\tphase\trole\tpid\trss_kb\tpss_kb\tuss_kb\tanon_kb\tshmem_kb\tpss_shmem_kb\tfile_kb\n' >"$RESULTS/procs.tsv"

# ---------------------------------------------------------------- measuring
# sample KIND N PHASE DAEMON_PID STATE_DIR: one row per process.
sample() {
	local kind=$1 n=$2 phase=$3 daemon=$4 st=$5
	local js workers p role
	js=$("$BLKTAP" ls --json --state-dir "$st") || die "blktap ls failed"
	workers=$(jq -r '.[] | .worker_pid' <<<"$js")
	# The daemon's children must be exactly the workers ls reports.
	local kids
	kids=$(pgrep -P "$daemon" | sort -n | tr '\n' ' ')
	[[ $kids == "$(sort -n <<<"$workers" | tr '\n' ' ')" ]] ||
		die "$kind N=$n $phase: daemon's children ($kids) differ from ls --json's workers ($workers)"
	for p in "$daemon" $workers; do
		role=worker
		[[ $p == "$daemon" ]] && role=daemon
		[[ -r /proc/$p/smaps_rollup ]] || die "$kind N=$n $phase: process $p is gone"
		awk -v kind="$kind" -v n="$n" -v phase="$phase" -v role="$role" -v pid="$p" '
			FNR == NR { if ($1 == "Rss:") rss = $2; if ($1 == "Pss:") pss = $2;
			            if ($1 == "Anonymous:") anon = $2; if ($1 == "Pss_Shmem:") pshm = $2;
			            if ($1 == "Private_Clean:" || $1 == "Private_Dirty:") uss += $2; next }
			$1 == "RssShmem:" { shm = $2 }
			$1 == "RssFile:" { file = $2 }
			END { printf "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\n", kind, n, phase, role, pid, rss, pss, uss, anon, shm, pshm, file }
		' "/proc/$p/smaps_rollup" "/proc/$p/status" >>"$RESULTS/procs.tsv"
	done
}

# ctxsw PID: context switches so far, voluntary and not, over every thread.
ctxsw() {
	cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { s += $2 } END { print s + 0 }'
}

# wakeups KIND N DAEMON_PID: context switches per second of the daemon and
# every worker over WAKE_SECONDS of idleness (issue 18: an idle worker
# wakes less than once a second). Every thread counts: a wake-up of the
# process is one switch or more.
wakeups() {
	local kind=$1 n=$2 daemon=$3 p
	local -A before
	((WAKE_SECONDS > 0)) || return 0
	# The last sample's `ls --json` asked every worker for its stats: a
	# Go process spins down over a few seconds after any work (some 50
	# switches), which would be counted as idle wake-ups.
	sleep 10
	for p in "$daemon" "${WORKERS[@]: -$n}"; do before[$p]=$(ctxsw "$p"); done
	sleep "$WAKE_SECONDS"
	for p in "$daemon" "${WORKERS[@]: -$n}"; do
		local role=worker
		[[ $p == "$daemon" ]] && role=daemon
		awk -v a="${before[$p]}" -v b="$(ctxsw "$p")" -v s="$WAKE_SECONDS" \
			-v kind="$kind" -v n="$n" -v role="$role" -v pid="$p" \
			'BEGIN { printf "%s\t%s\t%s\t%s\t%.2f\n", kind, n, role, pid, (b - a) / s }' >>"$RESULTS/wakeups.tsv"
	done
}

# ---------------------------------------------------------------- one configuration
run_config() { # KIND N
	local kind=$1 n=$2 dom=0
	[[ $kind == guest ]] && dom=1
	local d=$W/$kind-$n i
	mkdir -p "$d/st"
	local LETTERS=bcdefghijklmnopqrstuvwxyz
	echo "disks:" >"$d/disks.yaml"
	for ((i = 1; i <= n; i++)); do
		truncate -s "${SIZE_MB}M" "$d/disk$i.raw"
		# Devices xvdb, xvdc, ...: one per disk of the same domain.
		cat >>"$d/disks.yaml" <<-EOF
			  - name: disk$i
			    image: $d/disk$i.raw
			    format: raw
			    mode: w
			    domain: $dom
			    device: xvd${LETTERS:i-1:1}
		EOF
	done
	"$BLKTAP" run -c "$d/disks.yaml" --state-dir "$d/st" >"$d/daemon.log" 2>&1 &
	local daemon=$!
	STARTED+=("$daemon")
	local js connected=0
	for _ in $(seq 600); do
		kill -0 "$daemon" 2>/dev/null || die "$kind N=$n: blktap run exited:
$(tail -20 "$d/daemon.log")"
		js=$("$BLKTAP" ls --json --state-dir "$d/st" 2>/dev/null || true)
		connected=$(jq '[.[] | select(.phase == "connected" and .worker_pid > 0)] | length' <<<"$js" 2>/dev/null || echo 0)
		((connected == n)) && break
		if [[ -n $js ]] && jq -e '[.[] | select(.phase == "failed")] | length > 0' <<<"$js" >/dev/null 2>&1; then
			die "$kind N=$n: a disk failed: $(jq -r '.[] | select(.phase == "failed") | .name + ": " + .error' <<<"$js")"
		fi
		sleep 0.1
	done
	((connected == n)) || die "$kind N=$n: $connected of $n disks connected within 60 s"
	local uris=() u ok
	mapfile -t uris < <(jq -r '.[].export' <<<"$js")
	for u in "${uris[@]}"; do
		ok=0
		for _ in $(seq 100); do
			if nbdinfo --size "$u" >/dev/null 2>&1; then ok=1; break; fi
			sleep 0.1
		done
		((ok)) || die "$kind N=$n: $u does not answer"
	done
	WORKERS+=($(jq -r '.[].worker_pid' <<<"$js"))
	log "$kind N=$n: $n disks connected, every export answers (daemon $daemon)"
	sleep "$SETTLE"
	sample "$kind" "$n" idle "$daemon" "$d/st"

	# The load: every export at once, one fio job per export.
	local job rw
	for job in read-1m randwrite-4k; do
		{
			echo "[global]"
			echo "ioengine=nbd"
			echo "time_based=1"
			echo "runtime=$LOAD_SECONDS"
			echo "norandommap=1"
			echo "randrepeat=0"
			case $job in
			read-1m) printf 'rw=read\nbs=1M\niodepth=8\n' ;;
			randwrite-4k) printf 'rw=randwrite\nbs=4k\niodepth=16\n' ;;
			esac
			i=0
			for u in "${uris[@]}"; do
				i=$((i + 1))
				printf '[%s-%d]\nuri=%s\n' "$job" "$i" "$u"
			done
		} >"$d/$job.fio"
		timeout $((LOAD_SECONDS * 5 + 60)) fio --output-format=json --output="$d/$job.json" "$d/$job.fio" \
			>"$d/$job.log" 2>&1 || die "$kind N=$n: fio $job failed: $(tail -3 "$d/$job.log")"
		jq -e '[.jobs[].error] | all(. == 0)' "$d/$job.json" >/dev/null || die "$kind N=$n: fio $job reported errors"
		cp "$d/$job.json" "$RESULTS/fio-$kind-$n-$job.json"
	done
	sample "$kind" "$n" after-load "$daemon" "$d/st"
	sleep "$AFTER_IDLE"
	sample "$kind" "$n" after-idle "$daemon" "$d/st"
	wakeups "$kind" "$n" "$daemon"
	stop_pid "$daemon"
	log "$kind N=$n: measured"
}

for kind in $KINDS; do
	for n in $NS; do
		run_config "$kind" "$n"
	done
done

# ---------------------------------------------------------------- report
python3 - "$RESULTS" "$NS" <<'PY' | tee "$RESULTS/table.txt"
import csv, os, sys
res, ns = sys.argv[1], [int(x) for x in sys.argv[2].split()]
rows = list(csv.DictReader(open(os.path.join(res, "procs.tsv")), delimiter="\t"))
F = ["rss_kb", "pss_kb", "uss_kb", "anon_kb", "shmem_kb", "pss_shmem_kb", "file_kb"]
PH = ["idle", "after-load", "after-idle"]
mib = lambda kb: f"{kb / 1024:.1f}"
tot = {}
for r in rows:
    k = (r["kind"], int(r["n"]), r["phase"])
    t = tot.setdefault(k, {f: 0 for f in F} | {"procs": 0})
    for f in F:
        t[f] += int(r[f])
    t["procs"] += 1
print("Per process (MiB; Shmem = RssShmem, part of Rss; File = RssFile, mostly the blktap binary's text):")
print(f"{'kind':6} {'N':>2} {'phase':10} {'process':7} {'Rss':>7} {'Pss':>7} {'Uss':>7} {'Anon':>7} {'Shmem':>7} {'PssShm':>7} {'File':>7}")
for r in rows:
    if r["role"] == "worker" and int(r["n"]) != min(ns):
        continue  # one line per role is enough; totals below count them all
    print(f"{r['kind']:6} {r['n']:>2} {r['phase']:10} {r['role']:7} " + " ".join(f"{mib(int(r[f])):>7}" for f in F))
print()
print("Totals over the daemon and every worker (MiB):")
print(f"{'kind':6} {'N':>2} {'phase':10} {'procs':>5} {'Rss':>7} {'Pss':>7} {'Uss':>7} {'Anon':>7} {'Shmem':>7} {'PssShm':>7} {'File':>7}")
with open(os.path.join(res, "totals.tsv"), "w") as out:
    out.write("kind\tn\tphase\tprocs\t" + "\t".join(F) + "\n")
    for (kind, n, ph), t in sorted(tot.items(), key=lambda kv: (kv[0][0], kv[0][1], PH.index(kv[0][2]))):
        out.write(f"{kind}\t{n}\t{ph}\t{t['procs']}\t" + "\t".join(str(t[f]) for f in F) + "\n")
        print(f"{kind:6} {n:>2} {ph:10} {t['procs']:>5} " + " ".join(f"{mib(t[f]):>7}" for f in F))
print()
lo, hi = min(ns), max(ns)
if lo != hi:
    print(f"Marginal cost of one more disk, (total(N={hi}) - total(N={lo})) / {hi - lo} (MiB):")
    print(f"{'kind':6} {'phase':10} {'Rss':>7} {'Pss':>7} {'Uss':>7} {'Anon':>7} {'Shmem':>7}")
    with open(os.path.join(res, "marginal.tsv"), "w") as out:
        out.write("kind\tphase\trss_kb\tpss_kb\tuss_kb\tanon_kb\tshmem_kb\n")
        for kind in sorted({k[0] for k in tot}):
            for ph in PH:
                a, b = tot.get((kind, lo, ph)), tot.get((kind, hi, ph))
                if not a or not b:
                    continue
                m = {f: (b[f] - a[f]) / (hi - lo) for f in F}
                out.write(f"{kind}\t{ph}\t" + "\t".join(f"{m[f]:.0f}" for f in ["rss_kb", "pss_kb", "uss_kb", "anon_kb", "shmem_kb"]) + "\n")
                print(f"{kind:6} {ph:10} " + " ".join(f"{mib(m[f]):>7}" for f in ["rss_kb", "pss_kb", "uss_kb", "anon_kb", "shmem_kb"]))
print()
w = list(csv.DictReader(open(os.path.join(res, "wakeups.tsv")), delimiter="\t"))
if w:
    print("Context switches per second over every thread, idle (wakeups.tsv): max over the workers, the daemon:")
    for (kind, n) in sorted({(r["kind"], int(r["n"])) for r in w}):
        ws = [float(r["ctxsw_per_s"]) for r in w if (r["kind"], int(r["n"])) == (kind, n) and r["role"] == "worker"]
        dm = [float(r["ctxsw_per_s"]) for r in w if (r["kind"], int(r["n"])) == (kind, n) and r["role"] == "daemon"]
        print(f"{kind:6} N={n:<2} worker max {max(ws):6.2f}/s  daemon {dm[0]:6.2f}/s")
PY
log "results in $RESULTS"
