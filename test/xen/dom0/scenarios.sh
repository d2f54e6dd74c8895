# The scenarios of one boot (sourced by init; with --functions only the
# functions, for xt_run's subshells). Route: libxl `backendtype=phy,
# script=block-blktap, target=FORMAT:PATH` with `blktap run --serve-vbd`
# and no xen-blkback, which every Xen version accepts; `blktap attach N`
# writes backend/vbd3 itself.

DISK="backendtype=phy, script=block-blktap, access=rw"
MB=1048576

# ---- scenarios --------------------------------------------------------------
sc_images() {
  cd /images || fail "no /images"
  truncate -s 64M g1.raw kill.raw restart.raw att.raw d0.raw hostile.raw || fail "truncate"
  qemu-img create -q -f qcow2 a.qcow2 64M || fail "qemu-img create qcow2"
  qemu-img create -q -f qcow a.qcow 64M || fail "qemu-img create qcow"
  qemu-img create -q -f vpc -o subformat=dynamic a.vhd 64M || fail "qemu-img create vpc"
  qemu-img create -q -f vmdk a.vmdk 64M || fail "qemu-img create vmdk"
  qemu-img create -q -f qcow2 g2.qcow2 64M || fail "qemu-img create g2"
  # copy-on-write: a raw base with a known first MiB under a qcow2 overlay,
  # and a VHD base under a VHD differencing image
  truncate -s 64M base.raw
  head -c $MB /dev/zero | tr '\0' 'Z' | dd of=base.raw conv=notrunc 2>/dev/null
  head -c $MB /dev/zero | tr '\0' 'Z' | md5sum | cut -d' ' -f1 >/tmp/base.md5
  md5sum <base.raw | cut -d' ' -f1 >/tmp/base-whole.md5
  qemu-img create -q -f qcow2 -b base.raw -F raw overlay.qcow2 || fail "qemu-img create overlay"
  blktap image create -f vhd base.vhd 64M || fail "blktap image create base.vhd"
  qemu-io -f vpc -c "write -P 0x5a 0 1M" base.vhd >/dev/null || fail "qemu-io write base.vhd"
  blktap image create -f vhd -b base.vhd diff.vhd || fail "blktap image create diff.vhd"
  ls -ls /images
}

sc_boot_g1() { # two vCPUs, a raw disk from xl create through the hotplug script
  xl destroy g1 >/dev/null 2>&1   # a retry starts afresh
  guest_create g1 2 "" "$DISK, vdev=xvda, target=aio:/images/g1.raw"
  local be fe; be=$(be_path g1 51712); fe=$(fe_path g1 51712)
  wait_key $be/state 4 60
  gx g1 60 wait-disk xvda
  gx g1 120 check xvda 1 4
  echo "${GX#md5=}" >/tmp/g1.md5
  gx g1 30 dmesg 'persistent grants: enabled'
  gx g1 30 dmesg 'indirect descriptors: enabled'
  local q; q=$(xsr $fe/multi-queue-num-queues)
  echo "INFO xvda: multi-queue-num-queues=${q:-1} (backend offers $(xsr $be/multi-queue-max-queues)), $(xsr $be/feature-max-indirect-segments) indirect segments offered"
  [ "$(nproc)" -lt 2 ] || [ "${q:-1}" = 2 ] || fail "two vCPUs each side but multi-queue-num-queues=${q:-1}"
  gx g1 60 discard xvda 8 2
  gx g1 30 errors
  [ "$(xsr $be/hotplug-status)" = connected ] || fail "hotplug-status is '$(xsr $be/hotplug-status)'"
}

# attach_check GUEST VDEV TARGET: hot attach, data check, discard, detach
attach_check() {
  local g=$1 vdev=$2 target=$3 be
  guest_ensure $g
  xl block-attach $g "$DISK, vdev=$vdev, target=$target" || fail "xl block-attach $g $target failed"
  be=$(be_path $g $(vdevnum $vdev))
  wait_key $be/state 4 60
  gx $g 60 wait-disk $vdev
  gx $g 120 check $vdev 3 4
  MD5=${GX#md5=}
  if gx_try $g 60 discard $vdev 8 2; then echo "INFO discard: $GX"; else echo "INFO discard: $GX"; fi
  gx $g 30 errors
  xl block-detach $g $vdev || fail "xl block-detach $g $vdev failed"
  gx $g 60 gone-disk $vdev
  wait_gone $be 30
}
# gx_try: gx without failing the scenario; GX is the answer or the failure.
gx_try() { ( gx "$@" && echo "$GX" ) >/tmp/gx_try.$$ 2>&1; local rc=$?; GX=$(tail -n 1 /tmp/gx_try.$$); cat /tmp/gx_try.$$; return $rc; }

sc_attach_format() { # FORMAT FILE [TARGET]
  local fmt=$1 f=/images/$2 target=${3:-$1:/images/$2}
  attach_check g1 xvdb "$target"
  local got; got=$(image_md5 $f $fmt 3 4)
  [ "$got" = "$MD5" ] || fail "DATA MISMATCH: the guest wrote $MD5, the image holds $got"
  case $fmt in qcow2|vmdk) qemu-img check -q -f $fmt $f || fail "qemu-img check $f: $(qemu-img check -f $fmt $f 2>&1 | tail -n 2)" ;; esac
}

