// Package nbd is the "nbd" format: a disk image that lives on a remote NBD
// server (qemu-nbd, nbdkit and its plugins, another blktap), reached by a
// Go NBD client. Params are an NBD URI:
//
//	nbd:nbd+unix:///EXPORT?socket=PATH     a unix socket
//	nbd:nbd://HOST:PORT/EXPORT             TCP (no TLS)
//
// Protocol: fixed newstyle negotiation with STRUCTURED_REPLY, then
// SET_META_CONTEXT base:allocation, then GO (EXPORT_NAME when the server
// does not know GO). Any number of requests are in flight on the one
// connection: callers' goroutines write requests (one writev each, under a
// write lock), and one reader goroutine per connection matches replies to
// requests by cookie and reads data straight into the caller's buffer.
//
//	caller goroutines --request--> [socket] --> server
//	reader goroutine  <--reply---- [socket] <-- server   (cookie -> request)
//
// How each Image method maps to NBD:
//
//	ReadAt   READ (split at the server's maximum payload, all in flight)
//	WriteAt  WRITE (likewise)
//	Flush    FLUSH; nil at once when the server lacks SEND_FLUSH (no cache)
//	Discard  WRITE_ZEROES without NO_HOLE (zeros guaranteed; may punch)
//	Trim     TRIM (extra method: contents undefined afterwards)
//	Map      BLOCK_STATUS base:allocation; all Data without it
//
// Failures. When the connection drops (server killed, restarted, network
// reset, a reply that breaks the protocol), the client reconnects with
// exponential backoff (20 ms doubling to 2 s, until Close) and sends every
// request still waiting again on the new connection: reads, writes and
// zeroing are idempotent at block level, so one that the old server did
// execute does no harm when repeated. Every request has a deadline
// (Options.Timeout, default 30 s) from the call to its answer: past it the
// call fails with an error matching ErrTimeout and unix.EIO, and the
// connection it was waiting on is dropped and replaced, since a server that
// does not answer within the deadline is stuck. Nothing waits forever.
// A reconnection that finds a different export size does not use it.
//
// Caller's duties:
//
//  1. Open with the URI from the disk's params; open read-only exports
//     with Options.ReadOnly (else Open fails with image.ErrReadOnly).
//  2. Treat an error matching unix.EIO as an I/O error of that request
//     only: the image stays usable and recovers when the server returns.
//  3. Call Flush before acknowledging a guest's flush. After a connection
//     drop with acknowledged but unflushed writes, the next Flush reports
//     unix.EIO once: a server that crashed may have lost them.
//  4. Close the image: it flushes, sends DISC and stops reconnecting;
//     requests still waiting fail with image.ErrClosed.
//
// The wire format is internal/nbdwire's. Every length a server sends
// is checked against the request it answers, or capped, before any
// allocation; a server that breaks the protocol costs a reconnect, never
// a panic or a hang.
package nbd
