"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning",
https://arxiv.org/abs/2205.05638, section 3.3).

IA3 learns one scaling vector ``l`` per adapted layer and multiplies activations by it, elementwise::

    attention-side layer (keys, values; GPT-2's fused c_attn):  y = (W x + b) ⊙ l      l: (out,)
    feed-forward layer (GPT-2 mlp.c_proj, Llama down_proj):     y = W (x ⊙ l) + b      l: (in,)

- The paper rescales keys, values and the feed-forward's inner activation. On the feed-forward, scaling
  the *input* of the second projection is the same as scaling the output of the first one (after the
  nonlinearity), which is why those modules are listed as ``feedforward_modules``.
- ``l`` starts at ones, so a fresh adapter leaves the model's outputs bit-identical.
- Stored as peft stores it, a parameter named ``ia3_l`` (no ``.weight``): shape ``(out, 1)`` on an
  attention-side layer, ``(1, in)`` on a feed-forward layer.
- Parameters added: ``out`` per attention-side layer, ``in`` per feed-forward layer. GPT-2 small with the
  defaults (``c_attn`` 768 -> 2304, ``mlp.c_proj`` 3072 -> 768): (2,304 + 3,072) × 12 = 64,512 (0.052 %).
- Mergeable: a row or column scaling of ``W`` (and, on the attention side, of ``b``). ``unmerge()`` restores the
  copies kept at merge time, so it is exact (dividing by ``l`` again would not be).
"""

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from minipeft.core.adapter_layer import AdapterLayer
from minipeft.core.errors import UserError
from minipeft.core.inject import find_target_modules, module_matches, replace_module
from minipeft.core.layers import LINEAR_LAYERS, default_target_modules, layer_features
from minipeft.core.method import Method
from minipeft.core.options import module_names, modules_to_save_option, option, target_modules_option

# peft's defaults (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and ..._FEEDFORWARD_MODULES_MAPPING).
DEFAULT_TARGETS = {
    "gpt2": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],  # (peft's: q, not k, for these families)
    "qwen3": ["q_proj", "v_proj", "down_proj"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
}
DEFAULT_FEEDFORWARD = {
    "gpt2": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
}


@dataclass
class IA3Config:
    """IA3 settings; field names and meanings are peft's ``IA3Config``.

    Args:
        target_modules: layers to rescale (names, suffixes, or one regex string); None: the model family's
            default (:data:`DEFAULT_TARGETS`) (``--target_modules``).
        feedforward_modules: which targets scale their *input* instead of their output; must be among the
            targets when both are lists (``--feedforward_modules``). None: the family's default.
        fan_in_fan_out: set automatically: True for GPT-2 ``Conv1D`` targets.
        init_ia3_weights: True starts ``l`` at ones (identity); False starts it at 1 + 0.1·N(0, 1) (tests only).
        modules_to_save: modules trained in full beside the adapter, e.g. ``["lm_head"]``.
    """

    peft_type: ClassVar[str] = "IA3"

    target_modules: object = target_modules_option()
    feedforward_modules: object = option(None, flag="--feedforward_modules", parse=module_names,
                                         help="IA3 targets that scale their input (comma list; default: per model)")
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True
    modules_to_save: object = modules_to_save_option()

    def validate(self, name=str) -> None:
        """Check the settings; ``name(field)`` is how a message names one (the command line passes its flags)."""
        if isinstance(self.target_modules, (list, tuple, set)) and isinstance(self.feedforward_modules,
                                                                            (list, tuple, set)):
            outside = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if outside:
                raise UserError(f"{name('feedforward_modules')}: {', '.join(outside)} not among the target modules "
                                f"{sorted(self.target_modules)} ({name('target_modules')}, or the method's default "
                                "for the model); feed-forward modules must also be targets")

    def check_model(self, model: nn.Module, name=str) -> None:
        """The feed-forward modules against the targets ``model`` gets when none are named (its family's), before
        the model loads: the command line names the flags."""
        if self.target_modules is None and isinstance(self.feedforward_modules, (list, tuple, set)):
            replace(self, target_modules=default_target_modules(model, DEFAULT_TARGETS)).validate(name)


class IA3Linear(AdapterLayer):
    """A frozen ``nn.Linear`` or ``Conv1D`` whose output (or, on a feed-forward layer, input) is rescaled
    by a learned vector ``ia3_l`` (see the module docstring).

    Args:
        base_layer: the layer to adapt; kept as ``self.base_layer`` (frozen).
        is_feedforward: scale the input ``(1, in)`` instead of the output ``(out, 1)``.
        init_ia3_weights: start ``ia3_l`` at ones (identity) rather than random.

    Shapes: ``x (..., in) -> (..., out)``.
    """

    mergeable = True

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, init_ia3_weights: bool = True):
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = layer_features(base_layer)
        self.is_feedforward = is_feedforward
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)  # peft's shapes
        device = base_layer.weight.device
        if init_ia3_weights:
            initial = torch.ones(shape, device=device)  # identity
        else:
            initial = 1.0 + 0.1 * torch.randn(shape, device=device)  # a non-trivial adapter, for tests
        self.ia3_l = nn.Parameter(initial)  # float32, like every adapter weight here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.adapter_enabled:
            return self.base_layer(x)
        scaling = self.ia3_l.flatten()  # (in,) or (out,)
        if self.is_feedforward:
            return self.base_layer((x * scaling).to(x.dtype))  # W (x ⊙ l) + b
        result = self.base_layer(x)
        return (result * scaling).to(result.dtype)  # (W x + b) ⊙ l

    def merged_weight(self) -> torch.Tensor:
        """``W`` scaled by ``l`` in float32: its rows (keys, values) or its columns (feed-forward inputs)."""
        # ``ia3_l`` is (out, 1) or (1, in): it broadcasts over the (out, in) view of W. Conv1D stores W as
        # (in, out), so its scaling vector is transposed to match.
        scaling = self.ia3_l.T if self.fan_in_fan_out else self.ia3_l
        return self.base_layer.weight.float() * scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Scale ``W`` (and, on the output side, ``b``) by ``l``; the branch is skipped until :meth:`unmerge`."""
        if self.merged:
            return
        bias = self.base_layer.bias
        scales_bias = bias is not None and not self.is_feedforward
        self.bias_before_merge = bias.detach().clone() if scales_bias else None
        super().merge()  # W <- W ⊙ l, keeping W for unmerge
        if scales_bias:
            bias.copy_((bias.float() * self.ia3_l.flatten()).to(bias.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact pre-merge weight and bias."""
        if not self.merged:
            return
        if self.bias_before_merge is not None:
            self.base_layer.bias.copy_(self.bias_before_merge)
        del self.bias_before_merge
        super().unmerge()

    def extra_repr(self) -> str:
        return f"is_feedforward={self.is_feedforward}, fan_in_fan_out={self.fan_in_fan_out}"


def default_feedforward_modules(model: nn.Module, target_modules) -> list:
    """The family's feed-forward modules (peft's defaults), keeping only those among list targets."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_FEEDFORWARD:
        raise UserError(f"--feedforward_modules: no default for model type {model_type!r}; name the targets "
                        "whose input should be scaled (e.g. down_proj), or pass an empty list for none")
    defaults = DEFAULT_FEEDFORWARD[model_type]
    if isinstance(target_modules, str):  # a regex: which targets are feed-forward is decided per module
        return list(defaults)
    return [name for name in defaults if name in target_modules]


def apply_ia3(model: nn.Module, config: IA3Config) -> None:
    """Replace every target layer of ``model`` by an :class:`IA3Linear` (in place; only ``ia3_l`` trains).

    Fills in ``config.target_modules``/``feedforward_modules`` (family defaults) and ``fan_in_fan_out``.
    """
    config.validate()
    if config.target_modules is None:
        config.target_modules = default_target_modules(model, DEFAULT_TARGETS)
        config.validate()  # user-given feedforward_modules must be among the default targets too
    if config.feedforward_modules is None:
        config.feedforward_modules = default_feedforward_modules(model, config.target_modules)
    for name in find_target_modules(model, config.target_modules):
        layer = model.get_submodule(name)
        if not isinstance(layer, LINEAR_LAYERS):
            raise UserError(f"--target_modules: {name} is a {type(layer).__name__}; IA3 adapts nn.Linear "
                            "and GPT-2's Conv1D layers only (or their 4-bit versions)")
        config.fan_in_fan_out = layer_features(layer)[2]
        is_feedforward = module_matches(name, config.feedforward_modules)
        replace_module(model, name, IA3Linear(layer, is_feedforward, config.init_ia3_weights))


METHOD = Method(
    name="ia3", config_class=IA3Config, apply=apply_ia3, peft_type="IA3", mergeable=True, order=30,
    learning_rate=3e-3, learning_rate_source="Liu et al. 2022 (T-Few), the IA3 paper: 3e-3")
