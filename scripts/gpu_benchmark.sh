#!/usr/bin/env bash
# The demo build on a GPU host (run through the workplace's device tool on an H100; any CUDA host works).
# The device has torch/transformers but no internet, so quantkit's extra wheels and the demo GGUF travel with
# the call: the GGUF in two parts (the per-call transfer limit is 64 MiB), the first stashed by an earlier call:
#   call 1 (carry .gpu/a):       mkdir -p /root/stash && cp -r .gpu/a/* /root/stash/
#   call 2 (carry .gpu/b .whl):  scripts/gpu_benchmark.sh
# Writes report.md/json/html + pareto.png to $OUT (committed under docs/benchmarks/).
set -euo pipefail
OUT=${OUT:-/tmp/out}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export QUANTKIT_DATA=/root/stash/data QUANTKIT_CACHE=/tmp/qkcache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'pyarrow', pyarrow.__version__)"
test -f /tmp/smollm2.gguf || cat /root/stash/gguf.part1 .gpu/b/gguf.part2 > /tmp/smollm2.gguf
test -f models/smollm2-135m-instruct/config.json || \
  python3 -m quantkit.cli model import-gguf /tmp/smollm2.gguf models/smollm2-135m-instruct
python3 -m quantkit.cli build recipes/smollm2-135m-gpu.yaml --store /tmp/store --report-dir "$OUT" ${TARGET:+--target $TARGET}
python3 -m quantkit.cli plan recipes/smollm2-135m-gpu.yaml --gpu H100-80GB --store /tmp/store > "$OUT/plan.txt"
