// Package nbd serves one disk over the NBD protocol (fixed newstyle
// handshake, simple, structured and extended replies). The same server
// runs inside each disk's worker process, answering dom0 straight from the
// image, and in the daemon, where the local frontend exposes a guest's
// view whose backend pushes requests through a blkif ring.
//
// # Using it
//
//  1. Build a Server with an Export whose Backend is safe for concurrent
//     use (an image.Image is). Optional capabilities are found by type
//     assertion: Discarder (TRIM), Mapper (block status and sparse reads),
//     ZeroWriter (fast WRITE_ZEROES).
//  2. Call Serve with a listener (unix or loopback TCP; the caller creates
//     it and sets its permissions), or ServeConn per accepted connection.
//     Do not change the Server's fields afterwards.
//  3. Read Stats at any time.
//  4. Stop with Close or by cancelling the context: listeners close first,
//     then each connection stops reading, answers what it has in flight
//     and closes. Close returns when every connection is gone; the Backend
//     stays open (the caller owns it).
//
// # TLS
//
// With Server.TLSConfig set (LoadTLSConfig builds one from PEM files) the
// server is TLS-only, proto.md's FORCEDTLS mode, as qemu-nbd with
// --tls-creds:
//
//  1. The client must set FIXED_NEWSTYLE; otherwise it is dropped.
//  2. Before NBD_OPT_STARTTLS every option but ABORT is answered
//     NBD_REP_ERR_TLS_REQD; NBD_OPT_EXPORT_NAME, which cannot be refused,
//     drops the client.
//  3. STARTTLS (no data) gets NBD_REP_ACK in clear, then the TLS handshake
//     runs on the same connection (a failed one drops the client), then
//     haggling starts over inside TLS; a second STARTTLS gets
//     NBD_REP_ERR_INVALID.
//
// X.509 only: Go's crypto/tls has no TLS-PSK. Client certificates are
// required and verified when the config names client CAs. Without
// TLSConfig, STARTTLS gets NBD_REP_ERR_POLICY. Use TLS for every TCP
// listener that is not loopback; the caller decides.
//
// # What the server promises
//
//   - A write is acknowledged only after Backend.WriteAt returned; FUA adds
//     Backend.Flush before the reply; FLUSH calls Backend.Flush. Because
//     every connection shares one Backend, a flush covers writes made on
//     any connection, so CAN_MULTI_CONN is advertised unless
//     Export.NoMultiConn says otherwise.
//   - Replies may leave out of order; each is written whole.
//   - READ and WRITE up to MaxPayload (32 MiB, advertised as the maximum
//     block size) are buffered; up to MaxStreamed (64 MiB, what clients
//     told no block size may send, as nbdkit serves them) they are
//     streamed in 4 MiB parts: a write on the reader goroutine, a read
//     holding the socket for its whole reply.
//   - A request the server can answer without losing its place in the
//     stream (a read past the end, an absurd length, an unknown command or
//     flag) gets an error reply and the connection goes on; a refused
//     write's payload is read and dropped, never buffered. Anything that
//     loses the framing (a bad magic, a write payload above MaxStreamed)
//     drops that connection only.
//
// # Wire layouts
//
// The protocol's numbers and header layouts live in internal/nbdwire,
// shared with the client (formats/nbd) and the kernel glue
// (tapengine/nbdkernel); its package doc draws them.
//
// # Inside a connection
//
// One reader goroutine decodes requests, reads write payloads into
// pooled buffers and starts each request on the connection's engine
// (engine.go), its one request path; only the engine knows which kind of
// backend it serves. For a plain Backend the engine runs small reads (and,
// with Export.InlineWrites, page-cache writes up to 1 MiB) on the reader
// itself, holding their replies until it has no complete request left to
// decode; everything else goes to a small fixed pool of workers. Whoever
// has a reply to send while no write is under way becomes the writer and
// sends every reply queued meanwhile with one writev; a worker's read
// reply of 64 KiB or more waits for the role instead, so that its
// payload is sent from the CPU cache that read it. A unix connection's send buffer is
// raised to hold a 1 MiB reply whole. A fixed set of request slots bounds
// the requests in flight (MaxInFlight) and a byte budget bounds the
// memory large ones pin.
// On an AsyncBackend (Export.RoundTrip) the engine starts aligned reads
// and writes on the backend and the backend's goroutine answers them.
//
// The files follow these roles: conn.go the connection, its request slots
// and memory; read.go the reader (decoding, payloads); engine.go where
// each request runs; command.go running a command on the Backend;
// async.go starting one on the AsyncBackend and completing it; reply.go
// encoding replies and the writer role; handshake.go option haggling.
package nbd
