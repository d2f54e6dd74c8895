// Package nbdkernel connects the Linux kernel's NBD client (/dev/nbdN) to
// an NBD export, so a disk served by blktap becomes a block device in
// dom0 and `mount /dev/nbd0 /mnt` works as the seed's `xm block-attach 0`
// example did. It uses the classic ioctl interface of linux/nbd.h, not
// the netlink one.
//
// # Using it
//
//  1. Call Available(dev) for a clear reason why a device cannot be used:
//     no nbd module ("modprobe nbd"), no such device, not an nbd device,
//     already connected, or no permission (it needs CAP_SYS_ADMIN).
//  2. Call Connect(ctx, dev, socketPath, export). It dials the export's
//     unix socket, runs the handshake itself (fixed newstyle, NBD_OPT_GO;
//     no structured replies, because the kernel only reads simple ones),
//     hands the size, block size, transmission flags and the socket to
//     the kernel, and starts NBD_DO_IT on a goroutine of its own. It
//     returns once the device is live; ctx bounds only that.
//  3. Keep the process alive while the device is in use: NBD_DO_IT runs
//     in it, and the kernel drops the device when it exits.
//  4. Call Disconnect to detach (the kernel sends NBD_CMD_DISC and lets go
//     of the socket), then Wait, which returns once NBD_DO_IT has
//     returned and the device is free again. Wait also returns, with an
//     error, when the server goes away first.
//
// # Handshake (client side; all integers big-endian)
//
//	S: +0 u64 "NBDMAGIC" | +8 u64 "IHAVEOPT" | +16 u16 handshake flags
//	C: u32 client flags (FIXED_NEWSTYLE, NO_ZEROES if offered)
//	C: +0 u64 "IHAVEOPT" | +8 u32 7 (GO) | +12 u32 length
//	   | u32 name length | name | u16 1 | u16 3 (ask for BLOCK_SIZE)
//	S: +0 u64 0x3e889045565a9 | +8 u32 option | +12 u32 reply type | +16 u32 length | data
//	   ... REP_INFO(EXPORT: u16 0 | u64 size | u16 flags), REP_INFO(BLOCK_SIZE), REP_ACK
//
// A server that answers GO with NBD_REP_ERR_UNSUP gets NBD_OPT_EXPORT_NAME
// instead (u64 size | u16 flags | 124 zero bytes unless NO_ZEROES).
//
// # Ioctls (linux/nbd.h; _IO(0xab, n), checked against the header in tests)
//
//	NBD_SET_SOCK 0xab00  NBD_SET_BLKSIZE 0xab01  NBD_SET_SIZE 0xab02
//	NBD_DO_IT 0xab03     NBD_CLEAR_SOCK 0xab04   NBD_DISCONNECT 0xab08
//	NBD_SET_FLAGS 0xab0a
//
// The logical block size is 512 bytes unless the server's minimum block
// size is larger (then 4096), so images with 512-byte partition tables
// read right. A size that is not a multiple of it loses its tail. The
// kernel may send requests up to 32 MiB, which qemu-nbd and this
// project's server accept. There is no reconnection: when the export's
// server goes away, the device fails its I/O and Wait returns.
package nbdkernel
