"""LoRA on one GPT-2 layer, by hand, then checked against minipeft's LoRALinear.

    python examples/01_lora_by_hand.py

The layer is the first block's fused q/k/v projection (``c_attn``) of the built-in GPT-2. GPT-2 stores it as
a ``Conv1D``: ``y = x @ W + b`` with ``W`` of shape ``(in, out)``, the transpose of ``nn.Linear``'s.
See docs/methods/lora.md for the why of every step.
"""

import math

import torch
from torch import nn

from minipeft import LoRALinear, load_model_and_tokenizer

torch.manual_seed(0)
model, tokenizer = load_model_and_tokenizer("builtin")
layer = model.transformer.h[0].attn.c_attn
W, b = layer.weight.detach().clone(), layer.bias.detach()  # W (in, out), b (out,); W kept aside
d_in, d_out = W.shape
r, alpha = 4, 8
s = alpha / r                                               # the LoRA scale
print(f"c_attn: W {tuple(W.shape)} (in, out), rank r = {r}, scale s = alpha / r = {s}")

# 1) The two trainable matrices. A (r, in) starts like nn.Linear's weight, B (out, r) starts at zero.
A = torch.empty(r, d_in)
nn.init.kaiming_uniform_(A, a=math.sqrt(5))                 # uniform in ±1/√in
B = torch.zeros(d_out, r)

# 2) The forward pass, by hand: h = x W + b + s · (x Aᵀ) Bᵀ.  (B, T, in) -> (B, T, r) -> (B, T, out)
ids = tokenizer("The capital of France is Paris.", return_tensors="pt")["input_ids"]
x = model.transformer.wte(ids).detach()                    # (1, T, in): some real activations


def lora_forward(x):
    return x @ W + b + s * (x @ A.T) @ B.T


assert torch.equal(lora_forward(x), x @ W + b)              # adding s · 0 changes no bit
assert torch.allclose(x @ W + b, layer(x), atol=1e-5)        # ... and x W + b is what Conv1D computes
print("B = 0: the adapted layer computes exactly what the original does")

# 3) Pretend training moved B. Now the layer's output changes by s · (x Aᵀ) Bᵀ.
B = 0.01 * torch.randn(d_out, r)
change = (lora_forward(x) - layer(x)).abs().max().item()
print(f"after 'training' B: max change of the output {change:.4f}")
assert change > 0

# 4) minipeft's LoRALinear with the same A and B gives the same output.
lora = LoRALinear(layer, r=r, alpha=alpha)
with torch.no_grad():
    lora.lora_A.weight.copy_(A)
    lora.lora_B.weight.copy_(B)
assert torch.allclose(lora(x), lora_forward(x), atol=1e-5)
print("LoRALinear(x) == x W + b + s (x Aᵀ) Bᵀ")

# 5) The merged weight. ΔW = s · B A is (out, in); Conv1D keeps (in, out), so it is added transposed.
delta = s * (B @ A)                                          # (out, r) @ (r, in) -> (out, in)
W_merged = W + delta.T                                       # (in, out)
assert torch.linalg.matrix_rank(delta) == r                  # a rank-r change of a 160 x 480 matrix
assert torch.allclose(x @ W_merged + b, lora_forward(x), atol=1e-5)
print(f"merged: x (W + ΔWᵀ) + b gives the same output; rank of ΔW = {r}")
lora.merge()                                                 # minipeft does the same, in place
assert torch.allclose(layer.weight, W_merged, atol=1e-6)
lora.unmerge()                                               # and restores the exact original
assert torch.equal(layer.weight, W)
print("LoRALinear.merge() builds the same W + ΔWᵀ; unmerge() restores W bit for bit")

# 6) What it costs: r · (in + out) trained numbers instead of in · out.
lora_params = sum(p.numel() for p in (lora.lora_A.weight, lora.lora_B.weight))
assert lora_params == r * (d_in + d_out)
print(f"parameters: LoRA {lora_params:,} = {r} · ({d_in} + {d_out}), full layer {d_in * d_out:,} "
      f"({100 * lora_params / (d_in * d_out):.1f}%)")
