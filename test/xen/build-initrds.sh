#!/usr/bin/env bash
# Builds the two initramfs images of the harness from the host's installed
# Debian packages (xen-utils-4.17, xenstore-utils, qemu-utils, busybox-static)
# and the unpacked kernel package:
#   OUT/guest-initrd.cpio  busybox, xen-blkfront, the xenstore tools, test/xen/guest
#   OUT/dom0-initrd.cpio   the toolstack (xl, xenstored, xenconsoled, hotplug
#                          scripts), qemu-img, our blktap and block-blktap,
#                          test/xen/dom0 as /init and /xt, and the guest's
#                          kernel and initramfs
# Usage: build-initrds.sh OUT KERNEL_ROOT KVER BLKTAP_BINARY
# Environment (trixie/build.sh sets both):
#   XEN_ROOT     take every program, library and /etc/xen from this unpacked
#                Debian tree (ldd runs in a chroot of it) instead of the host
#   XEN_BIN_DIR  the toolstack's directory (default /usr/lib/xen-4.17/bin)
#   XT_PKG_DIR   a directory with blktap.deb, blktap-prev.deb and the
#                systemctl stand-in: dom0 gets dpkg and these instead of
#                BLKTAP_BINARY (run.sh sets it unless XEN_TEST_PKG=0)
set -euo pipefail
out=$1 kroot=$2 kver=$3 blktap=$4
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
moddir=$kroot/lib/modules/$kver/kernel
[ -d "$moddir" ] || moddir=$kroot/usr/lib/modules/$kver/kernel   # merged /usr (trixie)
XB=${XEN_BIN_DIR:-/usr/lib/xen-4.17/bin}
S=${XEN_ROOT:-}

sldd() { if [ -n "$S" ]; then chroot "$S" ldd "$1"; else ldd "$1"; fi; }
copy_with_libs() { # ROOT FILE...: files and their shared-library closure
  local r=$1 f l; shift
  for f in "$@"; do
    mkdir -p "$r$(dirname "$f")"; rm -f "$r$f"; cp -L "$S$f" "$r$f"
    for l in $(sldd "$f" 2>/dev/null | grep -oE '/[^ ]+'); do
      [ -e "$r$l" ] || { mkdir -p "$r$(dirname "$l")"; cp -L "$S$l" "$r$l"; }
    done
  done
}
kmod_copy() { # MODULE DEST: a module, decompressed when the kernel package compresses them
  if [ -f "$moddir/$1.ko" ]; then cp "$moddir/$1.ko" "$2"
  elif [ -f "$moddir/$1.ko.xz" ]; then xz -dc "$moddir/$1.ko.xz" >"$2"
  else zstd -qdc "$moddir/$1.ko.zst" >"$2"; fi
}
busybox_root() { # ROOT: busybox and its applets, but not sh/bash over a real bash
  local r=$1 p
  mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,etc}
  cp "$S/bin/busybox" "$r/bin/busybox"
  "$r/bin/busybox" --list-full | while read -r p; do
    [ -e "$r/$p" ] || { mkdir -p "$r/$(dirname "$p")"; ln -s /bin/busybox "$r/$p"; }
  done
}
cpio_of() { (cd "$1" && find . | cpio -o -H newc --quiet) >"$2.tmp" && mv "$2.tmp" "$2"; }

mkdir -p "$out"

# ---- guest ----
R=$out/guest-root; rm -rf "$R"; busybox_root "$R"
mkdir -p "$R/lib/modules"
kmod_copy drivers/block/xen-blkfront "$R/lib/modules/xen-blkfront.ko"
copy_with_libs "$R" /usr/bin/xenstore
for x in read write ls rm exists list chmod watch; do ln -sf xenstore "$R/usr/bin/xenstore-$x"; done
rm -f "$R/sbin/poweroff" "$R/sbin/reboot" "$R/bin/poweroff" "$R/bin/reboot"
cp "$here/guest/init" "$R/init"
cp "$here/guest/xt-guest" "$here/guest/xt-loop" "$R/bin/"
cp "$here/guest/poweroff" "$R/sbin/poweroff"; cp "$here/guest/reboot" "$R/sbin/reboot"
chmod +x "$R/init" "$R/bin/xt-guest" "$R/bin/xt-loop" "$R/sbin/poweroff" "$R/sbin/reboot"
cpio_of "$R" "$out/guest-initrd.cpio"

# ---- dom0 ----
R=$out/dom0-root; rm -rf "$R"; busybox_root "$R"
mkdir -p "$R"/{root,boot,var/lib/xen,var/log/xen/console,var/lib/xenstored,images,xt,lib/modules/$kver}
ln -s ../run "$R/var/run"
copy_with_libs "$R" /usr/bin/bash $XB/xl $XB/xenstored $XB/xenconsoled $XB/xen-init-dom0 $XB/xenconsole \
  $XB/libxl-save-helper /usr/bin/xenstore /usr/bin/qemu-img /usr/bin/qemu-io /usr/sbin/losetup \
  /usr/bin/flock /usr/bin/stat /usr/bin/timeout
