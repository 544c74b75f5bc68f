#!/usr/bin/env bash
# Everything the device machine checks and times in one call (see README "GPU runs").
# Expects: the engine importable (PYTHONPATH), MEDUSA_ENGINE_GGUF pointing at the bundled GGUF,
# MEDUSA_ENGINE_PROMPTS at held-out prompts, $OUT for the results.
# PARTS picks what runs (default: all three); a call has 600 s, and the Medusa table over five
# batch sizes and three trees needs most of one call by itself.
set -uo pipefail
export PYTHONUNBUFFERED=1
PARTS=${PARTS:-tests throughput speculative}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, xformers; print('torch', torch.__version__, 'xformers', xformers.__version__)"
python3 -c "from engine.models.loader import resolve_model_path; print(resolve_model_path('default'))" 2>&1 | tail -1
save() { cp benchmarks/results/* "$OUT"/ 2>/dev/null; true; }
trap save EXIT  # results come back even when the call's time limit cuts a part short
if [[ " $PARTS " == *" tests "* ]]; then
    python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | grep --line-buffered -v -i warn
fi
if [[ " $PARTS " == *" throughput "* ]]; then
    python3 benchmarks/throughput.py --batch-sizes ${TP_BS:-1 4 16 64} --max-tokens ${TP_TOKENS:-256} 2>&1 \
        | grep --line-buffered -v -i -E "warn|Loading" | tee "$OUT/throughput.log" | tail -8
fi
if [[ " $PARTS " == *" speculative "* ]]; then
    python3 benchmarks/speculative.py --heads ${HEADS:-default} --trees ${TREES:-mc_sim_7b_63 auto backoff} \
        --batch-sizes ${SP_BS:-1 4 16 64 128} --max-tokens ${SP_TOKENS:-128} ${SP_FLAGS:---hf --eager --kv-cache-memory-gb 8} 2>&1 \
        | grep --line-buffered -v -i -E "warn|Loading" | tee "$OUT/speculative.log" | tail -16
fi
