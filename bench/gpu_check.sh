#!/usr/bin/env bash
# Issue 11's checks on a CUDA machine, one part at a time, each allowed to fail alone; under 6 minutes.
#   bash bench/gpu_check.sh                               # on the GPU machine, from the repository root
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1 bash bench/gpu_check.sh    # smoke test of this script on a CPU
# Needs torch, transformers (and peft for the comparison); no model files, no data files, no internet.
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-python}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
STEPS=30; [ "${GPU_CHECK_TINY:-0}" = 1 ] && STEPS=6
RUN_DIR=$(mktemp -d)
echo "== part 0: environment"
timeout 60 $PY bench/gpu_check.py env 2>&1 | tail -8 || echo "FAILED part 0"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null

echo "== part a: train_llm.py --precision auto on the built-in model, $STEPS steps on $DEVICE"
if timeout 150 $PY train_llm.py --model builtin --device "$DEVICE" --precision auto --max_steps "$STEPS" \
        --output_dir "$RUN_DIR/a" >"$RUN_DIR/a.log" 2>&1; then
    grep -E "Eval loss:|^Trained" "$RUN_DIR/a.log"
    $PY -c "import json, sys; m = json.load(open(sys.argv[1])); print('precision resolved:', m['precision'], 'on', m['device'])" \
        "$RUN_DIR/a/metrics.json" || echo "FAILED part a (metrics.json)"
else
    tail -5 "$RUN_DIR/a.log"; echo "FAILED part a"
fi

echo "== part b: one LoRA training step, SmolLM2-135M shape, bf16: minipeft vs peft"
timeout 200 $PY bench/gpu_check.py step 2>&1 | grep -v Warning | tail -12 || echo "FAILED part b"

echo "== part c: generation with an adapter, merged vs unmerged"
timeout 90 $PY bench/gpu_check.py generate 2>&1 | grep -v Warning | tail -6 || echo "FAILED part c"
rm -rf "$RUN_DIR"
