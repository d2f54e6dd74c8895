#!/usr/bin/env bash
# bench/convert.sh: `blktap image convert` beside `qemu-img convert` on the
# same images: raw -> qcow2, qcow2 -> raw, and qcow2 -> compressed qcow2
# (-c, zlib). Per case and tool: wall time, CPU (user+sys), and the
# output's allocated and apparent size; then ours / qemu-img.
#
# The source (SIZE, default 1G) is a quarter each of random bytes, text
# that compresses (numbers, as `seq` prints them), zeros written out, and a
# hole, so the rows exercise data, compression, zero detection and
# sparseness. Its qcow2 copy is made once by qemu-img and read by both tools.
# The source is read once first (warm page cache); each tool writes a new
# file on the same file system and flushes it as its defaults do (both
# fdatasync at the end). Rounds interleave the tools, so a slow moment of
# the machine hits both; the table shows each one's median. Every output of
# the first round is checked with `qemu-img compare` against the source, so
# a fast wrong answer fails the run instead of winning it.
#
# It measures, it does not judge: exit 0 whatever the times; non-zero when
# a convert fails or an output differs.
#
# Knobs (environment):
#   SIZE=1G        source size (M or G)
#   ROUNDS=3       rounds (median shown)
#   CASES="raw-qcow2 qcow2-raw qcow2-zlib"
#   WORKDIR=DIR    scratch space, a disk file system (default /var/tmp)
#   RESULTS=DIR    (default bench/results/convert-UTC-TIMESTAMP)
#   BLKTAP=PATH    the binary (default bin/blktap; built when missing)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
SIZE=${SIZE:-1G}
ROUNDS=${ROUNDS:-3}
CASES=${CASES:-raw-qcow2 qcow2-raw qcow2-zlib}
RESULTS=${RESULTS:-$HERE/results/convert-$(date -u +%Y%m%dT%H%M%SZ)}

BENCH=convert
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
[[ $ROUNDS =~ ^[0-9]+$ && $ROUNDS -ge 1 ]] || die "ROUNDS must be a positive integer"
case $SIZE in
*M) mib=${SIZE%M} ;;
*G) mib=$((${SIZE%G} * 1024)) ;;
*) die "SIZE must end in M or G" ;;
esac
[[ $mib =~ ^[0-9]+$ && $mib -ge 16 && $((mib % 4)) -eq 0 ]] || die "SIZE must be a multiple of 4M, 16M at least"
for p in qemu-img python3; do
	command -v $p >/dev/null || die "$p not found (make oracles installs the test programs)"
done
[[ -x /usr/bin/time ]] || die "/usr/bin/time not found (Debian: apt-get install time)"

W=$(mktemp -d "${WORKDIR:-/var/tmp}/convert.XXXXXX")
trap 'rm -rf "$W"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p "$RESULTS"

build_blktap "$W"

# makeSource writes $W/src.raw: random | compressible | zeros | hole.
makeSource() {
	local q=$((mib / 4)) src=$W/src.raw
	truncate -s "${mib}M" "$src"
	head -c "${q}M" /dev/urandom | dd of="$src" bs=1M conv=notrunc status=none
	{ seq 1 100000000 || true; } | head -c "${q}M" | dd of="$src" bs=1M seek="$q" conv=notrunc status=none
	dd if=/dev/zero of="$src" bs=1M seek=$((2 * q)) count="$q" conv=notrunc status=none
	qemu-img convert -f raw -O qcow2 "$src" "$W/src.qcow2"
	cat "$src" "$W/src.qcow2" >/dev/null
}

# args CASE TOOL OUT: the command line of one convert.
args() {
	local c=$1 tool=$2 out=$3 cmd
	if [[ $tool == ours ]]; then cmd=("$BLKTAP" image convert); else cmd=(qemu-img convert); fi
	case $c in
	raw-qcow2) cmd+=(-f raw -O qcow2 "$W/src.raw" "$out") ;;
	qcow2-raw) cmd+=(-f qcow2 -O raw "$W/src.qcow2" "$out") ;;
	qcow2-zlib) cmd+=(-c -f qcow2 -O qcow2 -o compression_type=zlib "$W/src.qcow2" "$out") ;;
	*) die "unknown case $c" ;;
	esac
	printf '%s\n' "${cmd[@]}"
}

# run CASE TOOL ROUND: one timed convert; a row of runs.tsv.
run() {
	local c=$1 tool=$2 round=$3 out=$W/out
	rm -f "$out"
	mapfile -t cmd < <(args "$c" "$tool" "$out")
	/usr/bin/time -f '%e %U %S' -o "$W/time" nice -n 10 "${cmd[@]}" >"$W/log" 2>&1 ||
		die "$tool $c failed: $(cat "$W/log")"
	if [[ $round == 1 ]]; then
		local fmt=qcow2
		[[ $c == *-raw ]] && fmt=raw
		qemu-img compare -f raw -F "$fmt" "$W/src.raw" "$out" >"$W/log" 2>&1 ||
			die "$tool $c: the output differs from the source: $(cat "$W/log")"
	fi
	read -r wall user sys <"$W/time"
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$tool" "$round" "$wall" \
		"$(python3 -c "print(round($user + $sys, 2))")" "$(($(stat -c %b "$out") * 512))" "$(stat -c %s "$out")"
}

log "source: ${mib} MiB in $W; binary $BLKTAP"
makeSource
printf 'case\ttool\tround\twall_s\tcpu_s\tallocated\tapparent\n' >"$RESULTS/runs.tsv"
for ((r = 1; r <= ROUNDS; r++)); do
	for c in $CASES; do
		for tool in qemu-img ours; do
			log "round $r: $c $tool"
			run "$c" "$tool" "$r" >>"$RESULTS/runs.tsv"
		done
	done
done
{
	echo "qemu-img: $(qemu-img --version | head -1)"
	echo "blktap: $("$BLKTAP" --version)"
	echo "size: ${mib} MiB, rounds: $ROUNDS, nproc: $(nproc), load: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$RESULTS/env.txt"
python3 - "$RESULTS/runs.tsv" <<'EOF' | tee "$RESULTS/table.txt"
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
med = {}
for c in dict.fromkeys(r["case"] for r in rows):
    for t in ("qemu-img", "ours"):
        rs = [r for r in rows if r["case"] == c and r["tool"] == t]
        med[c, t] = {k: statistics.median(float(r[k]) for r in rs) for k in ("wall_s", "cpu_s", "allocated", "apparent")}
print("| case | tool | wall s | CPU s | allocated MiB | file MiB |")
print("|---|---|---:|---:|---:|---:|")
for (c, t), m in med.items():
    print(f"| {c} | {t} | {m['wall_s']:.2f} | {m['cpu_s']:.2f} | {m['allocated']/2**20:.1f} | {m['apparent']/2**20:.1f} |")
print()
print("| case | wall ours/qemu-img | CPU ours/qemu-img | allocated ours/qemu-img |")
print("|---|---:|---:|---:|")
for c in dict.fromkeys(c for c, _ in med):
    q, o = med[c, "qemu-img"], med[c, "ours"]
    ratio = lambda k: f"{o[k]/q[k]:.2f}" if q[k] else "n/a"
    print(f"| {c} | {ratio('wall_s')} | {ratio('cpu_s')} | {ratio('allocated')} |")
EOF
log "results in $RESULTS"
