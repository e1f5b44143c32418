#!/usr/bin/env bash
# Set up llama.cpp for quantkit (idempotent; a second run only checks stamps).
#
#   scripts/setup_llama_cpp.sh VENV [cpu|cuda]
#
# 1. Fetches the pinned llama-cpp-python sdist (PyPI has no binary wheel for it).
# 2. ONE CMake build of the sdist's vendored llama.cpp gives the CLI tools
#    (llama-quantize/-imatrix/-perplexity/-bench) and the shared libraries (libllama, libggml*)
#    the Python binding loads. Installed with the converter (convert_hf_to_gguf.py and what it
#    imports) into $QUANTKIT_CACHE/llama.cpp/<ver>-<backend>-<options hash>/{bin,lib}; $ORIGIN
#    rpaths make the tree relocatable. Key and CMake options come from
#    quantkit/toolchain/llama_cpp.py (single source of truth).
# 3. Installs the binding's pure-Python package (a py3-none-any wheel made from the sdist, no
#    compile) into VENV; quantkit points it at lib/ via LLAMA_CPP_LIB_PATH, and VENV's
#    llama_cpp/lib links to the same lib/ so a plain `import llama_cpp` works too.
#
# Env: QUANTKIT_CACHE (default ~/.cache/quantkit), CMAKE_BUILD_PARALLEL_LEVEL (default nproc).
# Builds use GGML_NATIVE (-march=native; with cuda, CMAKE_CUDA_ARCHITECTURES=native, the GPUs present at build
# time): the cache is meant for this machine only.
#
# cuda: needs nvcc (PATH, $CUDACXX, or /usr/local/cuda/bin) and a visible GPU. Offline hosts (the H200 run,
# docs/benchmarks/h200/README.md): put the sdist at $QUANTKIT_CACHE/sdist/ beforehand (a trimmed one with
# only what CMake needs works: the vendored llama.cpp without docs, tests, vocab files and other backends)
# and let pip find the binding's dependencies locally (PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR_WITH_WHEELS).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-bench llama-batched-bench)

log() { printf '[setup_llama_cpp] %s\n' "$*"; }
die() { printf '[setup_llama_cpp] ERROR: %s\n' "$*" >&2; exit 1; }

VENV="${1:?usage: $0 VENV [cpu|cuda]}"
BACKEND="${2:-cpu}"
PY="$VENV/bin/python"
[ -x "$PY" ] || die "no python at $PY (create the venv first)"

SPEC="$(PYTHONPATH="$ROOT" "$PY" -m quantkit.toolchain.llama_cpp build-spec "$BACKEND")" \
    || die "could not read the build spec from quantkit/toolchain/llama_cpp.py"
KEY="$(head -n 1 <<<"$SPEC")"
mapfile -t CMAKE_OPTS < <(tail -n +2 <<<"$SPEC")
VER="${KEY%%-*}"

CACHE="${QUANTKIT_CACHE:-$HOME/.cache/quantkit}"
SDIST="$CACHE/sdist/llama_cpp_python-$VER.tar.gz"
DEST="$CACHE/llama.cpp/$KEY"
STAMP="$DEST/.complete"
WHEEL="$CACHE/wheels/llama_cpp_python-$VER-py3-none-any.whl"
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
    rm -rf "$CACHE"/sdist/.llama-cpp-dl.* "$CACHE"/llama.cpp/.build-* "$CACHE"/wheels/.llama-cpp-whl.*
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

