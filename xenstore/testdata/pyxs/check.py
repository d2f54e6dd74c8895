"""Drive a xenstored with python3-pyxs, an independent client.

Usage: /usr/bin/python3 check.py SOCKET. Prints one line per check and
exits non-zero on the first failure.
"""
import errno
import sys
import threading

from pyxs import Client, PyXSError

sock = sys.argv[1]


def check(name, cond):
    print(("ok   " if cond else "FAIL ") + name, flush=True)
    if not cond:
        sys.exit(1)


with Client(unix_socket_path=sock) as c:
    c.write(b"/py/a", b"1")
    check("read back", c.read(b"/py/a") == b"1")
    check("parent created empty", c.read(b"/py") == b"")
    c.mkdir(b"/py/dir")
    check("list", sorted(c.list(b"/py")) == [b"a", b"dir"])
    check("exists", c.exists(b"/py/dir") and not c.exists(b"/py/none"))
    try:
        c[b"/py/none"]
        check("missing read raises", False)
    except PyXSError as e:
        check("missing read is ENOENT", e.args[0] == errno.ENOENT)
    c.set_perms(b"/py/a", [b"n0", b"r5"])
    check("perms", c.get_perms(b"/py/a") == [b"n0", b"r5"])
    check("domain path", c.get_domain_path(7) == b"/local/domain/7")
    c.delete(b"/py/dir")
    check("delete", not c.exists(b"/py/dir"))

    # A transaction that conflicts with another client's write.
    with Client(unix_socket_path=sock) as other:
        c.transaction()
        v = c.read(b"/py/a")
        other.write(b"/py/a", b"changed")
        c.write(b"/py/a", v + b"+tx")
        check("conflicting commit fails", c.commit() is False)
        check("conflicting write discarded", c.read(b"/py/a") == b"changed")
        c.transaction()
        v = c.read(b"/py/a")
        c.write(b"/py/a", v + b"+tx")
        check("clean commit succeeds", c.commit() is True)
        check("committed", other.read(b"/py/a") == b"changed+tx")
        c.transaction()
        c.write(b"/py/rolled", b"x")
        c.rollback()
        check("rollback", not other.exists(b"/py/rolled"))

    # Watches: initial event, then one per change beneath the path.
    m = c.monitor()
    m.watch(b"/py/w", b"tok")
    events = m.wait()
    check("initial event", next(events) == (b"/py/w", b"tok"))
    with Client(unix_socket_path=sock) as other:
        other.write(b"/py/w/x", b"1")
    check("write event", next(events) == (b"/py/w/x", b"tok"))
    with Client(unix_socket_path=sock) as other:
        other.delete(b"/py/w")
    check("rm event", next(events) == (b"/py/w", b"tok"))
    m.unwatch(b"/py/w", b"tok")
print("PASS")
