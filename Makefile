# blktap-go. `make run` serves examples/disks.yaml on the embedded default
# (no Xen needed); `make test` installs the test oracles when missing and
# runs vet and every test.
GO        ?= go
BIN       := bin
CONFIG    ?= examples/disks.yaml
STATE_DIR ?=
FUZZTIME  ?= 15s
TESTFLAGS ?=
# The version is CHANGELOG.md's newest; the commit is git's, "+dirty" for a
# modified tree. Both go into the binary (`blktap --version`).
VERSION   ?= $(shell sed -n 's/^\#\# \[\([0-9][^]]*\)\].*/\1/p' CHANGELOG.md | head -n 1)
COMMIT    ?= $(shell c=$$(git rev-parse HEAD 2>/dev/null) && { git diff --quiet HEAD 2>/dev/null || c=$$c+dirty; echo $$c; })
LDFLAGS   := -X main.version=$(VERSION) -X main.commit=$(COMMIT)
# make install: PREFIX for programs and docs, DESTDIR for staging.
PREFIX    ?= /usr/local
DESTDIR   ?=
SYSCONFDIR ?= /etc
UNITDIR   ?= /lib/systemd/system

.PHONY: all build build-rbd docs run test crash soak xen-test xen-bench vet lint fmt bench bench-memory bench-converge fuzz oracles clean deb install uninstall

all: build

# blktap and its worker binary (scripts/build.sh says why they go together).
# $(call build-pair,ENV,DIR,FLAGS)
build-pair = $(1) GO=$(GO) LDFLAGS='$(LDFLAGS)' scripts/build.sh $(2) $(3)

# Static (CGO_ENABLED=0), as the package ships: nothing here needs libc
# but librbd (build-rbd), and a worker without the dynamic loader and
# cgo's start starts in half the CPU (2.1 against 4.0 ms, perf stat), which
# every disk pays once (docs/PERFORMANCE.md, "Convergence").
build:
	$(call build-pair,CGO_ENABLED=0,$(BIN))
	ln -sf blktap $(BIN)/qcow-create
	ln -sf blktap $(BIN)/img2qcow
	ln -sf blktap $(BIN)/qcow2raw
	ln -sf blktap $(BIN)/tap-ctl

# The man page, the completions and README's command list, made from the
# command tree (cmd/blktap/cli.go); `go test ./cmd/blktap` fails when a
# shipped copy differs.
docs:
	$(GO) generate ./cmd/blktap

run: build
	$(BIN)/blktap run -c $(CONFIG) $(if $(STATE_DIR),--state-dir $(STATE_DIR))

# The rbd format links librbd through cgo (formats/rbd): the default
# binary leaves it out, so hosts without Ceph need no librbd; `make
# build-rbd` makes a blktap with it. "pacific" selects go-ceph's API for
# the Ceph release of Debian bookworm's librbd-dev (16.2).
RBD_TAGS  ?= rbd pacific
RBD_PKGS  := ./formats/rbd/ ./cmd/blktap/
build-rbd:
	$(call build-pair,,$(BIN),-tags '$(RBD_TAGS)')

oracles:
	./scripts/install-oracles.sh

vet:
	$(GO) vet ./...

lint: vet
	$(GO) vet -tags '$(RBD_TAGS)' $(RBD_PKGS)
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

fmt:
	gofmt -w $$(git ls-files '*.go')

test: oracles lint build
	$(GO) test -race -timeout 30m $(TESTFLAGS) ./...
	@# Verbose into a file, so the test cluster's start time and memory
	@# (the ceph-dev: line) reach the log; all of it on failure.
	@mkdir -p $(BIN); echo "go test -race -tags '$(RBD_TAGS)' -v ./formats/rbd/ > $(BIN)/rbd-test.log"; \
	$(GO) test -race -timeout 20m -tags '$(RBD_TAGS)' -v $(TESTFLAGS) ./formats/rbd/ >$(BIN)/rbd-test.log 2>&1; rc=$$?; \
	if [ $$rc != 0 ]; then cat $(BIN)/rbd-test.log; else grep -E '^(ceph-dev:|ok )' $(BIN)/rbd-test.log; fi; exit $$rc
	$(GO) test -race -timeout 20m -tags '$(RBD_TAGS)' -run RBD $(TESTFLAGS) ./cmd/blktap/

# The crash matrix (docs/CRASH.md): every writable format on both paths
# under SIGKILL of the workers, the daemon and both, CRASH_ROUNDS rounds of
# each (make test runs one); then the formats' process-kill tests and their
# power-cut tests with CRASH_SEEDS seeds per format.
CRASH_ROUNDS ?= 5
CRASH_SEEDS  ?= 1000
crash: oracles build
	CRASH_ROUNDS=$(CRASH_ROUNDS) $(GO) test -count=1 -timeout 60m -v -run '^TestEndToEndCrashMatrix$$' ./cmd/blktap
	CRASH_ROUNDS=$(CRASH_ROUNDS) $(GO) test -count=1 -timeout 30m -run '^TestKillLosesNothingAcknowledged$$' ./formats
	CRASH_SEEDS=$(CRASH_SEEDS) $(GO) test -count=1 -timeout 180m -run '^(TestCrashConsistency|TestCrashSnapshotOps)$$' ./formats/qcow ./formats/qcow2 ./formats/vhd ./formats/vmdk

