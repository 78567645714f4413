"""LoRA: Low-Rank Adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

A frozen weight ``W`` (out × in) learns only a low-rank update ``ΔW = s · B A``::

        x ──────────────► W (frozen) ───────────────┐
        │                                           + ──► h = W x + s · B A x
        └──► dropout ──► A (r × in) ──► B (out × r) ┘    s = α / r   (rsLoRA: α / √r)

- ``A`` starts kaiming-uniform (a=√5, bound 1/√in) and ``B`` starts at zero, so ``B A = 0``: a fresh
  adapter leaves the model's outputs bit-identical, and training starts from the pretrained model.
- Parameters added per target layer: ``r · (in + out)``. GPT-2 small, r=8 on ``c_attn`` (768 → 2304):
  8 · (768 + 2304) = 24,576 per block, × 12 blocks = 294,912.
- GPT-2 stores its projections as ``transformers.pytorch_utils.Conv1D``, a linear layer whose weight is
  kept transposed, ``(in, out)``. We detect it (``fan_in_fan_out``) and transpose ``ΔW`` when merging;
  the forward pass is the same for both layer kinds because ``A`` and ``B`` are ordinary ``nn.Linear``.
- ``merge()`` adds ``ΔW`` into ``W`` so inference costs nothing extra; ``unmerge()`` restores the exact
  original weight (kept aside at merge time, because ``(W + ΔW) - ΔW`` is not ``W`` in floating point).
- Dropout drawn faster on a CPU (by the gaps between dropped entries, the same distribution) is an
  optimisation the training run switches on: :mod:`minipeft.fast.lora_dropout`.
- ``rank stabilised`` LoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) scales by ``α/√r`` so that
  larger ranks keep learning.
"""

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from minipeft.core.adapter_layer import AdapterLayer
from minipeft.core.bounds import check_rank
from minipeft.core.errors import UserError
from minipeft.core.finite import require_finite
from minipeft.core.inject import find_target_modules, replace_module, unfreeze_biases
from minipeft.core.layers import LINEAR_LAYERS, default_target_modules, layer_features
from minipeft.core.method import Method
from minipeft.core.options import layers_option, modules_to_save_option, option, target_modules_option

# What LoRA targets when the user names nothing (the attention projections; peft's defaults).
DEFAULT_TARGETS = {
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
}


@dataclass
class LoRAConfig:
    """LoRA settings; field names and meanings are peft's ``LoraConfig`` (see docs/peft_format.md).

    Args:
        r: rank of the update (``--lora_rank``).
        lora_alpha: scale numerator ``α`` (``--lora_alpha``); the update is multiplied by ``α / r``. The default
            is 16 for the API and the command line alike (peft's ``LoraConfig`` defaults to 8).
        lora_dropout: dropout on the LoRA branch's input only (0 means no dropout module at all).
        target_modules: names, suffixes (a list) or one regex (a string); None uses the model family's
            default (:data:`DEFAULT_TARGETS`).
        layers_to_transform: only the transformer blocks with these indices.
        layers_pattern: name of the block list when it is not one of ``h``, ``layers``, ``blocks``...
        bias: ``"none"`` (train no bias), ``"all"`` (every bias in the model) or ``"lora_only"`` (biases of
            the adapted layers).
        use_rslora: scale by ``α / √r`` instead of ``α / r``.
        modules_to_save: modules trained in full beside the adapter, e.g. ``["lm_head"]``.
        init_lora_weights: False starts B random too (a non-zero adapter, useful only for tests).
        fan_in_fan_out: set automatically: True when the targets are GPT-2 ``Conv1D`` layers.
        use_dora: see :mod:`minipeft.methods.dora` (weight-decomposed LoRA).
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = option(8, flag="--lora_rank", help="LoRA rank r")
    lora_alpha: float = option(16.0, flag="--lora_alpha", help="LoRA scale numerator alpha; update x alpha/r")
    lora_dropout: float = option(0.0, flag="--lora_dropout", help="dropout on the LoRA branch input")
    target_modules: object = target_modules_option()
    layers_to_transform: object = layers_option(None, flag="--layers_to_transform",
                                                help='only these blocks, e.g. "0-5,-1"')
    layers_pattern: object = None
    bias: str = option("none", flag="--lora_bias", choices=["none", "all", "lora_only"], help="which biases train")
    use_rslora: bool = option(False, flag="--use_rslora", help="scale by alpha/sqrt(r)")
    modules_to_save: object = modules_to_save_option()
    init_lora_weights: bool = True
    fan_in_fan_out: bool = False
    use_dora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def validate(self, name=str) -> None:
        """Check the settings; ``name(field)`` is how a message names one (the command line passes its flags)."""
        if not isinstance(self.r, int) or self.r <= 0:
            raise UserError(f"{name('r')} must be a positive integer, got {self.r!r}")
        require_finite(name("lora_alpha"), self.lora_alpha)
        require_finite(name("lora_dropout"), self.lora_dropout)
        if self.lora_alpha <= 0:
            raise UserError(f"{name('lora_alpha')} must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"{name('lora_dropout')} must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise UserError(f"{name('bias')} must be none, all or lora_only, got {self.bias!r}")
        if self.rank_pattern or self.alpha_pattern:
            raise UserError("rank_pattern/alpha_pattern (per-module ranks) are not supported by minipeft")

    def check_model(self, model: nn.Module, name=str) -> None:
        """``r`` against ``model``'s target layers, before any A or B is allocated (``r ≤ min(in, out)``)."""
        targets = self.target_modules if self.target_modules is not None else default_target_modules(
            model, DEFAULT_TARGETS)
        names = find_target_modules(model, targets, self.layers_to_transform, self.layers_pattern)
        check_rank(self.r, {target: model.get_submodule(target) for target in names}, name("r"))


