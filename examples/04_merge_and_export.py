"""Merge a LoRA adapter into its base model, save a plain Hugging Face model, load it with transformers alone.

    python examples/04_merge_and_export.py

Merging folds W + s·B A into each adapted weight once, so the exported model costs exactly what the base
model costs and needs neither minipeft nor peft to run. `python -m minipeft merge --adapter DIR --out DIR`
does the same from the command line, with the checks below built in (see minipeft/inference/merge.py). A random,
non-zero LoRA adapter stands in for a trained one.
"""

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from minipeft import LoRAConfig, LoRALinear, get_peft_model, load_model_and_tokenizer
from minipeft.data import encode_prompt

torch.manual_seed(0)
base, tokenizer = load_model_and_tokenizer("builtin")
base_parameters = sum(p.numel() for p in base.parameters())
peft_model = get_peft_model(base, LoRAConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                                             init_lora_weights=False)).eval()
print(f"base model: {base_parameters:,} parameters; adapter: {peft_model.parameter_stats().trainable:,} more")

prompt = torch.tensor([encode_prompt("Name the opposite of hot.", "", "alpaca", tokenizer)])  # (1, T)
with torch.no_grad():
    adapted_logits = peft_model(input_ids=prompt).logits

# 1) merge_and_unload: a plain transformers model with W' = W + s·(B A)ᵀ in every adapted Conv1D (on a copy).
merged = peft_model.merge_and_unload()
assert not any(isinstance(module, LoRALinear) for module in merged.modules())
assert sum(p.numel() for p in merged.parameters()) == base_parameters
with torch.no_grad():
    difference = (merged(input_ids=prompt).logits - adapted_logits).abs().max().item()
print(f"{type(merged).__name__} with {base_parameters:,} parameters; max |logit difference| {difference:.1e}")
assert difference < 1e-4
assert isinstance(peft_model.base_model.transformer.h[0].attn.c_attn, LoRALinear)  # the adapted model is intact

# 2) Save it as any Hugging Face model, and load it back with transformers alone.
with tempfile.TemporaryDirectory() as directory:
    merged.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print("written:", sorted(path.name for path in Path(directory).iterdir()))
    plain = AutoModelForCausalLM.from_pretrained(directory).eval()
with torch.no_grad():
    reloaded_difference = (plain(input_ids=prompt).logits - adapted_logits).abs().max().item()
print(f"loaded with AutoModelForCausalLM.from_pretrained: max |logit difference| {reloaded_difference:.1e}")
assert reloaded_difference < 1e-4

# 3) transformers' own generate on the exported model writes what minipeft's generate writes with the adapter.
eos = tokenizer.eos_token_id
ours = peft_model.generate(prompt, max_new_tokens=12, eos_token_id=eos)[0]
theirs = plain.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)
theirs = theirs[0, prompt.shape[1]:]                                  # transformers returns prompt + new tokens
print("base + adapter (minipeft): ", repr(tokenizer.decode(ours)))
print("merged model (transformers):", repr(tokenizer.decode(theirs)))
assert torch.equal(ours[:len(theirs)], theirs)
