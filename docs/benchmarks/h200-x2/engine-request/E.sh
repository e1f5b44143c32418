# The engine helper's request (GPU_REQUEST.md of the engine helper; main at b0e661c or later), as lane E of
# scripts/gpu_session.sh on GPU 0 (CUDA_VISIBLE_DEVICES=0, OUT=$S/res/E, REPO = this call's code copy).
# Its command unchanged, except the wheel install: its .whl set (gemlite 0.6.0.post2, compressed-tensors 0.19.0,
# pydantic 2.14.4, pydantic-core 2.50.5, annotated-types 0.8.0, typing-inspection 0.4.5, loguru 0.7.3) is
# already installed in $SITE from .gpu/c1/whl (same files); a second --upgrade install would rewrite files that
# the other lanes have imported.
cd "$REPO" || exit 2
t0=$(date +%s); echo "start $(date -u +%FT%TZ)" > $OUT/rc.txt
set -o pipefail; export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; git log --oneline -1 2>/dev/null; timeout 200 python3 scripts/bench_decode_attention.py --out $OUT 2>&1 | grep -v -i "warn" | tee $OUT/decode-bench.log; echo "decode-bench rc $?" >> $OUT/rc.txt; [ -f $OUT/choices.json ] || cp quantkit/evaluation/kernels/data/choices.json $OUT/choices.json; QUANTKIT_KERNEL_CHOICES=$OUT/choices.json timeout 330 python3 scripts/bench_engine_gpu.py --layers 32 --batches 1 --gen 32 --reps 2 --no-check --only bf16,gptq-w4-g128 --profile gptq-w4-g128 --out $OUT 2>&1 | tee $OUT/engine.log
rc=$?; echo "engine rc $rc; wall $(( $(date +%s) - t0 )) s; end $(date -u +%FT%TZ)" >> $OUT/rc.txt
