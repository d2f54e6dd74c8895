#!/usr/bin/python3
"""Check that an NBD export serves the bytes of a reference file.

Usage: bench/verify.py REFERENCE_FILE URI

bench/run.sh calls this for every server before the first job: a server that
answers fast with the wrong bytes (zeros, another image, a shifted offset)
must fail the run, not win it. Reads the first and last 64 KiB and 30 more
64 KiB chunks at offsets spread over the image (fixed seed, so a failure
reproduces), through libnbd (python3-libnbd, hence /usr/bin/python3), and
compares them with the file. Exit 0 on a match, 1 with the first differing
offset otherwise.
"""

import os
import random
import sys

import nbd

CHUNK = 64 << 10


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: verify.py REFERENCE_FILE URI")
    ref, uri = sys.argv[1], sys.argv[2]
    size = os.path.getsize(ref)
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        esize = h.get_size()
        if esize != size:
            print(f"verify: {uri}: export size {esize}, reference {size}")
            return 1
        rnd = random.Random(10)
        last = max(0, size - CHUNK)
        offsets = [0, last] + [rnd.randrange(0, last + 1) & ~511 for _ in range(30)]
        with open(ref, "rb") as f:
            for off in offsets:
                n = min(CHUNK, size - off)
                want = os.pread(f.fileno(), n, off)
                got = h.pread(n, off)
                if got != want:
                    i = next(i for i in range(n) if got[i] != want[i])
                    print(f"verify: {uri}: byte {off + i} differs from {ref}")
                    return 1
    finally:
        h.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
