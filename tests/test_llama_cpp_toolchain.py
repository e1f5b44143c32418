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


def test_version_pin_matches_setup_script():
    # The setup script greps this line; keep the format it expects.
    src = Path(llama_cpp.__file__).read_text()
    assert f'LLAMA_CPP_PYTHON_VERSION = "{llama_cpp.LLAMA_CPP_PYTHON_VERSION}"' in src.splitlines()


def test_python_binding_matches_pin():
    llama_cpp_py = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed in this venv")
    assert llama_cpp_py.__version__ == llama_cpp.LLAMA_CPP_PYTHON_VERSION
