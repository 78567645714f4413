#!/usr/bin/env bash
# FSDP2 vs DDP at world size 1 with nccl on one GPU: peak CUDA memory and tokens/s, Llama-3.2-1B-shaped
# random base in bf16 + LoRA r=16; under 5 minutes. Never a test dependency.
#   bash bench/gpu_fsdp.sh                                   # on the GPU machine, from the repository root
#   GPU_FSDP_DEVICE=cpu GPU_FSDP_TINY=1 bash bench/gpu_fsdp.sh   # smoke test of this script on a CPU (gloo)
set -o pipefail
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-python}
DEVICE=${GPU_FSDP_DEVICE:-cuda}
ARGS=(--device "$DEVICE")
[ "${GPU_FSDP_TINY:-0}" = 1 ] && ARGS+=(--shape tiny --steps 6 --length 64)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
for SHARDING in ddp fsdp; do
    echo "== $SHARDING, world size 1"
    timeout 140 $PY -m torch.distributed.run --standalone --nproc_per_node 1 bench/gpu_fsdp.py \
        --sharding "$SHARDING" "${ARGS[@]}" 2>&1 | grep -E "^RESULT|Error|error" | tail -5 \
        || echo "FAILED $SHARDING"
done
