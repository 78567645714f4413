"""Bottleneck adapters: small residual MLPs inserted into every transformer block.

Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP" (https://arxiv.org/abs/1902.00751),
put one adapter after the attention output projection and one after the feed-forward, each *before* the
block's residual add (their figure 2). Pfeiffer et al. 2020, "AdapterFusion"
(https://arxiv.org/abs/2005.00247), found that one adapter after the feed-forward alone is about as good
and half the cost::

    out = proj(x)                         # attention o_proj / c_proj, or the MLP's down_proj / c_proj
      │
      ├───────────────────────────────┐
      ▼                               │
    down (d -> m) ─► act ─► up (m -> d)   │
      │                               │
      └────────────► + ◄──────────────┘
                     ▼
    h = out + up(act(down(out)))      # then dropout and the block's own residual add, unchanged

- ``up`` starts at zero (weight and bias), so ``h = out`` and a fresh adapter leaves the model's outputs
  bit-identical; ``down`` starts like an ``nn.Linear`` (kaiming-uniform). Houlsby et al. start near identity for
  the same reason.
- Parameters per adapter: ``2·d·m + d + m`` (down weight ``m·d`` + bias ``m``, up weight ``d·m`` + bias
  ``d``). GPT-2 small, Houlsby, m = 64, d = 768: 99,136 per adapter × 24 adapters (2 per block × 12) =
  2,379,264, which is 1.8761 % of the 126,819,072 parameters of the adapted model (the share minipeft prints and
  the README shows; 1.91 % of the 124,439,808 of the base alone); Pfeiffer: 12 × 99,136 = 1,189,632.
- ``train_layernorms`` also trains the norms *inside the blocks* (GPT-2 ``ln_1``/``ln_2``, LayerNorm weight and
  bias; Llama ``input_layernorm``/``post_attention_layernorm``, RMSNorm weight), as Houlsby did; not the
  final norm. GPT-2 small: + 12 × 2 × 1,536 = 36,864.
- Not mergeable: the nonlinearity between ``down`` and ``up`` means the adapter is no change of any weight.

The adapter wraps the projection module (:class:`ProjectionWithAdapter`), so no model source is edited and
the block's own dropout and residual add stay where they were.
"""

import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from minipeft.core.adapter_layer import AdapterLayer
from minipeft.core.bounds import check_allocation
from minipeft.core.errors import UserError
from minipeft.core.finite import require_finite
from minipeft.core.layers import is_norm_layer
from minipeft.core.inject import find_target_modules, layer_index, replace_module
from minipeft.core.layers import LINEAR_LAYERS, default_target_modules, layer_features
from minipeft.core.method import Method
from minipeft.core.options import modules_to_save_option, option, target_modules_option

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

# Where adapters go when the user names nothing: the attention output projection and the MLP's output
# projection (Houlsby), or the MLP's alone (Pfeiffer).
HOULSBY_TARGETS = {
    "gpt2": ["attn.c_proj", "mlp.c_proj"],
    "llama": ["self_attn.o_proj", "mlp.down_proj"],
    "mistral": ["self_attn.o_proj", "mlp.down_proj"],
    "qwen2": ["self_attn.o_proj", "mlp.down_proj"],
    "qwen3": ["self_attn.o_proj", "mlp.down_proj"],
    "gemma": ["self_attn.o_proj", "mlp.down_proj"],
    "gemma2": ["self_attn.o_proj", "mlp.down_proj"],
}
PFEIFFER_TARGETS = {
    "gpt2": ["mlp.c_proj"],
    "llama": ["mlp.down_proj"],
    "mistral": ["mlp.down_proj"],
    "qwen2": ["mlp.down_proj"],
    "qwen3": ["mlp.down_proj"],
    "gemma": ["mlp.down_proj"],
    "gemma2": ["mlp.down_proj"],
}


