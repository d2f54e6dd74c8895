#!/usr/bin/env bash
# The real-Xen harness for Xen 4.20 (Debian trixie) on a Debian bookworm
# host. Nothing comes from the host's own packages except the tools that
# build (apt-get, dpkg-deb, cpio, depmod, xz, chroot):
#   * trixie's packages are downloaded through a private APT directory (the
#     host's sources and lists are left alone) and unpacked, without their
#     maintainer scripts, into CACHE/trixie/root; dom0's and the guest's
#     binaries and their shared-library closure come from that tree (ldd in
#     a chroot of it);
#   * the hypervisor (xen-hypervisor-4.20-amd64) and the kernel
#     (linux-image-6.12*) are unpacked beside it.
# Then build-initrds.sh makes OUT/guest-initrd.cpio and OUT/dom0-initrd.cpio
# from that tree, with the same layout as for 4.17.
#
# Usage: build.sh CACHE OUT BLKTAP_BINARY
# Prints, on its last line, what a boot needs:
#   XEN=OUT/xen.elf KERNEL=... DOM0_INITRD=OUT/dom0-initrd.cpio XEN_VERSION=4.20
# Idempotent: the downloads and the unpacked tree are kept in CACHE/trixie
# and made again only when missing (delete CACHE/trixie to refresh them).
set -euo pipefail
cache=${1:?cache dir} out=${2:?out dir} blktap=${3:?blktap binary}
here=$(cd "$(dirname "$0")" && pwd)
xen=${XEN_TRIXIE_VERSION:-4.20}
suite=trixie
base=$cache/$suite
mkdir -p "$base" "$out"
base=$(cd "$base" && pwd); out=$(cd "$out" && pwd)
export DEBIAN_FRONTEND=noninteractive

# What dom0 and the guest run. Their dependencies come along; recommends do
# not (no qemu-system-xen: the harness has no qdisk).
userland=(xen-utils-$xen xen-utils-common xenstore-utils qemu-utils busybox-static bash coreutils
  util-linux mount libgcc-s1 libc-bin)

# ---- a private APT for trixie ------------------------------------------------
mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
  awk '$1 == "URIs:" { for (i = 2; i <= NF; i++) print $i }' | grep -v -e security -e '^$' | head -n1 || true)
[ -n "$mirror" ] || mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
  awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) { print $i; break } }' |
  grep -v security | head -n1 || true)
