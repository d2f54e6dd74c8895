#!/bin/sh
# Installs or removes blktap-go's files; the one list of what goes where,
# used by `make install`/`make uninstall` and by packaging/deb.sh.
#
#   install.sh install   BIN DESTDIR PREFIX SYSCONFDIR UNITDIR
#
# BIN is blktap as scripts/build.sh builds it, with blktap-worker beside it;
# the worker goes to PREFIX/libexec/blktap, where blktap looks for it.
#   install.sh uninstall ""  DESTDIR PREFIX SYSCONFDIR UNITDIR
#
# The example desired state is installed only where none exists, and removed
# only while it is still the example: an edited one is never lost.
set -eu
op=$1 bin=$2 dest=$3 prefix=$4 etc=$5 unitdir=$6
src=$(cd "$(dirname "$0")/.." && pwd)

sbin=$dest$prefix/sbin
libexec=$dest$prefix/libexec/blktap
ubin=$dest$prefix/bin
man8=$dest$prefix/share/man/man8
compl=$dest$prefix/share/bash-completion/completions
# zsh's fpath has vendor-completions for the distribution's packages and
# PREFIX/share/zsh/site-functions for the rest; fish reads
# vendor_completions.d under each data directory.
case $prefix in
/usr) zcompl=$dest$prefix/share/zsh/vendor-completions ;;
*) zcompl=$dest$prefix/share/zsh/site-functions ;;
esac
fcompl=$dest$prefix/share/fish/vendor_completions.d
doc=$dest$prefix/share/doc/blktap
units=$dest$unitdir
hotplug=$dest$etc/xen/scripts
conf=$dest$etc/blktap

# Links in PREFIX/bin to the binary in PREFIX/sbin (argv[0] picks the tool).
bin_links="qcow-create img2qcow qcow2raw"
sbin_links="tap-ctl"

case $op in
install)
	[ -x "$bin" ] || { echo "install.sh: $bin is not an executable (run make build)" >&2; exit 1; }
	worker=$(dirname "$bin")/blktap-worker
	[ -x "$worker" ] || { echo "install.sh: $worker is not an executable (run make build)" >&2; exit 1; }
	install -d "$sbin" "$libexec" "$ubin" "$man8" "$compl" "$zcompl" "$fcompl" "$doc" "$units" "$hotplug" "$conf"
	install -m 0755 "$bin" "$sbin/blktap"
	install -m 0755 "$worker" "$libexec/blktap-worker"
	for l in $bin_links; do ln -sfn ../sbin/blktap "$ubin/$l"; done
	for l in $sbin_links; do ln -sfn blktap "$sbin/$l"; done
	sed "s|/usr/sbin/blktap|$prefix/sbin/blktap|g" "$src/packaging/systemd/blktap.service" >"$units/blktap.service"
	chmod 0644 "$units/blktap.service"
	install -m 0755 "$src/scripts/xen/block-blktap" "$hotplug/block-blktap"
	if [ ! -e "$conf/disks.yaml" ]; then
		install -m 0644 "$src/packaging/disks.yaml" "$conf/disks.yaml"
	fi
	gzip -9n <"$src/packaging/man/blktap.8" >"$man8/blktap.8.gz"
	chmod 0644 "$man8/blktap.8.gz"
	install -m 0644 "$src/packaging/completion/blktap" "$compl/blktap"
	install -m 0644 "$src/packaging/completion/_blktap" "$zcompl/_blktap"
	install -m 0644 "$src/packaging/completion/blktap.fish" "$fcompl/blktap.fish"
	install -m 0644 "$src/packaging/debian/copyright" "$doc/copyright"
	gzip -9n <"$src/CHANGELOG.md" >"$doc/changelog.gz"
	chmod 0644 "$doc/changelog.gz"
	;;
uninstall)
	rm -f "$sbin/blktap" "$libexec/blktap-worker" "$units/blktap.service" "$hotplug/block-blktap" \
		"$man8/blktap.8.gz" "$compl/blktap" "$zcompl/_blktap" "$fcompl/blktap.fish" \
		"$doc/copyright" "$doc/changelog.gz"
	for l in $bin_links; do rm -f "$ubin/$l"; done
	for l in $sbin_links; do rm -f "$sbin/$l"; done
	if [ -f "$conf/disks.yaml" ] && cmp -s "$src/packaging/disks.yaml" "$conf/disks.yaml"; then
		rm -f "$conf/disks.yaml"
	elif [ -e "$conf/disks.yaml" ]; then
		echo "install.sh: keeping $conf/disks.yaml (edited)" >&2
	fi
	rmdir "$libexec" "$doc" "$conf" 2>/dev/null || true
	;;
*)
	echo "usage: install.sh install|uninstall BIN DESTDIR PREFIX SYSCONFDIR UNITDIR" >&2
	exit 2
	;;
esac