# attach_cow TARGET: a copy-on-write image whose base holds a known first
# MiB: the guest reads the base's data through it, then writes its own.
attach_cow() {
  guest_ensure g1
  xl block-attach g1 "$DISK, vdev=xvdb, target=$1" || fail "xl block-attach $1 failed"
  local be; be=$(be_path g1 51728)
  wait_key $be/state 4 60
  gx g1 60 wait-disk xvdb
  gx g1 60 verify xvdb 0 1 "$(cat /tmp/base.md5)"
  gx g1 120 check xvdb 3 4; MD5=${GX#md5=}
  xl block-detach g1 xvdb || fail "xl block-detach failed"
  wait_gone $be 30
}

sc_attach_overlay() { # qcow2 over a raw backing file: reads come from the base, writes stay in the overlay
  attach_cow qcow2:/images/overlay.qcow2
  [ "$(md5sum </images/base.raw | cut -d' ' -f1)" = "$(cat /tmp/base-whole.md5)" ] || fail "DATA MISMATCH: the backing file changed"
  [ "$(image_md5 /images/overlay.qcow2 qcow2 3 4)" = "$MD5" ] || fail "DATA MISMATCH in the overlay"
  qemu-img check -q /images/overlay.qcow2 || fail "qemu-img check overlay.qcow2"
}

sc_attach_vhd_diff() { # a VHD differencing image: the base's data, the guest's writes in the child
  attach_cow vhd:/images/diff.vhd
  [ "$(image_md5 /images/diff.vhd vhd-diff 3 4)" = "$MD5" ] || fail "DATA MISMATCH in diff.vhd"
  blktap image check /images/diff.vhd >/dev/null || fail "blktap image check diff.vhd: $(blktap image check /images/diff.vhd 2>&1 | tail -n 1)"
}

sc_attach_ram() { attach_check g1 xvdb "ram:xtram?size=64M"; }

# A worker or the daemon killed while the guest reads and writes: the guest
# sees no error and every round's data reads back.
kill_during_io() { # WHAT IMAGE VDEV
  local what=$1 img=$2 vdev=$3 be pid
  guest_ensure g1
  xl block-attach g1 "$DISK, vdev=$vdev, target=aio:/images/$img" || fail "xl block-attach failed"
  be=$(be_path g1 $(vdevnum $vdev))
  wait_key $be/state 4 60
  gx g1 60 wait-disk $vdev
  local rounds=24
  gx g1 30 bgio-start $vdev 0 4 $rounds
  local i=0
  until gx_try g1 20 bgio-progress >/dev/null && [ "${GX#round }" != "$GX" ]; do
    i=$((i+1)); [ $i -gt 100 ] && fail "background I/O made no progress"
    sleep 0.3
  done
  local at=${GX#round }; at=${at%% *}
  # The kill must land inside the guest's I/O, or it proves nothing.
  [ "$at" -lt "$rounds" ] || fail "the guest's I/O ended before the kill (round $at of $rounds)"
  case $what in
  worker)
    pid=$(xsr $be/blktap/worker-pid); [ -n "$pid" ] || fail "no worker pid"
    kill -9 $pid; echo "INFO killed worker $pid during guest I/O ($GX)"
    local j=0
    until np=$(xsr $be/blktap/worker-pid) && [ -n "$np" ] && [ "$np" != "$pid" ]; do
      j=$((j+1)); [ $j -gt 150 ] && fail "no new worker after 30 s"
      sleep 0.2
    done
    echo "INFO new worker $np, restarts=$(xsr $be/blktap/restarts)" ;;
  daemon)
    pid=$(daemon_pid); [ -n "$pid" ] || fail "no daemon"
    kill -9 $pid; echo "INFO killed daemon $pid during guest I/O ($GX)"
    sleep 0.5; daemon_start ;;
  esac
  gx g1 400 bgio-wait 390
  echo "INFO $GX"
  gx g1 30 errors
  [ "$(xsr $be/state)" = 4 ] || fail "backend state $(xsr $be/state) after the kill"
  xl block-detach g1 $vdev || fail "xl block-detach failed"
  wait_gone $be 30
}
sc_kill_worker() { kill_during_io worker kill.raw xvdc; }
sc_restart_daemon() { kill_during_io daemon restart.raw xvdh; }

