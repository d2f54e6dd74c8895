# Scenario runner and helpers for the real-Xen harness, sourced by dom0's
# init. The host's verdict comes from these lines on the serial console:
#   XT-PLAN name...            the scenarios this boot will run, in order
#   XT-START name              a scenario begins
#   XT-PASS name SECONDS       it passed
#   XT-FAIL name: reason       it failed (its log and the daemon's follow)
#   XT-RETRY name: reason      it failed outside the code under test (a
#                              segfault of a C tool under TCG) and runs once more
#   XT-INFO text               a fact worth keeping (timings, versions)
#   XT-DONE                    dom0 finished; it powers off next
# A scenario is a shell function run in its own bash under `timeout`; it
# fails by exiting non-zero, with its last line of output as the reason.

XT_ONLY=$(sed -n 's/.*xt_only=\([^ ]*\).*/\1/p' /proc/cmdline)
XT_SKIP=$(sed -n 's/.*xt_skip=\([^ ]*\).*/\1/p' /proc/cmdline)
XT_LOGS=/var/log/xt; mkdir -p $XT_LOGS

up() { cut -d' ' -f1 /proc/uptime; }
xt_info() { echo "XT-INFO $*"; }
say() { echo "$*"; }                 # into the scenario's log
fail() { echo "$*"; exit 1; }

# run.sh joins names with +
xt_selected() { [[ "+$XT_SKIP+" != *"+$1+"* ]] && { [ -z "$XT_ONLY" ] || [[ "+$XT_ONLY+" == *"+$1+"* ]]; }; }

XT_PLANNED=()
xt_plan() { # NAME...: announce what runs, so a crash cannot hide a scenario
  local n; for n in "$@"; do xt_selected "$n" && XT_PLANNED+=("$n"); done
  echo "XT-PLAN ${XT_PLANNED[*]}"
}

# xt_run NAME TIMEOUT FUNCTION [ARGS...]
xt_run() {
  local name=$1 tmo=$2; shift 2
  xt_selected "$name" || return 0
  local attempt log t0 t1 rc reason
  for attempt in 1 2; do
    log=$XT_LOGS/$name.$attempt.log
    local segv0; segv0=$(segfaults)
    echo "XT-START $name"
    touch "$log.start"
    t0=$(up)
    timeout -s KILL "$tmo" bash -c '. /xt/lib.sh; . /xt/scenarios.sh --functions; "$@"' xt "$@" >"$log" 2>&1
    rc=$?
    t1=$(up)
    # xs_until's watchers, when the timeout killed the scenario's shell
    pkill -x xenstore-watch 2>/dev/null
    cpu_report "$name"
    if [ $rc = 0 ]; then
      grep '^INFO ' "$log" | sed "s/^INFO /XT-INFO $name: /"
      echo "XT-PASS $name $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b-a}')"
      return 0
    fi
    reason=$(tail -n 1 "$log")
    [ $rc = 137 ] && reason="timed out after ${tmo}s (last: $reason)"
    # Under TCG short-lived C tools in dom0 and in guests now and then die
    # of SIGSEGV (see xen-in-qemu/README.md). A failure with such a death
    # during the scenario is retried once; a data mismatch never is.
    if [ $attempt = 1 ] && [ "$(segfaults)" != "$segv0" ] && ! grep -q 'DATA MISMATCH' "$log"; then
      echo "XT-RETRY $name: $reason"
      xt_dump "$name" "$log"
      xt_cleanup
      continue
    fi
    echo "XT-FAIL $name: $reason"
    xt_dump "$name" "$log"
    xt_cleanup
    return 1
  done
}

