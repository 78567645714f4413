"""The one finiteness check: no NaN or infinity is ever accepted as a setting, saved as a result, or called good.

``float("nan")`` passes every comparison-based check by failing it quietly (``nan < 0`` is False), so each
float a user can give (a flag, a config file's value) goes through :func:`require_finite`, and each tensor
minipeft saves as "good" or loads as an adapter goes through :func:`first_nonfinite_tensor`.

- flags: :func:`finite_float` is the ``type=`` of every float flag (``--learning_rate nan`` is a usage error);
- config values (dataclasses, ``adapter_config.json``): :func:`require_finite`;
- tensors: :func:`first_nonfinite_tensor` (checkpoints, the best adapter, adapters being loaded);
- JSON: :func:`finite_or_none` for values that may legitimately be undefined (an eval loss over no tokens).
"""

import argparse
import math

import torch

from minipeft.core.errors import UserError


def is_finite_number(value) -> bool:
    """True for an int or a finite float (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_finite(name: str, value, source: str = "") -> None:
    """Raise :class:`UserError` unless ``value`` is a finite number; ``name`` is the flag or field."""
    if not is_finite_number(value):
        where = f"{source}: " if source else ""
        raise UserError(f"{where}{name} must be a finite number, got {value!r}")


def finite_float(text: str) -> float:
    """argparse ``type=`` for float flags: ``"nan"``, ``"inf"`` and ``"1e999"`` are refused as usage errors."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def finite_or_none(value):
    """``value`` when it is a finite number, else None (what JSON files record for "undefined")."""
    return value if is_finite_number(value) else None


@torch.no_grad()
def first_nonfinite_tensor(tensors: dict):
    """The name of the first tensor (sorted by name) holding a NaN or an infinity, or None if all are finite."""
    for name in sorted(tensors):
        tensor = tensors[name]
        if tensor.is_floating_point() or tensor.is_complex():
            if not bool(torch.isfinite(tensor).all()):
                return name
    return None


def nonfinite_to_none(value):
    """``value`` with every NaN or infinite float inside it (dicts, lists) replaced by None, for JSON."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {key: nonfinite_to_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [nonfinite_to_none(item) for item in value]
    return value
