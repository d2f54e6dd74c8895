#!/usr/bin/env bash
# make xen-test: real Xen in QEMU (TCG, no KVM needed), real libxl and Linux
# xen-blkfront guests, our daemon in dom0. Builds everything from Debian
# packages (cached), boots once per Xen version, runs every scenario of that
# boot and prints one line per scenario:
#   PASS xen-4.17 boot-g1 (21.4 s)      FAIL xen-4.17 kill-worker: reason
# and a last line "N passed, N failed". Exit status 0 only if every planned
# scenario passed. The serial console of each boot is kept in OUT.
#
# Environment:
#   XEN_TEST_CACHE   packages and images, kept between runs (/var/cache/blktap-xen-test)
#   XEN_TEST_OUT     console logs and verdicts (test/xen/out)
#   XEN_TEST_ONLY    comma-separated scenario names to run (default: all)
#   XEN_TEST_TIMEOUT seconds for one whole boot (default 2400: a 4.20 boot of
#                    every scenario took 1330 s on a shared machine; each
#                    scenario has its own, shorter, timeout in dom0)
#   XEN_TEST_SMP     vCPUs of the emulated machine and of dom0 (default 1)
#   XEN_TEST_CPU     qemu's -cpu (default qemu64; see below)
#   XEN_TEST_STRESS  N: instead of the scenarios, N rounds of short-lived
#                    programs in dom0, counting the ones that die (flake rate)
#   BLKTAP_BIN       the (static) blktap binary to put in dom0 (default: built here)
#   XEN_TEST_HVM     1 (default): per version with a device model (4.17), a
#                    boot on an SVM CPU model running an HVM guest (hvm)
#   XEN_TEST_PKG     1 (default): dom0 installs the .deb of `make deb` with
#                    dpkg and runs the daemon under its unit (the harness's
#                    systemctl stand-in, test/xen/systemctl: dom0 has no
#                    systemd); 0: the bare binary, started by lib.sh
#   XEN_TEST_PKG_FULL without the systemd boot (XEN_TEST_SYSTEMD=0), the Xen
#                    versions whose boot also runs the package's long
#                    scenarios (pkg-restart-io, pkg-upgrade, pkg-remove:
#                    1.5-2.5 min each under TCG); default "4.20", so that
#                    CI's 90 minutes hold both versions; "all": every one.
#                    With the systemd boot they run there only. pkg-install
#                    and pkg-hotplug-nodaemon run on every version.
#   XEN_TEST_PREV_COMMIT the commit whose `make deb` is the previous version
#                    for the upgrade scenario (default 9bc94c0: see
#                    dom0/scenarios-pkg.sh)
#   XEN_TEST_SYSTEMD one more boot of Xen 4.20 whose dom0 is a trixie root
#                    with systemd as PID 1 (systemd/build.sh, mmdebstrap):
#                    dpkg -i starts the unit through the real systemctl, then
#                    pkg-install, pkg-restart-io, pkg-upgrade and pkg-remove
#                    run, and the stand-in boots skip the last three. Default: on in a full run
#                    (4.20 booted, XEN_TEST_PKG=1, no XEN_TEST_ONLY);
#                    1: always; 0: never; "only": that boot alone
#   XEN_TEST_WORK    where the images are built (default: XEN_TEST_CACHE)
#   XEN_TEST_VERSIONS the Xen versions to boot, in order (default "4.17 4.20":
#                    4.17 from the host's bookworm packages, 4.20 from
#                    Debian trixie's, see trixie/build.sh)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${XEN_TEST_CACHE:-/var/cache/blktap-xen-test}
out=${XEN_TEST_OUT:-$here/out}
only=${XEN_TEST_ONLY:-}
tmo=${XEN_TEST_TIMEOUT:-2400}
smp=${XEN_TEST_SMP:-1}
# qemu64: with -cpu max (even without SMAP/SMEP, which crash dom0 at once)
# programs in dom0 and in guests died of random memory faults under TCG in
# every run: busybox, xl, xenstored, our daemon's Go runtime. The plain
# 64-bit model ran the same scenarios without one.
cpu=${XEN_TEST_CPU:-qemu64}
versions=${XEN_TEST_VERSIONS:-4.17 4.20}
pkg_full=${XEN_TEST_PKG_FULL:-4.20}
export PATH=$PATH:/usr/local/go/bin
mkdir -p "$cache" "$out"