cp -L "$S/lib/x86_64-linux-gnu/libgcc_s.so.1" "$R/lib/x86_64-linux-gnu/"   # xl's pthread_cancel dlopens it
ln -sf /usr/bin/bash "$R/bin/bash"
# locking.sh runs `stat -L /dev/stdin FILE`, which busybox's stat gets wrong
for b in stat timeout flock; do rm -f "$R/bin/$b"; ln -s /usr/bin/$b "$R/bin/$b"; done
for x in read write ls rm exists list chmod watch; do ln -sf xenstore "$R/usr/bin/xenstore-$x"; done
for x in xl xenstored xenconsoled xen-init-dom0 xenconsole; do ln -sf $XB/$x "$R/usr/sbin/$x"; done
mkdir -p "$R/usr/lib/xen"; ln -sf $XB "$R/usr/lib/xen/bin"
cp -a "$S/etc/xen" "$R/etc/"
# The HVM firmware, for the hvm scenario (an HVM guest needs it
# before it needs a device model); absent packages just skip it.
for f in ${XB%/bin}/boot/hvmloader /usr/share/seabios/bios-256k.bin; do
  [ ! -f "$S$f" ] || { mkdir -p "$R$(dirname "$f")"; cp -L "$S$f" "$R$f"; }
done
# and the device model libxl starts for it, Debian's qemu-system-xen
# (deps.sh installs it on the host), with its libraries: bookworm's model
# links 4.17's libraries, so only the 4.17 image has it.
dm=/usr/libexec/xen-qemu-system-i386
if [ -z "$S" ] && [ -x "$dm" ]; then
  mkdir -p "$R/usr/libexec"; cp -L "$dm" "$R$dm"
  for l in $(ldd "$dm" | grep -oE '/[^ ]+'); do
    [ -e "$R$l" ] || { mkdir -p "$R$(dirname "$l")"; cp -L "$l" "$R$l"; }
  done
  # libxl passes -vnc none, and QEMU still loads its default keymap
  mkdir -p "$R/usr/share/qemu"; cp -a /usr/share/qemu/keymaps "$R/usr/share/qemu/"
fi
for m in drivers/xen/xen-evtchn drivers/xen/xen-gntdev drivers/xen/xen-gntalloc drivers/xen/xen-privcmd \
         drivers/xen/xenfs/xenfs drivers/block/loop drivers/block/xen-blkfront drivers/block/nbd \
         fs/ext4/ext4 fs/jbd2/jbd2 fs/mbcache lib/crc16 crypto/crc32c_generic; do
  mkdir -p "$R/lib/modules/$kver/kernel/$(dirname $m)"; kmod_copy $m "$R/lib/modules/$kver/kernel/$m.ko"
done
cp "$moddir/../modules.order" "$moddir/../modules.builtin" "$R/lib/modules/$kver/" 2>/dev/null || true
depmod -b "$R" "$kver"
cp "$kroot/boot/vmlinuz-$kver" "$R/boot/vmlinuz"
cp "$out/guest-initrd.cpio" "$R/boot/guest-initrd.cpio"
if [ -n "${XT_PKG_DIR:-}" ]; then
  # The packaged daemon: dom0's init installs XT_PKG_DIR/blktap.deb with
  # dpkg (and the scenarios the previous version, blktap-prev.deb); the
  # unit runs under the harness's systemctl stand-in (test/xen/systemctl).
  copy_with_libs "$R" /usr/bin/dpkg /usr/bin/dpkg-deb /usr/bin/dpkg-query /usr/bin/dpkg-split /usr/bin/tar   # diff: busybox
  copy_with_libs "$R" "$(if [ -e "$S/usr/sbin/ldconfig" ]; then echo /usr/sbin/ldconfig; else echo /sbin/ldconfig; fi)"
  mkdir -p "$R/var/lib/dpkg/info" "$R/var/lib/dpkg/updates" "$R/etc/dpkg" "$R/xt/pkg"
  : >"$R/var/lib/dpkg/status"; : >"$R/var/lib/dpkg/available"
  cp "$XT_PKG_DIR"/*.deb "$R/xt/pkg/"
  install -m 0755 "$XT_PKG_DIR/systemctl" "$R/usr/bin/systemctl"
else
  install -m 0755 "$blktap" "$R/usr/sbin/blktap"; ln -s blktap "$R/usr/sbin/tap-ctl"   # docs/TAP-CTL.md
  # the worker binary, where an installed blktap looks for it (cmd/blktap/workerexe.go)
  [ ! -f "$(dirname "$blktap")/blktap-worker" ] ||
    install -D -m 0755 "$(dirname "$blktap")/blktap-worker" "$R/usr/libexec/blktap/blktap-worker"
  install -m 0755 "$repo/scripts/xen/block-blktap" "$R/etc/xen/scripts/block-blktap"
fi
cp "$here/dom0/init" "$R/init"; chmod +x "$R/init"
cp "$here/dom0/lib.sh" "$here/dom0/scenarios.sh" "$R/xt/"
[ ! -f "$here/dom0/scenarios-tap.sh" ] || cp "$here/dom0/scenarios-tap.sh" "$R/xt/"
[ ! -f "$here/dom0/scenarios-pkg.sh" ] || cp "$here/dom0/scenarios-pkg.sh" "$R/xt/"
echo "root:x:0:0:root:/root:/bin/sh" >"$R/etc/passwd"; echo "root:x:0:" >"$R/etc/group"
cpio_of "$R" "$out/dom0-initrd.cpio"
ls -la "$out"/*.cpio
