#!/usr/bin/env bash
# Everything the device machine checks and times in one call (see README "GPU runs").
# Expects: the engine importable (PYTHONPATH), MEDUSA_ENGINE_GGUF pointing at the bundled GGUF,
# MEDUSA_ENGINE_PROMPTS at held-out prompts, $OUT for the results.
# PARTS picks what runs (default: tests, throughput, speculative); a call has 600 s. The
# Medusa table (plain / fixed tree / back-off / adaptive trees / a second plain engine x batch 1…128 x greedy and
# typical T=0.7, static batches) took 2 minutes on an H100 once every step replayed a graph;
# PARTS="speculative queue" adds the same under steady load (--queue 3) in the same call. PARTS=steps8b adds the Llama-3.1-8B shape's step costs (random
# weights and heads, benchmarks/profile_step.py); PARTS=backoff8b back-off against plain
# decoding at that shape with random heads that claim the bundled heads' accuracy (their
# tree.json) and accept nothing; PARTS=multiturn8b the multi-turn replay (prefix caching on /
# off, plain decoding) at that shape, MT8_REPEATS interleaved repeats; PARTS=structured the
# driver's grammar-mask cost (benchmarks/grammar_masks.py) and constrained vs free decoding
# (benchmarks/structured.py; needs llguidance and jsonschema wheels in .whl). Every row of the Medusa tables reports the capture steps of
# its timed runs (0: every graph is captured at start-up), graph-miss steps, the A/A row
# (``none``), the per-run ratios and the worst; prompts come from the held-out sources
# (SPLIT=random_heldout: the old random split, for comparison). GPU_K: a pytest -k filter.
set -uo pipefail
export PYTHONUNBUFFERED=1
PARTS=${PARTS:-tests throughput speculative}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, xformers; print('torch', torch.__version__, 'xformers', xformers.__version__)"
python3 -c "from engine.models.loader import resolve_model_path; print(resolve_model_path('default'))" 2>&1 | tail -1
STAMP=$(mktemp); touch "$STAMP"
# Only this call's results come back ($OUT takes a few files): JSON, PNG, logs written after $STAMP.
save() { find benchmarks/results -type f -newer "$STAMP" -exec cp {} "$OUT"/ \; 2>/dev/null; true; }
trap save EXIT  # results come back even when the call's time limit cuts a part short
if [[ " $PARTS " == *" tests "* ]]; then
    python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu.py ${GPU_K:+-k "$GPU_K"} 2>&1 \
        | tee "$OUT/gpu_tests.log" | grep --line-buffered -v -i warn
fi
if [[ " $PARTS " == *" throughput "* ]]; then
    python3 benchmarks/throughput.py --batch-sizes ${TP_BS:-1 4 16 64} --max-tokens ${TP_TOKENS:-256} 2>&1 \
        | grep --line-buffered -v -i -E "warn|Loading" | tee "$OUT/throughput.log" | tail -8
fi
if [[ " $PARTS " == *" speculative "* ]]; then
    python3 benchmarks/speculative.py --heads ${HEADS:-default} --trees ${TREES:-mc_sim_7b_63 backoff adaptive none} \
        --batch-sizes ${SP_BS:-1 4 16 64 128} --temperatures ${SP_TEMPS:-0 0.7} --max-tokens ${SP_TOKENS:-128} \
        --split ${SPLIT:-heldout} ${SP_FLAGS:---kv-cache-memory-gb 8} 2>&1 \
        | grep --line-buffered -v -i -E "warn|Loading" | tee "$OUT/speculative.log" | tail -24
fi
if [[ " $PARTS " == *" queue "* ]]; then
    # The same engines under steady load: 3 x B prompts, at most B in flight (speculative.py --queue).
    python3 benchmarks/speculative.py --heads ${HEADS:-default} --trees ${QUEUE_TREES:-backoff none} --queue 3 \
        --batch-sizes ${QUEUE_BS:-4 16 64 128} --temperatures ${SP_TEMPS:-0 0.7} --max-tokens ${SP_TOKENS:-128} --split ${SPLIT:-heldout} \
        ${SP_FLAGS:---kv-cache-memory-gb 8} 2>&1 \
        | grep --line-buffered -v -i -E "warn|Loading" | tee "$OUT/queue.log" | tail -20
fi
if [[ " $PARTS " == *" backoff8b "* ]]; then
    python3 benchmarks/dummy_model.py llama-8b /tmp/llama-8b --heads /tmp/llama-8b-tj --proposal-vocab 32768 \
        --tree-json engine/spec/bundled_heads/tree.json >/dev/null
    python3 benchmarks/speculative.py --model /tmp/llama-8b --load-format dummy --heads /tmp/llama-8b-tj \
        --trees ${B8_TREES:-backoff} --batch-sizes ${B8_BS:-1 8 32} --temperatures 0 --max-tokens ${B8_TOKENS:-64} \
        --min-prompts 4 --repeats ${B8_REPEATS:-3} --kv-cache-memory-gb ${B8_KV:-8} 2>&1 \
        | grep --line-buffered -v -i -E "warn|Loading" | tee "$OUT/backoff8b.log" | tail -12
fi
if [[ " $PARTS " == *" steps8b "* ]]; then
    # Two kinds of random heads: with a 32,768-id proposal vocabulary (the layout train-heads
    # writes) and heads="random" (Medusa-1 over the full 128k vocabulary: the lm_head read again).
    python3 benchmarks/dummy_model.py llama-8b /tmp/llama-8b --heads /tmp/llama-8b-heads --proposal-vocab 32768 >/dev/null
    for heads in /tmp/llama-8b-heads random; do
        python3 -m benchmarks.profile_step --model /tmp/llama-8b --load-format dummy --heads $heads \
            --batch-sizes ${P8_BS:-1 8 32} 2>&1 | grep --line-buffered -v -i -E "warn|Loading" | tee -a "$OUT/steps8b.log" | tail -12
    done
fi
if [[ " $PARTS " == *" multiturn8b "* ]]; then
    # Random weights answer gibberish, but what caching saves is prefill of the shared history,
    # which only the prompt lengths decide (TURNS: a JSONL of user messages, split "train").
    python3 benchmarks/dummy_model.py llama-8b /tmp/llama-8b >/dev/null
    python3 benchmarks/multi_turn.py --model /tmp/llama-8b --load-format dummy --no-medusa \
        --prompts ${TURNS:-$MEDUSA_ENGINE_PROMPTS} --concurrency ${MT8_C:-1 16} --conversations ${MT8_CONVS:-16} \
        --max-tokens ${MT8_TOKENS:-48} --repeats ${MT8_REPEATS:-2} --kv-cache-memory-gb ${MT8_KV:-8} 2>&1 \
        | grep --line-buffered -v -i -E "warn|Loading" | tee "$OUT/multiturn8b.log" | tail -16
fi
if [[ " $PARTS " == *" structured "* ]]; then
    python3 benchmarks/grammar_masks.py --batch-sizes ${GM_BS:-1 16 64} --threads 1 8 --iters 10 --trees mc_sim_7b_63 2>&1 \
        | grep --line-buffered -v -i warn | tee "$OUT/grammar_masks.log" | tail -14
    python3 benchmarks/structured.py --batch-sizes ${SO_BS:-1 16 64} --prompts-per-batch 16 --max-tokens ${SO_TOKENS:-96} \
        --repeats ${SO_REPEATS:-1} --kv-cache-memory-gb 4 2>&1 | grep --line-buffered -v -i -E "warn|Loading" \
        | tee "$OUT/structured.log" | tail -30
fi
