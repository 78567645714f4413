"""Several LoRA adapters at once: one per batch row (:class:`MultiLoRALinear`), or folded into one adapter
(:func:`combine_lora_weights`). The math of :class:`~minipeft.inference.multi_adapter.MultiAdapterModel`'s
mixed batches and ``add_weighted_adapter``, apart from its bookkeeping.

Mixed batches: for the duration of a call every adapted module is replaced by a :class:`MultiLoRALinear`,
which stacks the LoRA matrices of the adapters in the batch, ``A (n, r_max, in)`` and ``B (n, out, r_max)``,
and gathers one pair per row with an index tensor: ``h_b = W x_b + B[slot_b] A[slot_b] x_b``. That is one
batched matmul however many adapters the batch holds (the idea behind S-LoRA / Punica's batched kernels,
written plainly). Only the LoRA family (LoRA, rsLoRA, DoRA) can do this: their update is a per-layer linear
map that a row can pick.
"""

import math

import torch
from torch import nn

from minipeft.core.errors import UserError
from minipeft.core.layers import layer_features
from minipeft.methods.dora import DoRALinear

COMBINATION_TYPES = ("linear", "cat", "svd")


class MultiLoRALinear(nn.Module):
    """A base layer plus one LoRA (or DoRA) update *per batch row*, picked from stacked adapters.

    Args:
        base_layer: the frozen ``nn.Linear`` or ``Conv1D``.
        lora_layers: one entry per slot: a :class:`LoRALinear`/``DoRALinear`` wrapping ``base_layer``, or
            None where that slot's adapter does not adapt this module (its update is zero).
        row_slots: ``(B,)`` the slot of each batch row.

    Buffers (inference only, no gradient):
        ``lora_A (n, r_max, in)`` and ``lora_B (n, out, r_max)``, with each slot's scaling ``s`` folded into
        its B. Ranks differ between adapters, so each slot is **zero-padded** to ``r_max``: the padded rows
        of A give hidden units that are exactly 0, and the padded columns of B are 0, so
        ``B_pad A_pad = B A`` exactly; a row pays ``r_max`` instead of its own ``r`` in compute.
        ``magnitude_scale (n, out)``: DoRA's ``m / ‖W + s·B A‖_c`` per slot (1 for LoRA slots), or None
        when no slot is DoRA.

    Forward, for row b with slot k = row_slots[b]::

        h_b = W x_b + b + B[k] A[k] x_b                              (LoRA)
        h_b = W x_b + b + (scale[k] - 1) · W x_b + scale[k] · B[k] A[k] x_b   (DoRA; see minipeft.methods.dora)

    Shapes: ``x (B, T, in) -> (B, T, out)``. Dropout is not applied (this layer is for inference).
    """

    def __init__(self, base_layer: nn.Module, lora_layers: list, row_slots: torch.Tensor):
        super().__init__()
        self.base_layer = base_layer
        in_features, out_features, _ = layer_features(base_layer)
        real_layers = [layer for layer in lora_layers if layer is not None]
        max_rank = max(layer.r for layer in real_layers)
        device = base_layer.weight.device
        lora_a = torch.zeros(len(lora_layers), max_rank, in_features, device=device)  # (n, r_max, in)
        lora_b = torch.zeros(len(lora_layers), out_features, max_rank, device=device)  # (n, out, r_max)
        has_dora = any(isinstance(layer, DoRALinear) for layer in real_layers)
        magnitude_scale = torch.ones(len(lora_layers), out_features, device=device) if has_dora else None
        with torch.no_grad():
            for slot, layer in enumerate(lora_layers):
                if layer is None:
                    continue
                lora_a[slot, :layer.r] = layer.lora_A.weight
                lora_b[slot, :, :layer.r] = layer.lora_B.weight * layer.scaling
                if isinstance(layer, DoRALinear):
                    magnitude_scale[slot] = layer.lora_magnitude_vector / layer.weight_norm()
        self.register_buffer("lora_A", lora_a, persistent=False)
        self.register_buffer("lora_B", lora_b, persistent=False)
        self.register_buffer("magnitude_scale", magnitude_scale, persistent=False)
        self.register_buffer("row_slots", row_slots, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (B, T, out)
        if x.shape[0] != self.row_slots.shape[0]:
            raise UserError(f"mixed-adapter batch: {x.shape[0]} rows but {self.row_slots.shape[0]} adapter names")
        lora_a = self.lora_A[self.row_slots]  # (n, r, in) gathered -> (B, r, in)
        lora_b = self.lora_B[self.row_slots]  # (B, out, r)
        hidden = torch.bmm(x.to(lora_a.dtype), lora_a.transpose(1, 2))  # (B, T, in) @ (B, in, r) -> (B, T, r)
        lora_output = torch.bmm(hidden, lora_b.transpose(1, 2))  # (B, T, r) @ (B, r, out) -> (B, T, out)
        if self.magnitude_scale is None:
            return result + lora_output.to(result.dtype)
        scale = self.magnitude_scale[self.row_slots][:, None, :]  # (B, 1, out)
        bias = self.base_layer.bias
        weight_times_input = result.to(lora_output.dtype) - (bias if bias is not None else 0)  # W x, (B, T, out)
        update = (scale - 1) * weight_times_input + scale * lora_output
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        slots, rank, in_features = self.lora_A.shape
        return f"slots={slots}, r_max={rank}, in_features={in_features}, out_features={self.lora_B.shape[1]}"


def combine_lora_weights(factors: list, weights: list, combination_type: str, rank: int):
    """Combine LoRA factors ``(A_i (r_i, in), B_i (out, r_i), s_i)`` into one ``(A (r, in), B (out, r))``
    to be used with scaling 1. Computed in float32. With ``ΔW_i = s_i B_i A_i``:

    - ``"cat"``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]`` (rows stacked), ``B = [B_1, B_2, ...]`` (columns),
      so ``B A = Σ w_i s_i B_i A_i = Σ w_i ΔW_i`` **exactly**; rank ``Σ r_i``.
    - ``"svd"``: ``ΔW = Σ w_i ΔW_i`` built in full ``(out, in)``, then its best rank-``rank`` approximation
      (Eckart–Young): ``U S Vᵀ`` truncated, ``B = U_r S_r``, ``A = V_rᵀ``. Exact when ``rank ≥ Σ r_i``.
    - ``"linear"`` (peft's definition, equal ranks only): ``A = Σ sign(w_i)·√|w_i s_i|·A_i`` and
      ``B = Σ √|w_i s_i|·B_i``. This is **not** ``Σ w_i ΔW_i``: the product has cross terms,
      ``B A = Σ_i w_i ΔW_i + Σ_{i≠j} √|w_i s_i| sign(w_j) √|w_j s_j| B_i A_j``, because ``B_i`` meets
      ``A_j`` of another adapter. It is cheap (rank r, no SVD) but only a rough mix; with one adapter it is
      exact. Use ``"cat"`` or ``"svd"`` when the sum itself is what you want.

    Returns ``(A, B)``; for ``"cat"`` the rank may be below ``rank`` when some adapters do not adapt this
    module (the caller pads with zeros).
    """
    lora_as = [lora_a.detach().float() for lora_a, _, _ in factors]
    lora_bs = [lora_b.detach().float() for _, lora_b, _ in factors]
    scaled_weights = [weight * scaling for weight, (_, _, scaling) in zip(weights, factors)]  # w_i s_i
    if combination_type == "cat":
        lora_a = torch.cat([ws * a for ws, a in zip(scaled_weights, lora_as)], dim=0)  # (Σ r_i, in)
        return lora_a, torch.cat(lora_bs, dim=1)  # (out, Σ r_i)
    if combination_type == "linear":
        lora_a = sum(math.copysign(math.sqrt(abs(ws)), ws) * a for ws, a in zip(scaled_weights, lora_as))  # (r, in)
        lora_b = sum(math.sqrt(abs(ws)) * b for ws, b in zip(scaled_weights, lora_bs))  # (out, r)
        return lora_a, lora_b
    if combination_type == "svd":
        delta = sum(ws * (b @ a) for ws, a, b in zip(scaled_weights, lora_as, lora_bs))  # (out, in)
        if rank > min(delta.shape):
            raise UserError(f"svd_rank {rank} exceeds the smaller side of a {tuple(delta.shape)} weight")
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # (out, k), (k,), (k, in)
        return vh[:rank], u[:, :rank] * s[:rank]  # A (rank, in), B (out, rank)
    raise UserError(f"combination_type must be one of {', '.join(COMBINATION_TYPES)}, got {combination_type!r}")
