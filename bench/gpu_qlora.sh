#!/usr/bin/env bash
# Issue 22's GPU figures: Llama-3.2-3B-shaped QLoRA and bf16 LoRA, minipeft vs peft + bitsandbytes + Trainer.
#   bash bench/gpu_qlora.sh                                        # on the GPU machine, from the repository root
#   GPU_QLORA_DEVICE=cpu GPU_QLORA_SHAPE=tiny GPU_QLORA_STEPS=2 GPU_QLORA_LENGTH=32 bash bench/gpu_qlora.sh  # CPU smoke test
# Needs torch with CUDA, transformers, peft, bitsandbytes; writes its own checkpoint (6.4 GB) under $TMPDIR;
# no download. Each part may fail alone; about 4-5 minutes on one H100.
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-python}
SHAPE=${GPU_QLORA_SHAPE:-llama-3.2-3b}
CKPT=$(mktemp -d)/$SHAPE
trap 'rm -rf "$(dirname "$CKPT")"' EXIT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
echo "== checkpoint: $SHAPE, random bf16 weights"
timeout 150 $PY bench/make_checkpoint.py --shape "$SHAPE" --out "$CKPT" --no_tokenizer --shard_gb 5 2>&1 | tail -1 \
    || { echo "FAILED: checkpoint"; exit 1; }
for side in minipeft-qlora peft-qlora minipeft-lora peft-lora; do
    timeout 100 $PY bench/gpu_qlora.py "$side" "$CKPT" 2>&1 | grep -vE "Warning|warn" | tail -1 || echo "FAILED: $side"
done