@dataclass
class AdapterConfig:
    """Bottleneck adapter settings (peft has no such method; ``peft_type`` is minipeft's own).

    Args:
        adapter_type: ``"houlsby"`` (after attention and after the MLP) or ``"pfeiffer"`` (after the MLP
            only) (``--adapter_type``).
        bottleneck_size: ``m``, the adapter's hidden width (``--adapter_size``).
        reduction_factor: alternatively ``m = d // reduction_factor`` (``--adapter_reduction_factor``);
            give exactly one of the two (set ``bottleneck_size=None`` to use a factor).
        activation: nonlinearity between down and up: relu, gelu, silu or tanh (``--adapter_activation``).
        target_modules: the projections to wrap; None: the family's default for ``adapter_type``.
        train_layernorms: also train the norms inside the blocks (``--adapter_train_layernorms``).
        modules_to_save: modules trained in full beside the adapter, e.g. ``["lm_head"]``.
    """

    peft_type: ClassVar[str] = "BOTTLENECK_ADAPTER"

    adapter_type: str = option("houlsby", flag="--adapter_type", choices=["houlsby", "pfeiffer"], help="placement")
    bottleneck_size: int | None = option(64, flag="--adapter_size", help="bottleneck size m")
    reduction_factor: float | None = option(None, flag="--adapter_reduction_factor",
                                            help="bottleneck m = hidden / factor (instead of --adapter_size)")
    activation: str = option("relu", flag="--adapter_activation", choices=list(ACTIVATIONS),
                             help="nonlinearity between down and up")
    target_modules: object = target_modules_option()
    train_layernorms: bool = option(False, flag="--adapter_train_layernorms", help="also train block norms")
    modules_to_save: object = modules_to_save_option()

    @classmethod
    def from_flags(cls, given: dict, model=None, tokenizer=None) -> "AdapterConfig":
        """The config of the flags given: a reduction factor without a size replaces the default size."""
        if given.get("reduction_factor") is not None and given.get("bottleneck_size") is None:
            given = {**given, "bottleneck_size": None}
        return cls(**given)

    def validate(self, name=str) -> None:
        """Check the settings; ``name(field)`` is how a message names one (the command line passes its flags)."""
        if self.adapter_type not in ("houlsby", "pfeiffer"):
            raise UserError(f"{name('adapter_type')} must be houlsby or pfeiffer, got {self.adapter_type!r}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"{name('activation')} must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if (self.bottleneck_size is None) == (self.reduction_factor is None):
            raise UserError(f"{name('bottleneck_size')} and {name('reduction_factor')}: give exactly one of the two "
                            f"(got {self.bottleneck_size!r} and {self.reduction_factor!r})")
        if self.bottleneck_size is not None and (not isinstance(self.bottleneck_size, int)
                                                 or self.bottleneck_size <= 0):
            raise UserError(f"{name('bottleneck_size')} must be a positive integer, got {self.bottleneck_size!r}")
        if self.reduction_factor is not None:
            require_finite(name("reduction_factor"), self.reduction_factor)
        if self.reduction_factor is not None and not self.reduction_factor > 0:
            raise UserError(f"{name('reduction_factor')} must be positive, got {self.reduction_factor!r}")

    def check_model(self, model: nn.Module, name=str) -> None:
        """The adapters' weights, ``2·d·m`` floats each (one or two per block), against this machine's memory
        before they are allocated: ``--adapter_size 1000000000`` asked the allocator for 640 GB."""
        if self.bottleneck_size is None:  # a reduction factor keeps m at most d
            return
        config = model.config.get_text_config()
        count = config.num_hidden_layers * (2 if self.adapter_type == "houlsby" else 1)
        check_allocation(4 * 2 * config.hidden_size * self.bottleneck_size * count,
                         f"{name('bottleneck_size')} {self.bottleneck_size}",
                         f"{count} bottleneck adapters (float32, {config.hidden_size} x {self.bottleneck_size}, twice)")

    def bottleneck_for(self, hidden_size: int) -> int:
        """``m`` for a projection of width ``hidden_size``."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        size = int(hidden_size // self.reduction_factor)
        if size < 1:
            raise UserError(f"--adapter_reduction_factor {self.reduction_factor} leaves no bottleneck for "
                            f"width {hidden_size}; use a factor of at most {hidden_size}")
        return size


class BottleneckAdapter(nn.Module):
    """``h = out + up(act(down(out)))`` on a ``(..., d)`` tensor; ``up`` starts at zero (identity).

    Args:
        hidden_size: ``d``. bottleneck_size: ``m``. activation: a key of :data:`ACTIVATIONS`.

    Shapes: ``(..., d) -> (..., m) -> (..., d)``. Parameters: ``2·d·m + d + m``.
    """

    def __init__(self, hidden_size: int, bottleneck_size: int, activation: str = "relu"):
        super().__init__()
        # float32 even on a bf16 base: these are the weights the optimizer updates.
        self.down = nn.Linear(hidden_size, bottleneck_size, dtype=torch.float32)
        self.activation = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck_size, hidden_size, dtype=torch.float32)
        nn.init.zeros_(self.up.weight)  # up = 0  =>  h = out at the start
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        residual = self.up(self.activation(self.down(hidden.to(self.down.weight.dtype))))  # (..., d)
        return hidden + residual.to(hidden.dtype)


class ProjectionWithAdapter(AdapterLayer):
    """A frozen projection (``nn.Linear`` or ``Conv1D``) followed by a :class:`BottleneckAdapter`.

    ``adapter_enabled = False`` gives back the projection's plain output. Not mergeable (the adapter's
    nonlinearity is no change of a weight): :meth:`merge` refuses.
    """

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter):
        super().__init__(base_layer)
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., d)
        return self.adapter(out) if self.adapter_enabled else out


def apply_adapters(model: nn.Module, config: AdapterConfig) -> None:
    """Wrap every target projection of ``model`` in a :class:`ProjectionWithAdapter` (in place).

    Fills in ``config.target_modules`` (family default for ``adapter_type``) when it is None.
    """
    config.validate()
    if config.target_modules is None:
        defaults = HOULSBY_TARGETS if config.adapter_type == "houlsby" else PFEIFFER_TARGETS
        config.target_modules = default_target_modules(model, defaults)
    for name in find_target_modules(model, config.target_modules):
        layer = model.get_submodule(name)
        if not isinstance(layer, LINEAR_LAYERS):
            raise UserError(f"--target_modules: {name} is a {type(layer).__name__}; bottleneck adapters wrap "
                            "nn.Linear and GPT-2's Conv1D output projections only (or their 4-bit versions)")
        _, hidden_size, _ = layer_features(layer)
        adapter = BottleneckAdapter(hidden_size, config.bottleneck_for(hidden_size), config.activation)
        # the adapter reads only the projection's output, never its weight: a 4-bit (QLoRA) base works as is
        device = next(itertools.chain(layer.parameters(), layer.buffers())).device  # a 4-bit one has buffers
        replace_module(model, name, ProjectionWithAdapter(layer, adapter.to(device)))
    if config.train_layernorms:
        for name, module in model.named_modules():
            if layer_index(name) is not None and is_norm_layer(module):
                for parameter in module.parameters():
                    parameter.requires_grad_(True)


METHOD = Method(
    from_flags=AdapterConfig.from_flags,
    name="adapter", config_class=AdapterConfig, apply=apply_adapters, peft_type="BOTTLENECK_ADAPTER",
    mergeable=False, order=40,
    learning_rate=1e-3, learning_rate_source="Houlsby et al. 2019, inside their sweep {3e-5, 3e-4, 3e-3}",
    why_not_mergeable="a bottleneck adapter has a nonlinearity between its "
    "down and up projections, so it is not a change of any existing weight")
