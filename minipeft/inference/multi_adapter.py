"""Many named adapters on one frozen base model: switch, disable, delete, combine, and mix them per row.

A service that fine-tunes one model for many tasks (or customers) keeps *one* copy of the base weights and
one small adapter per task::

                                 ┌─ "summarise"  LoRA  r=8   (1.2 MB)
    base model (frozen, 500 MB) ─┼─ "translate"  LoRA  r=16  (2.4 MB)      set_adapter("translate")
                                 ├─ "support"    IA3         (0.1 MB)      -> the model now *is* base + translate
                                 └─ "persona"    prefix      (0.4 MB)

How switching works here (and why it is not peft's design). peft puts every adapter inside every adapted
layer (``lora_A = ModuleDict({"summarise": ..., "translate": ...})``) and each layer picks the active key.
minipeft keeps its layers single-adapter (:class:`~minipeft.methods.lora.LoRALinear` holds one A and one B), so a
reader of ``lora.py`` sees one idea. The bookkeeping lives here instead, once, for every method:

- **Adding** an adapter applies its method to the base model with :func:`~minipeft.get_peft_model` as
  usual, then records what changed: which modules were *replaced* (``c_attn`` -> ``LoRALinear(c_attn)``)
  and which *base* parameters the method trains in place (BitFit's biases, LoRA with ``bias="all"``,
  selective fine-tuning's blocks). Then it puts the original modules back. The adapter's layers wrap the
  *same* base layer objects, so no base weight is ever copied.
- **Activating** an adapter puts its layers back in (one ``setattr`` per adapted module) and copies its
  values of the base parameters it trains into place (the originals are kept aside, once). Deactivating
  does the reverse and keeps the trained values. So switching costs a few ``setattr`` calls plus, for
  methods that train base tensors, a copy of those tensors; no adapter is ever rebuilt.
- Prompt-learning adapters (prompt and prefix tuning) change no module: activating one makes its
  ``prompt_encoder`` the one that rewrites the inputs.

Mixed batches (the multi-tenant case): ``model(input_ids, adapter_names=["summarise", None, "translate"])``
runs row 0 with one adapter, row 1 with none, row 2 with another, in one forward: for the duration of the
call every adapted module is replaced by a :class:`~minipeft.inference.lora_mixing.MultiLoRALinear`, which
gathers one LoRA update per row from the stacked adapters (see :mod:`minipeft.inference.lora_mixing`). Only
the LoRA family (LoRA, rsLoRA, DoRA) can do this: their update is a per-layer linear map that a row can pick;
a prefix or bottleneck adapter changes the computation itself, and BitFit/selective change base tensors
shared by all rows.

Weighted combination (:meth:`MultiAdapterModel.add_weighted_adapter`) builds a new LoRA adapter from several;
see :func:`~minipeft.inference.lora_mixing.combine_lora_weights` for what each ``combination_type`` computes.
"""

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from minipeft.core.adapter_layer import AdapterLayer
from minipeft.core.errors import UserError
from minipeft.core.generation import generate
from minipeft.core.inject import replace_module
from minipeft.inference.lora_mixing import COMBINATION_TYPES, MultiLoRALinear, combine_lora_weights
from minipeft.methods.lora import LoRAConfig, LoRALinear
from minipeft.model.adapter_files import load_peft_state_dict, read_adapter
from minipeft.model.peft_model import get_peft_model


@dataclass
class NamedAdapter:
    """One adapter's place in a :class:`MultiAdapterModel`.

    Attributes:
        peft_model: the :class:`~minipeft.PeftModel` built when the adapter was added (its config, its
            ``prompt_encoder``, the names of what it trains). Its ``base_model`` is the shared base model.
        layers: ``{module path: (original module, adapter module)}`` for every module the method replaced.
        base_parameters: ``{parameter name: parameter}`` for base parameters the method trains in place.
        original_values / trained_values: those parameters' base values and this adapter's values.
        base_requires_grad: whether each of them trains (restored when the adapter is activated).
    """

    peft_model: nn.Module
    layers: dict
    base_parameters: dict = field(default_factory=dict)
    original_values: dict = field(default_factory=dict)
    trained_values: dict = field(default_factory=dict)
    base_requires_grad: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.peft_model.peft_config

    def is_plain_lora_family(self) -> bool:
        """True for LoRA/DoRA adapters that change nothing but their LoRA layers (mixable, combinable)."""
        return (isinstance(self.config, LoRAConfig) and not self.base_parameters
                and self.peft_model.prompt_encoder is None
                and all(isinstance(module, LoRALinear) for _, module in self.layers.values()))


