// Package rbd serves Ceph RBD images through librbd, Ceph's own client
// library, by way of the go-ceph binding (cgo).
//
// The format is built only with the build tag "rbd" (and go-ceph's tag for
// the Ceph release the headers come from, "pacific" for Debian bookworm's
// librbd 16.2): `make build-rbd`. A default build has no cgo dependency on
// librbd, so a host without Ceph runs the same binary; there Open and
// Create fail with ErrNotBuilt, which says how to get the format. A build
// tag, not a second binary, because a worker is the daemon's own binary
// re-executed: one binary keeps one process model for every format.
//
// What an Image promises beyond formats/image's contract:
//
//  1. A writable Image holds the image's exclusive lock (RBD_LOCK_MODE_
//     EXCLUSIVE, the exclusive-lock feature) from Open to Close, taken
//     explicitly, so librbd never hands it to another client on request.
//     Open fails with a *LockedError naming the holder when another live
//     client holds it. A holder that died (a host that crashed, a worker
//     killed -9) keeps the lock until the cluster blocklists it: its
//     watch on the image's header lapses first (the OSDs' watch timeout,
//     30 s by default), and only then does the next Open break the lock,
//     blocklisting the dead client so that it can never write again. Two
//     writers never run at once.
//  2. librbd's cache is off: a write is acknowledged when the OSDs have it
//     (in their journals), not while it sits in the worker's memory, so a
//     killed worker loses nothing it acknowledged. Flush still asks librbd
//     to flush, which is then cheap.
//  3. Snapshots (SPEC@SNAP) open read-only.
//  4. ReadAt and WriteAt go through librbd's aio calls (aio.go): a call in
//     flight parks its goroutine instead of holding an OS thread in a
//     synchronous cgo call, so the number in flight is the callers' to
//     choose. go-ceph binds no aio call, so aio.go does, on go-ceph's
//     image handle; should a go-ceph release hide that handle, I/O falls
//     back to the synchronous calls (TestAIOManyInFlight fails then).
//     StartRead and StartWrite (image.Starter) start the same calls
//     without waiting; their completions reach the caller's Completer on
//     the goroutine that reads librbd's completions, so a worker's export
//     keeps no goroutine per request in flight.
//
// ParseSpec and Spec, the image naming, are built in every build.
package rbd
