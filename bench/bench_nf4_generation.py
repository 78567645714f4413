"""Generation with a 4-bit base: tokens/s and weight memory, NF4 against the bf16 base it came from.

Greedy decoding with minipeft's KV-cached loop (:func:`minipeft.core.generation.generate`), a fixed number of
new tokens, batch 1 and batch 8. The variants, all from the same loaded model:

==========================  ==========================================================================
``bf16``                    the base in bfloat16 (``load_base_model(..., dtype=bfloat16)``)
``nf4 reference``           linear layers in NF4, dequantized by the reference every forward
``nf4 inductor``            the same layers, dequantized by Inductor's kernel (``dequantize_nf4_fused``)
``nf4 C kernel``            the same layers, dequantized by the C kernel into a reused workspace
                            (``fused_nf4_dequantization``, on a CPU: minipeft.fast.nf4_cpu_kernel)
``nf4 dequantized once``    the NF4 weights dequantized once to bf16 before generating
                            (``dequantize_model``): no per-token cost, and the bf16 model's memory
==========================  ==========================================================================

    python bench/bench_nf4_generation.py                             # SmolLM2-135M (offline GGUF)
    python bench/bench_nf4_generation.py --model /work/bigckpt/llama-3.2-1b --batch_sizes 1 --new_tokens 8

Variants alternate within each repeat (load changes hit them alike); the median is printed, with the ratio
to ``bf16`` (the issue's goal: NF4 ≥ 0.5 × bf16), and tokens per CPU-second of this process (with one thread,
what the variant costs when other processes share the cores), with its ratio too. The C kernel's workspace is
printed in the weights column as ``+ MB``.
"""

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def tokens_per_second(model, input_ids, new_tokens: int) -> tuple:
    """``(tokens/s of wall time, tokens per CPU-second of this process)``."""
    from minipeft.core.generation import generate

    started, cpu_started = time.perf_counter(), time.process_time()
    output = generate(model, input_ids, max_new_tokens=new_tokens)
    return output.numel() / (time.perf_counter() - started), output.numel() / (time.process_time() - cpu_started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from minipeft.fast.nf4_dequant import dequantize_nf4_fused, fused_nf4_dequantization
    from minipeft.loading.streaming import load_base_model
    from minipeft.quantization.nf4 import Linear4bit, dequantize_model

    quiet = dict(log=lambda message: print(message, file=sys.stderr))
    bf16, _ = load_base_model(args.model, "none", dtype=torch.bfloat16, **quiet)
    nf4, _ = load_base_model(args.model, "nf4", dtype=torch.bfloat16, **quiet)
    cached = copy.deepcopy(nf4)
    dequantize_model(cached, torch.bfloat16)
    inductor, kernel = copy.deepcopy(nf4), copy.deepcopy(nf4)
    for layer in inductor.modules():
        if isinstance(layer, Linear4bit):
            layer.dequantize_with = dequantize_nf4_fused
    variants = {"bf16": bf16, "nf4 reference": nf4, "nf4 inductor": inductor, "nf4 C kernel": kernel,
                "nf4 dequantized once": cached}
    vocab = bf16.config.vocab_size
    print(f"{args.model}, prompt {args.prompt_length} tokens, {args.new_tokens} new tokens (greedy, KV cache), "
          f"{args.threads} threads, median of {args.repeats}")
    print("| batch | variant | weights in memory (MB) | tokens/s | vs bf16 | tokens per CPU-s | vs bf16 |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    with torch.no_grad(), fused_nf4_dequantization(kernel):
        workspace = next(layer for layer in kernel.modules() if isinstance(layer, Linear4bit)).dequantize_with
        for batch_size in [int(size) for size in args.batch_sizes.split(",")]:
            input_ids = torch.randint(0, vocab, (batch_size, args.prompt_length))
            for model in variants.values():  # warm-up: oneDNN kernels, Inductor's compilation, the C kernel's build
                tokens_per_second(model, input_ids, 2)
            speeds = {name: [] for name in variants}
            for _ in range(args.repeats):
                for name, model in variants.items():
                    speeds[name].append(tokens_per_second(model, input_ids, args.new_tokens))
            wall = {name: statistics.median(w for w, _ in values) for name, values in speeds.items()}
            cpu = {name: statistics.median(c for _, c in values) for name, values in speeds.items()}
            for name, model in variants.items():
                extra = f" + {workspace.workspace_bytes() / 1e6:,.0f}" if model is kernel else ""
                print(f"| {batch_size} | {name} | {weight_bytes(model) / 1e6:,.0f}{extra} | {wall[name]:.2f} | "
                      f"{wall[name] / wall['bf16']:.2f}x | {cpu[name]:.2f} | {cpu[name] / cpu['bf16']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