# cpu_report NAME: the CPU seconds each domain (xl list) and dom0's own
# daemon, workers and xenstored used since the last report. One vCPU under
# TCG is shared by dom0 and every guest: a scenario that runs slow names
# what took the CPU.
XT_CPU_LAST=/run/xt-cpu.last
cpu_snapshot() {
  timeout 20 xl list 2>/dev/null | awk 'NR > 1 {print "dom:" $1, $6}'
  local p c hz; hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
  for p in /proc/[0-9]*; do
    c=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
    case $c in
      *blktap-worker*|*"blktap __worker"*) c=workers ;;
      *"blktap run"*) c=daemon ;;
      xenstored*|*/xenstored*|oxenstored*) c=xenstored ;;
      *) continue ;;
    esac
    awk -v n="$c" -v hz="$hz" '{sub(/.*\) /, ""); print n, ($12 + $13) / hz}' "$p/stat" 2>/dev/null
  done | awk '{t[$1] += $2} END {for (n in t) print n, t[n]}'
}
cpu_report() {
  local now; now=$(cpu_snapshot)
  xt_info "$1: CPU seconds since the last report: $(
    { sed 's/^/old /' $XT_CPU_LAST 2>/dev/null; echo "$now" | sed 's/^/new /'; } | awk '
      $1 == "old" {o[$2] = $3; next}
      {d = $3 - o[$2]; if (d >= 0.5) {printf "%s%s %.1f", sep, $2, d; sep = ", "}}')"
  echo "$now" >$XT_CPU_LAST
}

xt_dump() { # NAME LOG: what a failure needs to be understood. Every step is
  # bounded: with xenstored gone, its clients fall back to /dev/xen/xenbus
  # and wait forever.
  local t="timeout 20"
  echo "---- $1: scenario log"; tail -n 80 "$2"
  echo "---- $1: daemon log (tail)"; tail -n 60 /var/log/blktap.log 2>/dev/null
  [ "$(cat /proc/1/comm 2>/dev/null)" != systemd ] || $t journalctl -u blktap.service -n 60 --no-pager 2>&1
  echo "---- $1: processes"; ps -o pid,stat,args 2>/dev/null | grep -E 'xenstored|xenconsoled|blktap|xl ' | grep -v grep
  echo "---- $1: xenstore backends"; $t xenstore-ls -f /local/domain/0/backend 2>&1 | grep -vE '/(feature-|discard-|sector-size|physical-sector|multi-queue-max|max-ring)' | head -n 80
  local f; for f in /var/log/xen/console/guest-*.log; do
    [ -f "$f" ] || continue
    echo "---- $1: $(basename "$f") (tail)"; tail -n 25 "$f"
  done
  for f in /var/log/xen/xl-*.log; do
    [ -f "$f" ] && [ "$f" -nt "$2.start" ] || continue
    echo "---- $1: $(basename "$f") (errors)"; grep -vE 'xc: detail|elf_|xc_dom_|domainbuilder' "$f" | grep -iE 'error|fail|abort|warn' | tail -n 15
  done
  echo "---- $1: dom0 kernel (tail)"; dmesg | tail -n 15
  echo "---- $1: xl dmesg (tail)"; $t xl dmesg 2>/dev/null | tail -n 10
  echo "---- $1: end"
}

xt_cleanup() { :; }   # scenarios.sh may replace it

# segfaults: how many programs died of SIGSEGV so far, in dom0 and in every
# guest's console (the kernel logs each).
segfaults() {
  { dmesg; cat /var/log/xen/console/guest-*.log 2>/dev/null; } | grep -c 'segfault at\|Segmentation fault'
}

xt_done() {
  echo "XT-DONE"
  sync
  poweroff -f
  sleep 600
}

