"""QLoRA and bf16 LoRA on a Llama-3.2-3B-shaped checkpoint: minipeft against peft + bitsandbytes + Trainer.

One side per process (``bench/gpu_qlora.sh`` runs them in turn), so each ``torch.cuda.max_memory_allocated``
is its own. Every side: the checkpoint written by ``bench/make_checkpoint.py --shape llama-3.2-3b`` (random
weights: speed does not depend on the values), LoRA r=16, α=32, dropout 0.05 on q, k, v, o, gate, up, down,
bf16 compute, AdamW lr 2e-4, batch 4 × 512 random tokens (every token a target), no gradient checkpointing,
``WARMUP`` untimed steps then ``STEPS`` timed ones.

=================  =====================================================================================
``minipeft-qlora``  ``load_checkpoint_dir(quantize="nf4", device="cuda")`` (each linear quantized on the GPU
                    as it is read), ``minipeft.training.train`` (bf16 autocast, its own loss)
``minipeft-lora``   the same, base in bf16
``peft-qlora``      ``from_pretrained(BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute))``,
                    ``prepare_model_for_kbit_training(use_gradient_checkpointing=False)``, peft LoRA,
                    ``transformers.Trainer(bf16=True)``
``peft-lora``       ``from_pretrained(dtype=bfloat16)``, peft LoRA, ``Trainer(bf16=True)``
=================  =====================================================================================

    python bench/gpu_qlora.py minipeft-qlora /tmp/llama-3.2-3b
    GPU_QLORA_DEVICE=cpu GPU_QLORA_STEPS=2 python bench/gpu_qlora.py peft-lora /tmp/tiny   # smoke test
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEVICE = torch.device(os.environ.get("GPU_QLORA_DEVICE", "cuda"))
WARMUP, STEPS = 2, int(os.environ.get("GPU_QLORA_STEPS", "8"))
BATCH, LENGTH = int(os.environ.get("GPU_QLORA_BATCH", "4")), int(os.environ.get("GPU_QLORA_LENGTH", "512"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_batch(vocab: int) -> dict:
    ids = torch.randint(0, vocab, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class SameBatch:
    """A loader of ``n`` copies of one batch (what the training loop needs: ``len``, ``iter``, ``set_epoch``)."""

    def __init__(self, batch: dict, n: int):
        self.batch, self.n = batch, n

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        return iter([self.batch] * self.n)


def minipeft_side(directory: str, quantize: str) -> dict:
    from minipeft import get_peft_model
    from minipeft.loading.checkpoint_dir import load_checkpoint_dir
    from minipeft.methods.lora import LoRAConfig
    from minipeft.training import TrainingConfig, train

    started = time.perf_counter()
    model, _ = load_checkpoint_dir(directory, quantize, dtype=torch.bfloat16, device=DEVICE)
    load_seconds = time.perf_counter() - started
    peft_model = get_peft_model(model, LoRAConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS))
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as output:
        config = TrainingConfig(output_dir=output, max_steps=WARMUP + STEPS, learning_rate=2e-4, warmup_steps=0,
                                lr_schedule="constant", precision="bf16", device=str(DEVICE), log_every=1000)
        train(peft_model, SameBatch(random_batch(model.config.vocab_size), WARMUP + STEPS), None, config)
        records = [json.loads(line) for line in open(Path(output) / "metrics.jsonl")]
    timed = [r for r in records if r.get("kind") == "train" and r["step"] > WARMUP]
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {"load_s": load_seconds, "tokens_per_s": sum(r["tokens"] for r in timed) / seconds,
            "loss": timed[-1]["loss"]}


def peft_side(directory: str, quantize: bool) -> dict:
    import peft
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback,
                              TrainingArguments)

    started = time.perf_counter()
    if quantize:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, dtype=torch.bfloat16,
                                                     device_map={"": str(DEVICE)})
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(DEVICE)
    load_seconds = time.perf_counter() - started
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS,
                                                       task_type="CAUSAL_LM"))
    batch = random_batch(model.config.vocab_size)
    rows = [{key: value[i] for key, value in batch.items()} for i in range(BATCH)] * (WARMUP + STEPS)
    times = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as output:
        arguments = TrainingArguments(output_dir=output, per_device_train_batch_size=BATCH, max_steps=WARMUP + STEPS,
                                      learning_rate=2e-4, lr_scheduler_type="constant", bf16=True, logging_steps=1000,
                                      save_strategy="no", report_to=[], use_cpu=DEVICE.type == "cpu",
                                      dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=arguments, train_dataset=rows, callbacks=[StepTimes()])
        result = trainer.train()
    seconds = times[-1] - times[WARMUP - 1]
    return {"load_s": load_seconds, "tokens_per_s": STEPS * BATCH * LENGTH / seconds, "loss": result.training_loss}


def main() -> None:
    side, directory = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    if side == "minipeft-qlora":
        result = minipeft_side(directory, "nf4")
    elif side == "minipeft-lora":
        result = minipeft_side(directory, "none")
    elif side == "peft-qlora":
        result = peft_side(directory, quantize=True)
    elif side == "peft-lora":
        result = peft_side(directory, quantize=False)
    else:
        raise SystemExit(f"unknown side {side}")
    memory = torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"{side:15s} {name}: batch {BATCH}x{LENGTH}, {STEPS} timed steps: {result['tokens_per_s']:9,.0f} tokens/s, "
          f"max_memory_allocated {memory:6.2f} GiB, load {result['load_s']:5.1f} s, loss {result['loss']:.3f}",
          flush=True)


if __name__ == "__main__":
    main()
