package vmdk

import (
	"bytes"
	"compress/zlib"
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"runtime"
	"sync"

	"github.com/blktap-go/blktap/formats/image"
	"github.com/blktap-go/blktap/formats/internal/hostfile"
)

func metaMarker(val uint64, typ uint32) []byte {
	b := make([]byte, sectorSize)
	binary.LittleEndian.PutUint64(b, val)
	binary.LittleEndian.PutUint32(b[12:], typ)
	return b
}

// WriteStreamOptimized writes src to a new streamOptimized VMDK at dst (the
// layout VMware imports): header with the directory at the end, compressed
// grains with markers (all-zero grains omitted), grain tables, directory,
// footer and end-of-stream marker. Never overwrites dst; durable on return.
func WriteStreamOptimized(ctx context.Context, dst string, src image.Image) error {
	return writeStream(ctx, hostfile.OSFS{}, dst, src)
}

func writeStream(ctx context.Context, fs hostfile.FS, dst string, src image.Image) (err error) {
	size := src.Size()
	if size <= 0 {
		return createErr("stream: source size %d", size)
	}
	sectors := (size + sectorSize - 1) / sectorSize
	h := streamHeader(sectors)
	if h.gdEntries() > maxGDEntries {
		return createErr("stream: %w: image too large", image.ErrUnsupported)
	}
	d := newDescriptor("streamOptimized", sectors, "ide")
	d.Extents = []ExtentDesc{{Access: "RW", Sectors: sectors, Type: "SPARSE", File: filepath.Base(dst)}}
	f, err := fs.Open(dst, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return createErr("%w", err)
	}
	defer closeNew(fs, f, dst, &err)
	if _, err := f.WriteAt(h.marshal(), 0); err != nil {
		return createErr("%w", err)
	}
	if _, err := f.WriteAt(d.marshal(), sectorSize); err != nil {
		return createErr("%w", err)
	}
	w := newStreamWriter(f, h, src)
	if err := w.writeGrains(ctx); err != nil {
		return err
	}
	gdSector, err := w.writeTables()
	if err != nil {
		return err
	}
	fh := *h
	fh.GDOffset = gdSector
	for _, b := range [][]byte{metaMarker(1, markerFooter), fh.marshal(), metaMarker(0, markerEOS)} {
		if err := w.put(b); err != nil {
			return err
		}
	}
	if err := f.Sync(); err != nil {
		return createErr("%w", err)
	}
	return fs.SyncDir(filepath.Dir(dst))
}

// streamHeader is a streamOptimized header: compressed grains with
// markers, the directory at the end (its offset is in the footer copy).
func streamHeader(sectors int64) *sparseHeader {
	grainSec := int64(defaultGrain / sectorSize)
	return &sparseHeader{
		Version: 3, Flags: flagNLDetect | flagCompressed | flagMarkers,
		Capacity: uint64(sectors), GrainSize: uint64(grainSec), NumGTEsPerGT: 512,
		DescOffset: 1, DescSize: embedDescSec, GDOffset: gdAtEnd,
		GrainOffset: uint64(grainSec), CompressAlgorithm: compressDeflate,
	}
}

// streamWriter appends a stream's records in order after the header and
// remembers where each grain went.
type streamWriter struct {
	f        hostfile.File
	h        *sparseHeader
	src      image.Image
	size     int64
	pos      int64 // where the next record goes, sector-aligned
	gb       int64 // grain bytes
	grainSec int64
	gte      []uint32 // every grain table entry, in grain order
	zws      []*grainCompressor
	batch    []streamJob
}

type streamJob struct {
	g   int64
	rec []byte // marker + zlib data; nil for an all-zero grain
	err error
}

// newStreamWriter prepares one compressor per worker: grains are read and
// compressed by one worker per CPU (at most 8), a batch at a time.
func newStreamWriter(f hostfile.File, h *sparseHeader, src image.Image) *streamWriter {
	grainSec := int64(h.GrainSize)
	w := &streamWriter{f: f, h: h, src: src, size: src.Size(), pos: int64(h.GrainOffset) * sectorSize,
		gb: grainSec * sectorSize, grainSec: grainSec, gte: make([]uint32, h.gdEntries()*uint64(h.NumGTEsPerGT))}
	workers := max(1, min(runtime.GOMAXPROCS(0), 8))
	w.zws = make([]*grainCompressor, workers)
	for i := range w.zws {
		w.zws[i] = newGrainCompressor(w.gb)
	}
	w.batch = make([]streamJob, 0, 16*workers)
	return w
}

func (w *streamWriter) put(b []byte) error {
	if _, err := w.f.WriteAt(b, w.pos); err != nil {
		return createErr("stream: %w", err)
	}
	w.pos += (int64(len(b)) + sectorSize - 1) &^ (sectorSize - 1)
	return nil
}

