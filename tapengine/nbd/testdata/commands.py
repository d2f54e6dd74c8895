# nbdsh script: every command and flag, both reply styles, printed as a
# transcript that must be identical whichever server answers (ours or
# qemu-nbd on an identical copy of the image). URI names the export.
import errno
import hashlib
import json
import os

uri = os.environ["URI"]
out = []


def rec(name, f, *args):
    try:
        r = f(*args)
    except nbd.Error as e:
        r = "error " + str(e.errno)
    if isinstance(r, (bytes, bytearray)):
        r = "sha256 " + hashlib.sha256(r).hexdigest()[:16]
    out.append([name, r])


for structured in (True, False):
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.set_request_structured_replies(structured)
    if structured:
        h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    size = h.get_size()
    out.append(["structured", h.get_structured_replies_negotiated()])
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
                 "can_cache", "can_df", "is_read_only", "is_rotational"):
        out.append([flag, getattr(h, flag)()])
    if structured:
        out.append(["can_meta base:allocation", h.can_meta_context("base:allocation")])

    base = 0 if structured else 4 << 20
    rec("write", h.pwrite, bytes(range(256)) * 256, base)
    rec("write fua", h.pwrite, b"\x5a" * 65536, base + 65536, nbd.CMD_FLAG_FUA)
    rec("read", h.pread, 131072, base)
    if structured:
        rec("read df", h.pread, 131072, base, nbd.CMD_FLAG_DF)
    rec("zero", h.zero, 32768, base + 16384)
    rec("zero no_hole", h.zero, 4096, base + 65536, nbd.CMD_FLAG_NO_HOLE)
    rec("zero fast", h.zero, 65536, base + 131072, nbd.CMD_FLAG_FAST_ZERO)
    rec("zero fua", h.zero, 4096, base + 200000, nbd.CMD_FLAG_FUA)
    rec("read after zero", h.pread, 262144, base)
    rec("trim", h.trim, 1 << 20, base + (2 << 20))
    rec("trim fua", h.trim, 65536, base + (3 << 20), nbd.CMD_FLAG_FUA)
    rec("read after trim", h.pread, 1 << 20, base + (2 << 20))
    rec("cache", h.cache, 1 << 20, 0)
    rec("flush", h.flush)
    if structured:
        ext = []

        def cb(metacontext, offset, entries, err):
            ext.append([metacontext, offset, list(entries)])
        rec("block_status", h.block_status, size, 0, cb)
        # Servers may differ in precision (status 0 is always allowed),
        # so record whether what was claimed is true: ZERO reads as zeros.
        ok, off = True, 0
        for ctx, start, entries in ext:
            off = start
            for i in range(0, len(entries), 2):
                n, flags = entries[i], entries[i + 1]
                if flags & 2 and h.pread(n, off) != bytes(n):
                    ok = False
                off += n
        out.append(["extents truthful", ok, len(ext)])
        ext = []
        rec("block_status req_one", h.block_status, size, 0, cb, nbd.CMD_FLAG_REQ_ONE)
        out.append(["extents req_one", [len(e[2]) for e in ext]])
    # Errors.
    rec("read past end", h.pread, 512, size - 256)
    rec("write past end", h.pwrite, b"x" * 512, size - 256)
    rec("trim past end", h.trim, 4096, size)
    rec("zero past end", h.zero, 4096, size)
    rec("cache past end", h.cache, 4096, size)
    rec("read too long", h.pread, 40 << 20, 0)
    rec("read after errors", h.pread, 4096, base)
    h.shutdown()

for r in out:
    print(json.dumps(r))