die() { echo "xen-test: $*" >&2; echo "0 passed, 1 failed"; exit 1; }

kver=$("$here/deps.sh" "$cache" | sed -n 's/^KVER=//p') || die "installing the harness's packages failed"
[ -n "$kver" ] || die "no kernel version"
kroot=$cache/kernel-$kver

work=${XEN_TEST_WORK:-$cache}
w=$work/work-4.17; mkdir -p "$w"
if [ -n "${BLKTAP_BIN:-}" ]; then
  cp "$BLKTAP_BIN" "$w/blktap" || die "no $BLKTAP_BIN"
else
  (cd "$repo" && CGO_ENABLED=0 go build -trimpath -o "$w/blktap" ./cmd/blktap) || die "go build failed"
fi
if [ "${XEN_TEST_PKG:-1}" = 1 ]; then
  # The package of this tree (make deb), the previous version's package
  # (built once per commit from `git archive`, stamped VERSION~gitCOMMIT so
  # that dpkg sees the current one as an upgrade), the systemctl stand-in.
  pkg=$w/pkg; rm -rf "$pkg"; mkdir -p "$pkg"
  (cd "$repo" && make -s deb >"$out/make-deb.log" 2>&1) || die "make deb failed (see $out/make-deb.log)"
  cur=$(ls -t "$repo"/dist/blktap_*.deb | head -n 1); cp "$cur" "$pkg/blktap.deb"
  prev=${XEN_TEST_PREV_COMMIT:-9bc94c0}
  # a shallow clone (CI's may be one) lacks the previous version's commit
  git -C "$repo" rev-parse -q --verify "$prev^{commit}" >/dev/null ||
    git -C "$repo" fetch -q --unshallow >/dev/null 2>&1 || git -C "$repo" fetch -q origin >/dev/null 2>&1
  prev=$(git -C "$repo" rev-parse --verify "$prev^{commit}") ||
    die "no commit $prev for the previous package (a shallow clone? git fetch --unshallow; or XEN_TEST_PREV_COMMIT)"
  pdeb=$work/blktap-prev-${prev:0:12}.deb
  if [ ! -f "$pdeb" ]; then
    src=$(mktemp -d); git -C "$repo" archive "$prev" | tar -x -C "$src"
    v=$(sed -n 's/^## \[\([0-9][^]]*\)\].*/\1/p' "$src/CHANGELOG.md" | head -n 1)
    (cd "$src" && make -s deb VERSION="$v~git${prev:0:7}" COMMIT="$prev" >"$out/make-deb-prev.log" 2>&1) ||
      { rm -rf "$src"; die "make deb of $prev failed (see $out/make-deb-prev.log)"; }
    cp "$src"/dist/blktap_*.deb "$pdeb.tmp" && mv "$pdeb.tmp" "$pdeb"; rm -rf "$src"
  fi
  cp "$pdeb" "$pkg/blktap-prev.deb"
  (cd "$repo" && CGO_ENABLED=0 go build -trimpath -o "$pkg/systemctl" ./test/xen/systemctl) || die "go build of the systemctl stand-in failed"
  echo "xen-test: dom0 installs $(basename "$cur") with dpkg (previous version: $(dpkg-deb -f "$pdeb" Version)); the unit runs under the harness's systemctl stand-in, and in one more boot of 4.20 under systemd (unless XEN_TEST_SYSTEMD=0)" >&2
  export XT_PKG_DIR=$pkg
fi
"$here/build-initrds.sh" "$w" "$kroot" "$kver" "$w/blktap" >"$out/build-4.17.log" 2>&1 ||
  { tail -n 20 "$out/build-4.17.log" >&2; die "building the initramfs images failed (see $out/build-4.17.log)"; }
[ -f "$w/xen.elf" ] || zcat /boot/xen-4.17-amd64.gz >"$w/xen.elf"   # qemu's multiboot loader wants the plain ELF
declare -A XEN=([4.17]=$w/xen.elf) KERNEL=([4.17]=$kroot/boot/vmlinuz-$kver) INITRD=([4.17]=$w/dom0-initrd.cpio)

