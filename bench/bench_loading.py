"""Loading a checkpoint directory: peak resident memory and time, minipeft against transformers.

Each side runs in its own fresh process (peak RSS is a process's high-water mark, ``VmHWM``, the figure
``/usr/bin/time -v`` calls "Maximum resident set size"), loads the directory, then runs one forward pass of
16 tokens (which touches every weight: a memory-mapped load is only cheap until the weights are used), and
prints one line. The sides, in the order given to ``--sides``:

=====================  ===================================================================================
``minipeft-bf16``      ``load_base_model(DIR, dtype=bfloat16)``: tensor by tensor (minipeft.loading.checkpoint_dir)
``minipeft-nf4``       the same with ``quantize="nf4"``: each linear quantized as it is read, the rest in bf16
``transformers-bf16``  ``AutoModelForCausalLM.from_pretrained(DIR, dtype=bfloat16)`` (memory-mapped safetensors)
``transformers-bnb4``  ``from_pretrained(DIR, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
                       bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=bfloat16))``, bitsandbytes' CPU backend
=====================  ===================================================================================

    python bench/make_checkpoint.py --shape llama-3.2-1b --out /work/bigckpt/llama-3.2-1b
    python bench/bench_loading.py /work/bigckpt/llama-3.2-1b
    python bench/bench_loading.py /work/bigckpt/llama-3.2-3b --sides minipeft-nf4

The goals (issue #22) are printed beside each minipeft line: bf16 ≤ 1.1 × the files' size + 0.5 GB, NF4 ≤
1.2 × the quantized model's footprint + 0.5 GB (the footprint is what the loaded model's tensors take).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SIDES = ("minipeft-bf16", "minipeft-nf4", "transformers-bf16", "transformers-bnb4")


def peak_rss_bytes() -> int:
    """This process's peak resident memory (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def load(side: str, directory: str):
    import torch
    from transformers import AutoModelForCausalLM

    if side.startswith("minipeft"):
        from minipeft.loading.streaming import load_base_model

        model, _ = load_base_model(directory, "nf4" if side.endswith("nf4") else "none", dtype=torch.bfloat16,
                                   log=lambda message: print(message, file=sys.stderr))
        return model
    if side == "transformers-bf16":
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quantization, dtype=torch.bfloat16,
                                                device_map="cpu")


def measure(side: str, directory: str) -> dict:
    """One side, in this process: load, then one forward of 16 tokens; the figures as a dict."""
    import torch

    torch.set_num_threads(2)
    started = time.perf_counter()
    model = load(side, directory)
    seconds = time.perf_counter() - started
    after_load = peak_rss_bytes()
    footprint = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    with torch.no_grad():
        model(input_ids=torch.arange(16)[None] + 100)
    return {"side": side, "load_s": seconds, "peak_after_load": after_load, "peak_after_forward": peak_rss_bytes(),
            "footprint": footprint}


def goal(result: dict, file_bytes: int) -> str:
    if result["side"] == "minipeft-bf16":
        limit = 1.1 * file_bytes + 0.5e9
        return f"goal <= 1.1 x files + 0.5 GB = {limit / 1e9:.2f} GB: {'met' if result['peak_after_forward'] <= limit else 'MISSED'}"
    if result["side"] == "minipeft-nf4":
        limit = 1.2 * result["footprint"] + 0.5e9
        return f"goal <= 1.2 x footprint + 0.5 GB = {limit / 1e9:.2f} GB: {'met' if result['peak_after_forward'] <= limit else 'MISSED'}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run a single side in this process (the child)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.directory)))
        return
    directory = Path(args.directory)
    file_bytes = sum(path.stat().st_size for path in directory.glob("*.safetensors"))
    print(f"{directory}: {file_bytes / 1e9:.2f} GB of safetensors; peak RSS = VmHWM of a fresh process per side")
    print(f"{'side':<19} {'load s':>7} {'model GB':>9} {'peak RSS GB (load)':>19} {'(+ 1 forward)':>14}")
    for side in args.sides.split(","):
        child = subprocess.run([sys.executable, __file__, str(directory), "--one", side], capture_output=True, text=True)
        if child.returncode != 0:
            print(f"{side:<19} failed: {(child.stderr.strip().splitlines() or ['?'])[-1][:150]}")
            continue
        result = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{side:<19} {result['load_s']:>7.1f} {result['footprint'] / 1e9:>9.3f} "
              f"{result['peak_after_load'] / 1e9:>19.3f} {result['peak_after_forward'] / 1e9:>14.3f}  "
              f"{goal(result, file_bytes)}", flush=True)


if __name__ == "__main__":
    main()
