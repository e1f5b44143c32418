#!/usr/bin/env bash
# The H200 measurements of issue 11 (docs/benchmarks/h200/README.md) on a 2-GPU host, spread over several calls
# of the workplace's device tool: each call carries part of the inputs in .gpuwork-gpu/ (the per-call transfer
# limit is 64 MiB), this script stashes them under /root/qk (kept while the machine stays warm), starts every
# lane whose inputs are complete (once, in its own process session, so it outlives the call), then reports
# progress until $DEADLINE seconds and packs what is done into $OUT. Lanes:
#   A  GPU 0: scripts/bench_engine_gpu.py, 32-layer Llama-3.1-8B shapes, bf16 + the 8-bit layouts
#   B  GPU 1: the same with its own bf16 baseline + the 4-bit layouts; then lane D
#   L  CPU:   scripts/setup_llama_cpp.sh VENV cuda (the pinned sdist, trimmed), then the 8B GGUF F16/Q8_0/Q4_K_M
#             (convert_hf_to_gguf.py, llama-quantize) and, once lane A is done, llama-bench and
#             llama-batched-bench -ngl 99 on GPU 0
#   D  GPU 1 (or 0, whichever is free first): the demo recipe (recipes/smollm2-135m-h200.yaml) with the real SmolLM2 weights, then
#             scripts/gpu_crosscheck.py (compiled vs the artifacts' own engines); again with ModelOpt once its
#             wheels came (trtllm targets)
#   X  GPUs 0+1: $DIST_SCRIPT (issue 10's distributed run), only when asked and both GPUs are free
# DRY=1 runs the same on a CPU host with tiny shapes (no GPU lanes' timings mean anything there).
set -u
G="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"       # .gpuwork-gpu (code + inputs of this call)
S=${QK_STATE:-/root/qk}
OUT=${OUT:-/tmp/out}
DEADLINE=${DEADLINE:-540}
T0=$SECONDS
mkdir -p "$S"/{stash/whl,log,done,cache/sdist} "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export QUANTKIT_CACHE=$S/cache QUANTKIT_DATA=$S/data
PY=${PY:-python3}
. "$(dirname "${BASH_SOURCE[0]}")/lanes.sh"   # log, done_ok, poll_lanes

