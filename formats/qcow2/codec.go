package qcow2

import (
	"bytes"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// Compression types of the header's compression_type byte (version 3,
// with the incompatible compression bit set for anything but zlib).
const (
	compressionZlib = 0
	compressionZstd = 1
)

// qemuDeflateWindow is the window qemu's raw deflate streams use (zlib
// windowBits -12), and so the most any reader of the image may assume:
// a compressed cluster must not refer further back than this.
const qemuDeflateWindow = 4096

// codec compresses and decompresses one cluster at a time for one
// compression type. Safe for concurrent use.
type codec interface {
	// compress appends the compressed form of src to dst.
	compress(dst, src []byte) ([]byte, error)
	// decompress fills dst from src, which may run on past the end of
	// the compressed data (the descriptor counts whole sectors).
	decompress(dst, src []byte) error
	name() string
}

func codecFor(t uint8) (codec, error) {
	switch t {
	case compressionZlib:
		return deflateCodec{}, nil
	case compressionZstd:
		return zstdCodec{}, nil
	}
	return nil, fmt.Errorf("compression_type %d", t)
}

type deflateCodec struct{}

func (deflateCodec) name() string { return "zlib" }

var deflateWriters = sync.Pool{New: func() any {
	w, err := flate.NewWriterWindow(io.Discard, qemuDeflateWindow)
	if err != nil {
		panic(err) // only for a window outside flate's fixed bounds
	}
	return w
}}

func (deflateCodec) compress(dst, src []byte) ([]byte, error) {
	b := bytes.NewBuffer(dst)
	w := deflateWriters.Get().(*flate.Writer)
	defer deflateWriters.Put(w)
	w.Reset(b)
	if _, err := w.Write(src); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

func (deflateCodec) decompress(dst, src []byte) error {
	r := flate.NewReader(bytes.NewReader(src))
	defer r.Close()
	_, err := io.ReadFull(r, dst)
	return err
}

type zstdCodec struct{}

func (zstdCodec) name() string { return "zstd" }

var (
	zstdEncOnce sync.Once
	zstdEnc     *zstd.Encoder
	zstdEncErr  error
	zstdDecs    = sync.Pool{New: func() any {
		// Synchronous: the stream decoder must not read ahead into the
		// bytes after the frame, which belong to no frame.
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true))
		if err != nil {
			return err
		}
		return d
	}}
)

func (zstdCodec) compress(dst, src []byte) ([]byte, error) {
	zstdEncOnce.Do(func() {
		// qemu's level (zstd's default, 3) and no checksum: qemu neither
		// writes nor wants one, the qcow2 layer has none either.
		zstdEnc, zstdEncErr = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedDefault),
			zstd.WithEncoderCRC(false))
	})
	if zstdEncErr != nil {
		return nil, zstdEncErr
	}
	return zstdEnc.EncodeAll(src, dst), nil
}

func (zstdCodec) decompress(dst, src []byte) error {
	v := zstdDecs.Get()
	d, ok := v.(*zstd.Decoder)
	if !ok {
		return v.(error)
	}
	defer zstdDecs.Put(d)
	if err := d.Reset(bytes.NewReader(src)); err != nil {
		return err
	}
	_, err := io.ReadFull(d, dst)
	return err
}
