package formats

import (
	"context"
	"fmt"
	"os"
	"sync"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/backing"
	"github.com/blktap-go/blktap/formats/qcow"
	"github.com/blktap-go/blktap/formats/qcow2"
	"github.com/blktap-go/blktap/formats/raw"
	"github.com/blktap-go/blktap/formats/vhd"
	"github.com/blktap-go/blktap/formats/vmdk"
)

// CheckResult is what `image check` reports, in every format's terms.
// The cluster counts and ImageEndOffset follow qemu-img check's meaning
// and stay 0 where qemu reports none for the format.
type CheckResult struct {
	Format             string   `json:"format"`
	Problems           []string `json:"problems"`
	Corruptions        int      `json:"corruptions"`
	Leaks              int      `json:"leaks"`
	CorruptionsFixed   int      `json:"corruptions_fixed,omitempty"`
	LeaksFixed         int      `json:"leaks_fixed,omitempty"`
	TotalClusters      int64    `json:"total_clusters,omitempty"`
	AllocatedClusters  int64    `json:"allocated_clusters,omitempty"`
	FragmentedClusters int64    `json:"fragmented_clusters,omitempty"`
	CompressedClusters int64    `json:"compressed_clusters,omitempty"`
	ImageEndOffset     int64    `json:"image_end_offset,omitempty"`
	Detail             any      `json:"detail,omitempty"` // the format's own report
}

// RepairMode says what Check may fix, as qemu-img check -r: nothing,
// leaks only, or everything it can.
type RepairMode int

const (
	RepairNone RepairMode = iota
	RepairLeaks
	RepairAll
)

// Check checks the image at path for metadata problems and repairs what
// repair allows. backing opens parents where a check needs them (a VHD
// child's parent uuid); nil skips that part.
func Check(format, path string, repair RepairMode, backing OpenFunc) (*CheckResult, error) {
	name, err := Normalize(format)
	if err != nil {
		return nil, err
	}
	res := &CheckResult{Format: name, Problems: []string{}}
	switch name {
	case "raw":
		// Raw has no metadata: opening it is the whole check.
		img, err := raw.Open(path, raw.Options{ReadOnly: true})
		if err != nil {
			return nil, err
		}
		return res, img.Close()
	case "qcow":
		r, err := qcow.Check(path, qcow.CheckOptions{})
		if err != nil {
			return nil, err
		}
		for _, p := range r.Corruptions {
			res.Problems = append(res.Problems, fmt.Sprintf("ERROR at offset %d: %s", p.Offset, p.Message))
		}
		for _, p := range r.Leaks {
			res.Problems = append(res.Problems, fmt.Sprintf("Leaked cluster at offset %d: %s", p.Offset, p.Message))
		}
		res.Corruptions, res.Leaks, res.Detail = int(r.CorruptionCount), int(r.LeakedClusters), r
		res.TotalClusters, res.AllocatedClusters = r.TotalClusters, r.AllocatedClusters
		res.CompressedClusters, res.ImageEndOffset = r.CompressedClusters, r.ImageEndOffset
		if repair != RepairNone && res.Leaks > 0 {
			return res, fmt.Errorf("check %s: %w: qcow has no leak repair (leaks waste space but are harmless)", path, ErrUnsupported)
		}
		return res, nil
	case "qcow2":
		mode := qcow2.RepairNone
		switch repair {
		case RepairLeaks:
			mode = qcow2.RepairLeaks
		case RepairAll:
			mode = qcow2.RepairAll
		}
		r, err := qcow2.Check(path, qcow2.CheckOptions{Repair: mode})
		if err != nil {
			return nil, err
		}
		res.Problems = append(res.Problems, r.Problems...)
		res.Corruptions = int(r.Corruptions - r.CorruptionsFixed)
		res.Leaks = int(r.Leaks - r.LeaksFixed)
		res.CorruptionsFixed, res.LeaksFixed = int(r.CorruptionsFixed), int(r.LeaksFixed)
		res.TotalClusters, res.AllocatedClusters = r.TotalClusters, r.AllocatedClusters
		res.FragmentedClusters, res.CompressedClusters = r.FragmentedClusters, r.CompressedClusters
		res.ImageEndOffset, res.Detail = r.ImageEndOffset, r
		return res, nil
	case "vhd":
		// Everything vhd's repair touches (a lost footer, a stale batmap)
		// is a corruption, so leaks-only repair leaves it alone.
		r, err := vhd.Check(path, vhd.CheckOptions{Repair: repair == RepairAll, Backing: backing})
		if err != nil {
			return nil, err
		}
		res.Problems = append(res.Problems, r.Corruptions...)
		res.Problems = append(res.Problems, r.Warnings...)
		res.Corruptions, res.CorruptionsFixed, res.Detail = len(r.Corruptions), len(r.Repaired), r
		res.TotalClusters, res.AllocatedClusters = int64(r.TotalBlocks), int64(r.AllocatedBlocks)
		return res, nil
	case "vmdk":
		r, err := vmdk.Check(path, vmdk.CheckOptions{})
		if err != nil {
			return nil, err
		}
		res.Problems = append(res.Problems, r.Problems...)
		res.Corruptions, res.Leaks, res.Detail = r.Corruptions, r.Leaks, r
		if repair != RepairNone && r.Leaks > 0 {
			return res, fmt.Errorf("check %s: %w: vmdk has no free map, so leaked grains cannot be reclaimed", path, ErrUnsupported)
		}
		return res, nil
	}
	return nil, fmt.Errorf("check %s: %w: checking format %q is not built in yet", path, ErrUnsupported, name)
}