sc_hotplug_error() { # an image the daemon cannot open: xl fails and names it
  local out be
  guest_ensure g1
  if out=$(timeout 120 xl block-attach g1 "$DISK, vdev=xvdf, target=qcow2:/images/missing.qcow2" 2>&1); then
    fail "xl block-attach of a missing image succeeded"
  fi
  echo "$out" | tail -n 5
  echo "$out" | grep -q 'missing.qcow2' || fail "xl's error does not name the image: $(echo "$out" | tail -n 1)"
  be=$(be_path g1 51792)
  [ "$(xsr $be/state)" != 4 ] || fail "the backend of a missing image is Connected"
  echo "INFO xl said: $(echo "$out" | grep -m1 'script:' | sed 's/.*script: //')"
  # libxl leaves the failed device's directories behind; detach removes them.
  timeout 60 xl block-detach g1 xvdf >/dev/null 2>&1
  wait_gone $be 30
}

sc_blktap_attach() { # `blktap attach N` writes backend/vbd3 itself; the real guest connects
  local d out; guest_ensure g1; d=$(domid g1)
  out=$(timeout 120 blktap attach $d raw:/images/att.raw xvde w 2>&1) || fail "blktap attach: $(echo "$out" | tail -n 1)"
  [ "$(echo "$out" | tail -n 1)" = xvde ] || fail "blktap attach printed '$(echo "$out" | tail -n 1)', want xvde"
  gx g1 60 wait-disk xvde
  gx g1 120 check xvde 1 4
  timeout 120 blktap detach $d xvde || fail "blktap detach failed"
  gx g1 60 gone-disk xvde
}

sc_dom0_attach() { # xl block-attach 0: must not hang
  timeout 90 xl block-attach 0 "$DISK, vdev=xvdd, target=aio:/images/d0.raw" || fail "xl block-attach 0 failed or hung"
  local be=/local/domain/0/backend/vbd/0/51760
  wait_key $be/state 4 60
  timeout 90 xl block-detach 0 xvdd || fail "xl block-detach 0 failed or hung"
  wait_gone $be 30
}

sc_boot_g2() { # no persistent grants, a qcow2 disk
  xl destroy g2 >/dev/null 2>&1
  guest_create g2 1 "feature_persistent=0" "$DISK, vdev=xvda, target=qcow2:/images/g2.qcow2"
  wait_key "$(be_path g2 51712)/state" 4 60
  gx g2 60 wait-disk xvda
  gx g2 30 dmesg 'persistent grants: disabled'
  gx g2 180 check xvda 2 4
  echo "${GX#md5=}" >/tmp/g2.md5
  gx g2 30 errors
}

sc_reboot_g2() { # the frontend closes and comes back: the backend reconnects
  local d0 d1 i=0; d0=$(domid g2)
  xl reboot g2 || fail "xl reboot failed"
  until d1=$(domid g2) && [ "$d1" != "$d0" ]; do
    i=$((i+1)); [ $i -gt 600 ] && fail "g2 did not come back"
    sleep 0.2
  done
  guest_ready g2
  wait_key "$(be_path g2 51712)/state" 4 60
  gx g2 60 wait-disk xvda
  gx g2 120 verify xvda 2 4 "$(cat /tmp/g2.md5)"
  gx g2 120 check xvda 10 2
  xenstore-exists /local/domain/0/backend/vbd/$d0 2>/dev/null && fail "the old domain's backend is still there"
  true
}

sc_hostile() { # a guest writes garbage ring keys: that disk closes with the reason, nothing else notices
  local be fe
  guest_ensure g2; guest_ensure g1
  xl block-attach g2 "$DISK, vdev=xvdb, target=aio:/images/hostile.raw" || fail "xl block-attach failed"
  be=$(be_path g2 51728); fe=$(fe_path g2 51728)
  wait_key $be/state 4 60
  gx g2 60 wait-disk xvdb
  gx g2 30 unbind vbd-51728
  wait_key $fe/state 6 30
  wait_key $be/state 6 30
  # A reconnect as the protocol has it (Closed -> Initialising: the backend
  # goes InitWait), then garbage where a frontend publishes its ring.
  gx g2 10 xs-write device/vbd/51728/state 1
  wait_key $be/state 2 30
  gx g2 10 xs-write device/vbd/51728/ring-ref garbage device/vbd/51728/event-channel bogus device/vbd/51728/protocol x86_99-abi
  gx g2 10 xs-write device/vbd/51728/state 3
  local i=0
  until [ "$(xsr $be/state)" = 5 ]; do
    i=$((i+1)); [ $i -gt 150 ] && fail "backend state $(xsr $be/state) 30 s after garbage keys; want Closing"
    sleep 0.2
  done
  local err; err=$(xsr $be/blktap/error)
  [ -n "$err" ] || fail "no blktap/error after garbage keys"
  echo "INFO hostile frontend: backend state $(xsr $be/state), error: $err"
  gx g2 120 check xvda 12 2
  gx g1 120 check xvda 12 2
  xl block-detach g2 xvdb >/dev/null 2>&1 || true
}

