"""Training throughput of minipeft against peft + transformers.Trainer (and the seed's recipe), on identical work.

One command trains the same model with the same method and precision, each side in its own subprocess (so
each side's peak RSS is its own), the sides alternating over ``--rounds`` rounds:

    minipeft   minipeft.training.train (frozen weights in bf16 under --precision bf16, chunked LM head +
               cross-entropy at labelled positions only, fused AdamW)
    trainer    peft + transformers.Trainer with dynamic padding (DataCollatorForSeq2Seq); bf16 = autocast
               (needs the `oracle` extra: peft; skipped without it)
    seed       the seed's recipe: every record padded to max_length, logits at every position
    minipeft-compile / trainer-compile
               the same two with torch.compile: minipeft's --compile (its blocks, see
               minipeft/fast/compile.py), the Trainer's ``torch_compile=True`` (the whole model)

**Compile time.** It falls in the first optimizer step, which is not timed; the table shows that step's
seconds as its own column, and a fresh Inductor cache per side and round (``TORCHINDUCTOR_CACHE_DIR`` in a
temporary directory), so every compiling side pays its compile in full, every round.

**Identical work.** Every side trains on the first ``--records`` GPTeacher records in file order, batches of
``--batch_size`` consecutive records padded to the longest of the batch, ``--accumulation`` batches per
optimizer step: one epoch over that fixed subset, no shuffling and no length grouping (a length-grouped
sampler would hand one side different batches). The first ``--warmup`` optimizer steps are not timed; the
same later steps are timed on every side, so each side's timed window holds the same real tokens (printed).

Per side the table gives the median over rounds of real (non-padding) tokens/s, its spread (min–max), the
peak RSS, and achieved FLOP/s as a share of this machine's matmul peak in that precision
(bench/matmul_peak.py's measurement, taken by this run), then the ratio minipeft / trainer of the medians.
The load average (1 min) is printed before every side: other people's processes share the cores.

    python bench/bench_training.py --model smollm2-135m --precision bf16 --rounds 2
    python bench/bench_training.py --model gpt2 --precision fp32 --sides minipeft,trainer

Counting FLOPs: ``4·N`` per real token, N = the model's parameters, embeddings included (forward 2N;
backward 2N for the activations' gradients; the frozen weights need no weight gradients), as the issue
states. Attention's ``T²`` terms and LoRA's own FLOPs are not counted; the LM head runs only at target
positions on the minipeft side, so ``4N`` slightly overstates its work. Achieved FLOP/s = 4·N × tokens/s.

Tokens: GPT-2's tokenizer is not available offline, so the data is tokenized with SmolLM2-135M's tokenizer
(49,152 ids, all below GPT-2's 50,257: no id needs remapping) for both models; GPT-2 small is built from its
config with random weights (speed does not depend on the values). Data: the GPTeacher roleplay records in
../shared/data (Alpaca layout) with the Alpaca template, max_length 256.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "gpteacher_roleplay.json"
SIDES = ("minipeft", "trainer", "seed", "minipeft-compile", "trainer-compile")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2", choices=["gpt2", "smollm2-135m"],
                        help="gpt2: GPT-2 small's architecture, random init; smollm2-135m: the real model")
    parser.add_argument("--method", default="lora", choices=["lora", "prefix", "adapter"])
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--sides", default="minipeft,trainer,seed", help=f"comma list of {', '.join(SIDES)}")
    parser.add_argument("--records", type=int, default=64,
                        help="one epoch over the file's first N records, in file order (default: 64)")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps not timed (default: 1)")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the sides this many times (default: 2)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side
    return parser.parse_args(argv)


# -- shared by every side ---------------------------------------------------------------------------------
def load_tokenizer():
    from transformers import AutoTokenizer

    from minipeft.loading.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_model(name: str):
    from minipeft.loading.models import build_from_known_config, load_model_and_tokenizer

    if name == "gpt2":
        return build_from_known_config("gpt2")
    model, _ = load_model_and_tokenizer(name)
    return model


def tokenized_examples(tokenizer, max_length: int, n_records: int):
    """The first ``n_records`` records as ``{"input_ids", "labels"}`` (prompt masked with -100), minipeft's
    tokenization; ``dataset[i]`` is record i, in file order."""
    from minipeft.data.batching import InstructionDataset
    from minipeft.data.loading import load_records
    from minipeft.data.tokenization import tokenize_records

    records = load_records(DATA).records[:n_records]
    tokenized = tokenize_records(records, tokenizer, "alpaca", max_length, progress=False)
    dataset = InstructionDataset(tokenized, range(len(records)))
    return dataset, tokenized


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def step_timer(step_seconds: list):
    """A ``transformers.TrainerCallback`` that appends each optimizer step's seconds to ``step_seconds``
    (``on_step_begin`` to ``on_step_end``: the Trainer's side of the step timer minipeft keeps in metrics.jsonl)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            step_seconds.append(time.perf_counter() - self.started)

    return StepTimer()


def total_steps(args) -> int:
    """One epoch over the subset: ``ceil(records / (batch · accumulation))`` optimizer steps."""
    return -(-args.records // (args.batch_size * args.accumulation))


def fixed_batches(dataset, args):
    """The batches every side trains on: consecutive records, ``batch_size`` at a time, in file order."""
    return [list(range(start, min(start + args.batch_size, len(dataset))))
            for start in range(0, len(dataset), args.batch_size)]


def minipeft_config(method: str, dropout: float):
    from minipeft.methods.adapter import AdapterConfig
    from minipeft.methods.lora import LoRAConfig
    from minipeft.methods.prefix import PrefixTuningConfig

    if method == "lora":
        return LoRAConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["c_attn", "c_proj", "c_fc"])
    if method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=20)
    return AdapterConfig()