# Xen 4.20: trixie's hypervisor, kernel and toolstack, unpacked in the cache
# (never installed on the host); the same dom0 and guest images around them.
if [[ " $versions " == *" 4.20 "* ]]; then
  w20=$work/work-4.20; mkdir -p "$w20"; cp "$w/blktap" "$w20/blktap"
  line=$("$here/trixie/build.sh" "$cache" "$w20" "$w20/blktap" 2>"$out/build-4.20.log" | tail -n 1)
  [[ $line == XEN=* ]] || { tail -n 20 "$out/build-4.20.log" >&2; die "building the Xen 4.20 images failed (see $out/build-4.20.log)"; }
  for kv in $line; do
    case $kv in XEN=*) XEN[4.20]=${kv#*=} ;; KERNEL=*) KERNEL[4.20]=${kv#*=} ;; DOM0_INITRD=*) INITRD[4.20]=${kv#*=} ;; esac
  done
fi

# The systemd dom0: the same Xen 4.20 and kernel, a trixie root whose PID 1
# is systemd (its modules and guest image from the 4.20 busybox dom0).
sd=${XEN_TEST_SYSTEMD:-auto}
if [ "$sd" = auto ]; then
  sd=0; [ -n "${XEN[4.20]:-}" ] && [ -n "${XT_PKG_DIR:-}" ] && [ -z "$only" ] && sd=1
fi
if [ "$sd" != 0 ]; then
  [ -n "${XEN[4.20]:-}" ] && [ -n "${XT_PKG_DIR:-}" ] || die "XEN_TEST_SYSTEMD=$sd needs Xen 4.20 in XEN_TEST_VERSIONS and XEN_TEST_PKG=1"
  line=$("$here/systemd/build.sh" "$cache" "$w20" "$w20/dom0-root" "$XT_PKG_DIR" 2>"$out/build-4.20-systemd.log" | tail -n 1)
  [[ $line == DOM0_INITRD=* ]] || { tail -n 20 "$out/build-4.20-systemd.log" >&2; die "building the systemd dom0 failed (see $out/build-4.20-systemd.log)"; }
  XEN[4.20-systemd]=${XEN[4.20]} KERNEL[4.20-systemd]=${KERNEL[4.20]} INITRD[4.20-systemd]=${line#*=}
fi

# boot LOG SMP ONLY VERSION: one boot of Xen VERSION with its dom0 initramfs, SMP
# vCPUs, the scenarios ONLY (comma-separated; empty: all); the serial
# console, timestamped, goes to LOG. Returns when dom0 is done, crashed or
# timed out.
boot() {
  local log=$1 smp=$2 only=$3 v=$4 fifo=$w/serial.fifo qpid t0 l t ms
  rm -f "$fifo"; mkfifo "$fifo"
  local xenargs="console=com1 com1=115200,8n1 dom0_mem=1536M,max:1536M dom0_max_vcpus=$smp loglvl=warning guest_loglvl=warning noreboot ${XEN_TEST_XENARGS:-}"
  local skip=
  # the long ones (restart, upgrade, removal) run once: under real systemd
  # in its own boot, else in the stand-in boots of XEN_TEST_PKG_FULL
  if [[ $v != *-systemd ]] && { [ "$sd" != 0 ] || [[ $pkg_full != all && " $pkg_full " != *" $v "* ]]; }; then
    skip=pkg-restart-io+pkg-upgrade+pkg-remove
  fi
  local rdinit=/init; [[ $v != *-systemd ]] || rdinit=/lib/systemd/systemd
  local dom0args="console=hvc0 earlyprintk=xen rdinit=$rdinit loglevel=4${only:+ xt_only=${only//,/+}}${skip:+ xt_skip=$skip}${XEN_TEST_STRESS:+ xt_stress=$XEN_TEST_STRESS}"  # qemu splits -initrd at commas
  t0=${EPOCHREALTIME/./}
  echo "host-start $(date -u +%FT%TZ) xen=$v cpu=$cpu smp=$smp" >"$log"
  timeout "$tmo" qemu-system-x86_64 -accel tcg,thread=multi -machine pc -cpu "$cpu" -smp "$smp" -m 2560 \
    -display none -monitor none -serial stdio -no-reboot -nic none \
    -kernel "${XEN[$v]}" -append "$xenargs" \
    -initrd "${KERNEL[$v]} $dom0args,${INITRD[$v]}" </dev/null >"$fifo" 2>&1 &
  qpid=$!
  while IFS= read -r l; do
    t=${EPOCHREALTIME/./}; ms=$(( (t - t0) / 1000 ))
    printf '[%5d.%03d] %s\n' $((ms / 1000)) $((ms % 1000)) "${l%$'\r'}"
    case $l in
      *XT-START*|*XT-PASS*|*XT-FAIL*|*XT-RETRY*|*XT-INFO*) echo "  ${l%$'\r'}" >&2 ;;
    esac
    case $l in
      *XT-DONE*) (sleep 10; kill $qpid 2>/dev/null) & ;;
      *"Dom0 crashed"*|*"Panic on CPU"*|*"Kernel panic"*) (sleep 3; kill $qpid 2>/dev/null) & ;;
    esac
  done <"$fifo" >>"$log"
  wait $qpid; local rc=$?
  t=${EPOCHREALTIME/./}; ms=$(( (t - t0) / 1000 ))
  echo "host-end rc=$rc elapsed=$((ms / 1000)).$((ms % 1000 / 100))s" >>"$log"
  rm -f "$fifo"
}