# ---- stash this call's inputs (idempotent) and install wheels not installed yet ----
[ -d "$G/in" ] && for f in "$G"/in/*; do
    case "$f" in
        */whl) cp -n "$f"/*.whl "$S/stash/whl/" 2>/dev/null ;;
        *.tar.xz) [ -f "$S/done/unpacked-$(basename "$f")" ] || { tar -xJf "$f" -C "$S" && touch "$S/done/unpacked-$(basename "$f")"; } ;;
        *llama_cpp_python-*.tar.gz) cp -n "$f" "$S/cache/sdist/" ;;
        *) cp -rn "$f" "$S/stash/" ;;
    esac
done
SITE=${SITE:-/tmp/site}  # the carried wheels (cp312 manylinux): the device's python
for w in "$S"/stash/whl/*.whl; do
    [ -e "$w" ] && [ -z "${NO_WHEELS:-}" ] || continue
    [ -f "$S/done/whl-$(basename "$w")" ] && continue
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$w" \
        && touch "$S/done/whl-$(basename "$w")" || log "wheel $(basename "$w") failed"
done
export PYTHONPATH=$SITE
# the code of this call, copied once per content: a later call's copy cannot change a running lane's files
CODE_ID=$(cd "$G" && find quantkit scripts recipes calibration -type f -name '*.*' ! -name '*.pyc' -print0 | sort -z | xargs -0 cat | md5sum | cut -c1-10)
C=$S/code-$CODE_ID
[ -d "$C" ] || { mkdir -p "$C" && cp -r "$G"/{quantkit,scripts,recipes,calibration} "$C"/; }
ln -sfn "$S/models" "$C/models"
log "code $CODE_ID; inputs: $(ls "$S/stash" | tr '\n' ' ')"
nvidia-smi --query-gpu=index,name,memory.used,utilization.gpu --format=csv,noheader 2>/dev/null | sed 's/^/  gpu /'
[ -f "$S/done/machine.txt" ] || { echo "nvcc: $(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)"; \
    nproc; df -h "$S" | tail -1; $PY -c 'import torch; print(torch.__version__, torch.cuda.device_count())'; } \
    > "$S/done/machine.txt" 2>&1
for n in ${RESTART:-}; do rm -f "$S/done/started-$n" "$S/done/$n"; done  # RESTART="L": start lane L again

start() {  # start NAME CMD...: once per machine, in its own session
    local name=$1; shift
    [ -f "$S/done/started-$name" ] && return 0
    [ -n "${LANES:-}" ] && [[ " $LANES " != *" $name "* ]] && return 0  # LANES="A L": only these
    touch "$S/done/started-$name"
    log "start lane $name"
    (cd "$C" && PYTHONPATH=$SITE:$C setsid nohup bash -c "$*; echo \$? > $S/done/$name" \
        >"$S/log/$name.log" 2>&1 < /dev/null &)
}

if [ -n "${DRY:-}" ]; then
    BENCH="--tiny --layers 2 --prompt 32 --gen 4 --batches 1,2 --reps 1"
else
    BENCH="--layers 32"
fi
VENV=$($PY -c 'import sys; print(sys.prefix)')

launch() {  # start every lane whose inputs are complete (called again while waiting)
    # ---- lane L: llama.cpp CUDA build first (it takes minutes), then the 8B GGUFs ----
    if ls "$S"/cache/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
        SETUP="bash scripts/setup_llama_cpp.sh $VENV ${LLAMA_BACKEND:-cuda}"
        [ -n "${DRY:-}" ] && SETUP=true  # the dry run uses an existing CPU build (see the README's commands)
        start L "export CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-20} PIP_NO_INDEX=1 PIP_FIND_LINKS=$S/stash/whl; \
            $SETUP && touch $S/done/llama-built && \
            bash scripts/gguf_bench_gpu.sh $S/dense8b $S/gguf8b $S/done/A"
    fi

    # ---- lanes A and B: the compiled engine on the 8B shapes, one GPU each, each with its own bf16 baseline ----
    if [ -f "$S/stash/tok/tokenizer.json" ] || [ -n "${DRY:-}" ]; then
        TOK=$S/stash/tok; [ -n "${DRY:-}" ] && TOK=${DRY_TOK:-models/smollm2-135m-instruct}
        start A "CUDA_VISIBLE_DEVICES=0 $PY scripts/bench_engine_gpu.py $BENCH --out $S/benchA --root $S/qkA \
            --budget-s 100000 --save-gemlite $S/benchA/gemlite-h200.json --keep-dense $S/dense8b --tokenizer $TOK \
            --profile bf16,fp8-static,trtllm-fp8 \
            --only 'bf16,bf16 unfused,fp8-static,fp8-static unfused,trtllm-fp8,fp8-dynamic,int8-w8a8,fp8-dynamic rowwise'"
        start B "CUDA_VISIBLE_DEVICES=1 $PY scripts/bench_engine_gpu.py $BENCH --out $S/benchB --root $S/qkB \
            --budget-s 100000 --save-gemlite $S/benchB/gemlite-h200.json --profile 'bf16,gptq-w4-g128' \
            --only 'bf16,gptq-w4-g128,gptq-w4-g128 tinygemm unfused,gptq-w4-g128 gemlite,gptq-w4-g128-asym,awq-w4-g128,trtllm-int4-awq'"
    fi

    # ---- lane D: the demo recipe on GPU 1 once lane B is done, the model's two parts are here and llama.cpp is built
    # (on whichever GPU is free first: 1 after lane B, or 0 after lane A and lane L's llama-bench)
    DGPU=$(cat "$S/done/demo-gpu" 2>/dev/null || { done_ok B && echo 1; } || { done_ok A && done_ok L && echo 0; } || true)
    if [ -f "$S/stash/gguf.part1" ] && [ -f "$S/stash/gguf.part2" ] && [ -n "$DGPU" ] && done_ok llama-built \
        && [ -z "${DRY:-}${NO_DEMO:-}" ]; then
        echo "$DGPU" > "$S/done/demo-gpu"
        MO=""; ls "$S"/stash/whl/nvidia_modelopt-*.whl >/dev/null 2>&1 && MO=1
        TARGETS="--target fp8-dynamic --target fp8-static --target int8-w8a8 --target gptq-w4g64 \
            --target gptq-w4g64-asym --target awq-w4g64 --target gguf"
        DEMO="CUDA_VISIBLE_DEVICES=$DGPU QUANTKIT_LLAMA_CPP_BACKEND=${LLAMA_BACKEND:-cuda}"
        start D "set -x; test -f $S/models/smollm2-135m-instruct/config.json || { \
              cat $S/stash/gguf.part1 $S/stash/gguf.part2 > $S/smollm2.gguf && \
              $DEMO $PY -m quantkit.cli model import-gguf $S/smollm2.gguf $S/models/smollm2-135m-instruct; } && \
            $DEMO $PY -m quantkit.cli build recipes/smollm2-135m-h200.yaml --store $S/store --report-dir $S/demo $TARGETS; \
            $DEMO $PY scripts/gpu_crosscheck.py $S/store smollm2-135m-h200 --out $S/demo/crosscheck.jsonl"
        if [ -n "$MO" ] && done_ok D && ! [ -n "${DRY:-}" ]; then
            start D2 "$DEMO $PY -m quantkit.cli build recipes/smollm2-135m-h200.yaml --store $S/store --report-dir $S/demo; \
                $DEMO $PY scripts/gpu_crosscheck.py $S/store smollm2-135m-h200 --out $S/demo/crosscheck.jsonl; \
                $DEMO $PY -m quantkit.cli plan recipes/smollm2-135m-h200.yaml --gpu H200 --store $S/store > $S/demo/plan.txt"
        fi
    fi

    # ---- lane X: issue 10's distributed run, both GPUs, when asked and everything else is done ----
    if [ -n "${DIST_SCRIPT:-}" ] && done_ok A && done_ok D && { done_ok L || ! [ -f "$S/done/started-L" ]; }; then
        start X "OUT=$S/dist bash $DIST_SCRIPT"
    fi
}

# ---- progress until the deadline (or until every started lane is done) ----
pack() {
    cat "$S"/benchA/results.jsonl "$S"/benchB/results.jsonl > "$OUT/bench-results.jsonl" 2>/dev/null
    (cd "$S" && tar -czf "$OUT/logs.tar.gz" log benchA/gemlite-h200.json benchB/gemlite-h200.json \
        gguf8b/*.json gguf8b/*.jsonl gguf8b/*.txt 2>/dev/null)
    [ -d "$S/demo" ] && (cd "$S" && tar -czf "$OUT/demo.tar.gz" demo 2>/dev/null)
    [ -d "$S/dist" ] && (cd "$S" && tar -czf "$OUT/dist.tar.gz" dist 2>/dev/null)
    { ls "$S/done"; cat "$S/done/machine.txt"; df -h "$S" | tail -1; } > "$OUT/status.txt" 2>&1
}
poll_lanes 30
for n in A B L D D2 X; do [ -f "$S/done/$n" ] && log "lane $n exit $(cat "$S/done/$n")"; done
pack
log "packed: $(ls "$OUT" | tr '\n' ' ')"