def lora_targets(model) -> list:
    """GPT-2: c_attn, c_proj, c_fc (the issue's setting); Llama: every projection of attention and MLP."""
    if model.config.model_type == "gpt2":
        return ["c_attn", "c_proj", "c_fc"]
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- the sides (each runs in its own subprocess) ----------------------------------------------------------
def run_minipeft(args, model, tokenizer) -> list:
    """minipeft.training.train over the fixed batches; per-step (seconds, real tokens)."""
    import dataclasses

    from torch.utils.data import DataLoader

    from minipeft import get_peft_model
    from minipeft.data.batching import PaddingCollator
    from minipeft.data.tokenization import pad_token_id
    from minipeft.training.config import TrainingConfig
    from minipeft.training.loop import train

    config = minipeft_config(args.method, args.lora_dropout)
    if args.method == "lora":
        config = dataclasses.replace(config, target_modules=lora_targets(model))
    peft_model = get_peft_model(model, config)
    dataset, _ = tokenized_examples(tokenizer, args.max_length, args.records)
    collator = PaddingCollator(pad_token_id(tokenizer), "longest", args.max_length)
    loader = DataLoader(dataset, batch_sampler=fixed_batches(dataset, args), collate_fn=collator)
    with tempfile.TemporaryDirectory() as output_dir:
        train(peft_model, loader, None, TrainingConfig(
            output_dir=output_dir, max_steps=total_steps(args), gradient_accumulation_steps=args.accumulation,
            learning_rate=2e-4, precision=args.precision, device="cpu", log_every=10**9, save_every=10**9,
            compile=args.worker == "minipeft-compile"))
        records = [json.loads(line) for line in open(Path(output_dir) / "metrics.jsonl")]
    steps = [record for record in records if record["kind"] == "train"]
    cumulative = [0.0] + [record["seconds"] for record in steps]
    return [(cumulative[i + 1] - cumulative[i], steps[i]["tokens"]) for i in range(len(steps))]


def run_seed(args, model, tokenizer) -> list:
    """The seed's recipe: pad every record to max_length, no length grouping, logits at every position."""
    import dataclasses
    import itertools

    import torch
    from torch.utils.data import DataLoader

    from minipeft import get_peft_model
    from minipeft.data.batching import PaddingCollator
    from minipeft.data.tokenization import pad_token_id
    from minipeft.training.loop import autocast_for
    from minipeft.training.loss import causal_lm_loss_sum  # the reference: every logit

    config = minipeft_config(args.method, args.lora_dropout)
    if args.method == "lora":
        config = dataclasses.replace(config, target_modules=lora_targets(model))
    peft_model = get_peft_model(model, config)
    peft_model.train()
    dataset, _ = tokenized_examples(tokenizer, args.max_length, args.records)
    collator = PaddingCollator(pad_token_id(tokenizer), "max_length", args.max_length)
    loader = DataLoader(dataset, batch_sampler=fixed_batches(dataset, args), collate_fn=collator)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-4)
    autocast = autocast_for(args.precision, torch.device("cpu"))
    batches = iter(loader)
    per_step = []
    for _ in range(total_steps(args)):
        started = time.perf_counter()
        window = list(itertools.islice(batches, args.accumulation))
        n_targets = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in window)
        for batch in window:
            with autocast:
                nll_sum, _ = causal_lm_loss_sum(peft_model, batch)
            (nll_sum / n_targets).backward()
        torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        per_step.append((time.perf_counter() - started, sum(int(b["attention_mask"].sum()) for b in window)))
    return per_step