class LoRALinear(AdapterLayer):
    """A frozen ``nn.Linear`` or ``Conv1D`` plus a trainable low-rank update (see the module docstring).

    Args:
        base_layer: the layer to adapt; kept as ``self.base_layer`` (its weight stays frozen).
        r: rank. alpha: scale numerator. dropout: dropout probability on the LoRA branch input.
        use_rslora: scale ``α/√r`` instead of ``α/r``. init_lora_weights: False makes B random as well.

    Shapes: ``x (..., in) -> (..., out)``; ``lora_A.weight (r, in)``, ``lora_B.weight (out, r)``.
    An :class:`~minipeft.core.adapter_layer.AdapterLayer`: ``lora_A`` and ``lora_B`` are what it adds.
    """

    mergeable = True

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, init_lora_weights: bool = True):
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = layer_features(base_layer)
        self.r = r
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        # Adapter weights are float32 even on a bf16 base: they are what the optimizer updates.
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, dtype=torch.float32, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, dtype=torch.float32, device=device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters(init_lora_weights)

    def reset_lora_parameters(self, init_lora_weights: bool = True) -> None:
        # A ~ kaiming-uniform(a=√5): bound 1/√in, what nn.Linear itself uses (A is stored (r, in)).
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init_lora_weights:
            nn.init.zeros_(self.lora_B.weight)  # B = 0  =>  ΔW = 0 at the start
        else:
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # W x: (..., out)
        if self.merged or not self.adapter_enabled:
            return result
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls cast (to bf16) themselves
            x = x.to(self.lora_A.weight.dtype)  # the adapter's float32, even on a bf16 base
        # (..., in) -> A -> (..., r) -> B -> (..., out); ΔW itself is never built
        return result + (self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = s · B A`` in the base layer's own layout: ``(out, in)``, or ``(in, out)`` for Conv1D."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, r) @ (r, in) -> (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self) -> torch.Tensor:
        """``W + ΔW`` in float32 (what :meth:`merge` writes into the base weight)."""
        return self.base_layer.weight.float() + self.delta_weight()

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, fan_in_fan_out={self.fan_in_fan_out}"


def apply_lora(model: nn.Module, config: LoRAConfig, layer_class=LoRALinear) -> None:
    """Replace every target layer of ``model`` with a ``layer_class`` (:class:`LoRALinear`; DoRA passes its own).

    The caller (:func:`minipeft.get_peft_model`) has frozen the model; the new A and B are trainable, and
    ``config.bias`` decides which biases are unfrozen. ``config.fan_in_fan_out`` is set from the layers.
    """
    config.validate()
    if config.target_modules is None:
        config.target_modules = default_target_modules(model, DEFAULT_TARGETS)
    names = find_target_modules(model, config.target_modules, config.layers_to_transform, config.layers_pattern)
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, LINEAR_LAYERS):
            raise UserError(f"--target_modules: {name} is a {type(layer).__name__}; LoRA adapts nn.Linear "
                            "and GPT-2's Conv1D layers only (or their 4-bit versions)")
        config.fan_in_fan_out = layer_features(layer)[2]
        replace_module(model, name, layer_class(layer, config.r, config.lora_alpha, config.lora_dropout,
                                                config.use_rslora, config.init_lora_weights))
    unfreeze_biases(model, names, config.bias)  # none, all, or the adapted layers' own


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA layer in ``model`` (in place)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora` exactly."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.unmerge()


METHOD = Method(
    name="lora", config_class=LoRAConfig, apply=apply_lora, peft_type="LORA", mergeable=True, order=10,
    learning_rate=1e-3, learning_rate_source="between the LoRA paper's 2e-4 (GPT-2, 5 epochs) and "
    "peft's causal-LM LoRA example's 3e-3 (20 epochs)",
    # peft reads a file without "lora_alpha" as alpha 8 (peft writes every key; a hand-written file may not),
    # and writes a whole alpha as 16, not 16.0
    file_defaults={"lora_alpha": 8}, whole_number_fields=("lora_alpha",),
    flag_values_not_on_4bit=(("--lora_bias", "all", "that trains every bias of the 4-bit base; "
                              "use --lora_bias none or lora_only"),))