mirror=${mirror:-http://deb.debian.org/debian}
apt=$base/apt
mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$apt/parts" "$apt/prefs" "$base/debs"
chmod 0755 "$base" "$apt" "$apt/archives" "$base/debs"   # apt downloads as _apt
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb ${keyring:+[signed-by=$keyring] }$mirror $suite main" >"$apt/sources.list"
[ -f "$apt/status" ] || : >"$apt/status"
aptopts=(-o Dir::Etc::sourcelist="$apt/sources.list" -o Dir::Etc::sourceparts="$apt/parts"
  -o Dir::Etc::preferencesparts="$apt/prefs" -o Dir::State::Lists="$apt/lists"
  -o Dir::State::status="$apt/status" -o Dir::Cache="$apt" -o Dir::Cache::archives="$apt/archives"
  -o Debug::NoLocking=1 -o APT::Architecture=amd64 -o APT::Install-Recommends=false -q)
papt() { apt-get "${aptopts[@]}" "$@"; }
updated=
refresh() { [ -n "$updated" ] && return 0; echo "trixie: apt-get update ($mirror)" >&2; papt update >&2; updated=1; }
# retry CMD...: once, after refreshing the lists, when it fails
retry() { "$@" || { refresh && "$@"; }; }
[ -n "$(ls "$apt/lists" 2>/dev/null | grep -v -e partial -e lock)" ] || refresh

# ---- downloads ---------------------------------------------------------------
# The kernel: the version linux-image-amd64 depends on, fetched alone (its
# postinst would build an initramfs nobody uses, and its dependencies are
# not needed).
kernel_pkg() { papt --no-install-recommends install -s linux-image-amd64 2>/dev/null | awk '/^Inst linux-image-[0-9]/ {print $2; exit}' || true; }
kpkg=$(kernel_pkg)
[ -n "$kpkg" ] || { refresh; kpkg=$(kernel_pkg); }
[ -n "$kpkg" ] || { echo "trixie: no kernel package behind linux-image-amd64" >&2; exit 1; }
kver=${kpkg#linux-image-}
dl_one() { # PKG: the .deb of PKG alone into $base/debs
  ls "$base/debs/$1"_*.deb >/dev/null 2>&1 && return 0
  (cd "$base/debs" && retry papt --no-install-recommends download "$1" >&2)
}
dl_one "$kpkg"
dl_one "xen-hypervisor-$xen-amd64"

# The userland and its dependency closure (from an empty status, so the
# closure is complete), downloaded but not installed.
if [ ! -f "$base/root/.complete" ]; then
  retry papt --no-install-recommends -y -d install "${userland[@]}" >&2
  # ---- the tree: every .deb unpacked, no maintainer scripts ----
  rm -rf "$base/root.new"; mkdir -p "$base/root.new"
  for d in "$apt"/archives/*.deb; do dpkg-deb -x "$d" "$base/root.new"; done
  # merged /usr, as a trixie system has it (base-files ships the links;
  # anything a package still puts under /bin and friends moves to /usr)
  for d in bin sbin lib lib64; do
    if [ -d "$base/root.new/$d" ] && [ ! -L "$base/root.new/$d" ]; then
      mkdir -p "$base/root.new/usr/$d"; cp -a "$base/root.new/$d/." "$base/root.new/usr/$d/"; rm -rf "$base/root.new/$d"
    fi
    [ -e "$base/root.new/$d" ] || ln -s "usr/$d" "$base/root.new/$d"
  done
  chroot "$base/root.new" /sbin/ldconfig
  ls "$apt"/archives/*.deb | xargs -n1 basename >"$base/root.new/.packages"
  touch "$base/root.new/.complete"
  rm -rf "$base/root"; mv "$base/root.new" "$base/root"
fi
T=$base/root

# The kernel and the hypervisor, unpacked once each.
kroot=$base/kernel-$kver
if [ ! -f "$kroot/boot/vmlinuz-$kver" ]; then
  rm -rf "$kroot.new"; mkdir -p "$kroot.new"
  dpkg-deb -x "$base/debs/$kpkg"_*.deb "$kroot.new"
  rm -rf "$kroot"; mv "$kroot.new" "$kroot"
fi
hroot=$base/hypervisor
if [ ! -d "$hroot/boot" ]; then
  rm -rf "$hroot.new"; mkdir -p "$hroot.new"
  dpkg-deb -x "$base/debs/xen-hypervisor-$xen-amd64"_*.deb "$hroot.new"
  rm -rf "$hroot"; mv "$hroot.new" "$hroot"
fi

# ---- the hypervisor image qemu boots ----------------------------------------
# qemu's -kernel multiboot (v1) loader takes a 32-bit ELF with a multiboot
# header in its first 8 KiB: xen-<ver>-amd64.gz, decompressed.
xgz=$(ls "$hroot"/boot/xen-*-amd64.gz 2>/dev/null | head -n1)
[ -n "$xgz" ] || { echo "trixie: no xen-*-amd64.gz in xen-hypervisor-$xen-amd64: $(ls "$hroot/boot")" >&2; exit 1; }
if [ ! -f "$out/xen.elf" ] || [ "$xgz" -nt "$out/xen.elf" ]; then
  zcat "$xgz" >"$out/xen.elf.tmp" && mv "$out/xen.elf.tmp" "$out/xen.elf"
fi

# ---- the two initramfs images -------------------------------------------------
XEN_ROOT=$T XEN_BIN_DIR=/usr/lib/xen-$xen/bin "$here/../build-initrds.sh" "$out" "$kroot" "$kver" "$blktap" >&2
cp "$kroot/boot/vmlinuz-$kver" "$out/vmlinuz"
echo "XEN=$out/xen.elf KERNEL=$out/vmlinuz DOM0_INITRD=$out/dom0-initrd.cpio XEN_VERSION=$xen KVER=$kver"