# ---- the daemon -------------------------------------------------------------
BLKTAP_ARGS=${BLKTAP_ARGS:-"--state-dir /run/blktap --xenstore /run/xenstored/socket --image-dir /images --serve-vbd"}
daemon_start() {
  if [ -f /lib/systemd/system/blktap.service ]; then   # the package, under its unit (scenarios-pkg.sh)
    systemctl start blktap.service || fail "systemctl start blktap.service: $(tail -n 3 /var/log/blktap.log)"
    return
  fi
  # setsid: a scenario's timeout kills its process group, never the daemon
  setsid blktap run $BLKTAP_ARGS >>/var/log/blktap.log 2>&1 </dev/null &
  local t0; t0=$(up)
  until [ -S /run/blktap/blktap.sock ] && blktap ls >/dev/null 2>&1; do
    elapsed "$t0" 30 && fail "daemon did not start: $(tail -n 3 /var/log/blktap.log)"
    sleep 0.2
  done
}
# daemon_restart [ARGS...]: SIGTERM (workers and their rings stay), then a
# daemon with BLKTAP_ARGS plus ARGS. Under the package's unit the ARGS go
# in a drop-in read after the harness's own (xt.conf), removed when none.
daemon_restart() {
  if [ -f /lib/systemd/system/blktap.service ]; then
    local d=/etc/systemd/system/blktap.service.d
    if [ $# -gt 0 ]; then
      printf '[Service]\nExecStart=\nExecStart=/usr/sbin/blktap run %s %s\n' "$BLKTAP_ARGS" "$*" >$d/zz-args.conf
    else
      rm -f $d/zz-args.conf
    fi
    systemctl daemon-reload
    systemctl restart blktap.service || fail "systemctl restart blktap.service: $(tail -n 3 /var/log/blktap.log)"
    return
  fi
  local pid t0 args=$BLKTAP_ARGS; pid=$(daemon_pid); t0=$(up)
  [ -n "$pid" ] && kill "$pid"
  while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do
    elapsed "$t0" 30 && fail "daemon $pid did not exit on SIGTERM"
    sleep 0.2
  done
  BLKTAP_ARGS="$args $*"; daemon_start; BLKTAP_ARGS=$args
}
daemon_pid() { ps -o pid,args | awk '$2 ~ /blktap$/ && $3 == "run" {print $1; exit}'; }

# ---- xenstore ---------------------------------------------------------------
xsr() { xenstore-read "$1" 2>/dev/null; }
# Waits are measured in dom0's uptime, not in rounds: under TCG one round
# (a process or two) can take longer than its sleep.
# xs_until PATH SECONDS CMD...: until CMD succeeds, woken by a xenstore
# watch of PATH (an event when it is set, then one per change at or under
# PATH) instead of polling: under TCG a poll is a fork or two and a
# xenstored connection, five times a second for as long as a scenario
# waits, on a vCPU that dom0 shares with every guest. Returns 1 after
# SECONDS. A look every 2 s covers a watch that did not start.
xs_until() {
  local path=$1 tmo=$2; shift 2
  local t0 fd pid rc=1 st; t0=$(up)
  exec {fd}< <(exec xenstore-watch "$path" 2>/dev/null)
  pid=$!
  while :; do
    "$@" && { rc=0; break; }
    elapsed "$t0" "$tmo" && break
    read -r -t 2 -u "$fd" _; st=$?
    [ $st = 1 ] && sleep 0.5   # the watch ended: polls, slowly
  done
  kill "$pid" 2>/dev/null; exec {fd}<&-
  return $rc
}
key_is() { [ "$(xsr "$1")" = "$2" ]; }
key_absent() { ! xenstore-exists "$1" 2>/dev/null; }
wait_key() { # PATH VALUE SECONDS
  xs_until "$1" "$3" key_is "$1" "$2" || fail "$1 is '$(xsr "$1")' after $3 s, want '$2'"
}
lap() { # NAME: append "NAME=seconds since the last lap" to $LAPS (set LAP0=$(up) first)
  local t; t=$(up); LAPS="$LAPS $1=$(awk -v a="$LAP0" -v b="$t" 'BEGIN {printf "%.1f", b-a}')"; LAP0=$t
}
wait_blk() { # DEV SECONDS: a block device node appears
  local t0; t0=$(up)
  until [ -b "$1" ]; do
    elapsed "$t0" "$2" && fail "no $1 after $2 s"
    sleep 0.2
  done
}
wait_gone() { # PATH SECONDS
  xs_until "$1" "$2" key_absent "$1" || fail "$1 still exists after $2 s"
}

# ---- guests -----------------------------------------------------------------
# guest_create NAME VCPUS "BLKFRONT_ARGS" DISKSPEC...: a PV guest running
# the test initramfs; returns once it serves commands. XT_CREATE_TMO and
# XT_READY_TMO (240 and 150 s) bound xl create and the guest's boot.
guest_create() {
  local name=$1 vcpus=$2 bf=$3; shift 3
  local disks="" d
  for d in "$@"; do disks="$disks${disks:+, }'$d'"; done
  cat >/etc/xen/$name.cfg <<CFG
name = "$name"
type = "pv"
kernel = "/boot/vmlinuz"
ramdisk = "/boot/guest-initrd.cpio"
extra = "console=hvc0 rdinit=/init loglevel=4 blkfront_args=$bf"
memory = 160
vcpus = $vcpus
disk = [ $disks ]
on_poweroff = "destroy"
on_reboot = "restart"
on_crash = "destroy"
CFG
  timeout ${XT_CREATE_TMO:-240} xl create /etc/xen/$name.cfg >/var/log/xen/xl-create-$name.log 2>&1 ||
    fail "xl create $name failed: $(grep -iE 'error|fail' /var/log/xen/xl-create-$name.log | tail -n 2 | tr '\n' ' ')"
  guest_ready "$name"
}
guest_ready() { # NAME: wait until the guest's command loop runs
  local t0 d; t0=$(up)
  until d=$(xl domid "$1" 2>/dev/null); do
    elapsed "$t0" ${XT_READY_TMO:-150} && fail "guest $1 did not come up within ${XT_READY_TMO:-150} s"
    sleep 0.5
  done
  xs_until /local/domain/$d/data/ready ${XT_READY_TMO:-150} key_set /local/domain/$d/data/ready ||
    fail "guest $1 did not come up within ${XT_READY_TMO:-150} s"
}
key_set() { [ -n "$(xsr "$1")" ]; }
elapsed() { awk -v a="$1" -v b="$(up)" -v n="$2" 'BEGIN {exit !(b - a > n)}'; } # T0 SECONDS: more than SECONDS since T0
domid() { xl domid "$1" 2>/dev/null; }

# guest_ensure NAME: the guest runs (created again from its config if a
# flake took it down), and serves commands.
guest_ensure() {
  domid "$1" >/dev/null && { guest_ready "$1"; return; }
  echo "INFO guest $1 was gone: created again"
  timeout 240 xl create /etc/xen/$1.cfg >>/var/log/xen/xl-create-$1.log 2>&1 || fail "xl create $1 failed"
  guest_ready "$1"
}

# gx NAME SECONDS CMD ARGS...: run a command in the guest; its last line of
# output is left in GX; the scenario fails when the command fails in the guest.
XT_CMDID=0
gx() {
  local name=$1 tmo=$2; shift 2
  local d; d=$(domid "$name") || fail "guest $name is not running"
  # BASHPID: gx also runs in subshells (gx_try), whose counter restarts
  local id="$BASHPID.$((XT_CMDID += 1)).$RANDOM"
  xenstore-write /local/domain/$d/data/cmd "$id:$*"
  xs_until /local/domain/$d/data/result "$tmo" gx_answered "$d" "$id" ||
    fail "guest $name: '$*' did not answer within $tmo s"
  local r=${GX_R#*:}
  local rc=${r%%:*} out=${r#*:}
  say "guest $name: $* -> rc=$rc: $out"
  [ "$rc" = 0 ] || fail "guest $name: $*: $out"
  GX=$out
}

gx_answered() { GX_R=$(xsr /local/domain/$1/data/result); [ "${GX_R%%:*}" = "$2" ]; }

# be_path NAME VDEV-NUMBER [KIND]
be_path() { echo "/local/domain/0/backend/${3:-vbd}/$(domid "$1")/$2"; }
fe_path() { echo "/local/domain/$(domid "$1")/device/vbd/$2"; }

# vdev number of xvdX (Linux PV: 202 << 8 | index << 4)
vdevnum() { local c=${1#xvd}; printf '%d' $(( (202 << 8) | ( $(printf '%d' "'$c") - 97 ) << 4 )); }

# image_md5 FILE FORMAT OFF_MB LEN_MB: the bytes the guest wrote, read by an
# independent reader (qemu-img) where it knows the format.
image_md5() {
  local f=$1 fmt=$2 off=$3 len=$4 raw=/tmp/md5-$$.raw
  case $fmt in
    raw) raw=$f ;;
    qcow|qcow2|vmdk) qemu-img convert -f "$fmt" -O raw "$f" "$raw" || fail "qemu-img convert $f" ;;
    vhd) qemu-img convert -f vpc -O raw "$f" "$raw" || fail "qemu-img convert $f" ;;
    vhd-diff) blktap image convert -O raw "$f" "$raw" || fail "blktap image convert $f" ;;
  esac
  dd if="$raw" bs=1M skip="$off" count="$len" 2>/dev/null | md5sum | cut -d' ' -f1
  [ "$raw" = "$f" ] || rm -f "$raw"
}
