# libnbd's view of a TLS-only export (proto.md FORCEDTLS), in option mode.
# A client without TLS has its options refused; one requiring TLS has
# STARTTLS done first by libnbd (1.14 has no opt_starttls call), then
# lists, GOes and does I/O inside TLS. Env: PORT, CERTS.
import os
import nbd

h = nbd.NBD()
h.set_opt_mode(True)
h.set_tls(nbd.TLS_DISABLE)
h.set_export_name("disk")
h.connect_tcp("127.0.0.1", os.environ["PORT"])
for name, call in (("info", h.opt_info), ("list", lambda: h.opt_list(lambda n, d: 0))):
    try:
        r = call()
    except nbd.Error as e:
        print("before TLS", name, "refused:", e.string.splitlines()[0])
    else:
        raise SystemExit("before TLS %s succeeded: %r" % (name, r))
h.opt_abort()

h = nbd.NBD()
h.set_opt_mode(True)
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(os.environ["CERTS"])
h.set_export_name("disk")
h.connect_tcp("127.0.0.1", os.environ["PORT"])
assert h.get_tls_negotiated()
names = []
h.opt_list(lambda n, d: names.append(n))
assert names == ["disk"], names
print("in TLS list:", names)
h.opt_go()
assert h.get_size() == 1 << 20
h.pwrite(b"x" * 4096, 8192, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8192) == b"x" * 4096
h.shutdown()
print("ok")