class MultiAdapterModel(nn.Module):
    """One frozen base model and any number of named adapters, at most one active (see the module docstring).

    >>> model = MultiAdapterModel(base_model)
    >>> model.load_adapter("adapters/summarise", "summarise")
    >>> model.load_adapter("adapters/translate", "translate")
    >>> model.set_adapter("translate"); logits = model(input_ids).logits
    >>> with model.disable_adapters(): base_logits = model(input_ids).logits
    >>> model(input_ids, adapter_names=["summarise", "translate"])  # one adapter per row (LoRA family)

    Adapter layers are created on the base model's device: move the base model first, then add adapters.
    Adding or loading an adapter does not change which one is active (as in peft); call :meth:`set_adapter`.
    """

    def __init__(self, base_model: nn.Module):
        super().__init__()
        self.base_model = base_model
        self.prompt_encoder = None  # the active adapter's prompt/prefix module, if it has one
        self.active_adapter = None
        self._adapters = {}  # name -> NamedAdapter (a plain dict: inactive adapters are not submodules)
        self._mixed_batch = False

    @property
    def config(self):
        return self.base_model.config

    def list_adapters(self) -> list:
        """Names of the adapters held, in the order they were added."""
        return list(self._adapters)

    def get_adapter(self, name: str) -> NamedAdapter:
        if name not in self._adapters:
            known = ", ".join(self._adapters) or "none"
            raise UserError(f"adapter {name!r} is not loaded (loaded: {known})")
        return self._adapters[name]

    # -- adding and removing ------------------------------------------------------------------------------
    def add_adapter(self, name: str, config, state: dict = None, source: str = "adapter",
                    is_trainable: bool = True) -> NamedAdapter:
        """Add an adapter described by a method config (``LoRAConfig(...)``, ``IA3Config(...)``, ...).

        Args:
            name: the adapter's name (must be new).
            config: the method's config; the adapter starts as the method initialises it, unless ``state``
                (tensors in the adapter-file layout, ``base_model.model.<path>``) gives its values.
            is_trainable: leave the adapter's parameters trainable (for training it while it is active).
        """
        if not isinstance(name, str) or not name or name in self._adapters:
            raise UserError(f"adapter name {name!r}: give a new, non-empty name (loaded: {self.list_adapters()})")
        previous = self.active_adapter
        self._deactivate()
        modules_before = dict(self.base_model.named_modules())
        parameters_before = {id(parameter) for parameter in self.base_model.parameters()}
        device = next(self.base_model.parameters()).device
        try:
            peft_model = get_peft_model(self.base_model, config)
            peft_model.to(device)  # in case a method built its layers on the CPU; dtypes are kept
            adapter = NamedAdapter(peft_model, replaced_modules(self.base_model, modules_before))
            for parameter_name, parameter in peft_model.adapter_parameters().items():
                if id(parameter) in parameters_before:  # a base parameter this method trains in place
                    adapter.base_parameters[parameter_name] = parameter
                    adapter.original_values[parameter_name] = parameter.detach().clone()
            if state is not None:
                load_peft_state_dict(peft_model, state, source)  # checks every tensor before copying any
            peft_model.set_trainable(is_trainable)
        except BaseException:  # leave the base model as it was: original modules back, nothing trainable
            for path, (original, _) in replaced_modules(self.base_model, modules_before).items():
                replace_module(self.base_model, path, original)
            for parameter in self.base_model.parameters():
                parameter.requires_grad_(False)
            self._activate(previous)
            raise
        adapter.trained_values = {key: p.detach().clone() for key, p in adapter.base_parameters.items()}
        adapter.base_requires_grad = {key: p.requires_grad for key, p in adapter.base_parameters.items()}
        self._adapters[name] = adapter
        self.active_adapter = name  # its layers are in the model right now: take them out properly
        self._deactivate()
        self._activate(previous)
        return adapter

    def load_adapter(self, directory, name: str, is_trainable: bool = False) -> NamedAdapter:
        """Load an adapter directory (minipeft's or peft's files) under ``name``."""
        config, state, source = read_adapter(directory)
        return self.add_adapter(name, config, state, source, is_trainable)

    def delete_adapter(self, name: str) -> None:
        """Forget an adapter; if it was active, the model runs without any adapter afterwards."""
        self.get_adapter(name)
        if self.active_adapter == name:
            self._deactivate()
        del self._adapters[name]

    def save_adapter(self, name: str, directory, **metadata) -> None:
        """Write one adapter's files (the same files :meth:`minipeft.PeftModel.save_adapter` writes)."""
        with self._using(name):
            self.get_adapter(name).peft_model.save_adapter(directory, **metadata)

    # -- switching ----------------------------------------------------------------------------------------
    def set_adapter(self, name) -> None:
        """Make ``name`` the active adapter (None: no adapter)."""
        if name is not None:
            self.get_adapter(name)
        self._deactivate()
        self._activate(name)

    @contextmanager
    def disable_adapters(self):
        """``with model.disable_adapters():`` runs the plain base model, then restores the active adapter."""
        previous = self.active_adapter
        self._deactivate()
        try:
            yield self
        finally:
            self._activate(previous)

    @contextmanager
    def _using(self, name):
        previous = self.active_adapter
        self.set_adapter(name)
        try:
            yield self
        finally:
            self.set_adapter(previous)

    def _activate(self, name) -> None:
        if name is None:
            return
        adapter = self._adapters[name]
        for path, (_, module) in adapter.layers.items():
            replace_module(self.base_model, path, module)
        with torch.no_grad():
            for key, parameter in adapter.base_parameters.items():
                parameter.copy_(adapter.trained_values[key])
                parameter.requires_grad_(adapter.base_requires_grad[key])
        self.prompt_encoder = adapter.peft_model.prompt_encoder
        self.active_adapter = name

    def _deactivate(self) -> None:
        if self._mixed_batch:
            raise UserError("cannot switch adapters inside a mixed-adapter batch")
        if self.active_adapter is None:
            return
        adapter = self._adapters[self.active_adapter]
        for path, (original, module) in adapter.layers.items():
            if isinstance(module, AdapterLayer) and module.merged:
                raise UserError(f"adapter {self.active_adapter!r} is merged into the weights; unmerge it before "
                                "switching adapters")
            replace_module(self.base_model, path, original)
        with torch.no_grad():
            for key, parameter in adapter.base_parameters.items():
                adapter.trained_values[key] = parameter.detach().clone()  # keep what training did
                adapter.base_requires_grad[key] = parameter.requires_grad
                parameter.copy_(adapter.original_values[key])
                parameter.requires_grad_(False)
        self.prompt_encoder = None
        self.active_adapter = None

    # -- running ------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, labels=None, adapter_names=None, **kwargs):
        """The active adapter's forward; with ``adapter_names`` (one name or None per row), a mixed batch."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        if adapter_names is not None:
            with self.mixed_batch(adapter_names):
                return self.base_model(**inputs)
        if self._mixed_batch or self.active_adapter is None:
            return self.base_model(**inputs)
        return self._adapters[self.active_adapter].peft_model(**inputs)

    def generate(self, input_ids, attention_mask=None, adapter_names=None, **generation_kwargs):
        """:func:`minipeft.core.generation.generate` with the active adapter, or one adapter per row."""
        if adapter_names is None:
            return generate(self, input_ids, attention_mask=attention_mask, **generation_kwargs)
        with self.mixed_batch(adapter_names):
            return generate(self, input_ids, attention_mask=attention_mask, **generation_kwargs)

    @contextmanager
    def mixed_batch(self, adapter_names):
        """Inside this block, row ``b`` of every batch runs with adapter ``adapter_names[b]`` (None: none).

        Every module adapted by any of the named adapters is replaced by a :class:`MultiLoRALinear` for the
        duration; the active adapter is restored afterwards. The batch size must stay ``len(adapter_names)``.
        """
        adapter_names = list(adapter_names)
        slot_names = list(dict.fromkeys(name for name in adapter_names if name is not None))
        adapters = [self.get_adapter(name) for name in slot_names]
        for name, adapter in zip(slot_names, adapters):
            if not adapter.is_plain_lora_family():
                raise UserError(f"adapter {name!r}: only LoRA/DoRA adapters without modules_to_save or trained "
                                "biases can share a batch with other adapters; run its rows separately")
        previous = self.active_adapter
        self._deactivate()
        device = next(self.base_model.parameters()).device
        # Slot i holds slot_names[i]; the last slot (all zeros) is "no adapter".
        slots = {name: index for index, name in enumerate(slot_names)}
        row_slots = torch.tensor([slots.get(name, len(slot_names)) for name in adapter_names], device=device)
        originals = {}
        for adapter in adapters:
            for path, (original, _) in adapter.layers.items():
                originals[path] = original
        for path, original in originals.items():
            lora_layers = [adapter.layers[path][1] if path in adapter.layers else None for adapter in adapters]
            replace_module(self.base_model, path, MultiLoRALinear(original, lora_layers + [None], row_slots))
        self._mixed_batch = True
        try:
            yield self
        finally:
            self._mixed_batch = False
            for path, original in originals.items():
                replace_module(self.base_model, path, original)
            self._activate(previous)

    # -- combining ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def add_weighted_adapter(self, adapters: list, weights: list, adapter_name: str,
                             combination_type: str = "svd", svd_rank: int = None) -> NamedAdapter:
        """A new LoRA adapter ``adapter_name`` combining LoRA adapters (peft's method of the same name).

        Args:
            adapters: names of LoRA adapters (not DoRA: magnitude vectors do not add).
            weights: one weight per adapter (may be negative, e.g. to subtract a behaviour).
            combination_type: ``"svd"`` (exact ``Σ w_i ΔW_i``, truncated to ``svd_rank``), ``"cat"`` (exact,
                rank ``Σ r_i``) or ``"linear"`` (peft's cheap approximation, equal ranks only); see
                :func:`combine_lora_weights`.
            svd_rank: rank of the ``"svd"`` result (default: the largest rank among the adapters).

        The new adapter targets every module any of them adapts, has ``lora_alpha = r`` (scaling 1, the
        weights and scalings are folded into A and B), and is not activated.
        """
        if combination_type not in COMBINATION_TYPES:
            raise UserError(f"combination_type must be one of {', '.join(COMBINATION_TYPES)}, got {combination_type!r}")
        if len(adapters) != len(weights) or not adapters:
            raise UserError(f"add_weighted_adapter: give one weight per adapter ({len(adapters)} adapters, "
                            f"{len(weights)} weights)")
        sources = [self.get_adapter(name) for name in adapters]
        for name, adapter in zip(adapters, sources):
            if not adapter.is_plain_lora_family() or adapter.config.use_dora:
                raise UserError(f"adapter {name!r}: only plain LoRA adapters (no DoRA, modules_to_save or trained "
                                "biases) can be combined; their updates are B·A products and nothing else")
        ranks = [adapter.config.r for adapter in sources]
        if combination_type == "linear" and len(set(ranks)) > 1:
            raise UserError(f"combination_type linear needs equal ranks, got {ranks}; use cat or svd")
        new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[combination_type]
        paths = list(dict.fromkeys(path for adapter in sources for path in adapter.layers))
        config = LoRAConfig(r=new_rank, lora_alpha=new_rank, target_modules=paths)
        combined = {}  # path -> (A, B), computed before the new adapter exists
        for path in paths:
            factors = [(adapter.layers[path][1], weight) for adapter, weight in zip(sources, weights)
                       if path in adapter.layers]
            combined[path] = combine_lora_weights(
                [(layer.lora_A.weight, layer.lora_B.weight, layer.scaling) for layer, _ in factors],
                [weight for _, weight in factors], combination_type, new_rank)
        new_adapter = self.add_adapter(adapter_name, config, is_trainable=False)
        for path, (lora_a, lora_b) in combined.items():
            layer = new_adapter.layers[path][1]
            layer.lora_A.weight.zero_()
            layer.lora_B.weight.zero_()
            layer.lora_A.weight[:lora_a.shape[0]] = lora_a  # cat: a module that fewer adapters adapt
            layer.lora_B.weight[:, :lora_b.shape[1]] = lora_b  # has a smaller rank; the rest stays zero
        return new_adapter


def replaced_modules(model: nn.Module, modules_before: dict) -> dict:
    """``{path: (module before, module now)}`` for the outermost modules of ``model`` that were replaced.

    Raises:
        NotImplementedError: when a method added a module somewhere other than in place of an existing one
            (then switching could not undo it).
    """
    replaced = {}
    for path, original in modules_before.items():
        if not path or any(path.startswith(other + ".") for other in replaced):
            continue
        current = model.get_submodule(path)
        if current is not original:
            replaced[path] = (original, current)
    known = {id(module) for module in modules_before.values()}
    for path, module in model.named_modules():
        inside_replaced = any(path == other or path.startswith(other + ".") for other in replaced)
        if id(module) not in known and not inside_replaced:
            raise NotImplementedError(f"{path}: a method added a module without replacing one; "
                                      "MultiAdapterModel cannot switch it")
    return replaced
