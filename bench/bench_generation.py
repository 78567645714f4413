"""Generation speed: the base model, LoRA merged into the weights, and LoRA unmerged (the extra branch).

Greedy decoding with minipeft's own KV-cached loop (:func:`minipeft.core.generation.generate`), batch 1 and
batch 8, a fixed number of new tokens (no EOS stop, so every variant produces the same count). The three
variants run in turn, ``--repeats`` times, each through minipeft's loop and through transformers' own
``model.generate`` (greedy, same new-token count), and the median tokens/s of each is printed with its
ratio to the base model and to transformers' ``generate`` on the same model.

    python bench/bench_generation.py                          # GPT-2 small (random init), LoRA r=8
    python bench/bench_generation.py --model smollm2-135m     # the real SmolLM2-135M (offline)
    python bench/bench_generation.py --new_tokens 64 --repeats 5

The LoRA adapter has random B (``init_lora_weights=False``) so that the unmerged branch does real work
and the merged weights differ from the base ones; its targets are the issue's (GPT-2: c_attn, c_proj,
c_fc; Llama: every attention and MLP projection).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", choices=["gpt2", "smollm2-135m"])
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def tokens_per_second(model, input_ids, new_tokens: int) -> float:
    """New tokens per second of minipeft's loop (:func:`minipeft.core.generation.generate`)."""
    from minipeft.core.generation import generate

    started = time.perf_counter()
    output = generate(model, input_ids, max_new_tokens=new_tokens)
    seconds = time.perf_counter() - started
    return output.numel() / seconds


def transformers_tokens_per_second(model, input_ids, new_tokens: int) -> float:
    """New tokens per second of transformers' own ``model.generate`` (greedy, KV cache, exactly ``new_tokens``),
    on the same model: for unmerged LoRA, the transformers model inside the PeftModel, whose projections
    minipeft replaced with LoRA layers."""
    from minipeft import PeftModel

    hf_model = model.base_model if isinstance(model, PeftModel) else model
    started = time.perf_counter()
    output = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    seconds = time.perf_counter() - started
    return (output.shape[1] - input_ids.shape[1]) * output.shape[0] / seconds


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from bench_training import load_model, lora_targets

    from minipeft import get_peft_model
    from minipeft.methods.lora import LoRAConfig

    base = load_model(args.model).eval()
    vocab = base.config.vocab_size
    unmerged = get_peft_model(load_model(args.model).eval(), LoRAConfig(
        r=8, lora_alpha=16, target_modules=lora_targets(base), init_lora_weights=False)).eval()
    merged = unmerged.merge_and_unload().eval()  # a plain transformers model with ΔW folded in (a copy)
    variants = {"base": base, "LoRA merged": merged, "LoRA unmerged": unmerged}
    loops = {"minipeft": tokens_per_second, "transformers": transformers_tokens_per_second}
    print(f"{args.model}, prompt {args.prompt_length} tokens, {args.new_tokens} new tokens (greedy, KV cache), "
          f"{args.threads} threads, median of {args.repeats}")
    print("| batch | variant | minipeft tokens/s | vs base | transformers generate tokens/s | minipeft / transformers |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    with torch.no_grad():
        for batch_size in [int(size) for size in args.batch_sizes.split(",")]:
            input_ids = torch.randint(0, vocab, (batch_size, args.prompt_length))
            for model in variants.values():  # warm-up: oneDNN kernels, allocator
                for loop in loops.values():
                    loop(model, input_ids, 4)
            speeds = {(name, loop): [] for name in variants for loop in loops}
            for _ in range(args.repeats):  # interleaved, so load changes hit every variant and loop alike
                for name, model in variants.items():
                    for loop_name, loop in loops.items():
                        speeds[name, loop_name].append(loop(model, input_ids, args.new_tokens))
            median = {key: statistics.median(values) for key, values in speeds.items()}
            for name in variants:
                ours, theirs = median[name, "minipeft"], median[name, "transformers"]
                print(f"| {batch_size} | {name} | {ours:.1f} | {ours / median['base', 'minipeft']:.3f}x | "
                      f"{theirs:.1f} | {ours / theirs:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
