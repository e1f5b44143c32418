#!/usr/bin/env bash
# Issue 10, two H200s: the 8B-shape GPTQ target built by `quantkit build` with model.gpus: 1 and with
# model.gpus: 2 (llm-compressor's distributed oneshot, one process per GPU, started by quantkit), through
# scripts/bench_distributed.py: wall time per run, speed-up, peak GPU memory per GPU, peak host RSS and the
# largest weight difference between the two artifacts. Llama-3.1-8B shapes with dummy weights
# (`dummy:llama-3.1-8b`, LAYERS decoder layers), GPTQ W4 group 128, C4 128 x 2048.
#
# 1. On the CPU host, in the checkout that makes the call (once; ~10 MB, ignored by git):
#      bash scripts/gpu_distributed.sh --pack
#    -> .gpuwork-dist/: the wheels the GPU image lacks (llm-compressor 0.14.0.1, compressed-tensors 0.19.0,
#       datasets, ...), the C4 sample ($QUANTKIT_DATA/c4) and the demo model's tokenizer (dummy weights use it).
# 2. Through the device tool, one call (~4-5 min of the 400 s; the machine needs 2 GPUs):
#      run(command="bash scripts/gpu_distributed.sh", carry=[".gpuwork-dist"], kind="nvidia-h200-x2",
#          timeout_s=400)
#    $OUT gets summary.md, results.json, build-g1.log, build-g2.log, device.txt (commit them under
#    docs/benchmarks/h200-distributed/).
# Knobs (env): EXTRA_ARGS (more bench_distributed.py options, e.g. '--dtype float32 --ppl 8'), LAYERS=6 SAMPLES=128 SEQ_LEN=2048 GPUS=2 SOURCE=dummy:llama-3.1-8b BUDGET=370 (seconds for
# the benchmark itself). DRY=1: a CPU dry run (no wheel install; gloo ranks stand in for the GPUs).
set -uo pipefail
cd "$(dirname "$0")/.."
PACK=${DIST_PACK:-.gpuwork-dist}  # DIST_PACK: an absolute path works too (scripts/gpu_session.sh)
WHEELS="llmcompressor compressed_tensors datasets dill multiprocess loguru pydantic pydantic_core annotated_types typing_inspection"

if [ "${1:-}" = "--pack" ]; then
  set -e
  PY=${PY:-$(test -x .venv/bin/python && echo .venv/bin/python || echo python3)}
  mkdir -p $PACK/whl $PACK/data $PACK/tok
  main=$(dirname "$(git rev-parse --path-format=absolute --git-common-dir)")  # the main checkout
  for w in $WHEELS; do
    ls $PACK/whl/${w}-*.whl >/dev/null 2>&1 && continue
    found=$(ls ${WHEEL_DIR:+$WHEEL_DIR/${w}-*.whl} .whl/${w}-*.whl .gpuwork-*/whl/${w}-*.whl "$main"/.whl/${w}-*.whl \
            "$main"/.gpuwork-*/whl/${w}-*.whl 2>/dev/null | grep -v "^$PACK/" | head -1 || true)
    if [ -n "$found" ]; then cp "$found" $PACK/whl/; continue; fi
    ver=$($PY -c "from importlib.metadata import version; print(version('${w//_/-}'))")
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 -d $PACK/whl "${w//_/-}==$ver"
  done
  cp -r "${QUANTKIT_DATA:?set QUANTKIT_DATA to the shared data folder}/c4" $PACK/data/
  tok=${QUANTKIT_DEMO_MODEL:-models/smollm2-135m-instruct}
  for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
    test -f "$tok/$f" && cp "$tok/$f" $PACK/tok/
  done
  ls $PACK/whl; du -sh $PACK
  exit 0
fi

OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
case "$PACK" in /*) G=$PACK ;; *) G=$PWD/$PACK ;; esac
if [ ! -d "$G/whl" ] || [ ! -d "$G/data/c4" ] || [ ! -f "$G/tok/tokenizer.json" ]; then
  echo "$PACK/ is missing or incomplete: run 'bash scripts/gpu_distributed.sh --pack' on the CPU host and carry it"
  exit 2
fi
if [ -n "${NO_WHEELS:-}" ]; then  # the caller installed them into /tmp/site (a second install would rewrite
  export PYTHONPATH=$PWD:/tmp/site  # files that running processes import)
elif [ -z "${DRY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$G"/whl/*.whl || exit 1
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 QUANTKIT_DATA=$G/data QUANTKIT_CACHE=${QUANTKIT_CACHE:-/tmp/qkcache-dist} \
  QUANTKIT_DEMO_MODEL=$G/tok HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  DIST_WORK=${DIST_WORK:-/tmp/dist-work}
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers, llmcompressor, compressed_tensors as ct; print('torch', torch.__version__, 'cuda devices', torch.cuda.device_count(), 'transformers', transformers.__version__, 'llmcompressor', llmcompressor.__version__, 'compressed-tensors', ct.__version__)" 2>&1 | grep -v WARNING
  echo "cpus $(nproc)"; grep MemTotal /proc/meminfo; df -h /dev/shm | tail -1 | sed 's/^/shm /'
} | tee "$OUT/device.txt"
# the ranks share the host copy of the weights through /dev/shm (compressed-tensors): give it room where
# the machine started with little (memory grows on use there)
shm=$(df -B1 --output=size /dev/shm 2>/dev/null | tail -1 || echo 0)
if [ -z "${DRY:-}" ] && [ "${shm:-0}" -lt 40000000000 ]; then
  mount -o remount,size=96G /dev/shm && df -h /dev/shm | tail -1 | sed 's/^/shm after remount /' | tee -a "$OUT/device.txt"
fi
timeout "${BUDGET:-370}" $PY scripts/bench_distributed.py --out "$OUT" --source "${SOURCE:-dummy:llama-3.1-8b}" \
  --layers "${LAYERS:-6}" --samples "${SAMPLES:-128}" --seq-len "${SEQ_LEN:-2048}" --gpus "${GPUS:-2}" --logs \
  ${EXTRA_ARGS:-}
rc=$?
echo "bench_distributed exit $rc"
if [ $rc -ne 0 ]; then  # a failed rank's log is kept in the cache (quantkit/distributed.py): bring it back
  for f in $(ls -t "$QUANTKIT_CACHE"/logs/distributed-*/rank*.log 2>/dev/null | head -2); do
    cp "$f" "$OUT/$(basename "$(dirname "$f")")-$(basename "$f")"
  done
fi
exit $rc
