#!/usr/bin/env bash
# Set up llama.cpp for quantkit (idempotent; a second run only checks stamps).
#
#   scripts/setup_llama_cpp.sh VENV
#
# 1. Fetches the pinned llama-cpp-python sdist (PyPI has no binary wheel for it).
# 2. Builds llama.cpp's CLI tools (llama-quantize/-imatrix/-perplexity/-bench) from the
#    sdist's vendored llama.cpp and installs them, with convert_hf_to_gguf.py and what it
#    imports, into $QUANTKIT_CACHE/llama.cpp/<ver>/. The Python binding, the tools and the
#    converter thus all come from one llama.cpp revision.
# 3. Builds a llama-cpp-python wheel once (cached) and installs it into VENV.
#
# Env: QUANTKIT_CACHE (default ~/.cache/quantkit), CMAKE_BUILD_PARALLEL_LEVEL (default nproc).
# Builds use GGML_NATIVE (-march=native): the cache is meant for this machine only.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The pin lives in quantkit/toolchain/llama_cpp.py (single source of truth).
VER="$(sed -n 's/^LLAMA_CPP_PYTHON_VERSION *= *"\([^"]*\)".*/\1/p' "$ROOT/quantkit/toolchain/llama_cpp.py")"
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-bench)

log() { printf '[setup_llama_cpp] %s\n' "$*"; }
die() { printf '[setup_llama_cpp] ERROR: %s\n' "$*" >&2; exit 1; }

[ -n "$VER" ] || die "could not read LLAMA_CPP_PYTHON_VERSION from quantkit/toolchain/llama_cpp.py"
VENV="${1:?usage: $0 VENV}"
PY="$VENV/bin/python"
[ -x "$PY" ] || die "no python at $PY (create the venv first)"

CACHE="${QUANTKIT_CACHE:-$HOME/.cache/quantkit}"
SDIST="$CACHE/sdist/llama_cpp_python-$VER.tar.gz"
DEST="$CACHE/llama.cpp/$VER"
STAMP="$DEST/.complete"
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
mkdir -p "$CACHE/sdist" "$CACHE/llama.cpp" "$CACHE/wheels" "$CACHE/logs"

# Temp dirs live inside the cache (same filesystem => the final mv is an atomic rename);
# removed on any exit, and stale ones from a SIGKILLed run are removed under the lock below.
CLEANUP=()
trap 'rm -rf "${CLEANUP[@]}"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# mktmp VAR TEMPLATE: sets VAR (not via $(...): CLEANUP must be updated in this shell).
mktmp() { local _mk; _mk="$(mktemp -d "$2")"; CLEANUP+=("$_mk"); printf -v "$1" "%s" "$_mk"; }

# Serialize concurrent runs (e.g. two `make setup`s) on the same cache.
if command -v flock >/dev/null; then
    exec 9>"$CACHE/.setup_llama_cpp.lock"
    flock 9
    rm -rf "$CACHE"/sdist/.llama-cpp-dl.* "$CACHE"/llama.cpp/.build-* "$CACHE"/wheels/.llama-cpp-build.*
fi

# Run a long step quietly into a log file; on failure show its tail.
run_logged() {
    local name="$1"; shift
    local logf="$CACHE/logs/$name.log"
    if ! "$@" >"$logf" 2>&1; then
        tail -n 30 "$logf" >&2
        die "$name failed (full log: $logf)"
    fi
}

fetch_sdist() {
    [ -f "$SDIST" ] && return 0
    log "downloading llama-cpp-python==$VER sdist ..."
    local t0=$SECONDS d
    mktmp d "$CACHE/sdist/.llama-cpp-dl.XXXXXX"
    run_logged pip-download "$PY" -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VER" -d "$d"
    mv "$d"/llama_cpp_python-"$VER".tar.gz "$SDIST"
    log "sdist: $SDIST ($((SECONDS - t0)) s)"
}

# A build tool from PATH, else from VENV, else pip-installed into VENV.
need_tool() {
    if command -v "$1" >/dev/null; then command -v "$1"; return; fi
    if [ ! -x "$VENV/bin/$1" ]; then
        log "$1 not on PATH: pip-installing it into $VENV" >&2
        run_logged "pip-install-$1" "$PY" -m pip install "$1"
    fi
    printf '%s' "$VENV/bin/$1"
}

build_tools() {
    if [ -f "$STAMP" ]; then log "llama.cpp tools $VER: present ($DEST)"; return 0; fi
    fetch_sdist
    local cmake ninja t0=$SECONDS w src
    cmake="$(need_tool cmake)"; ninja="$(need_tool ninja)"
    mktmp w "$CACHE/llama.cpp/.build-$VER.XXXXXX"
    log "building ${TOOLS[*]} from vendored llama.cpp (jobs=$JOBS, a few minutes) ..."
    tar -xzf "$SDIST" -C "$w" "llama_cpp_python-$VER/vendor/llama.cpp"
    src="$w/llama_cpp_python-$VER/vendor/llama.cpp"
    # Flags as measured (research/cpu-trials.md Step 5e). LLAMA_CURL is unused by this
    # llama.cpp revision (cmake warns, harmless); static libs => self-contained binaries.
    run_logged cmake-configure "$cmake" -S "$src" -B "$w/build" -G Ninja -DCMAKE_MAKE_PROGRAM="$ninja" \
        -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON -DBUILD_SHARED_LIBS=OFF
    run_logged cmake-build "$cmake" --build "$w/build" -j "$JOBS" --target "${TOOLS[@]}"

    # Stage the install tree, then rename it into place (never a half-populated $DEST).
    local s="$w/stage" t
    mkdir -p "$s/bin" "$s/models" "$s/requirements"
    for t in "${TOOLS[@]}"; do install -m 755 "$w/build/bin/$t" "$s/bin/$t"; done
    # The converter imports conversion/ and gguf-py/ (sys.path relative to the script), reads
    # chat templates from models/templates/ and two builtin vocabs from models/ (mamba, openelm).
    cp "$src/convert_hf_to_gguf.py" "$src/LICENSE" "$s/"
    cp -r "$src/conversion" "$src/gguf-py" "$s/"
    cp -r "$src/models/templates" "$s/models/"
    cp "$src/models/ggml-vocab-gpt-neox.gguf" "$src/models/ggml-vocab-llama-spm.gguf" "$s/models/"
    cp "$src/requirements/requirements-convert_hf_to_gguf.txt" \
       "$src/requirements/requirements-convert_legacy_llama.txt" "$s/requirements/"
    printf 'llama-cpp-python %s\nbuilt %s on %s\n' "$VER" "$(date -u +%FT%TZ)" "$(uname -m)" >"$s/.complete"
    rm -rf "$DEST"   # only a stamp-less leftover can be here
    mv "$s" "$DEST"
    log "llama.cpp tools $VER: installed in $DEST ($((SECONDS - t0)) s)"
}

venv_has_version() {
    "$PY" -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$VER')" >/dev/null 2>&1
}

install_python_binding() {
    if venv_has_version; then log "llama-cpp-python $VER: already in $VENV"; return 0; fi
    local whl
    whl="$(ls "$CACHE"/wheels/llama_cpp_python-"$VER"-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -z "$whl" ]; then
        fetch_sdist
        local t0=$SECONDS d
        mktmp d "$CACHE/wheels/.llama-cpp-build.XXXXXX"
        log "building llama-cpp-python $VER wheel (jobs=$JOBS, a few minutes) ..."
        CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" run_logged pip-wheel "$PY" -m pip wheel --no-deps "$SDIST" -w "$d"
        whl="$(ls "$d"/llama_cpp_python-"$VER"-*.whl)"
        mv "$whl" "$CACHE/wheels/"
        whl="$CACHE/wheels/$(basename "$whl")"
        log "wheel: $whl ($((SECONDS - t0)) s)"
    fi
    log "installing $(basename "$whl") into $VENV ..."
    run_logged pip-install "$PY" -m pip install "$whl"
    venv_has_version || die "llama_cpp $VER still not importable in $VENV after install"
    log "llama-cpp-python $VER: installed in $VENV"
}

build_tools
install_python_binding
log "done"