// writeGrains queues every grain the source's map says holds data (each
// once, though extents may share a grain) and writes them in order.
func (w *streamWriter) writeGrains(ctx context.Context) error {
	ext, err := w.src.Map(0, w.size)
	if err != nil {
		return createErr("stream: map source: %w", err)
	}
	nGrains := (w.size + w.gb - 1) / w.gb
	next := int64(0) // first grain not yet queued
	for _, x := range ext {
		if x.Kind != image.Data {
			continue
		}
		for g := max(next, x.Offset/w.gb); g < nGrains && g*w.gb < x.Offset+x.Length; g++ {
			next = g + 1
			w.batch = append(w.batch, streamJob{g: g})
			if len(w.batch) == cap(w.batch) {
				if err := w.flushBatch(ctx); err != nil {
					return err
				}
			}
		}
	}
	return w.flushBatch(ctx)
}

// flushBatch compresses the batch in parallel, then writes its grains in
// grain order so the stream stays sequential.
func (w *streamWriter) flushBatch(ctx context.Context) error {
	workers := len(w.zws)
	var wg sync.WaitGroup
	for k := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := k; i < len(w.batch); i += workers {
				j := &w.batch[i]
				n := min(w.gb, w.size-j.g*w.gb)
				j.rec, j.err = w.zws[k].grain(w.src, j.g, n, uint64(j.g*w.grainSec))
			}
		}()
	}
	wg.Wait()
	for _, j := range w.batch {
		if j.err != nil {
			return j.err
		}
		if j.rec == nil {
			continue
		}
		if w.pos/sectorSize > 1<<32-1 {
			return createErr("stream: %w: output passes 2 TiB", image.ErrUnsupported)
		}
		w.gte[j.g] = uint32(w.pos / sectorSize)
		if err := w.put(j.rec); err != nil {
			return err
		}
	}
	w.batch = w.batch[:0]
	return ctx.Err()
}

// writeTables writes each grain table that has an entry, then the grain
// directory, each behind its marker; it returns the directory's sector.
func (w *streamWriter) writeTables() (uint64, error) {
	h := w.h
	per := int(h.NumGTEsPerGT)
	gd := make([]byte, (h.gdEntries()*4+sectorSize-1)/sectorSize*sectorSize)
	tb := make([]byte, h.gtSectors()*sectorSize)
	for i := 0; i < int(h.gdEntries()); i++ {
		t := w.gte[i*per : (i+1)*per]
		if allZero32(t) {
			continue
		}
		for j, v := range t {
			binary.LittleEndian.PutUint32(tb[4*j:], v)
		}
		if err := w.put(metaMarker(h.gtSectors(), markerGT)); err != nil {
			return 0, err
		}
		binary.LittleEndian.PutUint32(gd[4*i:], uint32(w.pos/sectorSize))
		if err := w.put(tb); err != nil {
			return 0, err
		}
	}
	if err := w.put(metaMarker(uint64(len(gd)/sectorSize), markerGD)); err != nil {
		return 0, err
	}
	at := uint64(w.pos / sectorSize)
	return at, w.put(gd)
}

func allZero32(t []uint32) bool {
	for _, v := range t {
		if v != 0 {
			return false
		}
	}
	return true
}

// grainCompressor reads and compresses grains for the stream writer; one
// per worker, reused across grains.
type grainCompressor struct {
	buf  []byte
	zbuf bytes.Buffer
	zw   *zlib.Writer
}

func newGrainCompressor(gb int64) *grainCompressor {
	c := &grainCompressor{buf: make([]byte, gb)}
	c.zw, _ = zlib.NewWriterLevel(&c.zbuf, zlib.DefaultCompression)
	return c
}

// grain returns grain g (n bytes of it in the source) as a grain marker and
// its zlib data, or nil when the grain is all zeros. The result is a fresh
// slice: the caller keeps it while the compressor moves on.
func (c *grainCompressor) grain(src image.Image, g, n int64, lba uint64) ([]byte, error) {
	gb := int64(len(c.buf))
	clear(c.buf[n:])
	if _, err := src.ReadAt(c.buf[:n], g*gb); err != nil {
		return nil, createErr("stream: read source at %d: %w", g*gb, err)
	}
	if image.IsZero(c.buf) {
		return nil, nil
	}
	c.zbuf.Reset()
	c.zbuf.Write(make([]byte, 12))
	c.zw.Reset(&c.zbuf)
	c.zw.Write(c.buf)
	if err := c.zw.Close(); err != nil {
		return nil, createErr("stream: compress: %w", err)
	}
	rec := bytes.Clone(c.zbuf.Bytes())
	binary.LittleEndian.PutUint64(rec, lba)
	binary.LittleEndian.PutUint32(rec[8:], uint32(len(rec)-12))
	return rec, nil
}
