#!/usr/bin/env bash
# The dom0 of XEN_TEST_SYSTEMD=1: Debian trixie with systemd as PID 1, so
# that the package's unit runs under the real systemctl instead of the
# harness's stand-in. The root file system is made once by mmdebstrap
# (maintainer scripts run: systemd, xen-utils-4.20 and their units are set
# up as on a host) and kept in CACHE/systemd-root/root; each build then
# adds what changes per run and packs one initramfs, booted with
# rdinit=/lib/systemd/systemd.
#
# Usage: build.sh CACHE OUT DOM0_ROOT PKG_DIR
#   DOM0_ROOT  the 4.20 busybox dom0 tree of trixie/build.sh: its kernel
#              modules (depmod'ed) and the guest's kernel and initramfs
#              come from there, so both boots run the same guest
#   PKG_DIR    blktap.deb (make deb), installed at boot by dpkg -i, and
#              blktap-prev.deb, the previous version (pkg-upgrade)
# Prints on its last line: DOM0_INITRD=OUT/dom0-systemd.cpio.gz
set -euo pipefail
cache=${1:?cache} out=${2:?out} dom0=${3:?busybox dom0 root} pkg=${4:?package dir}
here=$(cd "$(dirname "$0")" && pwd)
base=$cache/systemd-root
mkdir -p "$base" "$out"

# What dom0 runs beyond minbase. busybox-static gives `ps` the output lib.sh
# parses (procps' ps without -e lists only its own session). No udev: the
# device nodes dom0 needs come from devtmpfs, and udev's coldplug costs
# minutes under TCG.
pkgs=systemd,systemd-sysv,dbus,xen-utils-4.20,xen-utils-common,xenstore-utils,qemu-utils,kmod,busybox-static
if [ ! -f "$base/root/.complete" ] || [ "$(cat "$base/root/.complete")" != "$pkgs" ]; then
  # a fresh machine may carry stale package lists: refresh and try once more
  command -v mmdebstrap >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mmdebstrap ||
    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mmdebstrap; }; } >&2
  mirror=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)
  rm -rf "$base/root.new"
  # docs, man pages and translations: a third of the image, and the
  # initramfs lives in dom0's 1536 MB
  mmdeb() {
    rm -rf "$base/root.new"
    mmdebstrap --variant=minbase --mode=root --include="$pkgs" \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      trixie "$base/root.new" "${mirror:-http://deb.debian.org/debian}" >&2
  }
  # a mirror that hiccups once should not fail the run
  mmdeb || { sleep 10; mmdeb; }
  echo "$pkgs" >"$base/root.new/.complete"
  rm -rf "$base/root"; mv "$base/root.new" "$base/root"
fi

# ---- this run's tree: the cached root, copied, plus the harness ----
R=$out/dom0-systemd-root
rm -rf "$R"; cp -a "$base/root" "$R"; rm -f "$R/.complete"
# mmdebstrap leaves its --dpkgopt in the root: dpkg would also drop the
# package's own man page (which pkg-install checks)
rm -f "$R/etc/dpkg/dpkg.cfg.d/99mmdebstrap"
kver=$(ls "$dom0/lib/modules" | head -n1)
mkdir -p "$R/usr/lib/modules"; cp -a "$dom0/lib/modules/$kver" "$R/usr/lib/modules/"
mkdir -p "$R/boot"; cp "$dom0/boot/vmlinuz" "$dom0/boot/guest-initrd.cpio" "$R/boot/"
mkdir -p "$R/xt/pkg" "$R/images"
cp "$here/../dom0/lib.sh" "$here/../dom0/scenarios.sh" "$here/../dom0/scenarios-pkg.sh" "$here/main" "$R/xt/"
chmod +x "$R/xt/main"
cp "$pkg/blktap.deb" "$pkg/blktap-prev.deb" "$R/xt/pkg/"
ln -sf /usr/bin/busybox "$R/usr/local/bin/ps"   # first in systemd's PATH
# as dom0/init loads them (xen.service loads xenfs, evtchn and gntdev itself)
printf '%s\n' xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs loop xen-blkfront >"$R/etc/modules-load.d/xt.conf"
echo xt-dom0 >"$R/etc/hostname"
: >"$R/etc/machine-id"   # made at boot; an empty file keeps systemd from a first-boot run
# no login prompt on the serial console (the harness reads it), nothing
# periodic that would compete with the scenarios for the one emulated CPU
for u in systemd-firstboot.service serial-getty@hvc0.service getty@tty1.service console-getty.service getty.target \
         apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer fstrim.timer e2scrub_all.timer \
         systemd-tmpfiles-clean.timer systemd-timesyncd.service; do
  ln -sf /dev/null "$R/etc/systemd/system/$u"
done
install -m 0644 "$here/xt-scenarios.service" "$R/etc/systemd/system/xt-scenarios.service"
mkdir -p "$R/etc/systemd/system/multi-user.target.wants"
ln -sf ../xt-scenarios.service "$R/etc/systemd/system/multi-user.target.wants/xt-scenarios.service"
# xen.service (xen-utils-common's wrapper of /etc/init.d/xen: xenfs,
# xenstored, xen-init-dom0, xenconsoled) is what the package orders after
chroot "$R" systemctl enable xen.service >&2 || true
chroot "$R" systemd-analyze verify --man=no xt-scenarios.service xen.service >&2 || true

(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) >"$out/dom0-systemd.cpio.gz.tmp"
mv "$out/dom0-systemd.cpio.gz.tmp" "$out/dom0-systemd.cpio.gz"
echo "systemd dom0: $(du -sm "$R" | cut -f1) MB unpacked, $(du -m "$out/dom0-systemd.cpio.gz" | cut -f1) MB packed" >&2
echo "DOM0_INITRD=$out/dom0-systemd.cpio.gz"
