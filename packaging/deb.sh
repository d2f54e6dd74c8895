#!/bin/sh
# Builds OUTDIR/blktap_VERSION_ARCH.deb from a built binary with dpkg-deb
# alone: install.sh lays the files out in a staging root (PREFIX=/usr),
# then DEBIAN/ gets control, conffiles, md5sums and the maintainer scripts.
#
#   VERSION=0.1.0 packaging/deb.sh BIN OUTDIR
set -eu
bin=$1 out=$2
: "${VERSION:?VERSION is not set (make deb sets it from CHANGELOG.md)}"
case $VERSION in [0-9]*) ;; *) echo "deb.sh: version $VERSION must start with a digit" >&2; exit 1 ;; esac
src=$(cd "$(dirname "$0")/.." && pwd)
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
command -v dpkg-deb >/dev/null || { echo "deb.sh: dpkg-deb not found (Debian: apt-get install dpkg)" >&2; exit 1; }

mkdir -p "$out"
stage=$(mktemp -d "${TMPDIR:-/tmp}/blktap-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT INT TERM
root=$stage/root
umask 022
"$src/packaging/install.sh" install "$bin" "$root" /usr /etc /lib/systemd/system

install -d "$root/DEBIAN"
(cd "$root" && find etc -type f | sort | sed 's|^|/|') >"$root/DEBIAN/conffiles"
(cd "$root" && find usr lib -type f -print0 | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$VERSION/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
	"$src/packaging/debian/control.in" >"$root/DEBIAN/control"
for s in postinst prerm postrm; do
	install -m 0755 "$src/packaging/debian/$s" "$root/DEBIAN/$s"
done
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"

deb=$out/blktap_${VERSION}_$arch.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
