"""Where one LoRA training step's time goes: ``torch.profiler`` over one forward + backward + AdamW step.

    python bench/profile_step.py                          # SmolLM2-135M, LoRA r=8 on all 7 projections, bf16
    python bench/profile_step.py --precision fp32 --rows 15
    python bench/profile_step.py --model gpt2             # GPT-2 small's architecture (random init)
    python bench/profile_step.py --compile --lora_dropout 0   # the blocks through torch.compile (--compile)

One fixed batch: the first ``--batch_size`` GPTeacher records (Alpaca template, max_length 256, padded to
the longest), the same every run. One untimed step first (oneDNN picks its kernels), then one profiled
step through minipeft's own path: the frozen weights stored in bf16 as ``train`` stores them
(:func:`minipeft.training.precision.cast_frozen_weights`), with the RMSNorm ``train`` swaps in (or, with
``--compile``, its compiled blocks), :func:`minipeft.training.loop.accumulate_gradients`
under the loop's autocast, then the optimizer. Prints the wall time of the step, the real tokens in it, and the
top operators by self CPU time (a table for docs/benchmarks.md).
"""

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "gpteacher_roleplay.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "gpt2"])
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--compile", action="store_true", help="as train --compile: compiled blocks (untimed compile)")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, str(REPO / "bench"))
    from bench_training import lora_targets, load_model, load_tokenizer
    from minipeft import get_peft_model
    from minipeft.data.batching import InstructionDataset, PaddingCollator
    from minipeft.data.loading import load_records
    from minipeft.data.tokenization import pad_token_id, tokenize_records
    from minipeft.methods.lora import LoRAConfig
    from minipeft.training.distributed import DistributedContext
    from minipeft.training.precision import cast_frozen_weights
    from minipeft.training.loop import accumulate_gradients, autocast_for
    from minipeft.training.optimizer import build_optimizer
    from minipeft.fast import switched_on
    from minipeft.fast.loss import target_only_loss_sum

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    model = load_model(args.model)
    peft_model = get_peft_model(model, LoRAConfig(r=8, lora_alpha=16, lora_dropout=args.lora_dropout,
                                                  target_modules=lora_targets(model)))
    cast_frozen_weights(peft_model, args.precision)  # as train() does: frozen weights stored in bf16
    peft_model.train()
    records = load_records(DATA).records[:args.batch_size]
    tokenized = tokenize_records(records, tokenizer, "alpaca", args.max_length, progress=False)
    dataset = InstructionDataset(tokenized, range(len(records)))
    batch = PaddingCollator(pad_token_id(tokenizer), "longest", args.max_length)([dataset[i] for i in range(len(dataset))])
    optimizer = build_optimizer(peft_model, 2e-4, 0.01)
    context = DistributedContext()
    autocast = autocast_for(args.precision, torch.device("cpu"))

    def step():
        accumulate_gradients(peft_model, [batch], context, autocast, loss_sum=target_only_loss_sum)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    as_train_does = contextlib.ExitStack()  # kept open until the process ends
    # what train() switches on: dropout by gaps, and compiled blocks (--compile) or Llama's lean norms
    as_train_does.enter_context(switched_on(peft_model, torch.device("cpu"), args.compile))
    if args.compile:  # the first step compiles
        started = time.perf_counter()
        step()
        print(f"compile + first step: {time.perf_counter() - started:.1f} s")
    step()
    load_before = os.getloadavg()
    started = time.perf_counter()
    step()
    plain_seconds = time.perf_counter() - started
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    tokens = int(batch["attention_mask"].sum())
    n_parameters = sum(p.numel() for p in {id(p): p for p in peft_model.parameters()}.values())
    print(f"load average before {' '.join(f'{x:.1f}' for x in load_before)}, after "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min)")
    print(f"{args.model}, LoRA r=8, dropout {args.lora_dropout}, {args.precision}, "
          f"{'compiled blocks, ' if args.compile else ''}batch {tuple(batch['input_ids'].shape)}, {tokens} real tokens, "
          f"{args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"one step (unprofiled): {plain_seconds:.2f} s = {tokens / plain_seconds:.0f} tok/s = "
          f"{4 * n_parameters * tokens / plain_seconds / 1e9:.0f} GFLOP/s (4N)")
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    print(table)


if __name__ == "__main__":
    main()