def run_trainer(args, model, tokenizer) -> list:
    """peft + transformers.Trainer: DataCollatorForSeq2Seq (dynamic padding), the records in file order."""
    import peft
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from minipeft.data.tokenization import pad_token_id

    if args.method == "lora":
        config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=args.lora_dropout, target_modules=lora_targets(model),
                                 task_type="CAUSAL_LM", fan_in_fan_out=model.config.model_type == "gpt2")
    elif args.method == "prefix":
        config = peft.PrefixTuningConfig(num_virtual_tokens=20, task_type="CAUSAL_LM")
    else:
        raise SystemExit("trainer: peft has no bottleneck adapters; run --sides minipeft,seed for --method adapter")
    peft_model = peft.get_peft_model(model, config)
    dataset, _ = tokenized_examples(tokenizer, args.max_length, args.records)
    examples = [dataset[i] for i in range(len(dataset))]
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    tokenizer.pad_token_id = pad_token_id(tokenizer)
    tokens_per_batch = []

    def collate(features):
        batch = collator(features)
        tokens_per_batch.append(int(batch["attention_mask"].sum()))
        return batch

    step_seconds = []
    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulation, max_steps=total_steps(args), learning_rate=2e-4,
            train_sampling_strategy="sequential", bf16=args.precision == "bf16", use_cpu=True, report_to=[],
            save_strategy="no", torch_compile=args.worker == "trainer-compile",
            logging_strategy="no", dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=peft_model, args=training_args, train_dataset=examples, data_collator=collate,
                          callbacks=[step_timer(step_seconds)])
        trainer.train()
    # The Trainer fetches each window's micro-batches in order: step i used batches [k·i, k·i + k).
    k = args.accumulation
    return [(seconds, sum(tokens_per_batch[k * i:k * i + k])) for i, seconds in enumerate(step_seconds)]


