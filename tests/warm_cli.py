"""`quantkit` runs for the tests without paying the interpreter's imports each time.

A `quantkit build` spends about 6 CPU seconds importing torch, transformers and llm-compressor before it reads
its recipe; the suite runs dozens of them, which on 2 cores is minutes. So a server process (this file, run as a
script) imports them once and forks one child per run: still a process of its own, with the caller's
environment, working directory and argv, file descriptors 0-2 set at the OS level (library loggers included),
its own exit code and atexit handlers, and nothing shared back with the test. What differs from a fresh
interpreter is only what happens before `main` starts; tests about that start one (`run_cli(fresh=True)`).
(multiprocessing's forkserver would re-import the test runner's main module in every child.)
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

PRELOAD = ("torch", "transformers", "llmcompressor", "quantkit.cli", "quantkit.build")
_server: subprocess.Popen | None = None
_lock = threading.Lock()


def _child(argv: list[str], env: dict, cwd: str, out: str, err: str) -> int:
    """In the forked child: stdin empty, stdout/stderr to files, the caller's environment, directory, argv."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
        f = os.open(path, flags)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    from quantkit import cli

    sys.argv = [cli.__file__, *argv]  # as `python -m quantkit.cli ARGS` sets it (manifests record argv)
    try:
        cli.main(argv)
        code = 0
    except SystemExit as e:  # what the interpreter makes of it
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001 - an uncaught exception, reported as the interpreter reports it
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve() -> None:
    """One request per stdin line (JSON: argv, env, cwd, out, err); answers each with the child's exit code."""
    import importlib

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # import-time chatter (llm-compressor logs to stdout) must not reach the replies
    for name in PRELOAD:
        importlib.import_module(name)
    # the imported libraries are never garbage: out of the collector's sight, each gc.collect() of a build
    # (one per target) walks only what the run made, not torch's and transformers' objects (~0.4 CPU-s a call)
    import gc

    gc.collect()
    gc.freeze()
    while line := sys.stdin.readline():
        argv, env, cwd, out, err = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                replies.close()
                code = _child(argv, env, cwd, out, err)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        replies.write(f"{os.waitstatus_to_exitcode(status)}\n")
        replies.flush()


def run(argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """`python -m quantkit.cli *argv` as a child of the warm server, with environment env."""
    global _server
    with _lock, tempfile.TemporaryDirectory(prefix="qk-cli-") as tmp:
        if _server is None or _server.poll() is not None:
            log = tempfile.TemporaryFile(mode="w+")  # the server's own output: import-time chatter, or its crash
            _server = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=log, text=True, cwd=Path(__file__).parent)
            _server.log = log
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        for p in (out, err):
            open(p, "w").close()
        _server.stdin.write(json.dumps([list(map(str, argv)), dict(env), str(cwd), out, err]) + "\n")
        _server.stdin.flush()
        reply = _server.stdout.readline()
        if not reply:
            _server.log.seek(0)
            raise RuntimeError(f"the warm quantkit server died: {_server.log.read()[-3000:]}")
        code = int(reply)
        with open(out, errors="replace") as f, open(err, errors="replace") as g:
            return subprocess.CompletedProcess([sys.executable, "-m", "quantkit.cli", *argv], code, f.read(), g.read())


@atexit.register
def _stop() -> None:
    if _server is not None and _server.poll() is None:
        _server.stdin.close()  # the server's loop ends on EOF
        _server.wait(timeout=60)


if __name__ == "__main__":
    serve()