# CUDA builds: CMake's CUDA language needs nvcc; the CUDA images often keep it off PATH.
find_nvcc() {
    [ "$BACKEND" = cuda ] || return 0
    if [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null; then
        [ -x /usr/local/cuda/bin/nvcc ] || die "cuda backend: nvcc not found (PATH, \$CUDACXX, /usr/local/cuda/bin)"
        export PATH="/usr/local/cuda/bin:$PATH"
    fi
    log "cuda: $("${CUDACXX:-nvcc}" --version | tail -n 1)"
}

build_llama_cpp() {
    if [ -f "$STAMP" ]; then log "llama.cpp $KEY: present ($DEST)"; return 0; fi
    fetch_sdist
    find_nvcc
    local cmake ninja t0=$SECONDS w src
    cmake="$(need_tool cmake)"; ninja="$(need_tool ninja)"
    mktmp w "$CACHE/llama.cpp/.build-$KEY.XXXXXX"
    log "building ${TOOLS[*]} + libllama ($BACKEND, jobs=$JOBS, a few minutes) ..."
    tar -xzf "$SDIST" -C "$w" "llama_cpp_python-$VER/vendor/llama.cpp"
    src="$w/llama_cpp_python-$VER/vendor/llama.cpp"
    run_logged cmake-configure "$cmake" -S "$src" -B "$w/build" -G Ninja -DCMAKE_MAKE_PROGRAM="$ninja" \
        "${CMAKE_OPTS[@]}"
    # The tools link libllama, libggml* and llama-common: one build gives everything.
    run_logged cmake-build "$cmake" --build "$w/build" -j "$JOBS" --target "${TOOLS[@]}" llama

    # Stage the install tree, then rename it into place (never a half-populated $DEST).
    local s="$w/stage" t
    mkdir -p "$s/bin" "$s/lib" "$s/models" "$s/requirements"
    for t in "${TOOLS[@]}"; do install -m 755 "$w/build/bin/$t" "$s/bin/$t"; done
    cp -a "$w"/build/bin/lib*.so* "$s/lib/"
    # The converter imports conversion/ and gguf-py/ (sys.path relative to the script), reads
    # chat templates from models/templates/ and two builtin vocabs from models/ (mamba, openelm).
    cp "$src/convert_hf_to_gguf.py" "$src/LICENSE" "$s/"
    cp -r "$src/conversion" "$src/gguf-py" "$s/"
    cp -r "$src/models/templates" "$s/models/"
    cp "$src/models/ggml-vocab-gpt-neox.gguf" "$src/models/ggml-vocab-llama-spm.gguf" "$s/models/"
    cp "$src/requirements/requirements-convert_hf_to_gguf.txt" \
       "$src/requirements/requirements-convert_legacy_llama.txt" "$s/requirements/"
    printf '%s\n' "${CMAKE_OPTS[@]}" >"$s/cmake-options.txt"
    "$s/bin/llama-bench" --version >/dev/null 2>&1 || die "built llama-bench does not run (see $CACHE/logs)"
    printf 'llama-cpp-python %s\nbackend %s\nbuilt %s on %s\n' "$VER" "$BACKEND" "$(date -u +%FT%TZ)" \
        "$(uname -m)" >"$s/.complete"
    rm -rf "$DEST"   # only a stamp-less leftover can be here
    mv "$s" "$DEST"
    log "llama.cpp $KEY: installed in $DEST ($((SECONDS - t0)) s)"
}

# The binding's Python package from the sdist as a pure wheel: nothing is compiled, pip still
# records it (metadata, dependencies, uninstall).
make_binding_wheel() {
    [ -f "$WHEEL" ] && return 0
    fetch_sdist
    local d
    mktmp d "$CACHE/wheels/.llama-cpp-whl.XXXXXX"
    tar -xzf "$SDIST" -C "$d" --exclude="llama_cpp_python-$VER/vendor" \
        "llama_cpp_python-$VER/llama_cpp" "llama_cpp_python-$VER/PKG-INFO" "llama_cpp_python-$VER/LICENSE.md"
    "$PY" - "$d/llama_cpp_python-$VER" "$VER" "$d/out.whl" <<'EOF'
import base64, hashlib, pathlib, sys, zipfile
src, ver, out = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
info = f"llama_cpp_python-{ver}.dist-info"
files = {p.relative_to(src).as_posix(): p.read_bytes()
         for p in sorted((src / "llama_cpp").rglob("*")) if p.is_file() and "__pycache__" not in p.parts}
files[f"{info}/METADATA"] = (src / "PKG-INFO").read_bytes()
files[f"{info}/licenses/LICENSE.md"] = (src / "LICENSE.md").read_bytes()
files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: quantkit scripts/setup_llama_cpp.sh\n"
                          b"Root-Is-Purelib: true\nTag: py3-none-any\n")
digest = lambda b: "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b"=").decode()
record = "".join(f"{n},{digest(b)},{len(b)}\n" for n, b in files.items()) + f"{info}/RECORD,,\n"
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    for n, b in files.items():
        z.writestr(n, b)
    z.writestr(f"{info}/RECORD", record)
EOF
    mv "$d/out.whl" "$WHEEL"
}

install_python_binding() {
    local site
    site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    if [ "$(readlink "$site/llama_cpp/lib" 2>/dev/null)" = "$DEST/lib" ] && "$PY" -c \
        "import sys, importlib.metadata as m; sys.exit(m.version('llama_cpp_python') != '$VER')" 2>/dev/null; then
        log "llama-cpp-python $VER: already in $VENV (libs: $DEST/lib)"; return 0
    fi
    make_binding_wheel
    local cons=()
    [ -f "$VENV/constraints.txt" ] && cons=(-c "$VENV/constraints.txt")
    run_logged pip-install-binding "$PY" -m pip install --force-reinstall --no-deps "$WHEEL"
    run_logged pip-install-binding-deps "$PY" -m pip install "${cons[@]}" "$WHEEL"
    rm -rf "$site/llama_cpp/lib"
    ln -s "$DEST/lib" "$site/llama_cpp/lib"
    "$PY" -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$VER')" \
        || die "llama_cpp $VER not importable from $VENV with libs in $DEST/lib"
    log "llama-cpp-python $VER: installed in $VENV (pure Python; libs: $DEST/lib)"
}

build_llama_cpp
install_python_binding
log "done"