# verdict VERSION LOG: one line per planned scenario; sets PASSED, FAILED.
verdict() {
  local v=$1 log=$2 plan n line
  plan=$(grep -a -m1 -o 'XT-PLAN.*' "$log" | sed 's/^XT-PLAN *//; s/\r$//')
  if [ -z "$plan" ]; then
    echo "FAIL xen-$v boot: dom0 never reached its scenarios (console: $log)"
    FAILED=$((FAILED + 1)); return
  fi
  for n in $plan; do
    if line=$(grep -a -o "XT-PASS $n [0-9.]*" "$log" | tail -n 1) && [ -n "$line" ]; then
      echo "PASS xen-$v $n (${line##* } s)"; PASSED=$((PASSED + 1))
    elif line=$(grep -a -o "XT-FAIL $n: .*" "$log" | tail -n 1) && [ -n "$line" ]; then
      echo "FAIL xen-$v $n: ${line#XT-FAIL $n: }"; FAILED=$((FAILED + 1))
    elif grep -aq "XT-START $n\$" "$log"; then
      echo "FAIL xen-$v $n: never finished (dom0 crashed or the boot timed out; console: $log)"; FAILED=$((FAILED + 1))
    else
      echo "FAIL xen-$v $n: never ran (console: $log)"; FAILED=$((FAILED + 1))
    fi
  done
  grep -a -o 'XT-RETRY .*' "$log" | sed "s/^XT-RETRY /RETRIED xen-$v /"
}

# one_boot NAME SMP ONLY VERSION: a boot, once more if dom0 never reached its
# scenarios (a TCG flake before any code of ours ran), and its verdict.
one_boot() {
  local name=$1 log=$out/$1-serial.log
  echo "xen-test: booting $name (console: $log)" >&2
  boot "$log" "$2" "$3" "$4"
  if ! grep -aq 'XT-PLAN' "$log"; then
    mv "$log" "$out/$name-serial.failed-boot.log"
    echo "xen-test: dom0 did not reach its scenarios; booting once more" >&2
    boot "$log" "$2" "$3" "$4"
  fi
  verdict "${name#xen-}" "$log" >"$out/verdict-$name.txt"
  # the package's install/upgrade/removal transcripts, for quoting
  grep -a -o 'XT-INFO \(pkg-[a-z-]*: \)\?pkg: .*' "$log" | sed 's/\r$//' >"$out/pkg-transcript-$name.txt" || rm -f "$out/pkg-transcript-$name.txt"
  cat "$out/verdict-$name.txt"
  echo "$name wall time: $(sed -n 's/.*elapsed=//p' "$log")" >&2
}

