#!/usr/bin/env bash
# ceph-dev.sh start|stop DIR: a throwaway single-node Ceph cluster for the
# rbd format's tests: one monitor and one OSD on memstore (RAM, gone at
# stop), cephx on, a pool "rbd" with one replica. No manager: image I/O,
# locks and snapshots do not need one. Everything lives in DIR: the conf
# file DIR/ceph.conf (with the admin keyring) is what clients use.
#
#   CEPH_DEV_PORT   the monitor's port (default 6789)
#   CEPH_DEV_BYTES  the OSD's memstore size (default 1 GiB)
#
# Needs Debian's ceph-mon, ceph-osd and ceph-common (make oracles).
set -euo pipefail
cmd=${1:?start|stop}; dir=${2:?DIR}
port=${CEPH_DEV_PORT:-6789}
case $cmd in
stop)
	pids=$(cat "$dir"/*.pid 2>/dev/null || true)
	[ -n "$pids" ] && kill $pids 2>/dev/null || true
	for _ in $(seq 50); do
		alive=0
		for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
		[ $alive = 0 ] && break
		sleep 0.1
	done
	[ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
	rm -rf "$dir"; exit 0 ;;
start) ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
t0=$(date +%s.%N)
mkdir -p "$dir"/mon "$dir"/osd0 "$dir"/run
fsid=$(cat /proc/sys/kernel/random/uuid)
conf=$dir/ceph.conf
cat > "$conf" <<CONF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$port
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = $dir/keyring
run dir = $dir/run
log file = $dir/\$name.log
pid file = $dir/\$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
ms bind ipv6 = false
# A client that stops answering loses its watch (and so the exclusive lock
# it held) after this long; the default is 30 s, tests wait for it.
osd client watch timeout = 10
[mon]
admin socket = $dir/run/\$name.asok
mon data = $dir/mon
mon cluster log file = $dir/mon-cluster.log
[osd]
admin socket = $dir/run/\$name.asok
osd data = $dir/osd\$id
osd objectstore = memstore
keyring = $dir/osd\$id/keyring
memstore device bytes = ${CEPH_DEV_BYTES:-1073741824}
osd max object name len = 256
osd max object namespace len = 64
CONF
ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
ceph-authtool "$dir/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
monmaptool --create --addv a "[v1:127.0.0.1:$port]" --fsid "$fsid" "$dir/monmap" >/dev/null
ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring"
ceph-mon -c "$conf" -i a
id=$(ceph -c "$conf" osd create)
ceph-osd -c "$conf" -i "$id" --no-mon-config --mkfs --mkkey --osd-uuid "$(cat /proc/sys/kernel/random/uuid)" >"$dir/mkfs.log" 2>&1 || { cat "$dir/mkfs.log" >&2; exit 1; }
ceph -c "$conf" auth add osd.$id osd 'allow *' mon 'allow profile osd' -i "$dir/osd$id/keyring" >/dev/null
ceph -c "$conf" osd crush add osd.$id 1 root=default host=localhost >/dev/null 2>&1 || true
ceph-osd -c "$conf" -i "$id"
ceph -c "$conf" osd pool create rbd 8 8 >/dev/null
ceph -c "$conf" osd pool set rbd size 1 --yes-i-really-mean-it >/dev/null
rbd -c "$conf" pool init rbd
t1=$(date +%s.%N)
rss=0
for p in $(cat "$dir"/*.pid); do rss=$((rss + $(awk '/^VmRSS/ {print $2}' /proc/$p/status))); done
echo "ceph-dev: up in $(awk "BEGIN {printf \"%.1f\", $t1 - $t0}") s, monitor and OSD RSS $((rss / 1024)) MiB; conf $conf"
