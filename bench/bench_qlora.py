"""QLoRA on SmolLM2-135M: memory of the 4-bit base, and the same LoRA run on an NF4 base and on a bf16 base.

    python bench/bench_qlora.py                  # memory table + both runs (about 15 min on the busy shared machine)
    python bench/bench_qlora.py --steps 10       # a shorter run

Prints:

1. **Bytes of the quantized linear layers** (the 210 q/k/v/o/gate/up/down projections) in NF4 with double
   quantization against the same weights in float32 (goal: <= 0.135x), from SmolLM2 streamed from its
   GGUF file (:func:`minipeft.loading.streaming.load_smollm2_streaming`).
2. **The same LoRA run twice**, each side in its own subprocess so that each peak RSS is its own:
   ``nf4``  the base's linear layers in NF4 (quantized from float32, computed in bf16 on this CPU),
            embeddings and norms in bfloat16 (QLoRA's setting: the activations are bf16 on both sides);
   ``bf16`` the whole base in bfloat16.
   Same seed, data, steps and LoRA settings (r=8, alpha=16, q/k/v/o projections, adapter weights float32).
   Per side: peak RSS while loading, peak RSS while training (the kernel's high-water mark is reset through
   /proc/self/clear_refs just before training: steps and evaluations), eval loss before and after, and
   training tokens/s. Goals: nf4's training peak below bf16's, eval loss after within 3% of bf16's.

Data: 400 GPTeacher roleplay records from ../shared/data (chat template, max_length 128), 32 held out.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "gpteacher_roleplay.json"


def high_water_mark_mb() -> float:
    """VmHWM: the peak resident set size of this process since start or since the last reset."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


def memory_table() -> None:
    from minipeft.loading.streaming import load_smollm2_streaming
    from minipeft.quantization.nf4 import memory_stats

    started = time.perf_counter()
    model, _, names = load_smollm2_streaming()
    stats = memory_stats(model)
    ratio = stats.linear_nf4_bytes / (4 * stats.linear_params)
    print(f"SmolLM2-135M, {len(names)} linear layers in NF4 (streamed from the GGUF file in "
          f"{time.perf_counter() - started:.0f} s):")
    print(f"  {'':34} {'float32':>12} {'NF4 + double quant':>20}")
    bits = 8 * stats.linear_nf4_bytes / stats.linear_params
    print(f"  {'quantized linear weights':34} {4 * stats.linear_params / 1e6:>9.1f} MB "
          f"{stats.linear_nf4_bytes / 1e6:>17.1f} MB   ratio {ratio:.4f} (goal <= 0.135)  {bits:.3f} bits/weight")
    other = stats.other_bytes / 1e6
    print(f"  {'embeddings + norms (unchanged)':34} {other:>9.1f} MB {other:>17.1f} MB")
    total_float = 4 * stats.linear_params + stats.other_bytes
    total_nf4 = stats.linear_nf4_bytes + stats.other_bytes
    print(f"  {'whole base':34} {total_float / 1e6:>9.1f} MB {total_nf4 / 1e6:>17.1f} MB   "
          f"ratio {total_nf4 / total_float:.3f}")
    for line in stats.lines():
        print("  " + line)