# run_version NAME SMP ONLY VERSION: one boot; the scenarios that failed get one
# more boot of their own (with the scenarios they stand on), because under
# TCG a guest or a tool now and then dies of the emulation alone. A data
# mismatch is never run again, and a rerun is reported as such.
run_version() {
  local name=$1 smp=$2 only=$3 v=$4 failed again
  one_boot "$name" "$smp" "$only" "$v"
  failed=$(grep '^FAIL' "$out/verdict-$name.txt" | grep -v 'DATA MISMATCH' | awk '{print $3}' | tr -d ':' | paste -sd, -)
  if [ -n "$failed" ] && ! grep -q '^FAIL.*DATA MISMATCH' "$out/verdict-$name.txt"; then
    case $name in *-hvm) again=images ;; *) again=images,boot-g1 ;; esac
    [[ ",$failed," == *,reboot-g2,* || ",$failed," == *,hostile-frontend,* || ",$failed," == *,destroy-g2,* ]] &&
      again=$again,boot-g2-nopersist
    again=$again,$failed
    echo "xen-test: $name: running again in a boot of their own: $failed" >&2
    one_boot "$name-rerun" "$smp" "$again" "$v"
    local n line
    for n in ${failed//,/ }; do
      if line=$(grep "^PASS [^ ]* $n " "$out/verdict-$name-rerun.txt"); then
        sed -i "s|^FAIL \([^ ]*\) $n: \(.*\)|PASS \1 $n (on the rerun; first: \2)|" "$out/verdict-$name.txt"
      fi
    done
    grep '^FAIL' "$out/verdict-$name-rerun.txt" | grep -Ev " ($(echo "$failed" | tr , '|'))(:| )" >>"$out/verdict-$name.txt"
  fi
  cat "$out/verdict-$name.txt" >>"$out/verdicts.txt"
}

PASSED=0 FAILED=0
: >"$out/verdicts.txt"
# Every scenario on one vCPU (the steadiest under TCG) for each version,
# then a boot with two vCPUs in dom0 and the guest, where blkfront
# negotiates two queues: multi-queue is checked there.
[ "$sd" != only ] || versions=
for v in $versions; do
  [ -n "${XEN[$v]:-}" ] || die "no images for Xen $v (XEN_TEST_VERSIONS takes 4.17 and 4.20)"
  # hvm runs only in its own boot (below)
  main_only=$(echo ",$only," | sed 's/,hvm,/,/g; s/^,*//; s/,*$//')
  if [ -z "$only" ] || [ -n "$main_only" ]; then run_version xen-$v "$smp" "$main_only" $v; fi
  if [ "${XEN_TEST_MQ:-1}" = 1 ] && { [ -z "$only" ] || [[ ",$only," == *,boot-g1,* ]]; }; then
    run_version xen-$v-smp2 2 images,boot-g1 $v
  fi
  # HVM needs SVM, which TCG emulates (not VMX) and which qemu64 lacks;
  # with -cpu max dom0 crashes at boot. Only this boot uses it, and only
  # the 4.17 image carries a device model (bookworm's qemu-system-xen).
  if [ "${XEN_TEST_HVM:-1}" = 1 ] && [ "$v" = 4.17 ] && { [ -z "$only" ] || [[ ",$only," == *,hvm,* ]]; }; then
    cpu=qemu64,+svm,+npt XEN_TEST_XENARGS="${XEN_TEST_XENARGS:-} guest_loglvl=all" run_version xen-$v-hvm 1 images,hvm $v
  fi
done
if [ -n "${INITRD[4.20-systemd]:-}" ]; then
  # a scenario that failed gets one more boot, as in the other boots (its
  # dom0 runs only the package scenarios: the rerun's images and boot-g1
  # are not in its plan)
  run_version xen-4.20-systemd 1 "" 4.20-systemd
fi
echo "---- every scenario:"; cat "$out/verdicts.txt"
PASSED=$(grep -c '^PASS' "$out/verdicts.txt"); FAILED=$(grep -c '^FAIL' "$out/verdicts.txt")
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ] && [ "$PASSED" -gt 0 ]
