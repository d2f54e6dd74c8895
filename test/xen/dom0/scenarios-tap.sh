# The Xen >= 4.19 route (sourced by scenarios.sh, functions only): libxl's
# own `backendtype=tap` disks. libxl writes backend/vbd3/D/N, waits for the
# backend's InitWait and runs the stock /etc/xen/scripts/block-tap, which
# drives our tap-ctl (the blktap binary under that name, docs/TAP-CTL.md);
# the daemon serves the disk. Xen 4.17's libxl has no tap backend at all
# ("backend tap unsuitable because blktap not available"), so these
# scenarios are planned only where xl says 4.19 or later (tap_plan).

TAP="backendtype=tap, access=rw"

# tap_supported: libxl of this boot has the vbd3 backend (Xen 4.19+)
tap_supported() {
  local v; v=$(xl info 2>/dev/null | awk '/^xen_version/ {print $3}')
  local maj=${v%%.*} min=${v#*.}; min=${min%%.*}
  [ -n "$maj" ] && { [ "$maj" -gt 4 ] || { [ "$maj" = 4 ] && [ "${min:-0}" -ge 19 ]; }; }
}
# tap_plan: the names to add to xt_plan on this boot
tap_plan() { tap_supported && echo tap-raw tap-vhd tap-boot-g3; }

# tap_check_backend BE: what block-tap and libxl leave on a connected vbd3 disk
tap_check_backend() {
  local be=$1 fe; fe=$(xsr $be/frontend)
  [ "$(xsr $be/type)" = vbd3 ] || fail "$be/type is '$(xsr $be/type)', want vbd3"
  [ "$(xsr $be/hotplug-status)" = connected ] || fail "hotplug-status is '$(xsr $be/hotplug-status)' ($(xsr $be/hotplug-error))"
  [ "$(xsr $fe/backend)" = "$be" ] || fail "the frontend's backend is '$(xsr $fe/backend)', want $be"
  local pid minor pdp; pid=$(xsr $be/pid) minor=$(xsr $be/minor) pdp=$(xsr $be/physical-device-path)
  [ -n "$pid" ] && [ -n "$minor" ] || fail "block-tap wrote no pid/minor (pid='$pid' minor='$minor')"
  [ "$pdp" = "/run/blktap-control/nbd$pid.$minor" ] || fail "physical-device-path is '$pdp'"
  [ "$pid" = "$(xsr $be/blktap/worker-pid)" ] || fail "block-tap's pid $pid is not the worker's $(xsr $be/blktap/worker-pid)"
  echo "INFO $be: params=$(xsr $be/params) pid=$pid minor=$minor; tap-ctl list: $(tap-ctl list 2>&1 | tr '\n' ';')"
}

# tap_attach_check GUEST VDEV FORMAT FILE: hot attach with backendtype=tap,
# the guest's data check (O_DIRECT write and read back), detach, and the
# image read back by qemu-img
tap_attach_check() {
  local g=$1 vdev=$2 fmt=$3 f=$4 be t0 t1 t2 t3; t0=$(up)
  timeout 150 xl block-attach $g "$TAP, format=$fmt, vdev=$vdev, target=$f" ||
    fail "xl block-attach $g format=$fmt $f failed: $(tail -n 3 /var/log/xen/xen-hotplug.log 2>/dev/null | tr '\n' ' ')"
  be=$(be_path $g $(vdevnum $vdev) vbd3)
  wait_key $be/state 4 60
  t1=$(up)
  tap_check_backend $be
  gx $g 60 wait-disk $vdev
  gx $g 120 check $vdev 3 4
  MD5=${GX#md5=}
  gx $g 30 errors
  t2=$(up)
  timeout 150 xl block-detach $g $vdev || fail "xl block-detach $g $vdev failed"
  gx $g 60 gone-disk $vdev
  wait_gone $be 30
  t3=$(up)
  local t_detach; t_detach=$(awk -v a=$t2 -v b=$t3 'BEGIN {print int(b-a)}')
  if [ "$t_detach" -ge 15 ]; then   # what a slow detach waited for
    echo "INFO slow detach, xen-hotplug.log: $(tail -n 6 /var/log/xen/xen-hotplug.log 2>/dev/null | tr '\n' '|')"
    echo "INFO slow detach, daemon: $(grep -F "vbd3/$(domid $g)/$(vdevnum $vdev)" /var/log/blktap.log | tail -n 4 | sed 's/^time=[^ ]* //' | tr '\n' '|')"
  fi
  echo "INFO seconds: attach $(awk -v a=$t0 -v b=$t1 'BEGIN {print b-a}'), guest I/O $(awk -v a=$t1 -v b=$t2 'BEGIN {print b-a}'), detach $(awk -v a=$t2 -v b=$t3 'BEGIN {print b-a}')"
  local left; left=$(tap-ctl list 2>/dev/null | grep -F "$f")
  [ -z "$left" ] || fail "tap-ctl still lists $f after the detach: $left"
  if grep -iE 'error|fail' /var/log/xen/xen-hotplug.log >/tmp/hotplug-err.$$ 2>/dev/null; then
    echo "INFO xen-hotplug.log: $(tail -n 3 /tmp/hotplug-err.$$ | tr '\n' ' ')"
  fi
  local got; got=$(image_md5 $f $( [ $fmt = vhd ] && echo vhd || echo raw ) 3 4)
  [ "$got" = "$MD5" ] || fail "DATA MISMATCH: the guest wrote $MD5, the image holds $got"
}

sc_tap_raw() {
  truncate -s 64M /images/tap.raw || fail "truncate"
  tap_attach_check g1 xvdg raw /images/tap.raw
}

sc_tap_vhd() { # a dynamic VHD made by qemu-img, read back by qemu-img
  qemu-img create -q -f vpc -o subformat=dynamic /images/tap.vhd 64M || fail "qemu-img create vpc"
  tap_attach_check g1 xvdg vhd /images/tap.vhd
  blktap image check /images/tap.vhd >/dev/null || fail "blktap image check tap.vhd: $(blktap image check /images/tap.vhd 2>&1 | tail -n 1)"
}

sc_tap_boot_g3() { # xl create with a backendtype=tap boot disk, then an orderly shutdown
  domid g3 >/dev/null && { timeout 60 xl destroy g3; sleep 2; }   # a first attempt's guest
  truncate -s 64M /images/g3.raw || fail "truncate"
  guest_create g3 1 "" "$TAP, format=raw, vdev=xvda, target=/images/g3.raw"
  local be; be=$(be_path g3 51712 vbd3)
  wait_key $be/state 4 60
  tap_check_backend $be
  gx g3 60 wait-disk xvda
  gx g3 120 check xvda 1 4
  local md5=${GX#md5=} d; d=$(domid g3)
  gx g3 30 errors
  timeout 120 xl shutdown -w g3 || fail "xl shutdown -w g3 failed"
  wait_gone /local/domain/0/backend/vbd3/$d 30
  [ "$(image_md5 /images/g3.raw raw 1 4)" = "$md5" ] || fail "DATA MISMATCH in g3.raw"
  local left; left=$(tap-ctl list 2>/dev/null | grep -F /images/g3.raw)
  [ -z "$left" ] || fail "tap-ctl still lists g3.raw after the shutdown: $left"
}

# tap_run: the xt_run lines, for scenarios.sh's list (g1 must be running)
tap_run() {
  tap_supported || return 0
  xt_run tap-raw 240 sc_tap_raw
  xt_run tap-vhd 240 sc_tap_vhd
  xt_run tap-boot-g3 360 sc_tap_boot_g3
  domid g3 >/dev/null && timeout 60 xl destroy g3 >/dev/null 2>&1   # left by a failure
  true
}
