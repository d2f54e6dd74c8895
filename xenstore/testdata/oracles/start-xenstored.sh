#!/bin/sh
# Start a real Xen 4.17 xenstored (C or OCaml) with no hypervisor, for use as a
# test oracle over a unix socket. Needs: apt-get install xen-utils-4.17 gcc.
# Usage: start-xenstored.sh c|ocaml DIR   -> prints "PID SOCKET"; stop with: kill PID
# ORACLE_QUIET=1 turns off the trace and access logs (for benchmarks).
set -eu
impl=$1; dir=$(realpath -m "$2"); here=$(dirname "$(realpath "$0")")
mkdir -p "$dir/run" "$dir/fake"
[ -f "$dir/fakexen.so" ] || gcc -shared -fPIC -O2 -o "$dir/fakexen.so" "$here/fakexen.c" -ldl
echo 1 > "$dir/fake/xsd_port"; truncate -s 4096 "$dir/fake/xsd_kva"
sock="$dir/run/socket"; rm -f "$sock"
case $impl in
c)
  trace="-T $dir/trace"; [ -n "${ORACLE_QUIET:-}" ] && trace=""
  # shellcheck disable=SC2086
  XENSTORED_RUNDIR="$dir/run" XENSTORED_PATH="$sock" FAKEXEN_DIR="$dir/fake" \
  LD_PRELOAD="$dir/fakexen.so" setsid /usr/lib/xen-4.17/bin/xenstored -N $trace \
    >"$dir/stdout" 2>&1 </dev/null &
  pid=$! ;;
ocaml)
  level=debug; access="$dir/access.log"; special=true
  # oxenstored rotates its access log by renaming it: never point it at
  # /dev/null, which it would replace with a regular file for everyone.
  if [ -n "${ORACLE_QUIET:-}" ]; then level=error; special=false; fi
  cat > "$dir/oxenstored.conf" <<CONF
pid-file = $dir/xenstored.pid
persistent = false
xenstored-log-file = $dir/xenstored.log
xenstored-log-level = $level
access-log-file = $access
access-log-special-ops = $special
CONF
  # oxenstored always binds /var/run/xenstored/socket: give it a private one.
  setsid unshare -m -- sh -c 'mkdir -p /var/run/xenstored && mount --bind "$1/run" /var/run/xenstored && exec env LD_PRELOAD="$1/fakexen.so" /usr/lib/xen-4.17/bin/oxenstored --no-fork --no-domain-init --config-file "$1/oxenstored.conf"' sh "$dir" \
    >"$dir/stdout" 2>&1 </dev/null &
  pid=$! ;;
*) echo "usage: $0 c|ocaml DIR" >&2; exit 2 ;;
esac
i=0; while [ ! -S "$sock" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
[ -S "$sock" ] || { echo "xenstored failed to start:" >&2; cat "$dir/stdout" >&2; exit 1; }
echo "$pid" > "$dir/pid"
echo "$pid $sock"
