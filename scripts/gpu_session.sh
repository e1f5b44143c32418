#!/usr/bin/env bash
# One warm 2-GPU device machine, several chained calls of the workplace's device tool (issue 10's two-H200 run,
# issue 11's demo on the H200, the 8B GGUF CUDA bench; docs/benchmarks/h200-x2/README.md):
#   run(command="DEADLINE=500 bash scripts/gpu_session.sh", carry=[".gpu/c1"], kind="nvidia-h200-x2")
#   run(command="DEADLINE=500 bash scripts/gpu_session.sh", carry=[".gpu/c2"])     ... within 30 s of the last
# Each call stashes what its carry folder holds under $QK_STATE (default ~/qk; kept while the machine stays warm: the 64 MiB
# per-call limit spreads the inputs over calls), installs new wheels, copies this checkout's code once per
# content, starts every lane whose inputs and predecessors are ready (once per machine, in its own process
# session, so it outlives the call), prints progress until DEADLINE seconds, then packs every lane's results
# into $OUT (res.tar.gz: small files only).
# Lanes (GPU holds are files under $S/hold; a lane waiting for a GPU starts in a later loop or call):
#   L   CPU      scripts/setup_llama_cpp.sh (CUDA), then the binding diagnosis (scripts/llama_binding_diag.py)
#   X8  GPU 0+1  scripts/gpu_distributed.sh: dummy Llama-3.1-8B, $X8_LAYERS layers, GPTQ W4 g128, 1 vs 2 GPUs
#   (the lanes below start once both of X8's timed builds are over)
#   B   GPU 1    scripts/bench_scale_gpu.py --jobs $B_JOBS (issue 10's one-GPU targets)
#   B0  GPU 0    the same with $B0_JOBS, when set (while lane D waits for llama.cpp)
#   E   GPU 1    after B: the engine helper's request: $S/stash/E.sh (carried as E.sh), run with OUT=$S/res/E
#   M   CPU      the demo model: GGUF parts -> scripts/gguf_import_checked.py (tensor hashes = the CPU import's)
#   XD  GPU 0+1  scripts/gpu_distributed.sh on the demo model (real weights), ppl 1 vs 2 ranks; holds GPU 0 and
#                shares GPU 1 with B (its timings are not the point: its perplexities are)
#   D   GPU 0    recipes/smollm2-135m-h200.yaml after XD: every target in one process (its report), then one
#                process per target if that failed, the store-wide report, Pareto PNG, cross-check, plan
#   G   (RUN_G=1) CPU, then GPU 1 after B: scripts/gguf_bench_gpu.sh on X8's 32-layer dummy checkpoint
# DRY=1: a CPU rehearsal (tiny shapes, no GPU, the CPU llama.cpp build). FAKE=1: the schedule alone.
set -u
R="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
S=${QK_STATE:-$HOME/qk}
OUT=${OUT:-${TMPDIR:-/tmp}/out}  # the device tool sets OUT
DEADLINE=${DEADLINE:-500}
T0=$SECONDS
mkdir -p "$S"/{stash/whl,res,log,done,hold,cache/sdist,scratch} "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export QUANTKIT_CACHE=$S/cache QUANTKIT_DATA=$S/stash/data QUANTKIT_DEMO_MODEL=$S/stash/tok
PY=${PY:-python3}
SITE=${SITE:-${TMPDIR:-/tmp}/site}  # where the wheels go (gpu_distributed.sh NO_WHEELS reads it there)
. "$(dirname "${BASH_SOURCE[0]}")/lanes.sh"   # log, done_ok, poll_lanes