# The soak (docs/SOAK.md): SOAK_DISKS disks of every writable format on
# both paths for SOAK_DURATION under fio verify and journaling writers, a
# worker SIGKILLed every 10 s, the desired-state file rewritten every 20 s.
# It fails on any data error, leaked worker, descriptor or socket, or
# memory growth; the samples and the PASS/FAIL line go to SOAK_OUT.
SOAK_DURATION ?= 10m
SOAK_DISKS    ?= 64
SOAK_OUT      ?= $(CURDIR)/bench/results/soak-$(shell date -u +%Y%m%dT%H%M%SZ)
SOAK_TIMEOUT  ?= 2h
soak: oracles
	SOAK_DURATION=$(SOAK_DURATION) SOAK_DISKS=$(SOAK_DISKS) SOAK_OUT=$(SOAK_OUT) \
		$(GO) test -count=1 -timeout $(SOAK_TIMEOUT) -v -run '^TestSoak$$' ./cmd/blktap

# Real Xen in QEMU (TCG, no KVM needed): Xen 4.17 (and 4.20 where built)
# with a PV dom0 running this tree's daemon, guests created by real xl with
# Linux blkfront; one PASS/FAIL line per scenario (test/xen/run.sh). The
# packages and images are cached in XEN_TEST_CACHE (/var/cache/blktap-xen-test).
xen-test:
	mkdir -p $(BIN)/static
	$(call build-pair,CGO_ENABLED=0,$(BIN)/static,-trimpath)
	BLKTAP_BIN=$(BIN)/static/blktap test/xen/run.sh

# The guest path's speed on real Xen (issue 18 item 5): grant-perf (with and
# without persistent grants) and qdisk-perf (ours beside QEMU's xen-block)
# in one Xen 4.17 boot; the figures are XT-INFO lines. About 6 minutes.
xen-bench:
	XEN_TEST_VERSIONS=4.17 XEN_TEST_MQ=0 XEN_TEST_HVM=0 XEN_TEST_SYSTEMD=0 XEN_TEST_PKG=0 \
		XEN_TEST_ONLY=images,grant-perf,qdisk-perf XEN_TEST_TIMEOUT=$${XEN_TEST_TIMEOUT:-3600} \
		$(MAKE) xen-test

bench: build
	$(GO) test -run '^$$' -bench . -benchmem ./...
	@if [ -x bench/run.sh ]; then bench/run.sh; fi
	@# The control plane under load (issue 16): ls, attach, detach while fio runs on every disk.
	@if [ -x bench/ctlplane.sh ]; then bench/ctlplane.sh; fi
	@# image convert and convert -c beside qemu-img on the same 1 GiB images.
	@if [ -x bench/convert.sh ]; then bench/convert.sh; fi
	@# An rbd image through our export and qemu-nbd, beside rbd bench (issue 19).
	@if command -v ceph-osd >/dev/null && [ -e /usr/include/rbd/librbd.h ]; then bench/rbd.sh; else echo "bench: rbd skipped (make oracles installs Ceph)"; fi

# Memory per disk (RSS, PSS, marginal cost; idle, after load, after idle):
# bench/memory.sh builds this tree and writes bench/results/memory-*/.
bench-memory:
	bench/memory.sh

# Convergence (issue 18): N YAML disks from `blktap run` to every export
# answering, and the remove-all / add-all edits; NS="16 64 256 1024".
bench-converge: build
	bench/converge.sh

# Every fuzz target, FUZZTIME each.
fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
	  for t in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
	    echo "== $$pkg $$t"; $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) $$pkg; \
	  done; done

# The Debian package: dist/blktap_VERSION_ARCH.deb, built with dpkg-deb
# alone (packaging/deb.sh says what goes where).
# The binary in it is static (CGO_ENABLED=0): no Depends on a libc version.
deb:
	mkdir -p dist
	$(call build-pair,CGO_ENABLED=0,dist,-trimpath)
	VERSION=$(VERSION) packaging/deb.sh dist/blktap dist

# For hosts without dpkg (same files as the .deb). The example desired
# state never replaces an existing one, and is removed only if unedited.
# Neither enables nor starts anything: systemctl daemon-reload, enable.
install: build
	packaging/install.sh install "$(BIN)/blktap" "$(DESTDIR)" "$(PREFIX)" "$(SYSCONFDIR)" "$(UNITDIR)"

uninstall:
	packaging/install.sh uninstall "" "$(DESTDIR)" "$(PREFIX)" "$(SYSCONFDIR)" "$(UNITDIR)"

clean:
	rm -rf $(BIN) dist
