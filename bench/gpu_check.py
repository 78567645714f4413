"""The GPU checks of issue 11, one part per call (``bench/gpu_check.sh`` runs them all, each on its own).

    python bench/gpu_check.py env        # versions, the GPU, what minipeft needs from transformers
    python bench/gpu_check.py step       # LoRA r=8 training step on a SmolLM2-shaped Llama: minipeft vs peft
    python bench/gpu_check.py generate   # greedy generation with a LoRA adapter: merged == unmerged

``GPU_CHECK_DEVICE=cpu GPU_CHECK_TINY=1`` runs the same code on a CPU with tiny sizes (a smoke test of the
script itself: the figures then mean nothing).

**step.** SmolLM2-135M's architecture (``build_from_known_config("smollm2-135m")``, random weights: speed
does not depend on the values), LoRA r=8, α=16, dropout 0.05 on all 7 projections, a random batch of
``8 × 256`` tokens (every token real, every label a target), bf16. minipeft's step: frozen weights stored in
bf16, autocast, :func:`minipeft.training.loss.causal_lm_loss_sum` (logits only at targets, chunked head),
fused AdamW. peft's step: ``peft.get_peft_model`` on float32 weights, autocast to bf16 (what
``Trainer(bf16=True)`` does), ``model(labels=...)`` (logits at every position, transformers' loss), fused
AdamW (the Trainer's default optimizer on CUDA), gradient clipping as the Trainer does. Each: 3 untimed
steps, then ``--steps`` timed between ``torch.cuda.synchronize()`` calls. Printed: ms/step, tokens/s,
achieved FLOP/s (``4·N`` per token, N = the model's parameters) and its share of the H200's ~790 TFLOP/s
dense bf16 peak, peak GPU memory. Then the same at batch 64 × 256, where a 135M model stops being bound by
kernel launches.
"""

import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEVICE = torch.device(os.environ.get("GPU_CHECK_DEVICE", "cuda"))
TINY = os.environ.get("GPU_CHECK_TINY") == "1"
BF16_PEAK = 790e12  # H200 dense bf16 FLOP/s (the figure issue 11 quotes)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def smollm2_shaped():
    """SmolLM2-135M's architecture with random weights (tiny: 2 blocks, d=64, for a CPU smoke test)."""
    from minipeft.loading.models import KNOWN_CONFIGS, SMOLLM2_NAME, build_from_known_config

    if not TINY:
        return build_from_known_config(SMOLLM2_NAME)
    from transformers import AutoModelForCausalLM

    config = KNOWN_CONFIGS[SMOLLM2_NAME]()
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 64, 128
    config.num_attention_heads, config.num_key_value_heads, config.vocab_size = 4, 2, 512
    return AutoModelForCausalLM.from_config(config)


def env() -> None:
    import transformers

    from minipeft.training.prepare import resolve_precision

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, python {sys.version.split()[0]}")
    try:
        import peft
        print(f"peft {peft.__version__}")
    except ImportError:
        print("peft: not installed")
    if DEVICE.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    print(f"--precision auto on {DEVICE}: {resolve_precision('auto', DEVICE)}")
    import transformers.modeling_utils as modeling_utils
    print("boolean logits_to_keep (transformers.modeling_utils.slice_logits_to_keep):",
          "yes" if hasattr(modeling_utils, "slice_logits_to_keep") else "NO: minipeft's loss needs it")


def minipeft_step(model, batch):
    from minipeft import get_peft_model
    from minipeft.methods.lora import LoRAConfig
    from minipeft.training.loss import causal_lm_loss_sum
    from minipeft.training.optimizer import build_optimizer
    from minipeft.training.precision import cast_frozen_weights

    peft_model = get_peft_model(model, LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS))
    cast_frozen_weights(peft_model, "bf16")
    peft_model.to(DEVICE).train()
    optimizer = build_optimizer(peft_model, 2e-4, 0.01)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            nll_sum, n_targets = causal_lm_loss_sum(peft_model, batch)
        (nll_sum / n_targets).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return nll_sum / n_targets
    return step


