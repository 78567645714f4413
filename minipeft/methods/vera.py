"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al. 2024, https://arxiv.org/abs/2310.11454).

LoRA trains a pair of matrices per layer. VeRA freezes *one* random pair, shared by every adapted layer,
and trains only two vectors per layer that rescale it::

        x ──────────────► W (frozen) ──────────────────────────────────────────┐
        │                                                                      + ──► h = W x + Λ_b B Λ_d A x
        └──► dropout ──► A (r × in) ──► ⊙ λ_d (r) ──► B (out × r) ──► ⊙ λ_b (out) ┘
                         └─ frozen, shared ─┘            └─ frozen, shared ─┘

- ``Λ_d = diag(λ_d)`` and ``Λ_b = diag(λ_b)``: the trained vectors scale A's rows and B's rows. ``λ_b``
  starts at zero, so a fresh adapter leaves the model's outputs bit-identical (the role LoRA's zero ``B``
  plays); ``λ_d`` starts at ``d_initial`` (0.1; the paper's Table 6c: small values work best).
- ``A`` and ``B`` are drawn once, kaiming-uniform (bound ``√(6 / fan_in)``: ``√(6/in)`` for A, ``√(6/r)`` for
  B) from a ``torch.Generator`` seeded with ``projection_prng_key``, exactly as peft draws them, and shaped
  to the *largest* in and out among the targets; a layer uses the top-left corner it needs:
  ``A[:, :in]`` ``(r, in)`` and ``B[:out, :]`` ``(out, r)``.
- Parameters added per target layer: ``r + out`` (``λ_d`` and ``λ_b``). GPT-2 small, r=256 on ``c_attn``
  (768 → 2304): 256 + 2304 = 2,560 per block, × 12 blocks = 30,720 (LoRA r=8 on the same layers: 294,912).
  The frozen ``A`` (256 × 768) and ``B`` (2304 × 256) are buffers, not parameters: 786,432 numbers that
  the adapter file stores once (``save_projection=True``) or that are redrawn from the seed.
- Mergeable: ``ΔW = Λ_b B Λ_d A`` is a plain ``(out, in)`` matrix (transposed for GPT-2's ``Conv1D``).
  ``unmerge()`` restores a copy of ``W`` kept at merge time, so it is exact.

Files (peft's layout): per layer ``base_model.model.<path>.vera_lambda_b`` ``(out,)`` and ``...vera_lambda_d``
``(r,)``; the shared pair once, as ``base_model.vera_A`` ``(r, max in)`` and ``base_model.vera_B``
``(max out, r)`` (:func:`save_projections`, :func:`load_projections`).
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from minipeft.core.adapter_layer import AdapterLayer
from minipeft.core.bounds import check_allocation
from minipeft.core.errors import UserError
from minipeft.core.finite import require_finite
from minipeft.core.inject import find_target_modules, replace_module, unfreeze_biases
from minipeft.core.layers import LINEAR_LAYERS, default_target_modules, layer_features
from minipeft.core.method import Method
from minipeft.core.options import layers_option, modules_to_save_option, option, target_modules_option

# What VeRA targets when the user names nothing: peft's TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING
# (LoRA's table plus phi).
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
    "phi": ["q_proj", "v_proj"],
}
# Where the shared pair lives in an adapter file (peft's names; not a path inside the base model).
PROJECTION_KEYS = {"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"}


def prng_key(text: str) -> int:
    """``--projection_prng_key 7`` -> 7 (the flag's text as an integer seed)."""
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--projection_prng_key must be an integer seed, got {text!r}") from None


@dataclass
class VeraConfig:
    """VeRA settings; field names, meanings and defaults are peft's ``VeraConfig``.

    Args:
        r: rank, the width of the shared ``A`` and ``B`` (``--vera_rank``); VeRA's parameters grow only by
            ``r`` per layer, so it uses ranks far above LoRA's (peft's default 256; the paper up to 1024).
        target_modules: names, suffixes (a list) or one regex (a string); None uses the model family's
            default (:data:`DEFAULT_TARGETS`).
        projection_prng_key: the seed of the generator that draws ``A`` and ``B`` (``--projection_prng_key``).
            Typed ``object``, not ``int``: adapter files check every ``int`` field as a size (≥ 1), and a seed
            may be 0 (peft's default); :meth:`validate` checks that it is an integer.
        save_projection: store ``A`` and ``B`` in the adapter file (peft's default); False
            (``--no_save_projection``) saves only the vectors and redraws the pair from the seed when loading:
            smaller, but it trusts torch's generator to draw the same numbers on every machine and version.
        vera_dropout: dropout on the VeRA branch's input only (``--vera_dropout``).
        d_initial: the starting value of every ``λ_d`` entry (``--vera_d_initial``).
        fan_in_fan_out: set automatically: True when the targets are GPT-2 ``Conv1D`` layers.
        bias: ``"none"``, ``"all"`` (every bias in the model) or ``"vera_only"`` (biases of the adapted layers).
        modules_to_save: modules trained in full beside the adapter, e.g. ``["lm_head"]``.
        init_weights: False starts ``λ_b`` at ones and ``λ_d`` random (a non-zero adapter, for tests).
        layers_to_transform: only the transformer blocks with these indices.
        layers_pattern: name of the block list when it is not one of ``h``, ``layers``, ``blocks``...
    """

    peft_type: ClassVar[str] = "VERA"

    r: int = option(256, flag="--vera_rank", help="VeRA rank r: the width of the shared random A and B")
    target_modules: object = target_modules_option()
    projection_prng_key: object = option(0, flag="--projection_prng_key", parse=prng_key,
                                         help="VeRA: the seed that draws the shared random A and B")
    save_projection: bool = option(True, flag="--no_save_projection",
                                   help="VeRA: leave A and B out of the adapter file (redrawn from the seed)")
    vera_dropout: float = option(0.0, flag="--vera_dropout", help="dropout on the VeRA branch input")
    d_initial: float = option(0.1, flag="--vera_d_initial", help="starting value of every lambda_d entry")
    fan_in_fan_out: bool = False
    bias: str = option("none", flag="--vera_bias", choices=["none", "all", "vera_only"], help="which biases train")
    modules_to_save: object = modules_to_save_option()
    init_weights: bool = True
    layers_to_transform: object = layers_option(None, flag="--layers_to_transform",
                                                help='only these blocks, e.g. "0-5,-1"')
    layers_pattern: object = None

    def validate(self, name=str) -> None:
        """Check the settings; ``name(field)`` is how a message names one (the command line passes its flags)."""
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise UserError(f"{name('r')} must be a positive integer, got {self.r!r}")
        key = self.projection_prng_key
        if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < 2 ** 63:
            raise UserError(f"{name('projection_prng_key')} must be an integer from 0 to 2**63 - 1, got {key!r}")
        require_finite(name("vera_dropout"), self.vera_dropout)
        require_finite(name("d_initial"), self.d_initial)
        if not 0.0 <= self.vera_dropout < 1.0:
            raise UserError(f"{name('vera_dropout')} must be in [0, 1), got {self.vera_dropout!r}")
        if self.bias not in ("none", "all", "vera_only"):
            raise UserError(f"{name('bias')} must be none, all or vera_only, got {self.bias!r}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise UserError("layers_pattern is only used with layers_to_transform; give both or neither")

    def check_model(self, model: nn.Module, name=str) -> None:
        """The shared A ``(r, max_in)`` and B ``(max_out, r)`` against this machine's memory, before drawing them
        (a VeRA rank may exceed a layer's width: the paper uses 1024 on RoBERTa's 768)."""
        targets = self.target_modules if self.target_modules is not None else default_target_modules(
            model, DEFAULT_TARGETS)
        names = find_target_modules(model, targets, self.layers_to_transform, self.layers_pattern)
        shapes = [layer_features(layer) for layer in map(model.get_submodule, names) if isinstance(layer, LINEAR_LAYERS)]
        if shapes:
            width = max(shape[0] for shape in shapes) + max(shape[1] for shape in shapes)
            check_allocation(4 * self.r * width, f"{name('r')} {self.r}", f"VeRA's shared A and B (float32, "
                             f"{self.r} x {width})")


def kaiming_uniform(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """A float32 CPU tensor ~ U(-bound, bound), ``bound = √3 · √2 / √fan_in``, ``fan_in = shape[1]``.

    This is ``nn.init.kaiming_uniform_(a=0)`` drawn from ``generator``, written as peft's ``_kaiming_init``
    writes it (same expression, same order of draws), so that the same seed gives the same bits.
    """
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen random pair every VeRA layer of a model shares (one object, a submodule of each layer).

    Buffers (not parameters: nothing trains them, counts leave them out, as peft's do), not saved with the
    model's ``state_dict``: the adapter file holds them (:func:`save_projections`), or the seed redraws them.

    Shapes: ``vera_A (r, max_in)``, ``vera_B (max_out, r)``.
    """

    def __init__(self, r: int, max_in: int, max_out: int, seed: int):
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", kaiming_uniform((r, max_in), generator), persistent=False)  # drawn first
        self.register_buffer("vera_B", kaiming_uniform((max_out, r), generator), persistent=False)

    def extra_repr(self) -> str:
        return f"vera_A={tuple(self.vera_A.shape)}, vera_B={tuple(self.vera_B.shape)}"


class VeRALinear(AdapterLayer):
    """A frozen ``nn.Linear`` or ``Conv1D`` plus ``Λ_b B Λ_d A x`` (see the module docstring).

    Args:
        base_layer: the layer to adapt; kept as ``self.base_layer`` (its weight stays frozen).
        projections: the shared :class:`VeRAProjections`; must be at least ``(r, in)`` and ``(out, r)``.
        dropout: dropout probability on the branch input. d_initial: starting value of ``λ_d``.
        init_weights: False makes the adapter non-zero from the start (``λ_b`` ones, ``λ_d`` random).

    Shapes: ``x (..., in) -> (..., out)``; ``vera_lambda_d (r,)``, ``vera_lambda_b (out,)``.
    An :class:`~minipeft.core.adapter_layer.AdapterLayer`: ``vera_lambda_b`` and ``vera_lambda_d`` are what it
    adds; the shared ``A`` and ``B`` are buffers of :class:`VeRAProjections`, used, never trained.
    """

    mergeable = True

    def __init__(self, base_layer: nn.Module, projections: VeRAProjections, dropout: float = 0.0,
                 d_initial: float = 0.1, init_weights: bool = True):
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = layer_features(base_layer)
        self.r, max_in = projections.vera_A.shape
        if max_in < self.in_features or projections.vera_B.shape[0] < self.out_features:
            raise ValueError(f"shared projections {tuple(projections.vera_A.shape)}, "
                             f"{tuple(projections.vera_B.shape)} are too small for a {self.in_features} → "
                             f"{self.out_features} layer")
        self.projections = projections
        # The vectors are float32 even on a bf16 base: they are what the optimizer updates.
        device = base_layer.weight.device
        if init_weights:
            lambda_b = torch.zeros(self.out_features, device=device)  # λ_b = 0  =>  ΔW = 0 at the start
            lambda_d = torch.full((self.r,), float(d_initial), device=device)
        else:
            lambda_b = torch.ones(self.out_features, device=device)
            lambda_d = torch.randn(self.r, device=device)
        self.vera_lambda_b = nn.Parameter(lambda_b)
        self.vera_lambda_d = nn.Parameter(lambda_d)
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def sliced_projections(self):
        """``(A (r, in), B (out, r))``: the corner of the shared pair this layer uses (views, no copy)."""
        return self.projections.vera_A[:, :self.in_features], self.projections.vera_B[:self.out_features, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out)
        if self.merged or not self.adapter_enabled:
            return result
        vera_input = self.vera_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls cast (to bf16) themselves
            vera_input = vera_input.to(self.vera_lambda_d.dtype)
        A, B = self.sliced_projections()
        # (..., in) @ (in, r) -> (..., r) ⊙ λ_d -> @ (r, out) -> (..., out) ⊙ λ_b; ΔW itself is never built.
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(vera_input, A), B)
        return result + update.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``ΔW = Λ_b B Λ_d A`` in the base layer's own layout: ``(out, in)``, or ``(in, out)`` for Conv1D."""
        A, B = self.sliced_projections()
        # (out, r) with row i scaled by λ_b[i]  @  (r, in) with row j scaled by λ_d[j]  ->  (out, in)
        delta = (self.vera_lambda_b[:, None] * B) @ (self.vera_lambda_d[:, None] * A)
        return delta.T if self.fan_in_fan_out else delta

    def merged_weight(self) -> torch.Tensor:
        """``W + ΔW`` in float32 (what :meth:`merge` writes into the base weight)."""
        return self.base_layer.weight.float() + self.delta_weight().float()

    def extra_repr(self) -> str:
        return f"r={self.r}, fan_in_fan_out={self.fan_in_fan_out}"


def apply_vera(model: nn.Module, config: VeraConfig) -> None:
    """Replace every target layer of ``model`` by a :class:`VeRALinear` sharing one :class:`VeRAProjections`.

    The caller (:func:`minipeft.get_peft_model`) has frozen the model; the new ``λ_b`` and ``λ_d`` are trainable,
    and ``config.bias`` decides which biases are unfrozen. ``config.fan_in_fan_out`` is set from the layers.
    """
    config.validate()
    if config.target_modules is None:
        config.target_modules = default_target_modules(model, DEFAULT_TARGETS)
    names = find_target_modules(model, config.target_modules, config.layers_to_transform, config.layers_pattern)
    layers = {name: model.get_submodule(name) for name in names}
    for name, layer in layers.items():
        if not isinstance(layer, LINEAR_LAYERS):
            raise UserError(f"--target_modules: {name} is a {type(layer).__name__}; VeRA adapts nn.Linear "
                            "and GPT-2's Conv1D layers only (or their 4-bit versions)")
    shapes = [layer_features(layer) for layer in layers.values()]  # (in, out, fan_in_fan_out) per target
    max_in, max_out = max(shape[0] for shape in shapes), max(shape[1] for shape in shapes)
    device = next(iter(layers.values())).weight.device
    projections = VeRAProjections(config.r, max_in, max_out, config.projection_prng_key).to(device)
    for name, layer in layers.items():
        config.fan_in_fan_out = layer_features(layer)[2]
        replace_module(model, name, VeRALinear(layer, projections, config.vera_dropout, config.d_initial,
                                               config.init_weights))
    unfreeze_biases(model, names, config.bias)  # none, all, or the adapted layers' own


def shared_projections(model: nn.Module) -> VeRAProjections:
    """The one :class:`VeRAProjections` of a model that VeRA was applied to."""
    found = {id(module): module for module in model.modules() if isinstance(module, VeRAProjections)}
    if len(found) != 1:
        raise ValueError(f"expected one shared VeRA projection pair, found {len(found)}")
    return next(iter(found.values()))


def save_projections(peft_model) -> dict:
    """``{"base_model.vera_A": A, "base_model.vera_B": B}`` for the adapter file; empty when the config says
    ``save_projection=False`` (the loader then redraws them from ``projection_prng_key``)."""
    if not peft_model.peft_config.save_projection:
        return {}
    projections = shared_projections(peft_model)
    return {key: getattr(projections, name) for name, key in PROJECTION_KEYS.items()}


@torch.no_grad()
def load_projections(peft_model, tensors: dict, source: str) -> None:
    """Copy ``base_model.vera_A``/``vera_B`` from an adapter file's ``tensors`` into the shared pair.

    ``tensors`` are the file's tensors that no adapter parameter took. With ``save_projection=False`` the
    file need not hold the pair: the one drawn from ``projection_prng_key`` when the adapter was applied is
    kept (if the file holds them anyway, they are used: they are what the adapter was trained with).

    Raises:
        UserError: naming ``source`` for a tensor that is not one of the pair, a pair the config says was
            saved but the file lacks, or a shape that does not fit this model's targets. Nothing is copied
            until every tensor has been checked.
    """
    projections = shared_projections(peft_model)
    unknown = sorted(set(tensors) - set(PROJECTION_KEYS.values()))
    if unknown:
        raise UserError(f"{source}: tensor {unknown[0]} has no place in this model "
                        "(was the adapter trained on another model or with other target modules?)")
    if not tensors and not peft_model.peft_config.save_projection:
        return
    for name, key in PROJECTION_KEYS.items():
        if key not in tensors:
            raise UserError(f"{source}: tensor {key} is missing (the config says save_projection=true, so the "
                            "shared VeRA matrices should be in the file)")
        expected = tuple(getattr(projections, name).shape)
        if tuple(tensors[key].shape) != expected:
            raise UserError(f"{source}: tensor {key} has shape {list(tensors[key].shape)}, this model expects "
                            f"{list(expected)} (A: rank × the largest target input; B: the largest target "
                            "output × rank)")
    for name, key in PROJECTION_KEYS.items():
        target = getattr(projections, name)
        target.copy_(tensors[key].to(target.dtype))


METHOD = Method(
    name="vera", config_class=VeraConfig, apply=apply_vera, peft_type="VERA", mergeable=True,
    save_extra=save_projections, load_extra=load_projections,
    why_not_sharded="its adapter file holds its shared projections, which are buffers, "
    "not a copy of the sharded parameters",
    in_compare_by_default=False,  # compare's default run left it out before the registry; --methods all runs it
    learning_rate=4e-3, learning_rate_source="Kopiczko et al. 2024, their instruction tuning of Llama 2 "
    "(appendix hyperparameters): VeRA 4e-3, ten times their LoRA rate of 4e-4")
