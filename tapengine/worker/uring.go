package worker

import (
	"time"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/raw"
)

// The I/O engines a disk may ask for (Request.IO, the YAML's io key).
const (
	// IOThreads: pread/pwrite, on the ring loop's thread or the NBD
	// export's workers.
	IOThreads = "threads"
	// IOURing: io_uring for a raw image's reads and writes, a ring
	// batch's in one submission.
	IOURing = "uring"
	// IOAuto: whichever docs/PERFORMANCE.md measured faster for the
	// disk's format; the default. Today that is threads everywhere: no
	// job measured io_uring faster in alternating runs, and buffered
	// writes through it lost at QD1 on the guest view.
	IOAuto = "auto"
)

// IOEngines lists the values Request.IO takes ("" is IOAuto).
var IOEngines = []string{IOAuto, IOThreads, IOURing}

// useURing decides whether a disk's image does its I/O through io_uring.
// Where io_uring cannot work (another format, a kernel or container that
// forbids it) the disk gets threads and one log line says why: an
// engine is a speed choice, never a reason to fail a disk.
func (w *worker) useURing(want, format string) bool {
	if want != IOURing {
		return false // IOThreads, IOAuto, "" (see IOAuto)
	}
	if format != "raw" {
		w.logger.Info("worker: io_uring serves raw images only; using threads", "format", format, "io", want)
		return false
	}
	if err := uringSupported(); err != nil {
		w.logger.Info("worker: io_uring unavailable; using threads", "io", want, "err", err)
		return false
	}
	return true
}

// uringSupported is raw.URingSupported; tests play a host without
// io_uring through it.
var uringSupported = raw.URingSupported

// batch does ops through img's Batcher, or one ReadAt/WriteAt each.
func batch(img image.Image, ops []image.BatchOp) {
	if b, ok := img.(image.Batcher); ok {
		b.Batch(ops)
		return
	}
	for i := range ops {
		op := &ops[i]
		if op.Write {
			_, op.Err = img.WriteAt(op.Buf, op.Off)
		} else {
			_, op.Err = img.ReadAt(op.Buf, op.Off)
		}
	}
}

// Batch is the gate's image.Batcher: the image behind it may have none
// (a resume can swap formats), then the ops run one by one.
func (g *gate) Batch(ops []image.BatchOp) {
	g.mu.RLock()
	defer g.mu.RUnlock()
	batch(g.img, ops)
}

// Batch charges each op to the budgets and meters it as taking the whole
// batch's time, which is what its requester waited.
func (t *throttle) Batch(ops []image.BatchOp) {
	reads := 0
	for i := range ops {
		t.wait(len(ops[i].Buf))
		if !ops[i].Write {
			reads++
		}
	}
	t.meter.inFlight.Add(int64(len(ops)))
	t.meter.bell.Ring()
	t0 := time.Now()
	batch(t.Image, ops)
	d := time.Since(t0)
	t.meter.inFlight.Add(-int64(len(ops)))
	t.meter.record(opRead, d, reads)
	t.meter.record(opWrite, d, len(ops)-reads)
}
