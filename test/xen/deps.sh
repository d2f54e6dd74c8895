#!/usr/bin/env bash
# Installs what the real-Xen harness needs on a Debian bookworm host and
# unpacks the guest kernel into the cache (never into /boot: installing
# linux-image would build an initramfs nobody uses, minutes under CI).
# Usage: deps.sh CACHE_DIR   prints KVER=... on its last line.
set -euo pipefail
cache=${1:?cache dir}
mkdir -p "$cache"
export DEBIAN_FRONTEND=noninteractive
sudo=; [[ $(id -u) == 0 ]] || sudo=sudo

# program-or-file -> package
need=(
  qemu-system-x86_64:qemu-system-x86
  /boot/xen-4.17-amd64.gz:xen-hypervisor-4.17-amd64
  /usr/lib/xen-4.17/bin/xl:xen-utils-4.17
  xenstore-read:xenstore-utils
  qemu-img:qemu-utils
  /usr/libexec/xen-qemu-system-i386:qemu-system-xen
  /bin/busybox:busybox-static
  cpio:cpio depmod:kmod flock:util-linux
)
missing=()
for pair in "${need[@]}"; do
  prog=${pair%%:*} pkg=${pair##*:}
  if [[ $prog == /* ]]; then [[ -e $prog ]] && continue
  else command -v "$prog" >/dev/null 2>&1 && continue; fi
  [[ " ${missing[*]-} " == *" $pkg "* ]] || missing+=("$pkg")
done
apt_install() {
  # A fresh machine may carry stale package lists: refresh and try once more.
  $sudo apt-get install -y --no-install-recommends "$@" ||
    { $sudo apt-get update && $sudo apt-get install -y --no-install-recommends "$@"; }
}
if ((${#missing[@]})); then
  echo "xen-test: installing ${missing[*]}" >&2
  apt_install "${missing[@]}" >&2
fi

# The guest and dom0 kernel: Debian's, unpacked from its package.
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
if [[ -z $kpkg ]]; then
  $sudo apt-get update >&2
  kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
fi
kver=${kpkg#linux-image-}
kdir=$cache/kernel-$kver
if [[ ! -f $kdir/boot/vmlinuz-$kver ]]; then
  tmp=$(mktemp -d "$cache/dl.XXXXXX"); chmod 0755 "$tmp"   # apt downloads as _apt
  (cd "$tmp" && { apt-get download "$kpkg" >&2 || { $sudo apt-get update >&2 && apt-get download "$kpkg" >&2; }; })
  rm -rf "$kdir.new"; mkdir -p "$kdir.new"
  dpkg-deb -x "$tmp"/"$kpkg"_*.deb "$kdir.new"
  rm -rf "$tmp" "$kdir"; mv "$kdir.new" "$kdir"
fi
echo "KVER=$kver"
