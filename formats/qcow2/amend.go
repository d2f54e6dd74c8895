package qcow2

// Changing an image's settings in place (`image amend`): the version
// (compat), lazy refcounts, and the size. A version change rewrites the
// header cluster in one write, after everything the new version needs is
// durable: a downgrade first turns every zero cluster into plain zeros,
// which version 2 can express.

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// AmendOptions say what Amend changes; zero values leave a setting alone.
type AmendOptions struct {
	Compat        string // "0.10" (or "v2") or "1.1" (or "v3")
	LazyRefcounts *bool
	RefcountBits  int   // only the current width is accepted
	Size          int64 // a larger size (shrinking is `image resize --shrink`)
}

// ErrAmend: a change qemu-img refuses too; the message is qemu's.
var ErrAmend = errors.New("qcow2: amend refused")

func amendErr(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrAmend}, args...)...)
}

// Amend applies o. Like Resize it must not run concurrently with other
// calls on img.
func (img *Image) Amend(o AmendOptions) error {
	h := img.hdr
	version, lazy, err := img.amendTargets(o)
	if err != nil {
		return err
	}
	if o.Size != 0 && o.Size < img.size {
		return amendErr("size %d is smaller than the image (%d): use image resize --shrink", o.Size, img.size)
	}
	if version != h.version && (len(img.snaps) > 0 || h.hasBitmaps || h.hasFDE || h.unknownExtensions > 0) {
		return unsupported(4, "version", "changing the version of an image with internal snapshots, bitmaps or unknown header extensions is not supported")
	}
	if o.Size > img.size {
		if err := img.Resize(o.Size); err != nil {
			return err
		}
	}
	img.io.Lock()
	defer img.io.Unlock()
	if !lazy && h.compatible&compatLazyRefcounts != 0 {
		if err := img.lazyOff(); err != nil {
			return err
		}
	}
	switch {
	case version < h.version:
		if err := img.downgrade(); err != nil {
			return err
		}
	case version > h.version:
		if err := img.rewriteHeader(3); err != nil {
			return err
		}
	}
	if lazy && h.compatible&compatLazyRefcounts == 0 {
		img.mu.Lock()
		defer img.mu.Unlock()
		return img.setCompatibleLocked(h.compatible | compatLazyRefcounts)
	}
	return nil
}

// amendTargets checks o against the image as qemu-img does and returns
// the version and lazy-refcounts setting wanted.
func (img *Image) amendTargets(o AmendOptions) (uint32, bool, error) {
	h := img.hdr
	version := h.version
	switch o.Compat {
	case "":
	case "0.10", "v2":
		version = 2
	case "1.1", "v3":
		version = 3
	default:
		return 0, false, amendErr("Unknown compatibility level %s", o.Compat)
	}
	lazy := h.compatible&compatLazyRefcounts != 0
	if o.LazyRefcounts != nil {
		// As qemu: only a change is checked; a bit already on is
		// dropped by the downgrade without complaint.
		if *o.LazyRefcounts && !lazy && version < 3 {
			return 0, false, amendErr("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)")
		}
		lazy = *o.LazyRefcounts
	}
	if version < 3 {
		lazy = false // version 2 has no such bit: dropped with the version
	}
	bits := 1 << h.refcountOrder
	if version < 3 && (bits != 16 || (o.RefcountBits != 0 && o.RefcountBits != 16)) {
		return 0, false, amendErr("compat=0.10 requires refcount_bits=16")
	}
	if o.RefcountBits != 0 && o.RefcountBits != bits {
		return 0, false, unsupported(96, "refcount_order", "changing refcount_bits (%d to %d) is not supported", bits, o.RefcountBits)
	}
	return version, lazy, nil
}

// lazyOff makes the refcounts exact (the open of a dirty image rebuilt
// them), clears the dirty bit, then the lazy refcounts bit.
func (img *Image) lazyOff() error {
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.applyFreesLocked(); err != nil {
		return err
	}
	if err := img.releasePoolLocked(); err != nil {
		return err
	}
	if err := img.writeRefblocksLocked(); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	if img.mu.dirtySet {
		if err := img.setDirtyLocked(false); err != nil {
			return err
		}
	}
	return img.setCompatibleLocked(img.hdr.compatible &^ compatLazyRefcounts)
}

func (img *Image) setCompatibleLocked(v uint64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if err := img.writeMeta(b[:], 80, mHeader); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	img.hdr.compatible = v
	return nil
}

// downgrade turns zero clusters into what version 2 reads as zeros, then
// writes a version 2 header.
func (img *Image) downgrade() error {
	zeros, err := img.zeroClusters()
	if err != nil {
		return err
	}
	buf := make([]byte, img.cs)
	for _, vc := range zeros {
		img.mu.Lock()
		e, err := img.entryLocked(vc)
		backed := img.backing != nil && vc<<img.cbits < img.bsize
		if err == nil && e&offsetMask == 0 && !backed {
			// Unallocated reads as zeros here: no cluster needed.
			err = img.linkLocked(vc, 0, e)
			img.mu.Unlock()
		} else if img.mu.Unlock(); err == nil {
			err = img.writeCluster(vc, 0, buf)
		}
		if err != nil {
			return err
		}
	}
	img.mu.Lock()
	err = img.applyFreesLocked()
	img.mu.Unlock()
	if err != nil {
		return err
	}
	return img.rewriteHeader(2)
}

// zeroClusters lists the guest clusters whose entry has the zero flag,
// refusing a downgrade qemu refuses (zstd clusters: version 2 has only
// zlib).
func (img *Image) zeroClusters() ([]int64, error) {
	img.mu.Lock()
	defer img.mu.Unlock()
	var out []int64
	n := (img.size + img.cs - 1) >> img.cbits
	for vc := int64(0); vc < n; vc++ {
		if img.mu.l1[vc>>img.l2bits]&offsetMask == 0 {
			vc |= 1<<img.l2bits - 1 // no L2 table
			continue
		}
		e, err := img.entryLocked(vc)
		if err != nil {
			return nil, err
		}
		if e&entryCompressed != 0 && img.hdr.compressionType != compressionZlib {
			return nil, amendErr("Cannot downgrade an image with zstd compression type and existing compressed clusters")
		}
		if e&entryCompressed == 0 && e&entryZero != 0 {
			out = append(out, vc)
		}
	}
	return out, nil
}

// rewriteHeader writes the header cluster anew as version v, once all
// else is durable.
func (img *Image) rewriteHeader(v uint32) error {
	img.mu.Lock()
	defer img.mu.Unlock()
	if err := img.writeRefblocksLocked(); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	if img.mu.dirtySet {
		return corrupt(72, "incompatible_features", "the image is dirty; its refcounts must be rebuilt first")
	}
	h := *img.hdr
	h.version = v
	h.refcountOrder = 4
	h.incompatible, h.compatible, h.autoclear = 0, 0, 0
	h.compressionType = compressionZlib
	buf, err := encodeHeader(&h)
	if err != nil {
		return err
	}
	if err := img.writeMeta(buf, 0, mHeader); err != nil {
		return err
	}
	if err := img.f.Sync(); err != nil {
		return err
	}
	*img.hdr = h
	return nil
}
