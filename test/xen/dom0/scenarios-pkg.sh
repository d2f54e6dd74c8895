# The packaged daemon (sourced by init, which runs pkg_install before the
# scenarios, and by scenarios.sh). run.sh puts /xt/pkg/blktap.deb (make
# deb of this tree), /xt/pkg/blktap-prev.deb (the previous version) and
# dpkg in the image; dom0 has no systemd, so /usr/bin/systemctl is the
# harness's stand-in (test/xen/systemctl), which runs the installed unit:
# its ExecStart/ExecStop, Type=notify, KillMode=process, Restart=. Every
# scenario of the boot then runs against that daemon (lib.sh's daemon_start
# is `systemctl start blktap`). These scenarios come last: the last one
# removes the package.
#
# The previous version is `make deb` of commit 9bc94c0 (XEN_TEST_PREV_COMMIT),
# stamped VERSION~gitCOMMIT: no version was ever released before 0.1.0, and
# 9bc94c0 is the first commit whose package serves libxl's block-blktap
# disks (the unit's --serve-vbd); its daemon is the one before the last
# daemon change on main. pkg-upgrade first installs it over the current one
# (a downgrade, so the old daemon adopts this boot's workers), attaches a
# disk under it, then upgrades to the current package during guest I/O.

PKG_GUEST=gp
PKG_UNIT=blktap.service