# ---- stash this call's carry (every .gpu/c* folder that came) ----
for c in "$R"/.gpu/c*; do
    [ -d "$c" ] || continue
    for f in "$c"/*; do
        case "$f" in
            */whl) cp -n "$f"/*.whl "$S/stash/whl/" ;;
            */sdist) cp -n "$f"/* "$S/cache/sdist/" ;;
            *.tar.xz) [ -f "$S/done/unpacked-$(basename "$f")" ] || { tar -xJf "$f" -C "$S/stash" && touch "$S/done/unpacked-$(basename "$f")"; } ;;
            *) cp -rn "$f" "$S/stash/" ;;
        esac
    done
done
# the calibration set cached on the CPU host (same tokens quantkit would sample): no re-tokenizing there
[ -d "$S/stash/cache/calibration" ] && mkdir -p "$S/cache/calibration" && cp -n "$S"/stash/cache/calibration/* "$S/cache/calibration/"
NEW=()  # wheels not installed yet: all at once in the first call (nothing runs yet), never again: a second
for w in "$S"/stash/whl/*.whl; do  # --upgrade install would rewrite files that running lanes have imported
    [ -e "$w" ] && [ -z "${DRY:-}" ] && [ ! -f "$S/done/whl-$(basename "$w")" ] && NEW+=("$w")
done
if [ ${#NEW[@]} -gt 0 ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${NEW[@]}" \
        && for w in "${NEW[@]}"; do touch "$S/done/whl-$(basename "$w")"; done || log "wheel install failed"
fi
# the code of this call, copied once per content: a later call's checkout cannot change a running lane's files
CODE_ID=$(cd "$R" && find quantkit scripts recipes calibration -type f ! -name '*.pyc' -print0 | sort -z | xargs -0 cat | md5sum | cut -c1-10)
C=$S/code-$CODE_ID
[ -d "$C" ] || { mkdir -p "$C.tmp" && cp -r "$R"/{quantkit,scripts,recipes,calibration} "$C.tmp"/ && mv "$C.tmp" "$C"; }
mkdir -p "$S/models" && ln -sfn "$S/models" "$C/models"
export PYTHONPATH=$C:$SITE
log "code $CODE_ID; stash: $(ls "$S/stash" | tr '\n' ' ')"
if [ ! -f "$S/res/device.txt" ]; then
    { nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1
      $PY -c "import torch; from importlib.metadata import version as v; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count(), *[f'{n} {v(n)}' for n in ('transformers', 'triton', 'llmcompressor', 'compressed-tensors', 'nvidia-modelopt', 'gemlite', 'gguf', 'accelerate', 'safetensors', 'numpy')])" 2>&1 | tail -1
      echo "cpus $(nproc)"; grep MemTotal /proc/meminfo; uname -r; date -u; } > "$S/res/device.txt"
fi
nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader 2>/dev/null | sed 's/^/  gpu /'

started() { [ -f "$S/done/started-$1" ]; }
wanted() { [ -z "${LANES:-}" ] || [[ " $LANES " == *" $1 "* ]]; }  # LANES="L X8": only these lanes
over() { done_ok "$1" || ! wanted "$1"; }  # a lane this session does not run counts as over
gpu_free() { for g in "$@"; do [ -e "$S/hold/gpu$g" ] && return 1; done; return 0; }
start() {  # start NAME "GPUS" CMD: once per machine, in its own session; holds GPUS until it ends
    local name=$1 gpus=$2; shift 2
    started "$name" && return 0
    wanted "$name" || return 0
    touch "$S/done/started-$name"
    # FAKE=1: a scheduling rehearsal; each lane sleeps and leaves what its successors look for
    [ -n "${FAKE:-}" ] && set -- "sleep ${FAKE_S:-3}; case $name in X8) echo '\"2\": {' > $S/res/X8/results.json; \
        mkdir -p $S/cache/dummy/llama-3.1-8b-L32-x;; M) mkdir -p $S/models/smollm2-135m-instruct;; esac"
    for g in $gpus; do echo "$name" > "$S/hold/gpu$g"; done
    local rel=""; for g in $gpus; do rel="$rel $S/hold/gpu$g"; done
    mkdir -p "$S/res/$name"
    log "start lane $name${gpus:+ on GPU $gpus}"
    (cd "$C" && setsid nohup bash -c "$*; rc=\$?; rm -f $rel; echo \$rc > $S/done/$name" \
        > "$S/log/$name.log" 2>&1 < /dev/null &)
}

VENV=$($PY -c 'import sys; print(sys.prefix)')
JOBS=${JOBS:-12}          # llama.cpp compile jobs: 12 of 32 cores, the rest stay with the timed lanes
X8_LAYERS=${X8_LAYERS:-32}
# run 5: what run 4 left (trtllm-int4-awq on the GPU, the imatrix placement) and the quantkit / direct pairs
B_JOBS=${B_JOBS:-8b:gptq-w4-g128,8b:direct-gptq,8b:trtllm-int4-awq,8b:gguf-q4km,8b:awq-w4-g128,8b:direct-awq}
DEMO_RECIPE=recipes/smollm2-135m-h200.yaml
XD_ENV="SAMPLES=16 SEQ_LEN=256 EXTRA_ARGS='--dtype float32 --ppl 8 --no-sanity-check'"
if [ -n "${DRY:-}" ]; then
    X8_ENV="LAYERS=2 SAMPLES=4 SEQ_LEN=64 SOURCE=dummy:$R/.gpu/tiny-arch.json"
    XD_ENV="SAMPLES=2 SEQ_LEN=32 EXTRA_ARGS='--dtype float32 --ppl 2 --no-sanity-check'"
    B_ARGS="--smoke"
    [ -e "$S/cache/llama.cpp" ] || ln -s "$HOME/.cache/quantkit/llama.cpp" "$S/cache/llama.cpp"  # the CPU build
    DEMO_RECIPE=recipes/dry-h200.yaml  # the same recipe, CPU-sized evaluation
    printf '%s\n' "extends: smollm2-135m-h200.yaml" "calibration: {num_samples: 4, seq_len: 64}" \
        "eval: {perplexity: {max_windows: 2}, throughput: {prompt_len: 16, gen_len: 4, batch_sizes: [1], repetitions: 1}}" \
        > "$C/recipes/dry-h200.yaml"
    DEMO_GROUPS=("")
else
    X8_ENV="LAYERS=$X8_LAYERS"
    B_ARGS=""
    DEMO_GROUPS=("")  # every target in one process (its report is the table); a failure falls back below
fi
B_ARGS="$B_ARGS ${B_EXTRA:-}"  # e.g. B_EXTRA="--layers 8b:4,70b:4 --deadline 1000" (bench_scale_gpu.py's options)

x8_builds_done() {  # both timed builds of X8 are over (its artifact comparison runs on the CPU after them)
    wanted X8 || return 0
    done_ok X8 || grep -q '"2": {' "$S/res/X8/results.json" 2>/dev/null
}
launch() {
    # L: llama.cpp (CUDA) from the trimmed sdist, then where the in-process binding breaks, if it does
    if ls "$S"/cache/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
        SETUP="bash scripts/setup_llama_cpp.sh $VENV ${LLAMA_BACKEND:-cuda}"
        [ -n "${DRY:-}" ] && SETUP=true
        DIAG="for v in '' '--torch-first'; do echo \"== diag \$v\"; timeout 120 $PY -X faulthandler scripts/llama_binding_diag.py $S/stash/tiny-q8.gguf \$v; echo \"rc \$?\"; done; \
              echo '== diag, GPUs hidden'; CUDA_VISIBLE_DEVICES= timeout 120 $PY -X faulthandler scripts/llama_binding_diag.py $S/stash/tiny-q8.gguf --torch-first; echo \"rc \$?\""
        start L "" "export CMAKE_BUILD_PARALLEL_LEVEL=$JOBS PIP_NO_INDEX=1 PIP_FIND_LINKS=$S/stash/whl; \
            { time $SETUP; } > $S/res/L/setup.log 2>&1; echo setup rc \$? >> $S/res/L/setup.log; \
            cp -r $S/cache/logs $S/res/L/setup-logs 2>/dev/null; \
            { $DIAG; } > $S/res/L/diag.log 2>&1; \
            if grep -q '^rc 1[0-9][0-9]' $S/res/L/diag.log && command -v cuda-gdb >/dev/null; then \
              timeout 180 cuda-gdb -batch -ex run -ex bt -ex 'info sharedlibrary' --args $PY scripts/llama_binding_diag.py \
                $S/stash/tiny-q8.gguf --torch-first > $S/res/L/diag-gdb.log 2>&1; fi; \
            grep -q 'setup rc 0' $S/res/L/setup.log"
    fi
    # X8: issue 10's two-GPU run first, on quiet GPUs; its GPUs are free once both timed builds are over
    if [ -f "$S/stash/tok/tokenizer.json" ] && gpu_free 0 1; then
        start X8 "0 1" "$X8_ENV DIST_PACK=$S/stash DIST_WORK=$S/scratch/dist8 BUDGET=1500 OUT=$S/res/X8 NO_WHEELS=1 \
            bash scripts/gpu_distributed.sh"
    fi
    if started X8 && x8_builds_done; then
        for g in 0 1; do grep -qx X8 "$S/hold/gpu$g" 2>/dev/null && rm -f "$S/hold/gpu$g"; done
    fi
    # M: the demo model from its GGUF (two parts, two calls), proven equal to the CPU host's import
    if [ -f "$S/stash/smollm2.gguf.part1" ] && [ -f "$S/stash/smollm2.gguf.part2" ]; then
        start M "" "test -f $S/models/smollm2-135m-instruct/config.json || { \
            cat $S/stash/smollm2.gguf.part1 $S/stash/smollm2.gguf.part2 > $S/scratch/SmolLM2-135M-Instruct.Q4_1.gguf && \
            sha256sum $S/scratch/SmolLM2-135M-Instruct.Q4_1.gguf > $S/res/M/gguf.sha256 && \
            CUDA_VISIBLE_DEVICES= $PY -X faulthandler scripts/gguf_import_checked.py import \
              $S/scratch/SmolLM2-135M-Instruct.Q4_1.gguf $S/models/smollm2-135m-instruct --expect $S/stash/smollm2-hashes.json \
              > $S/res/M/import.json; }"
    fi
    x8_builds_done || return 0
    # B: issue 10's one-GPU targets on GPU 1 (gguf-q4km, late in its list, needs lane L's llama.cpp)
    if gpu_free 1; then
        start B "1" "CUDA_VISIBLE_DEVICES=${B_GPU:-1} SCALE_WORK=$S/scratch/scale $PY scripts/bench_scale_gpu.py \
            --out $S/res/B --deadline 100000 --jobs $B_JOBS $B_ARGS; cp $S/scratch/scale/logs/*.log $S/res/B/ 2>/dev/null; true"
    fi
    # B0: more one-GPU targets on GPU 0 while lane D waits for llama.cpp (B0_JOBS; run 5: the AWQ pair, 70B GPTQ)
    if [ -n "${B0_JOBS:-}" ] && gpu_free 0; then
        start B0 "0" "CUDA_VISIBLE_DEVICES=0 SCALE_WORK=$S/scratch/scale0 $PY scripts/bench_scale_gpu.py \
            --out $S/res/B0 --deadline 100000 --jobs $B0_JOBS $B_ARGS; cp $S/scratch/scale0/logs/*.log $S/res/B0/ 2>/dev/null; true"
    fi
    # E: the engine helper's request (carried as E.sh), GPU 1 once lane B is over, alone on it
    if [ -f "$S/stash/E.sh" ] && done_ok B && gpu_free 1; then
        start E "1" "cd $S/stash && mkdir -p $S/res/E && CUDA_VISIBLE_DEVICES=1 OUT=$S/res/E REPO=$C SITE=$SITE bash E.sh"
    fi
    # XD: the demo model, 1 rank vs 2 ranks: same perplexity (within 0.1 %); holds GPU 0, shares GPU 1 with B
    if done_ok M && gpu_free 0; then
        start XD "0" "SOURCE=$S/models/smollm2-135m-instruct LAYERS=0 $XD_ENV DIST_PACK=$S/stash DIST_WORK=$S/scratch/distD \
            BUDGET=1200 OUT=$S/res/XD NO_WHEELS=1 bash scripts/gpu_distributed.sh"
    fi
    # D: the demo recipe on GPU 0, one process per group of targets (a target that fails stops its process only;
    # GGUF alone: its process may meet the binding), then the report + Pareto PNG from the store, cross-check, plan
    if over XD && done_ok M && done_ok L && gpu_free 0; then
        DQ="CUDA_VISIBLE_DEVICES=0 $PY -m quantkit.cli build $DEMO_RECIPE --store $S/store --report-dir $S/res/D/report"
        GROUPS_CMD=""
        i=0
        for grp in "${DEMO_GROUPS[@]}"; do
            i=$((i + 1))
            GROUPS_CMD="$GROUPS_CMD { time $DQ $grp; } > $S/res/D/build-$i.log 2>&1; echo \"build-$i ($grp) rc \$?\" >> $S/res/D/rc.txt;"
        done
        # a target that fails stops its process: the rest then run one process each (built ones come from the store)
        GROUPS_CMD="$GROUPS_CMD if grep -q 'rc [1-9]' $S/res/D/rc.txt; then for t in \$($PY -c \"from quantkit.recipe.loader \
            import load_recipe; print(' '.join(t.name for t in load_recipe('$DEMO_RECIPE').recipe.targets))\"); do \
            { time $DQ --target \$t; } > $S/res/D/build-\$t.log 2>&1; echo \"build \$t rc \$?\" >> $S/res/D/rc.txt; done; fi;"
        start D "0" "$GROUPS_CMD \
            $PY scripts/store_report.py $S/store smollm2-135m-h200 $S/res/D/report > $S/res/D/report.log 2>&1; \
            echo report rc \$? >> $S/res/D/rc.txt; \
            CUDA_VISIBLE_DEVICES=0 $PY scripts/gpu_crosscheck.py $S/store smollm2-135m-h200 --out $S/res/D/crosscheck.jsonl \
              > $S/res/D/crosscheck.log 2>&1; echo crosscheck rc \$? >> $S/res/D/rc.txt; \
            $PY -m quantkit.cli plan $DEMO_RECIPE --gpu H200 --store $S/store > $S/res/D/plan.txt 2>&1; \
            cp -r $S/cache/logs $S/res/D/cache-logs 2>/dev/null; true"
    fi
    # G: the 8B GGUF F16/Q8_0/Q4_K_M of X8's 32-layer dummy checkpoint: convert + quantize on the CPU now, the
    # llama.cpp CUDA benches on GPU 1 once lane B is done (the script waits for $S/done/G-gpu)
    DENSE=$(ls -d "$S"/cache/dummy/*-L32-*/ 2>/dev/null | head -1)
    if [ -n "${RUN_G:-}" ] && [ -n "$DENSE" ] && done_ok L; then  # run 4 measured it: RUN_G=1 to repeat
        start G "" "touch ${DENSE%/}/.ready; GGUF_GPU=1 GGUF_WORK=$S/scratch/gguf8b THREADS=8 \
            bash scripts/gguf_bench_gpu.sh ${DENSE%/} $S/res/G $S/done/G-gpu"
    fi
    if started G && ! done_ok G && done_ok B && gpu_free 1 && [ ! -f "$S/done/G-gpu" ]; then
        echo G > "$S/hold/gpu1"; touch "$S/done/G-gpu"; log "lane G takes GPU 1"
    fi
    if done_ok G && grep -qx G "$S/hold/gpu1" 2>/dev/null; then rm -f "$S/hold/gpu1"; fi
}

pack() {
    (cd "$S" && tar -czf "$OUT/res.tar.gz" --exclude='*.safetensors' --exclude='*.gguf' res log done 2>/dev/null)
    { ls "$S/done"; ls "$S/hold"; df -h "$S" | tail -1; free -g | head -2; } > "$OUT/status.txt" 2>&1
    cp "$S/res/D/report/report.md" "$OUT/" 2>/dev/null
    ls "$S"/res/D/report/*.png >/dev/null 2>&1 && cp "$(ls "$S"/res/D/report/*.png | head -1)" "$OUT/pareto.png"
    true
}
poll_lanes 20
for n in L X8 B B0 M XD D G E; do done_ok "$n" && log "lane $n exit $(cat "$S/done/$n")"; done
for n in X8 XD; do [ -f "$S/res/$n/summary.md" ] && { echo "== $n"; cat "$S/res/$n/summary.md"; }; done
for n in B B0; do [ -f "$S/res/$n/summary.md" ] && { echo "== $n"; cat "$S/res/$n/summary.md"; }; done
pack
log "packed: $(ls "$OUT" | tr '\n' ' ')"
