"""FSDP2 (``--sharding fsdp``) against DDP at world size 1 on a GPU (nccl): peak CUDA memory and tokens/s.

Run under torchrun, once per sharding (``bench/gpu_fsdp.sh`` does both)::

    torchrun --nproc_per_node 1 bench/gpu_fsdp.py --sharding fsdp
    torchrun --nproc_per_node 1 bench/gpu_fsdp.py --sharding ddp

The base is Llama-3.2-1B-shaped (its published config: 16 blocks, width 2048, 32 heads / 8 KV heads, MLP
8192, vocabulary 128,256, tied embeddings), random weights drawn on the GPU, bf16; LoRA r=16 on every linear
layer of the blocks; random token batches. FSDP2 builds the model on the meta device and loads it from rank 0
(:func:`minipeft.training.sharding.build_sharded`); DDP builds it whole. At world size 1 FSDP2 shards nothing:
the figure measures its overhead (the all-gathers, the unit bookkeeping), not a saving.
``--shape tiny`` runs the same path on a 2-block model (a smoke test, CPU with ``--device cpu``).
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

LLAMA_32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                   tie_word_embeddings=True, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1000, max_position_embeddings=1024, tie_word_embeddings=True)


def build_model(shape: dict):
    """A random Llama of ``shape`` in bf16 with LoRA r=16 (the adapter float32); seeded, the same every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minipeft.methods.lora import LoRAConfig
    from minipeft.model.peft_model import get_peft_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    return get_peft_model(model, LoRAConfig(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))


class RandomBatches:
    """``count`` batches of ``rows`` × ``length`` random tokens (every position a target)."""

    def __init__(self, count: int, rows: int, length: int, vocab: int):
        generator = torch.Generator().manual_seed(1)
        ids = [torch.randint(0, vocab, (rows, length), generator=generator) for _ in range(count)]
        self.batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sharding", choices=["fsdp", "ddp"], required=True)
    parser.add_argument("--shape", choices=["llama-3.2-1b", "tiny"], default="llama-3.2-1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()

    from minipeft.training import TrainingConfig, train
    from minipeft.training.distributed import init_distributed, shutdown_distributed
    from minipeft.training.sharding import build_sharded

    shape = LLAMA_32_1B if args.shape == "llama-3.2-1b" else TINY
    context = init_distributed(args.device, args.sharding)
    device = context.device
    precision = "bf16"
    with torch.device(device):  # random weights drawn where they live: seconds on a GPU, not minutes on the CPU
        if args.sharding == "fsdp":
            model = build_sharded(lambda: build_model(shape), device, context.world_size, precision)
        else:
            model = build_model(shape)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        loaded = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as output_dir:
        train(model, RandomBatches(args.steps, args.rows, args.length, shape["vocab_size"]), None,
              TrainingConfig(output_dir=output_dir, max_steps=args.steps, epochs=1, learning_rate=1e-4,
                             precision=precision, device=args.device, log_every=10**6, eval_every=10**6,
                             save_every=10**6, warmup_steps=0), context)
        steps = [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]
    speeds = [record["tokens_per_s"] for record in steps if record.get("kind") == "train"][3:]  # after warm-up
    if context.is_main:
        figures = {"sharding": args.sharding, "shape": args.shape, "world_size": context.world_size,
                   "tokens_per_step": args.rows * args.length, "tokens_per_s_median": statistics.median(speeds)}
        if device.type == "cuda":
            figures.update(gpu=torch.cuda.get_device_name(device), loaded_gib=loaded / 2**30,
                           max_memory_allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30)
        print("RESULT " + json.dumps(figures))
    shutdown_distributed()


if __name__ == "__main__":
    main()