def peft_step(model, batch):
    import peft

    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                            target_modules=TARGETS, task_type="CAUSAL_LM"))
    peft_model.to(DEVICE).train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.01, fused=DEVICE.type == "cuda")

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def time_step(name, make_step, batch_size, length, steps):
    torch.manual_seed(0)
    model = smollm2_shaped()
    n_parameters = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    ids = torch.randint(0, model.config.vocab_size, (batch_size, length), device=DEVICE)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    step = make_step(model, batch)
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first = float(step())
    for _ in range(2):
        step()
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        last = step()
    synchronize()
    seconds = (time.perf_counter() - started) / steps
    tokens_per_s = batch_size * length / seconds
    flops = 4 * n_parameters * tokens_per_s
    memory = torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else float("nan")
    print(f"  {name:8s} batch {batch_size}×{length}: {seconds * 1e3:8.1f} ms/step  {tokens_per_s:10,.0f} tok/s  "
          f"{flops / 1e12:6.1f} TFLOP/s (4N) = {flops / BF16_PEAK:5.1%} of 790  peak {memory:5.1f} GiB  "
          f"loss {first:.3f} -> {float(last):.3f}", flush=True)
    return tokens_per_s


def step() -> None:
    sizes = [(2, 16)] if TINY else [(8, 256), (64, 256)]
    steps = 2 if TINY else 10
    sides = {"minipeft": minipeft_step}
    try:
        import peft  # noqa: F401
        sides["peft"] = peft_step
    except ImportError:
        print("  peft is not installed: minipeft only")
    print(f"LoRA r=8 on all 7 projections, SmolLM2-135M shape (random weights), bf16, {DEVICE}, {steps} timed steps")
    for batch_size, length in sizes:
        speeds = {}
        for name, make_step in sides.items():
            try:
                speeds[name] = time_step(name, make_step, batch_size, length, steps)
            except Exception as error:  # one side failing must not hide the other's figure
                print(f"  {name:8s} batch {batch_size}×{length}: FAILED {type(error).__name__}: {error}"[:400])
        if len(speeds) == 2:
            print(f"  minipeft / peft at batch {batch_size}: {speeds['minipeft'] / speeds['peft']:.2f}x tokens/s")


def generate() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        generate_in(dtype)


def generate_in(dtype) -> None:
    """Greedy tokens of the unmerged adapter and of ``merge_and_unload()``, base weights in ``dtype``."""
    from minipeft import get_peft_model
    from minipeft.core.generation import generate as generate_tokens
    from minipeft.methods.lora import LoRAConfig

    torch.manual_seed(0)
    model = smollm2_shaped().to(dtype)
    peft_model = get_peft_model(model, LoRAConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                  init_lora_weights=False)).to(DEVICE).eval()
    prompts = torch.randint(0, model.config.vocab_size, (4, 32), device=DEVICE)
    new_tokens = 8 if TINY else 64
    with torch.no_grad():
        generate_tokens(peft_model, prompts, max_new_tokens=2)  # warm-up
        synchronize()
        started = time.perf_counter()
        unmerged = generate_tokens(peft_model, prompts, max_new_tokens=new_tokens)
        synchronize()
        unmerged_seconds = time.perf_counter() - started
        merged_model = peft_model.merge_and_unload().eval()
        generate_tokens(merged_model, prompts, max_new_tokens=2)
        synchronize()
        started = time.perf_counter()
        merged = generate_tokens(merged_model, prompts, max_new_tokens=new_tokens)
        synchronize()
        merged_seconds = time.perf_counter() - started
    same = (merged == unmerged).all(0)  # (new_tokens,): every row agrees at this position
    verdict = "merged == unmerged" if bool(same.all()) else \
        f"DIFFER from position {int((~same).nonzero()[0])} of {new_tokens}"
    print(f"generate on {DEVICE}, base {str(dtype).split('.')[-1]}, LoRA r=8 (random B), batch 4, {new_tokens} new "
          f"tokens greedy: unmerged {unmerged.numel() / unmerged_seconds:,.0f} tok/s, merged "
          f"{merged.numel() / merged_seconds:,.0f} tok/s; {verdict}"
          + ("" if dtype == torch.float32 or bool(same.all()) else
             " (bf16: W + ΔW is rounded to bf16 when merged, which can flip a near-tie argmax)"), flush=True)


if __name__ == "__main__":
    {"env": env, "step": step, "generate": generate}[sys.argv[1]]()