// Describe returns format-specific information about an open image for
// `image info`, or nil when the format has none.
func Describe(img Image) any {
	switch i := img.(type) {
	case *raw.Image:
		return nil
	case *qcow.Image:
		return i.Info()
	case *vmdk.Image:
		return i.Info()
	case *vhd.Image:
		return i.Info()
	case *qcow2.Image:
		return i.Info()
	}
	return nil
}

// convertBlock is the unit of a conversion: read, test for zeros, write.
const convertBlock = 1 << 20

// Convert copies in into a new image of outFormat at outPath, created with
// co (whose Size is taken from in when zero). Runs that read as zeros stay
// unallocated in the output. Reads run in parallel; progress, if not nil,
// is called with bytes done and total. On error the partial output is
// removed.
func Convert(ctx context.Context, in Image, outFormat, outPath string, co CreateOptions, progress func(done, total int64)) (err error) {
	return ConvertWith(ctx, in, outFormat, outPath, co, ConvertOptions{Progress: progress})
}

// ConvertOptions tune ConvertWith.
type ConvertOptions struct {
	Progress func(done, total int64)
	// Compress writes data clusters compressed (qcow2 output only).
	Compress bool
}

// compressor is an output image that can store compressed clusters.
type compressor interface {
	WriteCompressed(p []byte, off int64) error
}

// ConvertWith is Convert with options.
func ConvertWith(ctx context.Context, in Image, outFormat, outPath string, co CreateOptions, opt ConvertOptions) (err error) {
	if co.Size == 0 {
		co.Size = in.Size()
	}
	if name, _ := Normalize(outFormat); name == "vmdk" && co.Subformat == "streamOptimized" {
		return convertStream(ctx, in, outPath, opt.Progress)
	}
	if err := Create(outFormat, outPath, co); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			os.Remove(outPath)
		}
	}()
	// A failed convert deletes its output, and success ends in Flush.
	out, err := Open(outFormat, outPath, Options{Scratch: true})
	if err != nil {
		return err
	}
	var comp compressor
	if opt.Compress {
		c, ok := out.(compressor)
		if !ok {
			out.Close()
			return fmt.Errorf("convert: %w: %s output cannot be compressed (qcow2 can)", ErrUnsupported, outFormat)
		}
		comp = c
	}
	defer func() {
		if cerr := out.Close(); err == nil {
			err = cerr
		}
	}()
	exts, err := mapAll(in)
	if err != nil {
		return err
	}
	cp := &copier{in: in, out: out, comp: comp, progress: opt.Progress, total: in.Size()}
	if err := cp.run(ctx, exts); err != nil {
		return err
	}
	if cp.progress != nil {
		cp.progress(cp.total, cp.total)
	}
	return out.Flush()
}

// convertStream writes a streamOptimized VMDK, which is written in one
// pass and never opened for writing.
func convertStream(ctx context.Context, in Image, outPath string, progress func(done, total int64)) error {
	if progress != nil {
		progress(0, in.Size())
	}
	if err := vmdk.WriteStreamOptimized(ctx, outPath, in); err != nil {
		return err
	}
	if progress != nil {
		progress(in.Size(), in.Size())
	}
	return nil
}

// copier copies the data extents of in to out with four workers, on a
// fixed grid of convertBlock chunks.
type copier struct {
	in, out  Image
	comp     compressor // nil: plain writes
	progress func(done, total int64)
	total    int64

	mu    sync.Mutex
	done  int64 // bytes copied, guarded by mu
	first error // the first failure, guarded by mu
}

type copyJob struct{ off, n int64 }

func (c *copier) fail(e error) {
	c.mu.Lock()
	if c.first == nil {
		c.first = e
	}
	c.mu.Unlock()
}

func (c *copier) failed() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.first
}

func (c *copier) run(ctx context.Context, exts []Extent) error {
	jobs := make(chan copyJob)
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.work(jobs)
		}()
	}
	c.feed(ctx, exts, jobs)
	close(jobs)
	wg.Wait()
	if err := c.failed(); err != nil {
		return err
	}
	return ctx.Err()
}

// feed works in chunks on a fixed grid, so every write is aligned for any
// output cluster size (compressed clusters must be); a chunk is read when
// any extent in it holds data. It stops at the first failure.
func (c *copier) feed(ctx context.Context, exts []Extent, jobs chan<- copyJob) {
	next := int64(0)
	for _, e := range exts {
		if e.Kind != image.Data {
			continue
		}
		start := max(next, e.Offset/convertBlock*convertBlock)
		for off := start; off < e.Offset+e.Length; off += convertBlock {
			if c.failed() != nil || ctx.Err() != nil {
				return
			}
			jobs <- copyJob{off, min(convertBlock, c.total-off)}
			next = off + convertBlock
		}
	}
}

func (c *copier) work(jobs <-chan copyJob) {
	buf := make([]byte, convertBlock)
	for j := range jobs {
		if err := c.copyChunk(buf[:j.n], j.off); err != nil {
			c.fail(err)
			continue
		}
		c.mu.Lock()
		c.done += j.n
		d := c.done
		c.mu.Unlock()
		if c.progress != nil {
			c.progress(d, c.total)
		}
	}
}

// copyChunk copies one chunk; an all-zero chunk is not written, the new
// image reads zeros there already.
func (c *copier) copyChunk(b []byte, off int64) error {
	if _, err := c.in.ReadAt(b, off); err != nil {
		return fmt.Errorf("read at %d: %w", off, err)
	}
	if image.IsZero(b) {
		return nil
	}
	var err error
	if c.comp != nil {
		err = c.comp.WriteCompressed(b, off)
	} else {
		_, err = c.out.WriteAt(b, off)
	}
	if err != nil {
		return fmt.Errorf("write at %d: %w", off, err)
	}
	return nil
}

// mapAll returns the extents of the whole image (see backing.MapAll).
func mapAll(img Image) ([]Extent, error) { return backing.MapAll(img) }
