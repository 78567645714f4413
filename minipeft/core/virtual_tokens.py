"""What prompt tuning and prefix tuning share: ``n`` virtual tokens placed before the real ones.

Both methods make the base model see ``n`` extra positions at the front of every row: prompt tuning as
input embeddings, prefix tuning as keys and values in every layer. The attention mask and the position ids
must then cover ``n + S`` positions (:func:`extend_mask_and_positions`), a KV cache that already holds the
virtual tokens must not get them again (:func:`is_continuing`), and a saved file holds the ``(n, d)`` table
under one name (:func:`load_prompt_embeddings`).

Neither method puts a layer into the model, so neither is an :class:`~minipeft.core.adapter_layer.AdapterLayer`.
Each keeps one module *beside* the frozen model, a :class:`PromptEncoder`, which rewrites the model's inputs
before every forward; :class:`~minipeft.PeftModel` holds it as ``prompt_encoder``.
"""

from typing import ClassVar

import torch
from torch import nn

from minipeft.core.errors import UserError


class PromptEncoder(nn.Module):
    """The contract of a prompt-learning method's module (prompt tuning's ``PromptEmbedding``, prefix
    tuning's ``PrefixEncoder``), the counterpart of :class:`~minipeft.core.adapter_layer.AdapterLayer`.

    Attributes:
        num_virtual_tokens: ``n``, the virtual tokens put before the real ones.
        adapter_enabled: False leaves the inputs alone (``disable_adapters``): the plain base model runs.
        in_sequence: class attribute: True when the virtual tokens are positions of the model's sequence, so
            its outputs (and logits) have ``n + T`` positions (prompt tuning); False when they live only in
            attention's keys and values and the outputs keep ``T`` positions (prefix tuning).

    A subclass provides :meth:`prepare_inputs` (the base model's keyword arguments for one forward),
    :meth:`peft_state_dict` and :meth:`load_peft_state_dict` (its tensors in peft's file layout). Every
    parameter of the module is the method's own: :meth:`adapter_parameters` is all of them.
    """

    in_sequence: ClassVar[bool]  # each subclass says which

    def __init__(self, num_virtual_tokens: int):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.adapter_enabled = True

    def positions_prepended(self) -> int:
        """How many positions come before the real tokens in the model's outputs: ``n`` for an enabled
        encoder whose virtual tokens are in the sequence (prompt tuning), else 0."""
        return self.num_virtual_tokens if self.adapter_enabled and self.in_sequence else 0

    def adapter_parameters(self) -> dict:
        """``{name: parameter}``: everything in the encoder (it is all added by the method)."""
        return dict(self.named_parameters())

    def prepare_inputs(self, base_model: nn.Module, **inputs) -> dict:
        """The keyword arguments for ``base_model(**kwargs)``, with the virtual tokens in place."""
        raise NotImplementedError

    def peft_state_dict(self) -> dict:
        """``{"prompt_embeddings": (n, width)}``: what peft's files hold for this method."""
        raise NotImplementedError

    def load_peft_state_dict(self, state: dict, source: str = "adapter_model.safetensors") -> None:
        """Copy a file's ``prompt_embeddings`` in; a :class:`UserError` naming ``source`` when it does not fit."""
        raise NotImplementedError


def extend_mask_and_positions(num_virtual_tokens: int, attention_mask: torch.Tensor, position_ids,
                              query_length: int):
    """The attention mask and position ids the base model needs when ``n`` virtual tokens come first.

    Args:
        attention_mask: ``(B, S)``, 1 for real tokens, covering the real tokens already in the KV cache plus
            the ones in this forward.
        position_ids: ``(B, q)`` positions of this forward's real tokens counted from 0, or None to derive
            them from the mask (left padding then leaves every real token where it would be unpadded).
        query_length: how many of the last positions this forward computes (new virtual + real tokens).

    Returns:
        ``(mask (B, n + S), positions (B, query_length))``: n ones in front of the mask; the virtual tokens
        take positions ``0 … n-1`` and the k-th real token of a row takes ``n + k``.
    """
    batch_size = attention_mask.shape[0]
    full_mask = torch.cat([attention_mask.new_ones(batch_size, num_virtual_tokens), attention_mask], dim=1)
    if position_ids is None:
        # Position = number of unmasked tokens before this one; padding gets 0 (it is masked anyway).
        positions = (full_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, n + S)
        return full_mask, positions[:, -query_length:]
    real_positions = position_ids.to(full_mask.device).expand(batch_size, -1)
    if ((real_positions == 0) & attention_mask[:, -real_positions.shape[1]:].bool()).sum(-1).max() > 1:
        raise UserError("position_ids: packed batches (several sequences in one row) cannot be used with prompt "
                        "or prefix tuning: the virtual tokens come once per row, before its first sequence only; "
                        "turn packing off")
    virtual_positions = torch.arange(num_virtual_tokens, device=full_mask.device).expand(batch_size, -1)
    positions = torch.cat([virtual_positions, real_positions + num_virtual_tokens], dim=1)
    return full_mask, positions[:, -query_length:]


def is_continuing(cache) -> bool:
    """True when a KV cache from an earlier forward is given: the virtual tokens are already in it."""
    return cache is not None and cache.get_seq_length() > 0


def load_prompt_embeddings(weight: torch.Tensor, state: dict, source: str) -> None:
    """Copy ``state["prompt_embeddings"]`` into ``weight``; the only tensor a prompt-learning file holds."""
    for key in state:
        if key != "prompt_embeddings":
            raise UserError(f"{source}: tensor {key} has no place in a prompt-learning adapter "
                            "(it holds only prompt_embeddings)")
    if "prompt_embeddings" not in state:
        raise UserError(f"{source}: tensor prompt_embeddings is missing")
    tensor = state["prompt_embeddings"]
    if tuple(tensor.shape) != tuple(weight.shape):
        raise UserError(f"{source}: tensor prompt_embeddings has shape {list(tensor.shape)}, this model expects "
                        f"{list(weight.shape)} (was the adapter trained on another model or with another "
                        "number of virtual tokens?)")
    with torch.no_grad():
        weight.copy_(tensor.to(weight.dtype))