def worker(args) -> None:
    """Run one side and print one JSON line: per-step (seconds, tokens), peak RSS, parameter count."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = load_tokenizer()
    model = load_model(args.model)
    n_parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    run = {"minipeft": run_minipeft, "trainer": run_trainer, "seed": run_seed, "minipeft-compile": run_minipeft,
           "trainer-compile": run_trainer}[args.worker]
    per_step = run(args, model, tokenizer)
    print("RESULT " + json.dumps({"side": args.worker, "per_step": per_step, "peak_rss": peak_rss_bytes(),
                                  "n_parameters": n_parameters}), flush=True)


# -- the parent: alternate the sides, measure the peak, print the table -----------------------------------
def run_side(side: str, argv: list) -> dict | None:
    command = [sys.executable, __file__, *argv, "--worker", side]
    with tempfile.TemporaryDirectory() as compile_cache:  # a cold Inductor cache: a compiling side pays in full
        completed = subprocess.run(command, capture_output=True, text=True,
                                   env={**os.environ, "TQDM_DISABLE": "1", "TORCHINDUCTOR_CACHE_DIR": compile_cache})
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        print(f"  {side}: failed (exit {completed.returncode}): {' / '.join(tail)}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def summarise(result: dict, warmup: int, peak: float) -> dict:
    timed = result["per_step"][warmup:]
    seconds = sum(s for s, _ in timed)
    tokens = sum(t for _, t in timed)
    tokens_per_s = tokens / seconds
    flops = 4 * result["n_parameters"] * tokens_per_s
    return {"tokens_per_s": tokens_per_s, "seconds_per_step": statistics.median(s for s, _ in timed),
            "peak_rss_gib": result["peak_rss"] / 2**30, "flops": flops, "peak_share": flops / peak,
            "timed_steps": len(timed), "timed_tokens": tokens,
            "first_steps_seconds": sum(s for s, _ in result["per_step"][:warmup])}


def main() -> int:
    args = parse_args()
    if args.worker:
        worker(args)
        return 0
    if not DATA.is_file():
        sys.exit(f"{DATA} is missing: the benchmark needs the shared data in ../shared/data/")
    if total_steps(args) <= args.warmup:
        sys.exit(f"--records {args.records}: one epoch is {total_steps(args)} optimizer steps, not more than "
                 f"--warmup {args.warmup}; give more records")
    from matmul_peak import cpu_flags, matmul_peak

    import torch

    sides = [side.strip() for side in args.sides.split(",") if side.strip()]
    trainer_sides = [side for side in sides if side.startswith("trainer")]
    if trainer_sides:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("peft is not installed (the `oracle` extra): the trainer sides are skipped", file=sys.stderr)
            sides = [side for side in sides if side not in trainer_sides]
    if args.method == "adapter" and trainer_sides:
        print("peft has no bottleneck adapters: the trainer sides are skipped for --method adapter", file=sys.stderr)
        sides = [side for side in sides if side not in trainer_sides]
    torch.set_num_threads(args.threads)
    peak = matmul_peak(args.precision)
    print(f"machine: {os.cpu_count()} CPUs, flags {' '.join(cpu_flags()) or 'unknown'}, torch {torch.__version__}, "
          f"{args.threads} threads, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"matmul peak ({args.precision}): {peak / 1e9:.1f} GFLOP/s")
    print(f"config: {args.model}, {args.method}, {args.precision}, batch {args.batch_size} × accumulation "
          f"{args.accumulation}, max_length {args.max_length}, the first {args.records} records in file order: "
          f"{total_steps(args)} optimizer steps, the first {args.warmup} not timed; {args.rounds} round(s)")
    argv = [arg for arg in sys.argv[1:]]
    results = {side: [] for side in sides}
    for round_index in range(args.rounds):
        for side in (sides if round_index % 2 == 0 else sides[::-1]):  # alternate the order between rounds
            started, load = time.perf_counter(), os.getloadavg()[0]
            result = run_side(side, argv)
            if result is not None:
                results[side].append({**summarise(result, args.warmup, peak), "load": load})
                figures = results[side][-1]
                print(f"  round {round_index + 1} {side:16s} {figures['tokens_per_s']:7.1f} tok/s  "
                      f"{figures['seconds_per_step']:6.2f} s/step  {figures['peak_rss_gib']:5.2f} GiB  "
                      f"{figures['timed_tokens']} timed tokens  load {load:.1f}  "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
    table = {side: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
             for side, runs in results.items() if runs}
    for side, runs in results.items():
        if runs:
            table[side]["spread"] = (min(run["tokens_per_s"] for run in runs), max(run["tokens_per_s"] for run in runs))
    print()
    print(f"| side | real tokens/s (median) | min–max over {args.rounds} rounds | s / optimizer step | "
          f"peak RSS (GiB) | achieved GFLOP/s | share of {args.precision} matmul peak ({peak / 1e9:.0f}) | "
          f"untimed first {args.warmup} step(s), s | load avg |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for side, figures in table.items():
        low, high = figures["spread"]
        print(f"| {side} | {figures['tokens_per_s']:.1f} | {low:.1f}–{high:.1f} | {figures['seconds_per_step']:.2f} | "
              f"{figures['peak_rss_gib']:.2f} | {figures['flops'] / 1e9:.1f} | {figures['peak_share']:.1%} | "
              f"{figures['first_steps_seconds']:.1f} | {figures['load']:.1f} |")
    for ours_name in ("minipeft", "minipeft-compile"):
        for other in ("trainer", "trainer-compile", "seed"):
            if ours_name in table and other in table:
                ours, theirs = table[ours_name], table[other]
                print(f"{ours_name} / {other}: tokens/s {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x, "
                      f"s/step {ours['seconds_per_step'] / theirs['seconds_per_step']:.2f}x, "
                      f"peak RSS {ours['peak_rss_gib'] / theirs['peak_rss_gib']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "matmul_peak": peak, "runs": results,
                                               "median": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
