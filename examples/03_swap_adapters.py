"""Two adapters on one base model: switch between them, switch them off, give each row of a batch its own.

    python examples/03_swap_adapters.py

A service that serves many fine-tunes of one model keeps one copy of the base weights and one small adapter
per task (minipeft/inference/multi_adapter.py explains how switching works). Two random, non-zero LoRA adapters stand
in for trained ones here: what this shows is that switching is exact, whatever the adapters learned.
"""

import copy
import shutil
import tempfile
from pathlib import Path

import torch

from minipeft import LoRAConfig, get_peft_model, load_adapter, load_model_and_tokenizer
from minipeft.inference.multi_adapter import MultiAdapterModel

torch.manual_seed(0)
base, tokenizer = load_model_and_tokenizer("builtin")
ids = tokenizer(["The capital of France is"], return_tensors="pt")["input_ids"]            # (1, T)
with torch.no_grad():
    base_logits = base(ids).logits

# Two adapter directories, as training would leave them (peft's file format).
directory = Path(tempfile.mkdtemp())
for name, rank in (("first", 4), ("second", 8)):
    peft_model = get_peft_model(copy.deepcopy(base), LoRAConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False))
    peft_model.save_adapter(directory / name)
    print(f"adapter {name!r}: LoRA r={rank}, {peft_model.parameter_stats().trainable:,} parameters")
with torch.no_grad():
    first_alone = load_adapter(copy.deepcopy(base), directory / "first")(input_ids=ids).logits  # the usual way

# One base model, both adapters loaded by name; none is active until set_adapter.
model = MultiAdapterModel(base)
model.load_adapter(directory / "first", "first")
model.load_adapter(directory / "second", "second")
print("loaded:", model.list_adapters(), "| active:", model.active_adapter)
c_attn = lambda: type(model.base_model.transformer.h[0].attn.c_attn).__name__  # noqa: E731


@torch.no_grad()
def logits():
    return model(input_ids=ids).logits


assert torch.equal(logits(), base_logits)
model.set_adapter("first")
first = logits()
print(f"set_adapter('first'):  block 0's c_attn is now a {c_attn()}")
assert torch.allclose(first, first_alone, atol=1e-6)            # the same as loading it on its own
model.set_adapter("second")
second = logits()
assert not torch.allclose(first, second)
model.set_adapter("first")
assert torch.equal(logits(), first)
print("switching first -> second -> first gives back the same logits, bit for bit (no weight was copied)")

with model.disable_adapters():
    assert torch.equal(logits(), base_logits)
    print(f"disable_adapters(): block 0's c_attn is the plain {c_attn()} again")

# One forward, one adapter per row (LoRA family): row 0 "first", row 1 no adapter, row 2 "second".
batch = ids.expand(3, -1)
with torch.no_grad():
    mixed = model(input_ids=batch, adapter_names=["first", None, "second"]).logits
for row, expected in enumerate((first, base_logits, second)):
    assert torch.allclose(mixed[row], expected[0], atol=1e-5)
print("mixed batch ['first', None, 'second']: every row equals its adapter run alone")

print(f"max |logit change| from the base: first {(first - base_logits).abs().max():.3f}, "
      f"second {(second - base_logits).abs().max():.3f}")
shutil.rmtree(directory)
