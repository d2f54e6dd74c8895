#!/usr/bin/env bash
# One boot of the images trixie/build.sh made, with run.sh's qemu command
# (boot() there), for trying the Xen 4.20 harness on its own until run.sh
# boots both versions. The serial console, timestamped, goes to LOG; the
# XT- lines also go to stderr.
#
# Usage: boot.sh LOG XEN KERNEL DOM0_INITRD [SCENARIO+SCENARIO...]
# Environment: XEN_TEST_CPU (default qemu64, as run.sh), XEN_TEST_SMP (default 1), XEN_TEST_TIMEOUT (default 1500),
# XEN_TEST_NICE (default 10).
set -uo pipefail
log=$1 xen=$2 kernel=$3 initrd=$4 only=${5:-}
cpu=${XEN_TEST_CPU:-qemu64} smp=${XEN_TEST_SMP:-1} tmo=${XEN_TEST_TIMEOUT:-1500} nice=${XEN_TEST_NICE:-10}
fifo=$(mktemp -u /tmp/xen-serial.XXXXXX); mkfifo "$fifo"
trap 'rm -f "$fifo"' EXIT
xenargs="console=com1 com1=115200,8n1 dom0_mem=1536M,max:1536M dom0_max_vcpus=$smp loglvl=warning guest_loglvl=warning noreboot ${XEN_TEST_XENARGS:-}"
dom0args="console=hvc0 earlyprintk=xen rdinit=/init loglevel=4${only:+ xt_only=${only//,/+}}"
t0=${EPOCHREALTIME/./}
echo "host-start $(date -u +%FT%TZ) cpu=$cpu smp=$smp xen=$xen" >"$log"
timeout "$tmo" nice -n "$nice" qemu-system-x86_64 -accel tcg,thread=multi -machine pc -cpu "$cpu" -smp "$smp" -m 2560 \
  -display none -monitor none -serial stdio -no-reboot -nic none \
  -kernel "$xen" -append "$xenargs" \
  -initrd "$kernel $dom0args,$initrd" </dev/null >"$fifo" 2>&1 &
qpid=$!
while IFS= read -r l; do
  t=${EPOCHREALTIME/./}; ms=$(( (t - t0) / 1000 ))
  printf '[%5d.%03d] %s\n' $((ms / 1000)) $((ms % 1000)) "${l%$'\r'}"
  case $l in
    *XT-START*|*XT-PASS*|*XT-FAIL*|*XT-RETRY*|*XT-INFO*|*XT-PLAN*) echo "  ${l%$'\r'}" >&2 ;;
  esac
  case $l in
    *XT-DONE*) (sleep 10; kill $qpid 2>/dev/null) & ;;
    *"Dom0 crashed"*|*"Panic on CPU"*|*"Kernel panic"*) (sleep 3; kill $qpid 2>/dev/null) & ;;
  esac
done <"$fifo" >>"$log"
wait $qpid; rc=$?
t=${EPOCHREALTIME/./}; ms=$(( (t - t0) / 1000 ))
echo "host-end rc=$rc elapsed=$((ms / 1000)).$((ms % 1000 / 100))s" >>"$log"
tail -n 1 "$log" >&2
