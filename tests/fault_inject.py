"""Run the real `quantkit` CLI with a SIGKILL injected from outside the product code.

    python tests/fault_inject.py POINT quantkit-args...

POINT  manifest:N   just before the N-th manifest write of the process (its blobs are all uploaded)
       blob:N       the N-th blob upload of the process has just completed (others may be in flight)

The store's write primitives are wrapped here, before the CLI starts, so quantkit itself carries no test hook.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

from quantkit.store import backends


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    writer = backends.Writer
    kind, _, n = point.partition(":")
    if kind not in ("manifest", "blob") or not n.isdigit():
        raise SystemExit(f"unknown fault point {point!r}")
    n, seen, lock = int(n), [0], threading.Lock()

    def count() -> None:
        with lock:
            seen[0] += 1
            if seen[0] == n:
                _die()

    if kind == "manifest":
        create = writer.create_bytes

        def create_bytes(self, data: bytes, dest: str) -> bool:
            if "/manifests/" in dest:
                count()
            return create(self, data, dest)

        writer.create_bytes = create_bytes
    else:
        put = writer.put_blob

        def put_blob(self, local, dest: str, **kw) -> None:
            put(self, local, dest, **kw)
            count()

        writer.put_blob = put_blob


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = ["quantkit", *sys.argv[2:]]
    from quantkit.cli import main

    main()
