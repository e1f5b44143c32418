#!/usr/bin/env bash
# GGUF F16 / Q8_0 / Q4_K_M of a Hugging Face checkpoint through llama.cpp's own tools, timed on the GPU:
#   scripts/gguf_bench_gpu.sh DENSE_DIR OUT_DIR [WAIT_FILE]
# DENSE_DIR: a safetensors checkpoint with a tokenizer (scripts/bench_engine_gpu.py --keep-dense writes the
# 32-layer Llama-3.1-8B-shaped one and `.ready` last; this waits for it). The tools are the cached build of
# scripts/setup_llama_cpp.sh (quantkit.toolchain.llama_cpp.install_dir: the CUDA one where it is complete).
# Converts with the vendored convert_hf_to_gguf.py, quantizes with llama-quantize (no imatrix: it changes
# quality, not speed), then waits for WAIT_FILE (the GPU's other user is done) and runs
#   llama-bench -ngl 99 -p 2048 -n 128 -r 3 -o json           (batch-1 decode, prefill of 2048)
#   llama-batched-bench -ngl 99 -npp 2048 -ntg 64 -npl 1,16,64 (decode at batch 1/16/64 after 2048-token prompts)
# on each. Writes OUT_DIR/{bench-TYPE.json, batched-TYPE.jsonl, convert.txt, versions.txt}.
set -euo pipefail
DENSE=$1 OUTD=$2 WAIT=${3:-}
PY=${PY:-python3}
mkdir -p "$OUTD"
LL=$($PY -c "from quantkit.toolchain.llama_cpp import install_dir; print(install_dir())")
BIN=$LL/bin
THREADS=${THREADS:-16}
W=${GGUF_WORK:-$(dirname "$OUTD")/gguf-work}
mkdir -p "$W"
echo "llama.cpp: $LL ($(cat "$LL/.complete" | tr '\n' ' '))" | tee "$OUTD/versions.txt"
"$BIN/llama-bench" --version 2>&1 | tail -n 2 >> "$OUTD/versions.txt" || true
until [ -f "$DENSE/.ready" ]; do sleep 10; done
t0=$SECONDS
[ -f "$W/F16.gguf" ] || $PY "$LL/convert_hf_to_gguf.py" "$DENSE" --outtype f16 --outfile "$W/F16.gguf.part" \
    > "$OUTD/convert-log.txt" 2>&1 && mv "$W/F16.gguf.part" "$W/F16.gguf"
echo "convert F16: $((SECONDS - t0)) s" | tee -a "$OUTD/convert.txt"
for q in Q8_0 Q4_K_M; do
    t0=$SECONDS
    [ -f "$W/$q.gguf" ] || "$BIN/llama-quantize" "$W/F16.gguf" "$W/$q.gguf.part" "$q" "$THREADS" \
        > "$OUTD/quantize-$q-log.txt" 2>&1 && mv "$W/$q.gguf.part" "$W/$q.gguf"
    echo "quantize $q: $((SECONDS - t0)) s, $(stat -c %s "$W/$q.gguf") bytes" | tee -a "$OUTD/convert.txt"
done
echo "F16: $(stat -c %s "$W/F16.gguf") bytes" >> "$OUTD/convert.txt"
[ -n "$WAIT" ] && until [ -f "$WAIT" ]; do sleep 10; done
NGL=${NGL:-99}
# one GPU: without this llama.cpp splits the layers over every visible GPU (run 3 did: see the README)
export CUDA_VISIBLE_DEVICES=${GGUF_GPU:-0}
for q in F16 Q8_0 Q4_K_M; do
    "$BIN/llama-bench" -m "$W/$q.gguf" -ngl "$NGL" -p "${PROMPT:-2048}" -n "${GEN:-128}" -r "${REPS:-3}" \
        -o json > "$OUTD/bench-$q.json" 2> "$OUTD/bench-$q-log.txt" || echo "llama-bench $q failed" >&2
    "$BIN/llama-batched-bench" -m "$W/$q.gguf" -ngl "$NGL" -c $(( ${NPL_MAX:-64} * (${PROMPT:-2048} + 64) )) \
        -b 2048 -ub 512 -npp "${PROMPT:-2048}" -ntg 64 -npl "${NPL:-1,16,64}" -fa on --output-format jsonl \
        > "$OUTD/batched-$q.jsonl" 2> "$OUTD/batched-$q-log.txt" || echo "llama-batched-bench $q failed" >&2
    echo "$q done"
done
