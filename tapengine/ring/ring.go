// Package ring moves blkif requests and responses over a shared ring: the
// backend loop (Serve) that answers one ring from one image, the
// frontend half (Front) that the local frontend drives, and the Transport
// through which the backend reaches the frontend's memory and signals.
//
// Who owns what in the shared ring (see package blkif for the layout):
//
//	req_prod   written by the frontend only: requests in [.., req_prod) are published
//	req_event  written by the backend only: "kick me when req_prod passes this"
//	rsp_prod   written by the backend only: responses in [.., rsp_prod) are published
//	rsp_event  written by the frontend only: "notify me when rsp_prod passes this"
//
// Each side keeps its private index (req_cons / rsp_prod_pvt for the
// backend, req_prod_pvt / rsp_cons for the frontend) in its own memory,
// never in the shared page, so the peer cannot move it.
//
// Producer duties (both directions, ring.h):
//
//  1. Write the entries into their slots. The backend writes a response
//     only just before step 2 (Back stages it until then): the slot
//     still holds its request, which a restarted backend would otherwise
//     read back as one.
//  2. Publish the new producer index (a release store).
//  3. Read the peer's event index after the store (a full barrier) and
//     signal iff event lies in (old, new]; otherwise the peer is awake and
//     will see the entries on its own.
//
// Consumer duties:
//
//  1. Read the producer index (an acquire load), then copy each entry out
//     of shared memory exactly once and validate only the copy.
//  2. Before sleeping, set the event index to consumed+1, then re-read the
//     producer index: if entries arrived meanwhile, go on consuming
//     (the "final check"), else sleep until signalled.
//
// The backend treats the frontend as an adversary: a bad request gets an
// error response for that request only; a producer index more than a ring
// ahead of the responses stops the ring with an error wrapping ErrHostile.
package ring

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"

	"github.com/blktap-go/blktap/tapengine/blkif"
)

// PageReleaser is a Transport whose data pages must be given back before
// the frontend sees the responses that used them (Xen grants that are not
// persistent: blkfront checks that the backend unmapped them). Serve calls
// ReleasePages after a batch's responses are decided and before they are
// written to the ring and published.
type PageReleaser interface {
	ReleasePages() error
}

// PageReserver is a Transport whose page mappings are a scarce, shared
// resource (every Xen data-page map is a VMA, and a process has
// vm.max_map_count of them). Its Page may fail with an error wrapping
// ErrPagesBusy instead of waiting while the loop holds pages, since the
// loop alone can release them and pages held while waiting could
// deadlock rings that wait on each other. Serve then answers what it
// has, publishes (a release point), and calls ReservePages with the
// number of pages the request needs: holding nothing, it may wait there
// until that many can be mapped, after which the request is mapped again.
// If ctx ends the wait, the request is left in the ring unanswered for
// the next Serve.
type PageReserver interface {
	PageReleaser
	ReservePages(ctx context.Context, n int) error
}

// Copier is a Transport that can move a request's data by copying
// between the frontend's granted pages and the backend's own memory (Xen's
// grant copy) instead of mapping the pages. When Copying reports true at
// the start of Serve, Serve never calls Page: each read or write request
// gets one buffer of its length, filled by one CopyIn before a write
// reaches the image, or copied out by one CopyOut after a read, and
// indirect descriptor pages come in through CopyIn too. A copy error fails
// that request (StatusError); it never stops the ring. CopyIn and CopyOut
// may run on several goroutines at once.
type Copier interface {
	Copying() bool
	// CopyIn fills buf from the frontend's pages: segs in order, each
	// Len bytes, back to back in buf (len(buf) is their sum).
	CopyIn(segs []CopySeg, buf []byte) error
	// CopyOut is CopyIn's reverse: buf into the frontend's pages, which
	// must be granted writable.
	CopyOut(segs []CopySeg, buf []byte) error
}

// CopySeg is a byte range of one granted page.
type CopySeg struct {
	Ref      uint32
	Off, Len uint16 // Off+Len <= 4096
}

