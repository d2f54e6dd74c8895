// Package xenstore is blktap-go's own XenStore library: the wire codec,
// a client for any xenstored (Xen's C xenstored, oxenstored, or ours), and
// an embedded xenstored for machines without Xen. It imports nothing of
// the project.
//
// # Wire format
//
// Every message, in both directions, is a 16-byte header then a payload
// of at most PayloadMax (4096) bytes. The header fields are u32 in the
// host's byte order; Xen runs only on little-endian hosts, so the codec
// uses little-endian.
//
//	 0        4        8        12       16
//	+--------+--------+--------+--------+---------------------+
//	|  type  | req_id | tx_id  |  len   | payload (len bytes) |
//	+--------+--------+--------+--------+---------------------+
//
// Payloads are NUL-terminated strings, except: WRITE is "path\0" followed
// by the raw value (no NUL); a READ reply is the raw value; a reply with no
// data is "OK\0"; an error reply has type ERROR and payload "ENOENT\0"
// (an errno name). WATCH_EVENT ("path\0token\0", req_id 0) is sent by the
// server at any time. A peer announcing len > 4096 has broken the
// protocol: the connection is dropped, never the length clamped.
//
// The codec does no I/O: a Decoder is fed bytes and answers "need more",
// a Message, or an error; the same Decoder serves client, server and
// fuzzers.
//
// # Using a Client
//
//  1. Dial(ctx, DefaultPath()) (DialXenbus in a guest, or NewClient on a
//     connection you made, e.g. from Server.ConnectDomain). One Client
//     serves many goroutines: requests are matched to replies by req_id.
//  2. Pass a context to every call; a cancelled call returns ctx.Err()
//     and its late reply is discarded (a WRITE may still take effect).
//  3. Match errors with errors.Is: ErrNotFound, ErrAccess, ErrAgain, ...
//     or the syscall.Errno of the same name. ErrConnLost means the
//     connection dropped with the call pending: its effect is unknown.
//  4. Group reads and writes that must be consistent in Transaction; its
//     function may run several times (on EAGAIN) and must have no other
//     effects.
//  5. Treat watch events as level-triggered hints: on any Event re-read
//     the state it covers. Events may be spurious, merged, or replaced by
//     one Event{Overflow: true} when the consumer falls behind (the queue
//     is bounded and never blocks the client) or after a reconnect
//     (WithReconnect): then re-read everything the watch covers.
//  6. Close the Watch (UNWATCH) and the Client when done.
//
// # The embedded server
//
// The logic is State.Handle: one request in, the reply and the watch
// events out, no I/O, tested with tables of requests and replies. A
// request goes through fixed stages, and the first that fails chooses
// the error: its transaction is found (ENOENT; EBUSY for a nested
// TRANSACTION_START), its operation looked up (ENOSYS), privilege checked
// for dom0-only operations (EACCES), its arguments parsed into a typed
// request with canonical paths (EINVAL), and only then does the
// operation's own method look at the tree or the domain table. Server
// puts it behind a unix socket (mode 0600; every socket client is domain
// 0, privileged) or in-process connections bound to a guest domain
// (ConnectDomain), to which permissions and quotas apply.
//
// The tree is persistent: an update copies the path from the root, so a
// transaction's snapshot is one pointer. Each node carries the generation
// at which its own value, permissions or child list last changed. A
// transaction records the generation of every node it reads or writes
// when it first touches it; at commit, if any differs in the live tree,
// the commit fails with EAGAIN, otherwise its writes are replayed on the
// live tree and their watches fire.
//
// Behaviour follows Xen's C xenstored where it and oxenstored agree,
// checked by the differential test against both (diff_test.go), and picks
// the C answer where they disagree, except:
//   - DIRECTORY lists children sorted by name (as oxenstored; C xenstored
//     uses creation order).
//   - Watch events are sent after the reply of the request that fired
//     them (the two daemons differ).
//
// Some C behaviours worth knowing: RM of a missing node whose parent
// exists succeeds; WRITE creates missing parents with empty values and
// the parent's permissions; MKDIR of an existing node changes nothing and
// fires nothing; a path may have at most 2048 bytes after a leading
// "/local/domain/<domid>/" (dom0 included); relative paths resolve under
// /local/domain/<domid>.
package xenstore
