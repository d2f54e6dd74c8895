// Package nbdwire is the NBD protocol's wire format, shared by the
// client (formats/nbd), the server (tapengine/nbd) and the kernel glue
// (tapengine/nbdkernel): its numbers, and the fixed-size headers encoded
// into and decoded from the caller's buffers. It does no I/O and
// allocates nothing, so each side keeps its own reading, buffering and
// policy (which options to send, what to refuse) and every side agrees on
// the bytes. The numbers are those of the NBD project's doc/proto.md
// (extended headers from its extension-ext-header branch, as qemu
// implements them); all integers on the wire are big-endian.
//
// # Using it
//
//  1. Read as many bytes as the header you expect (the *Size constants;
//     for a reply, 4 bytes of magic first, then ReplySize says the rest).
//  2. Parse it. A Parse function checks the magic and the length of its
//     input and nothing else: whether a command, flag or length is
//     acceptable is the caller's policy.
//  3. To send, Put a header into a buffer of at least its size (or Append
//     one), then write the header and its payload.
//
// # Layouts
//
// Handshake (fixed newstyle):
//
//	greeting      (18 B) +0 u64 "NBDMAGIC" | +8 u64 "IHAVEOPT" | +16 u16 handshake flags
//	client flags  (4 B)  +0 u32
//	option        (16 B) +0 u64 "IHAVEOPT" | +8 u32 option | +12 u32 length | data
//	option reply  (20 B) +0 u64 0x3e889045565a9 | +8 u32 option | +12 u32 type | +16 u32 length | data
//	EXPORT_NAME's reply  +0 u64 size | +8 u16 transmission flags | 124 zero bytes unless NO_ZEROES
//
// Transmission, compact headers:
//
//	request (28 B) +0 u32 0x25609513 | +4 u16 flags | +6 u16 type | +8 u64 cookie | +16 u64 offset | +24 u32 length
//	simple  (16 B) +0 u32 0x67446698 | +4 u32 error | +8 u64 cookie
//	chunk   (20 B) +0 u32 0x668e33ef | +4 u16 flags | +6 u16 type | +8 u64 cookie | +16 u32 payload length
//
// Transmission, extended headers (NBD_OPT_EXTENDED_HEADERS):
//
//	request (32 B) +0 u32 0x21e41c71 | +4 u16 flags | +6 u16 type | +8 u64 cookie | +16 u64 offset | +24 u64 length
//	reply   (32 B) +0 u32 0x6e8a278c | +4 u16 flags | +6 u16 type | +8 u64 cookie | +16 u64 offset | +24 u64 payload length
package nbdwire
