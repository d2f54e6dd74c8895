#!/bin/sh
# Fetch Debian's stock Xen hotplug scripts (block-tap and the files it
# sources) into a cache directory, for the tap-ctl end-to-end tests. The
# scripts are downloaded, never committed: the test runs exactly what a
# Debian host with that Xen runs.
#
#   scripts/fetch-xen-hotplug.sh [DIR]
#
# DIR defaults to $BLKTAP_XEN_SCRIPTS, else
# ${XDG_CACHE_HOME:-$HOME/.cache}/blktap-go/xen-scripts-$SUITE (where the
# tests look). SUITE=trixie (the default: Xen 4.20) picks the Debian release.
#
# The download uses a private APT directory, so the host's sources and
# package lists are left as they are. The mirror is the one the host's
# own sources name. It prints the directory holding the scripts.
set -eu

suite=${SUITE:-trixie}
pkg=xen-utils-common
dest=${1:-${BLKTAP_XEN_SCRIPTS:-${XDG_CACHE_HOME:-$HOME/.cache}/blktap-go/xen-scripts-$suite}}

if [ -f "$dest/block-tap" ] && [ -f "$dest/block-common.sh" ]; then
	echo "$dest"
	exit 0
fi

# The first Debian archive URI the host already uses (deb822 or one-line).
mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
	awk '$1 == "URIs:" { for (i = 2; i <= NF; i++) print $i }' |
	grep -v -e security -e '^$' | head -n1 || true)
if [ -z "$mirror" ]; then
	mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
		awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) { print $i; break } }' |
		grep -v security | head -n1 || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/parts" "$work/prefs"
: > "$work/status"
opt="$work/sources.list"
if [ -f "$keyring" ]; then
	echo "deb [signed-by=$keyring] $mirror $suite main" > "$opt"
else
	echo "deb $mirror $suite main" > "$opt"
fi
aptopts="-o Dir::Etc::sourcelist=$opt -o Dir::Etc::sourceparts=$work/parts
	-o Dir::Etc::preferencesparts=$work/prefs -o Dir::State::Lists=$work/lists
	-o Dir::State::status=$work/status -o Dir::Cache=$work/cache
	-o Debug::NoLocking=1 -o APT::Sandbox::User=root -q"

# shellcheck disable=SC2086
apt-get $aptopts update >&2
# shellcheck disable=SC2086
(cd "$work" && apt-get $aptopts download "$pkg" >&2)
deb=$(ls "$work"/${pkg}_*.deb)
mkdir -p "$work/x"
dpkg-deb -x "$deb" "$work/x"
basename "$deb" > "$work/x/etc/xen/scripts/SOURCE"
# Whole or nothing: a half-copied directory would pass the check above.
mkdir -p "$(dirname "$dest")"
if [ -d "$dest" ]; then
	cp -p "$work"/x/etc/xen/scripts/* "$dest"/
else
	cp -rp "$work/x/etc/xen/scripts" "$dest.tmp.$$"
	mv "$dest.tmp.$$" "$dest"
fi
echo "$dest"
