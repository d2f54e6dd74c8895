# blktap-go. `make run` serves examples/disks.yaml on the embedded default
# (no Xen needed); `make test` installs the test oracles when missing and
# runs vet and every test.
GO        ?= go
BIN       := bin
CONFIG    ?= examples/disks.yaml
STATE_DIR ?=
FUZZTIME  ?= 15s
TESTFLAGS ?=

.PHONY: all build run test vet lint fmt bench bench-memory fuzz oracles clean

all: build

build:
	$(GO) build -o $(BIN)/blktap ./cmd/blktap
	ln -sf blktap $(BIN)/qcow-create
	ln -sf blktap $(BIN)/img2qcow
	ln -sf blktap $(BIN)/qcow2raw
	ln -sf blktap $(BIN)/tap-ctl

run: build
	$(BIN)/blktap run -c $(CONFIG) $(if $(STATE_DIR),--state-dir $(STATE_DIR))

oracles:
	./scripts/install-oracles.sh

vet:
	$(GO) vet ./...

lint: vet
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

fmt:
	gofmt -w $$(git ls-files '*.go')

test: oracles lint build
	$(GO) test -race -timeout 30m $(TESTFLAGS) ./...

bench: build
	$(GO) test -run '^$$' -bench . -benchmem ./...
	@if [ -x bench/run.sh ]; then bench/run.sh; fi

# Memory per disk (RSS, PSS, marginal cost; idle, after load, after idle):
# bench/memory.sh builds this tree and writes bench/results/memory-*/.
bench-memory:
	bench/memory.sh

# Every fuzz target, FUZZTIME each.
fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
	  for t in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
	    echo "== $$pkg $$t"; $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) $$pkg; \
	  done; done

clean:
	rm -rf $(BIN)
