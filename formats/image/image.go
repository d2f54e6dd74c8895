// Package image holds the contract every disk format implements and the
// error classes shared by all of them. It imports nothing of the project,
// so format packages and their callers can both depend on it.
//
// An Image is safe for concurrent use: ReadAt, WriteAt, Discard, Map and
// Flush may be called from many goroutines at once. The duties are:
//
//  1. WriteAt returns only once the data is in the image (the page cache
//     at least, with every metadata update it needs ordered so a crash
//     leaves a valid image).
//  2. Flush returns only once every write that completed before it was
//     called is durable (fdatasync or stronger).
//  3. ReadAt and WriteAt never go past Size(); a request that would gets
//     ErrOutOfRange and touches nothing.
//  4. Close flushes, then releases the image. Calls after Close fail.
package image

import (
	"errors"
	"fmt"
	"io"
)

// ExtentKind says what a range of an image holds.
type ExtentKind uint8

const (
	// Data is allocated and holds data (which may happen to be zero).
	Data ExtentKind = iota
	// Zero reads as zeros and is known to, though space may be allocated.
	Zero
	// Hole is unallocated in every layer and reads as zeros.
	Hole
)

func (k ExtentKind) String() string {
	switch k {
	case Data:
		return "data"
	case Zero:
		return "zero"
	case Hole:
		return "hole"
	}
	return fmt.Sprintf("ExtentKind(%d)", uint8(k))
}

// Extent is one run of an image with a single kind. Depth is the layer of
// a backing chain the run comes from: 0 for the image itself, 1 for its
// backing file, and so on; for holes it is the chain's length.
type Extent struct {
	Offset int64
	Length int64
	Kind   ExtentKind
	Depth  int
}

// AppendExtent appends x to exts, or lengthens the last extent when x
// continues it with the same kind and depth, so a map lists each run once.
// An empty x is dropped.
func AppendExtent(exts []Extent, x Extent) []Extent {
	if x.Length <= 0 {
		return exts
	}
	if k := len(exts) - 1; k >= 0 && exts[k].Kind == x.Kind && exts[k].Depth == x.Depth && exts[k].Offset+exts[k].Length == x.Offset {
		exts[k].Length += x.Length
		return exts
	}
	return append(exts, x)
}

// Image is one open disk image.
type Image interface {
	io.ReaderAt
	io.WriterAt
	// Size is the virtual size in bytes.
	Size() int64
	// Flush makes every completed write durable.
	Flush() error
	// Discard tells the image that a range is no longer needed; afterwards
	// the range reads as zeros.
	Discard(off, length int64) error
	// Map describes [off, off+length) as contiguous, ordered extents that
	// cover the whole range.
	Map(off, length int64) ([]Extent, error)
	// Close flushes and releases the image.
	Close() error
}

// Error classes. Every error a format returns about its input wraps one of
// these, so callers decide retry policy with errors.Is, never by text.
var (
	// ErrCorrupt: the image's metadata is inconsistent or out of bounds.
	ErrCorrupt = errors.New("corrupt image")
	// ErrUnsupported: the image is valid but uses a feature we lack.
	ErrUnsupported = errors.New("unsupported image feature")
	// ErrWrongFormat: the file is not an image of the format asked for.
	ErrWrongFormat = errors.New("wrong image format")
	// ErrReadOnly: a write, discard or create on an image opened read-only.
	ErrReadOnly = errors.New("image is read-only")
	// ErrOutOfRange: a request reaches past the end of the image.
	ErrOutOfRange = errors.New("request past the end of the image")
	// ErrClosed: a call on an image after Close.
	ErrClosed = errors.New("image is closed")
)

// FormatError locates a problem in an image file. It unwraps to its class.
type FormatError struct {
	Format string // "qcow2", "vhd", ...
	Offset int64  // byte offset in the file of the field, or -1
	Field  string // the field, e.g. "l1_table_offset"
	Err    error  // the class (ErrCorrupt, ErrUnsupported, ErrWrongFormat) or a wrapped one
	Detail string // what is wrong, for people
}