sc_destroy_g2() { # no zombie, no worker, the image flushed and clean
  local d; d=$(domid g2)
  xl destroy g2 || fail "xl destroy failed"
  local i=0
  while xl list | awk 'NR > 1 {print $2}' | grep -qx "$d"; do
    i=$((i+1)); [ $i -gt 150 ] && fail "domain $d still listed 30 s after xl destroy: $(xl list | tail -n +2 | tr -s ' ' | tr '\n' ';')"
    sleep 0.2
  done
  wait_gone /local/domain/0/backend/vbd/$d 30
  blktap ls 2>/dev/null | awk '{print $2}' | grep -qx "$d" && fail "blktap ls still lists domain $d"
  qemu-img check -q /images/g2.qcow2 || fail "qemu-img check g2.qcow2: $(qemu-img check /images/g2.qcow2 2>&1 | tail -n 1)"
  [ "$(image_md5 /images/g2.qcow2 qcow2 2 4)" = "$(cat /tmp/g2.md5)" ] || fail "DATA MISMATCH in g2.qcow2"
}

sc_shutdown_g1() { # xl shutdown: the guest closes its frontends, libxl removes the backends
  local d; d=$(domid g1)
  timeout 120 xl shutdown -w g1 || fail "xl shutdown -w g1 failed"
  wait_gone /local/domain/0/backend/vbd/$d 30
  [ "$(image_md5 /images/g1.raw raw 1 4)" = "$(cat /tmp/g1.md5)" ] || fail "DATA MISMATCH in g1.raw"
  local left; left=$(blktap ls 2>/dev/null | tail -n +2)
  [ -z "$left" ] || fail "devices left after every guest is gone: $left"
}

. /xt/scenarios-tap.sh   # Xen >= 4.19: backendtype=tap (tap_plan, tap_run)
[ ! -f /xt/scenarios-pkg.sh ] || . /xt/scenarios-pkg.sh   # the packaged daemon (pkg_plan, pkg_run)

[ "${1:-}" = --functions ] && return 0

# ---- this boot --------------------------------------------------------------
xt_plan images boot-g1 attach-qcow2 attach-qcow attach-vhd attach-vhd-diff attach-vmdk attach-ram \
  attach-qcow2-overlay kill-worker restart-daemon hotplug-error blktap-attach dom0-attach \
  $(tap_plan) boot-g2-nopersist reboot-g2 hostile-frontend destroy-g2 shutdown-g1 \
  $(type pkg_plan >/dev/null 2>&1 && pkg_plan)
daemon_start
xt_info "daemon: $(blktap --version 2>/dev/null || echo unknown version)"
# After a failure, take away whatever the scenario left attached, so the
# next one starts from the same guests.
xt_cleanup() {
  local g id
  for g in g1 g2 gp; do
    domid $g >/dev/null || continue
    for id in $(xl block-list $g 2>/dev/null | awk 'NR > 1 && $1 != 51712 {print $1}'); do
      timeout 60 xl block-detach $g $id >/dev/null 2>&1
    done
  done
  for id in $(xl block-list 0 2>/dev/null | awk 'NR > 1 {print $1}'); do
    timeout 60 xl block-detach 0 $id >/dev/null 2>&1
  done
}

xt_run images 60 sc_images
xt_run boot-g1 300 sc_boot_g1
xt_run attach-qcow2 180 sc_attach_format qcow2 a.qcow2
xt_run attach-qcow 180 sc_attach_format qcow a.qcow
xt_run attach-vhd 180 sc_attach_format vhd a.vhd
xt_run attach-vhd-diff 180 sc_attach_vhd_diff
xt_run attach-vmdk 180 sc_attach_format vmdk a.vmdk
xt_run attach-ram 180 sc_attach_ram
xt_run attach-qcow2-overlay 180 sc_attach_overlay
xt_run kill-worker 480 sc_kill_worker
xt_run restart-daemon 480 sc_restart_daemon
xt_run hotplug-error 150 sc_hotplug_error
xt_run blktap-attach 180 sc_blktap_attach
xt_run dom0-attach 200 sc_dom0_attach
tap_run
xt_run boot-g2-nopersist 300 sc_boot_g2
xt_run reboot-g2 300 sc_reboot_g2
xt_run hostile-frontend 180 sc_hostile
xt_run destroy-g2 120 sc_destroy_g2
xt_run shutdown-g1 180 sc_shutdown_g1
type pkg_run >/dev/null 2>&1 && pkg_run
