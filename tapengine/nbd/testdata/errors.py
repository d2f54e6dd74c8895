# nbdsh script: error paths of the export, with and without structured
# replies. URI names a writable export, RO_URI a read-only one.
import errno
import os

uri, ro_uri = os.environ["URI"], os.environ["RO_URI"]


def expect(want, f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        # libnbd's Python binding gives the errno's name ("EINVAL").
        assert e.errno in (want, errno.errorcode[want]), "%s%r: errno %s (%s), want %s" % (f.__name__, args, e.errno, e.string, want)
        return
    raise AssertionError("%s%r succeeded, want errno %d" % (f.__name__, args, want))


for structured in (True, False):
    h = nbd.NBD()
    h.set_strict_mode(0)  # let bad requests reach the server
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    assert h.get_structured_replies_negotiated() == structured
    size = h.get_size()
    expect(errno.EINVAL, h.pread, 512, size - 256)
    expect(errno.EINVAL, h.pread, 4096, size)
    expect(errno.EINVAL, h.pread, 40 << 20, 0)  # above the maximum payload
    expect(errno.ENOSPC, h.pwrite, b"x" * 512, size - 256)
    expect(errno.EINVAL, h.trim, 4096, size)
    expect(errno.EINVAL, h.cache, 4096, size)
    # Still in frame: the connection serves on.
    h.pwrite(b"\xa5" * 4096, 8192, nbd.CMD_FLAG_FUA)
    assert h.pread(4096, 8192) == b"\xa5" * 4096
    h.flush()
    h.shutdown()

h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(ro_uri)
assert h.is_read_only()
expect(errno.EPERM, h.pwrite, b"x" * 512, 0)
expect(errno.EPERM, h.trim, 512, 0)
expect(errno.EPERM, h.zero, 512, 0)
assert h.pread(512, 0) == bytes(512)
h.shutdown()
print("ok")