func (e *FormatError) Error() string {
	s := e.Format
	if e.Field != "" {
		s += ": " + e.Field
	}
	if e.Offset >= 0 {
		s += fmt.Sprintf(" (offset %d)", e.Offset)
	}
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *FormatError) Unwrap() error { return e.Err }

// CheckRange reports ErrOutOfRange when [off, off+n) is not inside an image
// of the given size.
func CheckRange(off int64, n int, size int64) error {
	return CheckRange64(off, int64(n), size)
}

// CheckRange64 is CheckRange for lengths that may not fit an int (Discard,
// Map).
func CheckRange64(off, length, size int64) error {
	if off < 0 || length < 0 || off > size || length > size-off {
		return fmt.Errorf("%w: offset %d length %d size %d", ErrOutOfRange, off, length, size)
	}
	return nil
}

// ReadBacking fills p with what backing holds at off: zeros past its end,
// or everywhere when backing is nil (no backing file). Formats with a
// backing chain read unallocated ranges through it.
func ReadBacking(backing Image, p []byte, off int64) error {
	if backing == nil {
		clear(p)
		return nil
	}
	n := int64(0)
	if size := backing.Size(); off < size {
		n = min(int64(len(p)), size-off)
		if _, err := backing.ReadAt(p[:n], off); err != nil {
			return err
		}
	}
	clear(p[n:])
	return nil
}

// OpenFunc opens a backing file on behalf of an image that names it. The
// caller of a format's Open passes one in, so the caller (never the format)
// decides which paths may be opened, resolves relative names, limits chain
// depth and refuses loops. format is "" when the image declares none; the
// function must then probe safely and must not let the result be written.
// A backing image is always opened read-only.
type OpenFunc func(path, format string) (Image, error)

// BatchOp is one read or write of a Batch.
type BatchOp struct {
	Write bool
	Buf   []byte
	Off   int64
	// Err is set by Batch: nil once all of Buf was read or written, else
	// what ReadAt or WriteAt would have returned.
	Err error
}

// Starter is an Image that starts a read or a write and returns before it
// finishes (rbd, on librbd's aio), so a request in flight costs its caller
// no goroutine. Optional: callers type-assert, and use ReadAt and WriteAt
// when it is missing or Starts reports false.
type Starter interface {
	// Starts reports whether StartRead and StartWrite can be used.
	Starts() bool
	// StartRead starts reading len(p) bytes at off into p, StartWrite
	// writing p at off; p is not empty. Until the call completes the
	// image owns p. It completes once, on a goroutine of the image's own,
	// with c.Complete(cookie, data, err): err is nil once every byte was
	// read (data is then p) or written (a write is then in the image, as
	// after WriteAt). Every Completer that got Complete calls in one batch
	// then gets one CompleteBatch call. One image makes these calls from
	// one goroutine at a time, so a Completer needs no lock of its own for
	// them. Close returns only after every started call's Complete and
	// CompleteBatch have returned; they may start further calls, which
	// fail once Close has begun, but must not Close the image (it would
	// wait for them). An error returned means nothing was started, and c
	// is not called.
	StartRead(p []byte, off int64, c Completer, cookie uint64) error
	StartWrite(p []byte, off int64, c Completer, cookie uint64) error
}

// Completer receives the completions of a Starter's calls (the shape of
// tapengine/nbd's and tapengine/frontend's: one interface literal).
type Completer = interface {
	Complete(cookie uint64, data []byte, err error)
	CompleteBatch()
}

// Batcher is an Image that does many reads and writes in one call, with
// fewer system calls than one ReadAt or WriteAt each (an io_uring). Batch
// returns once every op is done; the ops may run in any order and at
// once, so a caller puts in one batch only ops it would also run
// concurrently. Optional: callers type-assert, and loop over ReadAt and
// WriteAt otherwise.
type Batcher interface {
	Batch(ops []BatchOp)
}
