"""LoRA training speed and peak memory on a checkpoint directory (the 1B shape): minipeft against peft +
transformers.Trainer, in bf16 and with a 4-bit base (issue 22).

Every side trains the same LoRA (r=8, α=16, no dropout, all 7 projections of every block) on the same fixed
batches of random token ids (``--batch_size`` × ``--length``, no padding, labels = inputs), ``--warmup``
untimed optimizer steps and then ``--steps`` timed ones, bf16 autocast, AdamW at 2e-4, one process per side
(peak RSS = that process's ``VmHWM``, loading included):

======================  ===============================================================================
``minipeft-bf16``       ``load_base_model(DIR, dtype=bfloat16)``, ``minipeft.training.train``
``minipeft-bf16-heap``  the same with the C library's default heap (:func:`minipeft.core.c_heap.large_tensors_mapped`
                        off), to measure what mapping large tensors costs and saves
``minipeft-bf16-compile``  the same with ``--compile`` (each block through ``torch.compile``; compiled in the
                        untimed warm-up step)
``minipeft-nf4``        ``load_base_model(DIR, "nf4")`` (each linear quantized as read), ``train`` inside
                        ``fused_nf4_dequantization`` (the C kernel: minipeft.fast.nf4_cpu_kernel)
``minipeft-nf4-ref``    the same, the reference dequantization
``trainer-bf16``        ``from_pretrained(DIR, dtype=bfloat16)``, ``peft.get_peft_model``, ``Trainer(bf16=True)``
``trainer-bnb4``        ``from_pretrained`` with ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant,
                        compute bf16)`` on the CPU, ``prepare_model_for_kbit_training`` not applied (it casts
                        norms to float32; minipeft keeps them in bf16), then as ``trainer-bf16``
======================  ===============================================================================

    python bench/bench_training_ckpt.py /work/bigckpt/llama-3.2-1b --sides minipeft-bf16,trainer-bf16 --rounds 2

Tokens/s is the timed steps' tokens over their seconds (each side's own step timer: minipeft's ``metrics.jsonl``
``seconds``, the Trainer's ``on_step_begin``/``on_step_end``).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_training import peak_rss_bytes, step_timer  # noqa: E402  (this folder is the script's: sys.path[0])

SIDES = ("minipeft-bf16", "minipeft-bf16-heap", "minipeft-bf16-compile", "minipeft-nf4", "minipeft-nf4-ref", "trainer-bf16", "trainer-bnb4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(args, vocab: int) -> list:
    import torch

    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.warmup + args.steps):
        ids = torch.randint(100, min(vocab, 49152), (args.batch_size, args.length), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def run_minipeft(args) -> list:
    import contextlib

    import torch

    from minipeft import get_peft_model
    from minipeft.fast.nf4_dequant import fused_nf4_dequantization
    from minipeft.loading.streaming import load_base_model
    from minipeft.methods.lora import LoRAConfig
    from minipeft.training.config import TrainingConfig
    from minipeft.training.loop import train

    quantize = "nf4" if "nf4" in args.worker else "none"
    if args.worker == "minipeft-bf16-heap":  # what large_tensors_mapped costs: glibc's default heap, as if absent
        from minipeft.core import c_heap
        c_heap._glibc[:] = [None]
    model, _ = load_base_model(args.directory, quantize, dtype=torch.bfloat16, log=lambda m: print(m, file=sys.stderr))
    peft_model = get_peft_model(model, LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    data = batches(args, model.config.vocab_size)
    fast = fused_nf4_dequantization(peft_model) if args.worker == "minipeft-nf4" else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as output_dir, fast:
        train(peft_model, data, None, TrainingConfig(
            output_dir=output_dir, max_steps=len(data), learning_rate=2e-4, precision="bf16", device="cpu",
            log_every=10**9, save_every=10**9, lr_schedule="constant", compile=args.worker.endswith("-compile")))
        records = [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]
    steps = [record for record in records if record["kind"] == "train"]
    cumulative = [0.0] + [record["seconds"] for record in steps]
    return [(cumulative[i + 1] - cumulative[i], steps[i]["tokens"]) for i in range(len(steps))]


def run_trainer(args) -> list:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    extra = {}
    if args.worker == "trainer-bnb4":
        extra = dict(device_map="cpu", quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    model = AutoModelForCausalLM.from_pretrained(args.directory, dtype=torch.bfloat16, **extra)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    examples = [{key: value[row] for key, value in batch.items()}
                for batch in batches(args, model.config.vocab_size) for row in range(args.batch_size)]
    step_seconds = []
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.warmup + args.steps,
            learning_rate=2e-4, lr_scheduler_type="constant", train_sampling_strategy="sequential", bf16=True,
            use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=True)
        Trainer(model=peft_model, args=training_args, train_dataset=examples, callbacks=[step_timer(step_seconds)]).train()
    return [(seconds, args.batch_size * args.length) for seconds in step_seconds]


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    per_step = (run_minipeft if args.worker.startswith("minipeft") else run_trainer)(args)
    print("RESULT " + json.dumps({"side": args.worker, "per_step": per_step, "peak_rss": peak_rss_bytes()}), flush=True)


def load_average() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--sides", default="minipeft-bf16,trainer-bf16,minipeft-nf4,trainer-bnb4")
    parser.add_argument("--rounds", type=int, default=1, help="alternate the sides this many times (odd rounds reversed)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    sides = args.sides.split(",")
    results = {side: [] for side in sides}
    print(f"{args.directory}: LoRA r=8 on {len(TARGETS)} projections, batch {args.batch_size} x {args.length} tokens, "
          f"{args.warmup} untimed + {args.steps} timed steps, bf16, {args.threads} threads")
    for round_index in range(args.rounds):
        for side in (sides if round_index % 2 == 0 else sides[::-1]):
            before = load_average()
            argv = [sys.executable, __file__, args.directory, "--worker", side] + [
                f"--{name}={getattr(args, name)}" for name in ("batch_size", "length", "warmup", "steps", "threads")]
            completed = subprocess.run(argv, capture_output=True, text=True, env={"TQDM_DISABLE": "1", **__import__("os").environ})
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not lines:
                tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
                print(f"  {side}: failed (exit {completed.returncode}): {' / '.join(tail)}", flush=True)
                continue
            result = json.loads(lines[-1][len("RESULT "):])
            timed = result["per_step"][args.warmup:]
            tokens_per_s = sum(t for _, t in timed) / sum(s for s, _ in timed)
            results[side].append((tokens_per_s, result["peak_rss"]))
            print(f"  round {round_index + 1} {side:<17} {tokens_per_s:8.2f} tokens/s  s/step "
                  f"{', '.join(f'{s:.2f}' for s, _ in timed)}  peak RSS {result['peak_rss'] / 1e9:.2f} GB  "
                  f"load avg {before} -> {load_average()}", flush=True)
    print("| side | tokens/s (median) | peak RSS (GB) |")
    print("| --- | ---: | ---: |")
    median = {}
    for side, values in results.items():
        if values:
            speeds = sorted(v for v, _ in values)
            median[side] = (speeds[len(speeds) // 2], max(r for _, r in values))
            print(f"| {side} | {median[side][0]:.2f} | {median[side][1] / 1e9:.2f} |")
    for ours, theirs in (("minipeft-bf16", "trainer-bf16"), ("minipeft-bf16-compile", "trainer-bf16"),
                         ("minipeft-nf4", "trainer-bnb4"),
                         ("minipeft-nf4", "minipeft-bf16"), ("minipeft-nf4-ref", "minipeft-bf16")):
        if ours in median and theirs in median:
            print(f"{ours} / {theirs}: tokens/s {median[ours][0] / median[theirs][0]:.2f}x, "
                  f"peak RSS {median[ours][1] / median[theirs][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
