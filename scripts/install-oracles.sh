#!/usr/bin/env bash
# Installs the Debian packages whose programs the tests use as oracles, when
# any of them is missing. Needs root (or sudo) and apt-get; elsewhere it says
# what to install and leaves the tests to skip (or fail under CI=true).
set -euo pipefail
# program -> package
need=(
  qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils
  xenstore-read:xenstore-utils xenstore-ls:xenstore-utils
  /usr/lib/xen-4.17/bin/test-xenstore:xen-utils-4.17
  /usr/lib/xen-4.17/bin/xenstored:xen-utils-4.17
  nbdinfo:libnbd-bin nbdsh:libnbd-bin nbdcopy:libnbd-bin
  /usr/lib/python3/dist-packages/nbd.py:python3-libnbd
  /usr/lib/python3/dist-packages/pyxs/__init__.py:python3-pyxs
  nbdkit:nbdkit fio:fio
  qemu-system-i386:qemu-system-x86
  qcowinfo:libqcow-utils vhdiinfo:libvhdi-utils vmdkinfo:libvmdk-utils
  gcc:gcc
  /usr/include/xen/io/blkif.h:libxen-dev
  /usr/include/linux/nbd.h:linux-libc-dev /usr/include/xen/gntdev.h:linux-libc-dev
  # the rbd format: librbd to build against, a throwaway cluster
  # (scripts/ceph-dev.sh), and qemu's rbd driver as the oracle
  /usr/include/rbd/librbd.h:librbd-dev /usr/include/rados/librados.h:librados-dev
  ceph-mon:ceph-mon ceph-osd:ceph-osd rbd:ceph-common
  /usr/lib/x86_64-linux-gnu/qemu/block-rbd.so:qemu-block-extra
  # promtool checks the daemon's /metrics scrape; the package's server is
  # never started by the tests
  promtool:prometheus
  # syntax checks of the shipped zsh and fish completions
  zsh:zsh fish:fish
)
missing=()
for pair in "${need[@]}"; do
  prog=${pair%%:*} pkg=${pair##*:}
  if [[ $prog == /* ]]; then [[ -e $prog ]] && continue
  else command -v "$prog" >/dev/null 2>&1 && continue; fi
  [[ " ${missing[*]-} " == *" $pkg "* ]] || missing+=("$pkg")
done
((${#missing[@]})) || exit 0
echo "test oracles missing: ${missing[*]}" >&2
sudo=
[[ $(id -u) == 0 ]] || sudo=sudo
if ! command -v apt-get >/dev/null 2>&1 || { [[ -n $sudo ]] && ! command -v sudo >/dev/null 2>&1; }; then
  echo "install them (Debian: apt-get install ${missing[*]}); tests that need them will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# A fresh machine has no package lists yet.
if [[ ! -d /var/lib/apt/lists ]] || [[ -z $(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial) ]]; then
  $sudo apt-get update
fi
# Recommends are not oracles: without --no-install-recommends this once
# pulled 156 MB. Lists older than the mirror give 404s: refresh and retry once.
install() { $sudo apt-get install -y --no-install-recommends "${missing[@]}"; }
if ! install; then
  echo "apt-get install failed; refreshing the package lists and trying once more" >&2
  $sudo apt-get update
  install
fi
# The prometheus package was installed for promtool alone: where systemd
# started its server (containers' policy-rc.d forbids it), stop it again.
if [[ " ${missing[*]} " == *" prometheus "* && -d /run/systemd/system ]]; then
  $sudo systemctl disable --now prometheus.service || true
fi
