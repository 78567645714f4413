"""The PEFT methods minipeft knows, by the name users pass as ``--modification_type``.

Every module in this folder is one method: its config dataclass, its layer (an
:class:`~minipeft.core.adapter_layer.AdapterLayer`) or prompt encoder, its ``apply`` function, and, at its
end, its own record ``METHOD = Method(...)`` (:class:`~minipeft.core.method.Method`: config class, apply
function, peft type, mergeable, default learning rate). This file lists no method: :func:`discover_methods`
imports every module of the folder and collects their records, so **adding a method is adding one module**.

``METHODS`` (name -> :class:`Method`) is in the order users see (``--modification_type`` choices,
``compare``): by each record's ``order`` (lora 10, dora 20, ia3 30, adapter 40, prefix 50, prompt 60,
selective 70, bitfit 80), then by name, so a new method that gives no order comes after these.

Default learning rates, one per method, for AdamW and short runs (tens to hundreds of steps): how far a
method's parameters sit from the loss sets its rate. Matrices added beside frozen weights (LoRA, adapters)
take ~1e-3; a few vectors or virtual tokens need 3e-3 to 3e-2; base weights (selective) need what full
fine-tuning uses. Each method's docs page repeats its rate and source. ``--learning_rate`` overrides.
"""

import importlib
import pkgutil

from minipeft.core.errors import UserError
from minipeft.core.method import Method


def discover_methods() -> dict:
    """``{name: Method}`` from the ``METHOD`` record of every module in ``minipeft/methods/``, in order.

    Raises:
        TypeError: for a module without a ``METHOD`` record, or two records with one name (a programming
            mistake in the package, not a user's).
    """
    records = []
    for module_info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        record = getattr(module, "METHOD", None)
        if not isinstance(record, Method):
            raise TypeError(f"{module.__name__}: a module of minipeft/methods must end with its record, "
                            "METHOD = Method(...) (one module per method)")
        records.append(record)
    methods = {}
    for record in sorted(records, key=lambda method: (method.order, method.name)):
        if record.name in methods:
            raise TypeError(f"two methods are called {record.name!r}: "
                            f"{methods[record.name].module} and {record.module}")
        methods[record.name] = record
    return methods


METHODS = discover_methods()


def default_learning_rate(name: str) -> float:
    """The default peak learning rate of method ``name`` (see :data:`METHODS`)."""
    return METHODS[name].learning_rate


def adapter_kind(name: str) -> str:
    """A method's adapter in words, for messages: "a lora adapter", "a bottleneck adapter" (not "a adapter
    adapter")."""
    return "a bottleneck adapter" if name == "adapter" else f"a {name} adapter"


def method_for_config(config) -> Method:
    """The :class:`Method` a config object belongs to: of the methods with its config class, the one whose
    ``variant_settings`` the config matches, the most specific first (DoRA is LoRA with ``use_dora=True``, as in
    peft: a LoRAConfig with ``use_dora`` is DoRA's, without it LoRA's)."""
    candidates = [method for method in METHODS.values() if type(config) is method.config_class
                  and all(getattr(config, key) == value for key, value in method.variant_settings.items())]
    if candidates:
        return max(candidates, key=lambda method: len(method.variant_settings))
    raise UserError(f"{type(config).__name__} is not the config of a minipeft method")


def method_for_peft_type(peft_type: str, source: str = "adapter_config.json") -> Method:
    """The first :class:`Method` (in order) whose files say ``peft_type`` (``"LORA"`` -> lora; the config's
    ``use_dora`` then picks DoRA, see :func:`method_for_config`)."""
    for method in METHODS.values():
        if method.peft_type == peft_type:
            return method
    known = sorted({method.peft_type for method in METHODS.values()})
    raise UserError(f"{source}: peft_type {peft_type!r} is not supported (known: {', '.join(known)})")


# --- command-line flags ------------------------------------------------------------------------------------
# The flags of every method, shared by modify_llm.py, train_llm.py and `python -m minipeft compare`. A flag
# of one method given with another method is an error, never silently ignored.
