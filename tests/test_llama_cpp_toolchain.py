"""llama.cpp toolchain: the tools built by scripts/setup_llama_cpp.sh are found and run."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.errors import UserError
from quantkit.toolchain import llama_cpp
from quantkit.toolchain.llama_cpp import TOOLS, convert_env, convert_script, find_tool, run_tool


def _require(name: str):
    try:
        return find_tool(name)
    except UserError as e:
        pytest.skip(f"{name} not installed ({e.one_line()})")


@pytest.mark.parametrize("name", [t for t in TOOLS if t != "llama-quantize"])
def test_tool_runs(name):
    exe = _require(name)
    # Tools on llama.cpp's common arg parser print "version: N (commit)" and exit 0.
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "version" in (proc.stdout + proc.stderr)


def test_quantize_lists_q4_k_m():
    exe = _require("llama-quantize")
    # llama-quantize has no --version; its usage (exit code 1) lists the quant types.
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert "Q4_K_M" in proc.stdout + proc.stderr


def test_run_tool_reports_failure(tmp_path):
    _require("llama-quantize")
    with pytest.raises(RuntimeError, match="llama-quantize exited with code"):
        run_tool("llama-quantize", [tmp_path / "missing.gguf", tmp_path / "out.gguf", "Q8_0"],
                 log_path=tmp_path / "q.log")
    assert "exit code" in (tmp_path / "q.log").read_text()


def test_convert_script_importable():
    try:
        script = convert_script()
    except UserError as e:
        pytest.skip(f"converter not installed ({e.one_line()})")
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                          timeout=300, env=convert_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--outtype" in proc.stdout


def test_missing_tool_is_user_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("QUANTKIT_LLAMA_CPP", str(empty))
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(UserError) as ei:
        find_tool("llama-quantize")
    assert "llama-quantize" in str(ei.value)
    assert "make setup" in ei.value.fix and "setup_llama_cpp.sh" in ei.value.fix
    assert "\n" not in ei.value.one_line()
    with pytest.raises(UserError):
        convert_script()
    assert not (tmp_path / "cache").exists()  # a lookup must not create cache dirs


def test_setup_script_reads_key_and_options_from_the_module():
    # scripts/setup_llama_cpp.sh runs exactly this; the cache key is computed in one place
    proc = subprocess.run([sys.executable, "-m", "quantkit.toolchain.llama_cpp", "build-spec", "cuda"],
                          capture_output=True, text=True, timeout=60, check=True)
    key, *opts = proc.stdout.splitlines()
    assert key == llama_cpp.build_key("cuda") and tuple(opts) == llama_cpp.build_options("cuda")
    assert key.startswith(llama_cpp.LLAMA_CPP_PYTHON_VERSION + "-cuda-")
    assert llama_cpp.build_key("cpu") != key and "-DGGML_CUDA=ON" in opts
    assert "-DBUILD_SHARED_LIBS=ON" in opts  # one build gives the tools and the binding's libraries


def test_install_dir_prefers_a_complete_cuda_build(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("QUANTKIT_LLAMA_CPP_BACKEND", raising=False)
    root = tmp_path / "llama.cpp"
    assert llama_cpp.install_dir() == root / llama_cpp.build_key("cpu")
    (root / llama_cpp.build_key("cuda")).mkdir(parents=True)  # an interrupted CUDA build: not used
    assert llama_cpp.install_dir() == root / llama_cpp.build_key("cpu")
    (root / llama_cpp.build_key("cuda") / ".complete").write_text("done\n")
    assert llama_cpp.install_dir() == root / llama_cpp.build_key("cuda")
    assert llama_cpp.backend_of(llama_cpp.install_dir() / "bin" / "llama-bench") == "cuda"
    monkeypatch.setenv("QUANTKIT_LLAMA_CPP_BACKEND", "cpu")
    assert llama_cpp.install_dir() == root / llama_cpp.build_key("cpu")


def _needed_libs(binary: Path, env: dict | None = None) -> dict[str, Path]:
    """ldd's resolution of a binary's shared libraries: name -> resolved file."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True, env=env).stdout
    libs = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>":
            libs[parts[0]] = Path(parts[2])
    return libs


def _libllama(libs: dict[str, Path]) -> Path:
    (name,) = [n for n in libs if n.startswith("libllama.so")]
    return libs[name]


def test_one_build_serves_tools_and_binding():
    """The binding loads the very libllama the tools link: one compile, not two."""
    binding = llama_cpp.binding()
    assert binding.__version__ == llama_cpp.LLAMA_CPP_PYTHON_VERSION
    loaded = Path(binding.llama_cpp._lib._name).resolve()
    linked = _needed_libs(find_tool("llama-bench"))
    assert loaded == _libllama(linked).resolve(), (loaded, linked)
    assert loaded.parent == (llama_cpp.install_dir() / "lib").resolve()
    # no compiled copy inside the venv: the package's lib/ is the cache's
    pkg_lib = Path(binding.__file__).parent / "lib"
    assert not pkg_lib.exists() or pkg_lib.resolve() == loaded.parent
    assert binding.llama_max_devices() >= 1  # a real call into the library


def test_install_tree_is_relocatable(tmp_path):
    """$ORIGIN rpaths: a copy of bin/ + lib/ elsewhere runs against its own libraries."""
    import os
    import shutil

    src = find_tool("llama-bench").parent.parent
    dst = tmp_path / "moved"
    for d in ("bin", "lib"):
        shutil.copytree(src / d, dst / d, symlinks=True)
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    libs = _needed_libs(dst / "bin" / "llama-bench", env)
    assert _libllama(libs).resolve().parent == (dst / "lib").resolve(), libs
    proc = subprocess.run([str(dst / "bin" / "llama-bench"), "--help"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert "usage" in (proc.stdout + proc.stderr).lower()


def test_run_tool_reports_the_tools_own_peak_rss():
    """The tool's RSS, not the forked Python parent's: a 400 MB parent must not show up in it."""
    ballast = bytearray(400 << 20)  # touched pages: resident in this (parent) process
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    # `--help` can exit before the sampler's first read on an idle machine (peak 0: nothing sampled): retry
    for _ in range(20):
        proc = run_tool("llama-bench", ["--help"])
        if proc.peak_rss_mb > 0:
            break
    assert 0 < proc.peak_rss_mb < 200, proc.peak_rss_mb
    del ballast
