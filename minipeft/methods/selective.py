"""Selective fine-tuning: train whole transformer blocks, keep others frozen.

The oldest parameter-efficient recipe: freeze the lower blocks, which hold general features, and fine-tune
the upper ones (Howard & Ruder 2018, "Universal Language Model Fine-tuning", https://arxiv.org/abs/1801.06146,
gradual unfreezing; Lee et al. 2019, "What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning",
https://arxiv.org/abs/1911.03090, who find that training only the top quarter of the blocks keeps ~90 % of
full fine-tuning quality). Nothing is added to the model; chosen base parameters simply get
``requires_grad=True``::

    embeddings ─► block 0 ─► block 1 ─► ... ─► block L-1 ─► final norm ─► lm_head
      (opt.)      frozen    (freeze_layers)      trained     (default on)   (opt.)

- Trainable parameters: ``Σ params(block i) for i not in freeze_layers`` + the chosen extras: the final
  norm (``train_final_norm``, default on), the input embeddings (``train_embeddings``: token embeddings, and
  GPT-2's learned position embeddings ``wpe``), the output head (``train_lm_head``).
- GPT-2 small: one block holds 7,087,872 parameters (two LayerNorms 2·1,536, c_attn 1,771,776,
  attn c_proj 590,592, c_fc 2,362,368, mlp c_proj 2,360,064); freezing blocks 0-3 trains
  8 × 7,087,872 + 1,536 (ln_f) = **56,704,512** of 124,439,808 (45.57 %).
- Tied embeddings (GPT-2, SmolLM2): ``lm_head.weight`` *is* the input embedding, one tensor, so
  ``train_embeddings`` and ``train_lm_head`` must agree there; it is counted once.
- The trained weights are the base weights themselves: the adapter file holds the trained blocks in full,
  and there is nothing to merge (save the full model instead) and no separate adapter to switch off.
"""

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from minipeft.core.errors import UserError
from minipeft.core.inject import layer_index
from minipeft.core.layers import is_norm_layer, resolve_layer_indices, transformer_blocks
from minipeft.core.method import Method
from minipeft.core.options import flag_of, layers_option, option


@dataclass
class SelectiveConfig:
    """Which transformer blocks (and extras) to train; the others stay frozen.

    Args:
        freeze_layers: indices of the blocks to keep frozen (``--freeze_layers``); negative indices count
            from the top (-1 is the last block) and are resolved when applied. Every other block trains.
        train_embeddings: also train the input embeddings (``--train_embeddings``).
        train_final_norm: also train the norm after the last block (on unless ``--no_train_final_norm``).
        train_lm_head: also train the output head (``--train_lm_head``).
    """

    peft_type: ClassVar[str] = "SELECTIVE"

    freeze_layers: list = layers_option([], flag="--freeze_layers",
                                        help='blocks to freeze, e.g. "0,1,2,3", "0-5", "-1"')
    train_embeddings: bool = option(False, flag="--train_embeddings", help="also train the embeddings")
    train_final_norm: bool = option(True, flag="--no_train_final_norm", help="freeze the final norm")
    train_lm_head: bool = option(False, flag="--train_lm_head", help="also train the LM head")

    @classmethod
    def from_flags(cls, given: dict, model, tokenizer=None) -> "SelectiveConfig":
        """The config of the flags given: ``--freeze_layers`` is required on the command line (freezing nothing
        would be full fine-tuning of the blocks, rarely meant)."""
        if given.get("freeze_layers") is None:
            raise UserError(f'--modification_type selective needs {flag_of(cls, "freeze_layers")}, e.g. "0,1,2,3"')
        return cls(**given)

    def validate(self, name=str) -> None:
        """Check the settings; ``name(field)`` is how a message names one (the command line passes its flags)."""
        if not isinstance(self.freeze_layers, (list, tuple)) or not all(
                isinstance(index, int) and not isinstance(index, bool) for index in self.freeze_layers):
            raise UserError(f"{name('freeze_layers')} must be a list of block indices, got {self.freeze_layers!r}")


def unfreeze(module: nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(True)


def apply_selective(model: nn.Module, config: SelectiveConfig) -> None:
    """Unfreeze every transformer block except ``config.freeze_layers``, plus the chosen extras.

    ``config.freeze_layers`` is replaced by its resolved form (sorted, non-negative).

    Raises:
        UserError: for an out-of-range layer, or for embeddings and head that are one tied tensor but
            were asked to train differently.
    """
    config.validate()
    blocks = transformer_blocks(model)
    config.freeze_layers = resolve_layer_indices(config.freeze_layers, len(blocks), "--freeze_layers")
    input_embeddings, output_embeddings = model.get_input_embeddings(), model.get_output_embeddings()
    tied = output_embeddings is not None and output_embeddings.weight is input_embeddings.weight
    if tied and config.train_embeddings != config.train_lm_head:
        raise UserError(f"--train_embeddings/--train_lm_head: {type(model).__name__} ties lm_head.weight to "
                        "the input embedding (they are one tensor), so pass both flags or neither")
    for index, block in enumerate(blocks):
        if index not in config.freeze_layers:
            unfreeze(block)
    outside_blocks = [module for name, module in model.named_modules() if name and layer_index(name) is None]
    if config.train_embeddings:  # token embeddings, and learned position embeddings where there are some
        for module in outside_blocks:
            if isinstance(module, nn.Embedding):
                unfreeze(module)
    if config.train_final_norm:
        for module in outside_blocks:
            if is_norm_layer(module):
                unfreeze(module)
    if config.train_lm_head and output_embeddings is not None:
        unfreeze(output_embeddings)


def train_the_last_block(model) -> dict:
    """``compare``'s setting for selective, whose ``--freeze_layers`` has no default: freeze every block but
    the last (``"0-10"`` on a 12-block model; ``""`` on a one-block model)."""
    last = len(transformer_blocks(model)) - 1
    return {"freeze_layers": f"0-{last - 1}" if last >= 1 else ""}


METHOD = Method(
    name="selective", config_class=SelectiveConfig, apply=apply_selective, peft_type="SELECTIVE",
    mergeable=False, order=70,
    learning_rate=1e-4, learning_rate_source="full fine-tuning practice for small "
    "language models (1e-5 to 1e-4), at its top for short runs",
    why_not_mergeable="selective fine-tuning trains the base weights themselves; save the full model instead",
    why_not_on_4bit="selective trains base weights, and a 4-bit base is frozen",
    from_flags=SelectiveConfig.from_flags, compare_settings=train_the_last_block)
