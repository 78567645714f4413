"""How much of one LoRA training step on a checkpoint directory is matmul: minipeft against peft's compute path.

    python bench/profile_ckpt_step.py /work/bigckpt/llama-3.2-1b --side minipeft --batch_size 4 --length 512
    python bench/profile_ckpt_step.py /work/bigckpt/llama-3.2-1b --side peft --batch_size 4 --length 512

One process per side (run them one after the other, on the same load). Both train LoRA r=8, α=16, no dropout,
on all 7 projections of every block, on one fixed batch of random token ids (labels = inputs), bf16 autocast,
AdamW. ``minipeft``: ``load_base_model`` (bf16), ``get_peft_model`` and the training run's own step (its
optimisations switched on: :func:`minipeft.fast.switched_on`, the target-only fused loss). ``peft``:
``from_pretrained(dtype=bfloat16)``, ``peft.get_peft_model`` and what ``transformers.Trainer(bf16=True)`` does
in a step (autocast, ``model(**batch).loss``, backward). One untimed step, then one under ``torch.profiler``;
prints the step's seconds, the share of ``aten::mm`` (the frozen weights' products, forward and input
gradient) and of attention, and the top operators. The matmul share bounds any speed-up at equal work:
a side whose every other operation took no time would be ``step / matmul`` times faster.
"""

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def minipeft_step(directory: str, batch: dict):
    import torch

    from minipeft import get_peft_model
    from minipeft.fast import switched_on
    from minipeft.fast.loss import target_only_loss_sum
    from minipeft.loading.streaming import load_base_model
    from minipeft.methods.lora import LoRAConfig

    model, _ = load_base_model(directory, "none", dtype=torch.bfloat16)
    peft_model = get_peft_model(model, LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    optimisations = switched_on(peft_model, torch.device("cpu"), compile=False)
    optimisations.__enter__()  # for the whole process, as a training run holds them for its whole run

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nll_sum, n_targets = target_only_loss_sum(peft_model, batch)
        (nll_sum / n_targets).backward()

    return peft_model, step


def peft_step(directory: str, batch: dict):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                             target_modules=TARGETS, task_type="CAUSAL_LM"))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = peft_model(**batch).loss
        loss.backward()

    return peft_model, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--side", choices=("minipeft", "peft"), required=True)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from torch.profiler import profile, ProfilerActivity

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(100, 49152, (args.batch_size, args.length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model, step = (minipeft_step if args.side == "minipeft" else peft_step)(args.directory, batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def train_step():
        step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()  # untimed: oneDNN picks its kernels
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        train_step()
    seconds = time.perf_counter() - started
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events) / 1e6
    matmul = sum(event.self_cpu_time_total for event in events if event.key in MATMULS) / 1e6
    attention = sum(event.self_cpu_time_total for event in events if "scaled_dot_product" in event.key) / 1e6
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"{args.side} {args.batch_size} x {args.length}: step {seconds:.1f} s, matmul {matmul:.1f} s "
          f"({matmul / total:.0%}), attention {attention:.1f} s ({attention / total:.0%}), everything else "
          f"{total - matmul - attention:.1f} s; at most {seconds / matmul:.2f}x faster at equal matmuls; load avg {load}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=45))


if __name__ == "__main__":
    main()
