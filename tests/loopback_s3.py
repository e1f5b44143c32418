"""A real S3 API on the loopback interface: moto's standalone server, spoken to through s3fs exactly as users do
(s3:// URIs, AWS_* variables). Used by the test fixtures (conftest.py) and the store benchmarks (scripts/)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Start the server on a free port, point AWS_* at it for this process and its children; yield its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(Path(tempfile.gettempdir()) / f"moto-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    saved: dict[str, str | None] = {}
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start (see {log.name})") from None
                time.sleep(0.2)
        env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def bucket_exists(name: str) -> bool:
    """Asked of the server directly (not through a Store, which is what is being tested)."""
    import s3fs

    return name in {b.rstrip("/") for b in s3fs.S3FileSystem(skip_instance_cache=True).ls("")}