pkg_enabled() { [ -f /xt/pkg/blktap.deb ]; }
# pkg_systemd: systemd is PID 1 (the XEN_TEST_SYSTEMD boot), not the stand-in
pkg_systemd() { [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; }
# pkg_ready: how long the unit's last start took from exec to the daemon's
# READY=1 (systemd's own timestamps: ExecMainStart -> ActiveEnter)
pkg_ready() {
  systemctl show -p ExecMainStartTimestampMonotonic -p ActiveEnterTimestampMonotonic $PKG_UNIT |
    awk -F= '{v[$1] = $2} END {printf "READY %.2f s after exec", (v["ActiveEnterTimestampMonotonic"] - v["ExecMainStartTimestampMonotonic"]) / 1e6}'
}
pkg_plan() { pkg_enabled && echo pkg-install pkg-hotplug-nodaemon pkg-restart-io pkg-upgrade pkg-remove; }

# pkg_log FILE: a transcript's lines as XT-INFO on the console (init) or
# INFO in a scenario's log (forwarded by xt_run)
pkg_log() { sed "s/^/${XT_PKG_PREFIX:-INFO} pkg: /" "$1"; }

# pkg_dpkg ARGS...: dpkg with its transcript (command, output, status,
# seconds) kept in /var/log/xt/pkg-transcript.log and shown
pkg_dpkg() {
  local t0 t1 rc log=/tmp/dpkg.$$.log
  t0=$(up)
  dpkg "$@" >$log 2>&1; rc=$?
  t1=$(up)
  {
    echo "# dpkg $*"
    sed 's/^/    /' $log
    echo "  -> exit $rc in $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b-a}') s"
  } >/tmp/dpkg.$$.t
  cat /tmp/dpkg.$$.t >>/var/log/xt/pkg-transcript.log
  pkg_log /tmp/dpkg.$$.t
  rm -f $log /tmp/dpkg.$$.t
  return $rc
}

# pkg_install: at boot, before any scenario: a drop-in for the harness's
# paths (what `systemctl edit blktap` makes on a host), then dpkg -i, whose
# postinst starts the unit.
pkg_install() {
  mkdir -p /etc/systemd/system/$PKG_UNIT.d /run/systemd/system /var/log/xt
  cat >/etc/systemd/system/$PKG_UNIT.d/xt.conf <<EOF
[Service]
ExecStart=
ExecStart=/usr/sbin/blktap run $BLKTAP_ARGS
EOF
  if pkg_systemd; then
    xt_info "pkg: the unit runs under systemd as PID 1 ($(systemctl --version | head -n 1))"
  else
    xt_info "pkg: the unit runs under the harness's systemctl stand-in (test/xen/systemctl), not systemd: dom0 is an initramfs without it"
  fi
  XT_PKG_PREFIX=XT-INFO pkg_dpkg -i /xt/pkg/blktap.deb || xt_info "pkg: dpkg -i failed"
  xt_info "pkg: systemctl is-active $PKG_UNIT: $(systemctl is-active $PKG_UNIT 2>&1); $(systemctl show -p MainPID $PKG_UNIT); $(blktap --version 2>&1 | head -n 1)"
  if pkg_systemd; then xt_info "pkg: $PKG_UNIT $(pkg_ready); is-enabled: $(systemctl is-enabled $PKG_UNIT 2>&1)"; fi
}

# pkg_worker BE: the worker pid serving that backend
pkg_worker() { xsr "$1/blktap/worker-pid"; }
main_pid() { systemctl show -p MainPID $PKG_UNIT | sed 's/^MainPID=//'; }

# pkg_guest: the guest of these scenarios, with xvda on pkg-a.raw
pkg_guest() {
  domid $PKG_GUEST >/dev/null && { guest_ready $PKG_GUEST; return; }
  [ -f /images/pkg-a.raw ] || truncate -s 64M /images/pkg-a.raw
  [ -f /images/pkg-b.raw ] || truncate -s 64M /images/pkg-b.raw
  guest_create $PKG_GUEST 1 "" "$DISK, vdev=xvda, target=aio:/images/pkg-a.raw"
  wait_key "$(be_path $PKG_GUEST 51712)/state" 4 60
  gx $PKG_GUEST 60 wait-disk xvda
}

# pkg_bgio VDEV: start the guest's write/read-back loop and return once a
# round has completed, so what follows lands inside the I/O
pkg_bgio() {
  gx $PKG_GUEST 30 bgio-start $1 0 4 24
  local t0; t0=$(up)
  until gx_try $PKG_GUEST 20 bgio-progress >/dev/null && [ "${GX#round }" != "$GX" ]; do
    elapsed "$t0" 60 && fail "background I/O made no progress"
    sleep 0.3
  done
  local at=${GX#round }; at=${at%% *}
  [ "$at" -lt 24 ] || fail "the guest's I/O ended before the step under test (round $at)"
}
# pkg_bgio_end VDEV IMAGE OFF: the loop passed, no kernel I/O error, and a
# last write reads back in the guest and from the image in dom0
pkg_bgio_end() {
  gx $PKG_GUEST 400 bgio-wait 390
  echo "INFO guest I/O: $GX"
  gx $PKG_GUEST 30 errors
  gx $PKG_GUEST 120 check $1 $3 4
  local md5=${GX#md5=} got; got=$(image_md5 /images/$2 raw $3 4)
  [ "$got" = "$md5" ] || fail "DATA MISMATCH: the guest wrote $md5, /images/$2 holds $got"
}

sc_pkg_install() { # the package as dpkg sees it, and the daemon its unit runs
  local st; st=$(dpkg-query -W -f '${Status} ${Version}' blktap 2>&1)
  [ "${st#install ok installed }" != "$st" ] || fail "dpkg-query: '$st'"
  [ "$(systemctl is-active $PKG_UNIT)" = active ] || fail "$PKG_UNIT is $(systemctl is-active $PKG_UNIT)"
  local pid; pid=$(main_pid)
  [ -n "$pid" ] && [ "$pid" != 0 ] || fail "no MainPID"
  [ "$pid" = "$(daemon_pid)" ] || fail "the unit's MainPID $pid is not the daemon $(daemon_pid)"
  [ "$(readlink /proc/$pid/exe)" = /usr/sbin/blktap ] || fail "the daemon runs $(readlink /proc/$pid/exe), not the packaged /usr/sbin/blktap"
  tr '\0' ' ' </proc/$pid/cmdline | grep -q -- '--serve-vbd' || fail "the daemon was not started from the unit's ExecStart"
  local f
  for f in /usr/sbin/blktap /usr/sbin/tap-ctl /lib/systemd/system/blktap.service /etc/xen/scripts/block-blktap \
           /usr/share/man/man8/blktap.8.gz /etc/blktap/disks.yaml; do
    dpkg -L blktap | grep -qx "$f" || fail "dpkg -L blktap does not list $f"
    [ -e "$f" ] || fail "$f is missing"
  done
  echo "INFO $st, daemon $pid ($(blktap --version | head -n 1))"
  if pkg_systemd; then
    [ "$(systemctl is-enabled $PKG_UNIT)" = enabled ] || fail "$PKG_UNIT is $(systemctl is-enabled $PKG_UNIT), want enabled by the postinst"
    echo "INFO $PKG_UNIT $(pkg_ready)"
    systemctl status --no-pager --lines=5 $PKG_UNIT 2>&1 | sed 's/^/INFO systemctl status: /'
  fi
  dpkg-deb -c /xt/pkg/blktap.deb | awk '{print "INFO dpkg -c: " $1 " " $6 ($7 ? " " $7 " " $8 : "")}'
  pkg_log /var/log/xt/pkg-transcript.log
}

sc_pkg_hotplug_nodaemon() { # the hotplug script exits non-zero within 5 s, naming the socket
  local be=/local/domain/0/backend/vbd/77/51712 sock=/run/blktap/blktap.sock
  local t0 t1 rc out
  pkg_hotplug_try() { # WHY MAX_SECONDS
    t0=$(up)
    out=$(XENBUS_PATH=$be timeout 60 /etc/xen/scripts/block-blktap add 2>&1); rc=$?
    t1=$(up)
    local s; s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b-a}')
    echo "INFO $1: exit $rc after $s s: $out"
    [ $rc != 0 ] || fail "$1: block-blktap add succeeded"
    [ $rc != 124 ] || fail "$1: block-blktap add still running after 60 s"
    echo "$out" | grep -qF "$sock" || fail "$1: the error does not name $sock: $out"
    awk -v s="$s" -v m="$2" 'BEGIN {exit !(s <= m)}' || fail "$1: block-blktap add took $s s, want at most $2"
  }
  systemctl stop $PKG_UNIT || fail "systemctl stop failed"
  [ -z "$(daemon_pid)" ] || fail "daemon $(daemon_pid) still running after systemctl stop"
  pkg_hotplug_try "daemon stopped" 5
  systemctl start $PKG_UNIT || fail "systemctl start failed"
  # A daemon that accepts but never answers (stopped by SIGSTOP) is not an
  # unreachable one: a busy daemon under this emulation took over 5 s to
  # answer, so it gets add's timeout (30 s), then the failure names it.
  local pid; pid=$(main_pid)
  trap 'kill -CONT $pid' EXIT   # fail exits: never leave the daemon stopped
  kill -STOP "$pid"
  pkg_hotplug_try "daemon not answering" 40
  kill -CONT "$pid"
  blktap ls >/dev/null || fail "the daemon does not answer after SIGCONT"
}

sc_pkg_restart_io() { # systemctl restart while the guest writes and reads back
  pkg_guest
  local be pid0 w0 t0 t1; be=$(be_path $PKG_GUEST 51712)
  pid0=$(main_pid); w0=$(pkg_worker $be)
  pkg_bgio xvda
  t0=$(up)
  systemctl restart $PKG_UNIT || fail "systemctl restart failed: $(tail -n 3 /var/log/blktap.log)"
  t1=$(up)
  local pid1; pid1=$(main_pid)
  echo "INFO systemctl restart during guest I/O ($GX): $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b-a}') s, daemon $pid0 -> $pid1"
  if pkg_systemd; then
    echo "INFO after the restart: $PKG_UNIT $(pkg_ready)"
    systemctl status --no-pager --lines=0 $PKG_UNIT 2>&1 | sed 's/^/INFO systemctl status: /'
  fi
  [ -n "$pid1" ] && [ "$pid1" != "$pid0" ] || fail "the daemon was not restarted (MainPID $pid0 -> '$pid1')"
  [ "$(pkg_worker $be)" = "$w0" ] || fail "the worker changed: $w0 -> $(pkg_worker $be) (KillMode=process should keep it)"
  pkg_bgio_end xvda pkg-a.raw 8
  [ "$(xsr $be/state)" = 4 ] || fail "backend state $(xsr $be/state) after the restart"
}

sc_pkg_upgrade() { # previous version -> a disk attached under it -> upgrade during guest I/O
  pkg_guest
  local bea beb wa wb pid0 pid1 v0 v1; bea=$(be_path $PKG_GUEST 51712); beb=$(be_path $PKG_GUEST 51728)
  wa=$(pkg_worker $bea)
  gx $PKG_GUEST 120 check xvda 12 4; local md5a=${GX#md5=}
  pkg_dpkg -i /xt/pkg/blktap-prev.deb || fail "dpkg -i blktap-prev.deb failed"
  v0=$(dpkg-query -W -f '${Version}' blktap)
  pid0=$(main_pid)
  [ "$(systemctl is-active $PKG_UNIT)" = active ] || fail "the previous version's daemon is not active"
  echo "INFO previous version $v0: daemon $pid0, $(/proc/$pid0/exe --version 2>&1 | head -n 1)"
  [ "$(pkg_worker $bea)" = "$wa" ] || fail "installing the previous version replaced xvda's worker"
  # a disk attached under the previous version. Its block-blktap gives the
  # daemon 5 s to answer, which a busy daemon under TCG missed once: one
  # more try then, said as INFO (what this scenario tests is the upgrade).
  if ! xl block-attach $PKG_GUEST "$DISK, vdev=xvdb, target=aio:/images/pkg-b.raw" >/tmp/attach.$$ 2>&1; then
    grep -q 'not answering' /tmp/attach.$$ || fail "xl block-attach under $v0 failed: $(tail -n 3 /tmp/attach.$$ | tr '\n' ' ')"
    echo "INFO xl block-attach under $v0, first try: $(grep -m1 'not answering' /tmp/attach.$$)"
    timeout 60 xl block-detach $PKG_GUEST xvdb >/dev/null 2>&1
    wait_gone $beb 60
    xl block-attach $PKG_GUEST "$DISK, vdev=xvdb, target=aio:/images/pkg-b.raw" || fail "xl block-attach under $v0 failed twice"
  fi
  wait_key $beb/state 4 60
  gx $PKG_GUEST 60 wait-disk xvdb
  wb=$(pkg_worker $beb)
  pkg_bgio xvdb
  pkg_dpkg -i /xt/pkg/blktap.deb || fail "dpkg -i blktap.deb (the upgrade) failed"
  v1=$(dpkg-query -W -f '${Version}' blktap); pid1=$(main_pid)
  echo "INFO upgraded $v0 -> $v1 during guest I/O: daemon $pid0 -> $pid1 ($(blktap --version | head -n 1))"
  [ "$pid1" != "$pid0" ] || fail "the upgrade did not restart the daemon"
  [ "$(systemctl is-active $PKG_UNIT)" = active ] || fail "$PKG_UNIT is $(systemctl is-active $PKG_UNIT) after the upgrade"
  [ "$(pkg_worker $bea)" = "$wa" ] && [ "$(pkg_worker $beb)" = "$wb" ] ||
    fail "workers replaced by the upgrade: xvda $wa -> $(pkg_worker $bea), xvdb $wb -> $(pkg_worker $beb)"
  pkg_bgio_end xvdb pkg-b.raw 8
  gx $PKG_GUEST 120 verify xvda 12 4 "$md5a"
  # a disk attached under the new version still works too
  timeout 120 xl block-detach $PKG_GUEST xvdb || fail "xl block-detach after the upgrade failed"
  gx $PKG_GUEST 60 gone-disk xvdb
  wait_gone $beb 30
}

sc_pkg_remove() { # dpkg -r while the guest runs: its disks work until detached, then the daemon goes
  pkg_guest
  # this package's maintainer scripts, whatever pkg-upgrade left
  [ "$(dpkg-query -W -f '${Version}' blktap 2>/dev/null)" = "$(dpkg-deb -f /xt/pkg/blktap.deb Version)" ] ||
    pkg_dpkg -i /xt/pkg/blktap.deb || fail "dpkg -i blktap.deb failed"
  local bea beb pid d w; bea=$(be_path $PKG_GUEST 51712); beb=$(be_path $PKG_GUEST 51728)
  xl block-attach $PKG_GUEST "$DISK, vdev=xvdb, target=aio:/images/pkg-b.raw" || fail "xl block-attach failed"
  wait_key $beb/state 4 60
  gx $PKG_GUEST 60 wait-disk xvdb
  pid=$(main_pid)
  pkg_bgio xvdb
  pkg_dpkg -r blktap || fail "dpkg -r blktap failed"
  [ ! -e /usr/sbin/blktap ] || fail "/usr/sbin/blktap is still there after dpkg -r"
  kill -0 "$pid" 2>/dev/null || fail "the daemon $pid stopped although guests' disks are attached"
  echo "INFO after dpkg -r: daemon $pid runs $(readlink /proc/$pid/exe); dpkg-query: $(dpkg-query -W -f '${Status}' blktap 2>&1)"
  pkg_bgio_end xvdb pkg-b.raw 16
  gx $PKG_GUEST 120 check xvda 20 4
  [ "$(image_md5 /images/pkg-a.raw raw 20 4)" = "${GX#md5=}" ] || fail "DATA MISMATCH in pkg-a.raw after dpkg -r"
  # detach: still the daemon's work
  local t0; t0=$(up)
  timeout 120 xl block-detach $PKG_GUEST xvdb || fail "xl block-detach after dpkg -r failed: $(tail -n 3 /var/log/xen/xen-hotplug.log 2>/dev/null | tr '\n' ' ')"
  gx $PKG_GUEST 60 gone-disk xvdb
  wait_gone $beb 30
  echo "INFO xl block-detach after dpkg -r: $(awk -v a="$t0" -v b="$(up)" 'BEGIN {printf "%.1f", b-a}') s"
  kill -0 "$pid" 2>/dev/null || fail "the daemon exited while xvda is still attached"
  # the last disk goes with the guest: then the daemon exits
  d=$(domid $PKG_GUEST)
  timeout 120 xl shutdown -w $PKG_GUEST || fail "xl shutdown -w $PKG_GUEST failed"
  wait_gone /local/domain/0/backend/vbd/$d 30
  t0=$(up)
  while kill -0 "$pid" 2>/dev/null; do
    elapsed "$t0" 30 && fail "daemon $pid still running 30 s after its last disk was detached"
    sleep 0.5
  done
  echo "INFO the daemon exited $(awk -v a="$t0" -v b="$(up)" 'BEGIN {printf "%.1f", b-a}') s after the last detach; unit: $(systemctl is-active $PKG_UNIT)"
  w=$(ps -o pid,args | awk '$2 ~ /blktap/ {print $1}' | tr '\n' ' ')
  [ -z "$w" ] || fail "blktap processes left after every disk is gone: $w"
}

# pkg_run: the xt_run lines, for scenarios.sh's list (the last ones: the
# package is removed by pkg-remove)
pkg_run() {
  pkg_enabled || return 0
  xt_run pkg-install 60 sc_pkg_install
  xt_run pkg-hotplug-nodaemon 120 sc_pkg_hotplug_nodaemon
  # Under TCG with the host shared, one systemctl restart took 104 s (the
  # new daemon's READY waits up to 60 s for convergence) and 24 rounds of
  # guest I/O 300 s: 600 s was not enough.
  xt_run pkg-restart-io 1200 sc_pkg_restart_io
  xt_run pkg-upgrade 1500 sc_pkg_upgrade
  xt_run pkg-remove 1500 sc_pkg_remove
  domid $PKG_GUEST >/dev/null && timeout 60 xl destroy $PKG_GUEST >/dev/null 2>&1   # left by a failure
  true
}
