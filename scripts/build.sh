#!/bin/sh
# Builds blktap and its worker binary into DIR, the worker first: blktap
# carries the worker's SHA-256 (-X main.workerSum) and starts each disk's
# worker from DIR/blktap-worker (or PREFIX/libexec/blktap/blktap-worker
# once installed) only when the sum matches; otherwise it runs as its own
# worker (cmd/blktap/workerexe.go). Every build of blktap that ships or is
# tested goes through here, so the pair never drifts apart.
#
#   [GO=go] [LDFLAGS=...] [CGO_ENABLED=0] scripts/build.sh DIR [go build flags...]
set -eu
[ $# -ge 1 ] || { echo "usage: scripts/build.sh DIR [go build flags...]" >&2; exit 2; }
mkdir -p "$1"
dir=$(cd "$1" && pwd)
shift
cd "$(dirname "$0")/.."
go=${GO:-go}
"$go" build "$@" -ldflags "${LDFLAGS:-}" -o "$dir/blktap-worker" ./cmd/blktap-worker
sum=$(sha256sum "$dir/blktap-worker" | cut -d' ' -f1)
"$go" build "$@" -ldflags "${LDFLAGS:-} -X main.workerSum=$sum" -o "$dir/blktap" ./cmd/blktap