// Transport is how the backend reaches the frontend's memory and signals.
// The ring loop knows nothing else of Xen (or of its absence).
type Transport interface {
	// Ring is the mapped shared ring, 4096<<order bytes, page-aligned.
	Ring() []byte
	// Page maps a granted 4096-byte data page. It fails if ref is not
	// granted, or is granted read-only and writable is asked. The page stays
	// usable until Close, or, for a PageReleaser, until ReleasePages.
	Page(ref uint32, writable bool) ([]byte, error)
	// WaitFD is readable when the frontend has signalled (for epoll).
	WaitFD() int
	// Ack consumes pending signals.
	Ack() error
	// Notify signals the frontend.
	Notify() error
	// Close unmaps everything and closes the descriptors.
	Close() error
}

// Error classes.
var (
	// ErrHostile: the frontend broke the ring protocol so badly that the
	// ring cannot go on (it is not a single bad request).
	ErrHostile = errors.New("ring: hostile peer")
	// ErrRingFull: no free slot for a request.
	ErrRingFull = errors.New("ring: full")
	// ErrBadRing: the ring memory or parameters are unusable.
	ErrBadRing = errors.New("ring: bad ring")
	// ErrPagesBusy: a PageReserver has no mapping to spare until the
	// loop releases the pages it holds (not a fault of the request).
	ErrPagesBusy = errors.New("ring: page mappings busy")
	// ErrBadGrant: a Copier's copy failed because the frontend's grant
	// was refused (not granted, read-only, its own ring): the request's
	// fault, counted as invalid, not an I/O error of the backend.
	ErrBadGrant = errors.New("ring: grant refused")
)

// Options tunes Serve.
type Options struct {
	// ReadOnly refuses every request that would change the image.
	ReadOnly bool
	// Logger receives per-ring diagnostics; nil means slog.Default().
	Logger *slog.Logger
	// Stats, if set, receives the ring's counters (safe to read while
	// Serve runs).
	Stats *Stats
	// Discard enables BLKIF_OP_DISCARD (the reconciler then publishes
	// feature-discard). Secure discard is always refused.
	Discard bool
	// MaxIndirectSegments enables BLKIF_OP_INDIRECT with up to this many
	// segments per request (the value of feature-max-indirect-segments;
	// 0 disables indirect requests; capped at 8*512).
	MaxIndirectSegments int
	// Workers > 1 submits the I/O of a batch concurrently on that many
	// goroutines (plus the loop's own thread). 0 or 1 does every request
	// on the loop's thread, which is fastest when the image is in the
	// page cache.
	Workers int
	// Batch hands the reads and writes of a batch to the image in one
	// call, where it implements image.Batcher (an io_uring raw image),
	// instead of Workers; a flush or barrier still runs alone after
	// everything before it.
	Batch bool
	// Persistent advertises feature-persistent: the transport keeps a
	// frontend's grants mapped across requests (the Xen transport does;
	// Serve itself is unaffected).
	Persistent bool
}

// Stats are a ring's counters. All fields are atomics: read them at any
// time.
type Stats struct {
	// Requests received by op. An indirect request counts in Indirects
	// and in Reads or Writes (its inner op).
	Reads, Writes, Flushes, Barriers, Discards, Indirects atomic.Uint64
	BytesRead, BytesWritten                               atomic.Uint64
	// Errors counts error responses of any cause; Invalid those caused
	// by a malformed request; Unsupported the EOPNOTSUPP ones.
	Errors, Invalid, Unsupported atomic.Uint64
	// Batches counts drain rounds that answered at least one request,
	// Notifies the signals sent, Wakeups the times the loop woke.
	Batches, Notifies, Wakeups atomic.Uint64
}

// orderOf returns the ring order for a mapping of n bytes.
func orderOf(n int) (int, error) {
	for order := 0; order <= blkif.MaxRingOrder; order++ {
		if n == blkif.RingSize(order) {
			return order, nil
		}
	}
	return 0, fmt.Errorf("%w: ring of %d bytes is not 4096<<order with order <= %d", ErrBadRing, n, blkif.MaxRingOrder)
}
