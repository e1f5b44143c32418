#!/usr/bin/env bash
# Issue 10's H200 measurements (docs/benchmarks/h200-scale/), through the workplace's device tool. Everything the
# run needs travels in one ignored folder of the main checkout, .gpuwork-scale/ (this worktree's quantkit,
# scripts and calibration/ definitions, the C4 sample, the demo tokenizer, the cached 128 x 2048 calibration set
# and the wheels the image lacks), named in `carry`:
#   run(command="bash .gpuwork-scale/scripts/gpu_scale.sh", carry=[".gpuwork-scale"])
set -uo pipefail
OUT=${OUT:-/tmp/out}
G=$PWD/.gpuwork-scale
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$G"/whl/*.whl || exit 1
export PYTHONPATH=$G:/tmp/site PYTHONUNBUFFERED=1 QUANTKIT_DATA=$G/data QUANTKIT_CACHE=/tmp/qkcache \
  QUANTKIT_DEMO_MODEL=$G/tok HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 SCALE_WORK=/tmp/scale-work
mkdir -p /tmp/qkcache && cp -r "$G/cache/calibration" /tmp/qkcache/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, transformers, llmcompressor, compressed_tensors as ct; print('torch', torch.__version__, 'transformers', transformers.__version__, 'llmcompressor', llmcompressor.__version__, 'compressed-tensors', ct.__version__)" | tee -a "$OUT/device.txt"
nproc | sed 's/^/cpus /' | tee -a "$OUT/device.txt"
cd "$G" && python3 scripts/bench_scale_gpu.py --out "$OUT" --deadline "${DEADLINE:-530}" ${SMOKE:+--smoke}