def worker(side: str, steps: int, threads: int, output: str) -> None:
    """One training run in this process; writes its figures as JSON to ``output``."""
    import torch

    from minipeft.data import DataConfig, build_dataloaders
    from minipeft.methods.lora import LoRAConfig
    from minipeft.loading.models import load_model_and_tokenizer
    from minipeft.loading.streaming import load_base_model
    from minipeft.model.peft_model import get_peft_model
    from minipeft.training import TrainingConfig, train

    torch.set_num_threads(threads)
    started = time.perf_counter()
    if side == "nf4":
        model, tokenizer = load_base_model("smollm2-135m", "nf4", dtype=torch.bfloat16, log=lambda message: None)
    else:
        model, tokenizer = load_model_and_tokenizer("smollm2-135m", dtype=torch.bfloat16)
    load_seconds = time.perf_counter() - started
    load_peak = high_water_mark_mb()

    records = json.loads(DATA.read_text(encoding="utf-8"))[:400]
    with tempfile.TemporaryDirectory() as directory:
        subset = Path(directory) / "records.json"
        subset.write_text(json.dumps(records))
        data = DataConfig(dataset_path=str(subset), template="chat", max_length=128, batch_size=4, val_size=32,
                          cache_dir=None, seed=0)
        train_loader, val_loader, _ = build_dataloaders(data, tokenizer, progress=False)
        torch.manual_seed(0)
        peft_model = get_peft_model(model, LoRAConfig(r=8, lora_alpha=16,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        config = TrainingConfig(output_dir=str(Path(directory) / "run"), max_steps=steps, learning_rate=2e-3,
                                warmup_steps=2, eval_every=steps, save_every=steps, log_every=steps, device="cpu",
                                precision="fp32")
        reset = reset_high_water_mark()
        before_training = high_water_mark_mb()
        state = train(peft_model, train_loader, val_loader, config).state
        train_peak = high_water_mark_mb()
    Path(output).write_text(json.dumps({
        "side": side, "load_seconds": load_seconds, "load_peak_mb": load_peak, "train_peak_mb": train_peak,
        "rss_before_training_mb": before_training, "peak_reset": reset,
        "eval_loss_before": state.eval_loss_before, "eval_loss": state.eval_loss,
        "tokens_per_s": state.tokens_seen / state.train_seconds, "train_seconds": state.train_seconds,
        "steps": state.step, "threads": threads}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (default 1: on the busy shared 2-core machine, 2 threads ran "
                             "a 4-bit layer's forward and backward 4.5x slower than 1)")
    parser.add_argument("--sides", default="nf4,bf16")
    parser.add_argument("--skip_memory_table", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.steps, args.threads, args.output)
        return 0
    if not DATA.is_file():
        print(f"{DATA} is absent; the benchmark needs it")
        return 1
    if not args.skip_memory_table:
        memory_table()
        print()
    results = {}
    for side in args.sides.split(","):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
            output = handle.name
        environment = dict(os.environ, PYTHONPATH=str(REPO))
        subprocess.run([sys.executable, __file__, "--worker", side, "--steps", str(args.steps), "--threads",
                        str(args.threads), "--output", output], check=True, env=environment,
                       stdout=subprocess.DEVNULL)
        results[side] = json.loads(Path(output).read_text())
        os.unlink(output)
    print(f"LoRA r=8 on q/k/v/o, {args.steps} steps, batch 4, max_length 128, same seed and data; "
          f"{args.threads} threads; one subprocess per side")
    print(f"  {'base':6} {'load s':>7} {'load peak':>10} {'train peak':>11} {'eval before':>12} {'eval after':>11} "
          f"{'tokens/s':>9}")
    for side, result in results.items():
        print(f"  {side:6} {result['load_seconds']:>7.1f} {result['load_peak_mb']:>7.0f} MB "
              f"{result['train_peak_mb']:>8.0f} MB {result['eval_loss_before']:>12.4f} {result['eval_loss']:>11.4f} "
              f"{result['tokens_per_s']:>9.1f}")
    if {"nf4", "bf16"} <= results.keys():
        nf4, bf16 = results["nf4"], results["bf16"]
        change = (nf4["eval_loss"] - bf16["eval_loss"]) / bf16["eval_loss"]
        print(f"  eval loss after, nf4 vs bf16: {change:+.2%} (goal within 3%); training peak RSS nf4 / bf16: "
              f"{nf4['train_peak_mb'] / bf16['train_peak_mb']:.2f} (goal < 1); throughput nf4 / bf16: "
              f"{nf4['tokens_per_s'] / bf16['tokens_per_s']:.2f}")
        if not (nf4["peak_reset"] and bf16["peak_reset"]):
            print("  note: /proc/self/clear_refs could not be written: the training peaks include loading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
