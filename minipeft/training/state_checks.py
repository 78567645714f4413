"""What a checkpoint's files must hold before a value of them is used (:mod:`minipeft.training.checkpoint`).

A resume continues a run from what it saved, so every field of ``trainer_state.json`` is checked by type and
range before it is read (a step of -5, 1e20 or "3", a NaN best loss, a misshaped optimizer group or RNG record:
:func:`check_saved_state`, :func:`check_state_file`), and so are the tensors beside it (optimizer moments finite
and named as written, generator states of their generators' size: :func:`check_optimizer_files`,
:func:`check_rng_tensors`). Each refusal is one line naming the file and the field (issue #26). Whether the
checkpoint continues *this* run (its method, settings and data) is :mod:`minipeft.training.resume_checks`'.
"""

import math
import re
import types
import typing
from dataclasses import fields
from pathlib import Path

import torch

from minipeft.core.errors import UserError
from minipeft.core.finite import first_nonfinite_tensor, is_finite_number
from minipeft.training.resume_checks import DATA_SETTINGS
from minipeft.training.state import TrainState


# -- the saved state, field by field ----------------------------------------------------------------
# A count in a checkpoint beyond this is not one a run reached (2**53: where a float stops counting exactly).
MAX_COUNT = 2 ** 53
# Counts of steps (or of evaluations, one per step at most) that no run can have more of than its steps.
AT_MOST_STEP = ("eval_step", "best_step", "nonfinite_in_a_row", "evals_without_improvement")


def check_saved_state(values, source: str) -> dict:
    """The ``trainer`` block of a checkpoint's state as :class:`TrainState` takes it, each field checked by its
    annotation: counts are integers in [0, 2**53), sums and losses finite numbers ≥ 0 (a loss that was undefined
    is saved as null, where the field allows None), steps of an evaluation at most ``step``, flags true or false.

    Raises:
        UserError: naming ``source`` and the field (``trainer_state.json: "step" must be ...``): a checkpoint
            edited by hand or damaged is refused before a single value of it is used.
    """
    if not isinstance(values, dict):
        raise UserError(f"{source}: \"trainer\" must be an object of the run's progress, got {values!r:.60}")
    known = {item.name: item for item in fields(TrainState)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{source}: unknown field \"{unknown[0]}\" in \"trainer\" (not a state this version wrote)")
    if "step" not in values:
        raise UserError(f"{source}: \"trainer\" has no \"step\"")
    for name, value in values.items():
        problem = _field_problem(value, known[name].type)
        if problem is None and name in AT_MOST_STEP and value is not None \
                and isinstance(values["step"], int) and value > values["step"]:
            problem = f"at most \"step\" ({values['step']})"
        if problem is not None:
            raise UserError(f"{source}: \"{name}\" must be {problem}, got {value!r:.60}")
    if values.get("epoch_nll", 0) > 0 and values.get("epoch_target_tokens", 0) == 0:
        raise UserError(f"{source}: \"epoch_target_tokens\" is 0 with a summed loss of {values['epoch_nll']!r:.20} "
                        "(a loss is summed over target tokens); the file is damaged")
    return dict(values)


def _field_problem(value, annotation) -> str | None:
    """What ``value`` should be for a field annotated ``annotation``, or None when it is that."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = set(typing.get_args(annotation)) if union else {annotation}
    optional = type(None) in kinds
    if value is None and optional:
        return None
    if bool in kinds:
        return None if isinstance(value, bool) else "true or false"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if int in kinds:
        if not (number and isinstance(value, int) and 0 <= value < MAX_COUNT):
            return f"an integer from 0 to {MAX_COUNT - 1}" + (" or null" if optional else "")
    elif float in kinds:
        if not (number and math.isfinite(value) and 0 <= value < MAX_COUNT):
            return "a finite number ≥ 0" + (" or null" if optional else "")
    return None


def check_state_file(state, source: str, expected_format: str) -> dict:
    """The parts of ``trainer_state.json`` besides ``trainer`` (see :func:`check_saved_state`), by type; its
    ``format`` is ``expected_format``."""
    def refuse(field: str, expected: str, value):
        raise UserError(f"{source}: \"{field}\" must be {expected}, got {value!r:.60}")

    if not isinstance(state, dict):
        raise UserError(f"{source}: expected a JSON object, found {type(state).__name__}")
    if state.get("format") != expected_format:
        raise UserError(f"{source}: format {state.get('format')!r}, expected {expected_format!r}")
    optimizer = state.get("optimizer")
    if not isinstance(optimizer, dict):
        refuse("optimizer", "an object", optimizer)
    groups, names, scalars = (optimizer.get(key) for key in ("param_groups", "parameter_names", "scalars"))
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        refuse("optimizer.parameter_names", "a list of parameter names", names)
    if not isinstance(scalars, dict):
        refuse("optimizer.scalars", "an object", scalars)
    if not isinstance(groups, list) or not all(isinstance(group, dict) for group in groups):
        refuse("optimizer.param_groups", "a list of objects", groups)
    indices = []
    for index, group in enumerate(groups):
        for key, value in group.items():
            field = f"optimizer.param_groups[{index}].{key}"
            if key == "params":
                if not isinstance(value, list) or not all(isinstance(item, int) and item >= 0 for item in value):
                    refuse(field, "a list of parameter indices", value)
                indices.extend(value)
            elif key == "betas":
                if not (isinstance(value, list) and len(value) == 2
                        and all(is_finite_number(beta) and 0 <= beta < 1 for beta in value)):
                    refuse(field, "two numbers in [0, 1)", value)
            elif key in ("lr", "initial_lr", "weight_decay", "eps"):
                if not (is_finite_number(value) and value >= 0):
                    refuse(field, "a finite number ≥ 0", value)
            elif isinstance(value, float) and not math.isfinite(value):
                refuse(field, "a finite number", value)
    if sorted(indices) != list(range(len(names))):  # each parameter in exactly one group
        refuse("optimizer.param_groups", f"groups holding each of the {len(names)} parameters once "
               f"(indices 0 to {len(names) - 1})", sorted(indices))
    scaler = state.get("grad_scaler")
    if scaler is not None and not (isinstance(scaler, dict) and all(
            is_finite_number(value) and value > 0 if key == "scale" else not isinstance(value, float)
            or math.isfinite(value) for key, value in scaler.items())):
        refuse("grad_scaler", "null or an object of finite numbers (a positive scale)", scaler)
    rng = state.get("rng")
    if not isinstance(rng, list) or not rng or not all(
            isinstance(entry, dict) and isinstance(entry.get("python"), list) and len(entry["python"]) == 2
            and isinstance(entry.get("numpy"), list) and len(entry["numpy"]) == 4 for entry in rng):
        refuse("rng", "one object of generator scalars per process", rng)
    data = state.get("data")
    if not isinstance(data, dict):  # without it, a resume could not tell other data apart
        refuse("data", "an object (the data fingerprint)", data)
    for key, value in data.items():
        expected = _fingerprint_problem(key, value)
        if expected is not None:
            refuse(f"data.{key}", expected, value)
    check_saved_state(state.get("trainer"), source)
    return state


def _fingerprint_problem(key: str, value) -> str | None:
    """What the data fingerprint's field ``key`` (:func:`data_fingerprint`) should be, or None when it is that."""
    whole = isinstance(value, int) and not isinstance(value, bool)
    if key in ("batch_size", "max_length", "gradient_accumulation_steps", "processes"):
        return None if whole and 1 <= value < MAX_COUNT else "a positive integer"
    if key == "max_records":
        return None if value is None or whole and 1 <= value < MAX_COUNT else "null or a positive integer"
    if key == "seed":
        return None if whole and 0 <= value < 2 ** 32 else "an integer from 0 to 2**32 - 1"
    if key == "val_size":
        return None if is_finite_number(value) and 0 <= value < MAX_COUNT else "a count or a fraction ≥ 0"
    if key in ("train_on_inputs", "packing", "group_by_length", "shuffle"):
        return None if isinstance(value, bool) else "true or false"
    if key in ("dataset_path", "dataset_sha256", "template", "instruction_column", "input_column", "output_column"):
        return None if value is None or isinstance(value, str) else "null or a string"
    known = ("dataset_path", "dataset_sha256", *DATA_SETTINGS, "processes")
    return f"one of the fields a data fingerprint has ({', '.join(known)})"


# -- the tensors ---------------------------------------------------------------------------------------
OPTIMIZER_KEY = re.compile(r"state\.\d+\.\w+")
SCALAR_KEY = re.compile(r"\d+\.\w+")
# The generator states restore_rng_state sets: (dtype, number of values, largest value + 1 or None).
RNG_SHAPES = {"torch_cpu": (torch.uint8, torch.get_rng_state().numel(), None),
              "python": (torch.int64, 625, 2**32), "numpy": (torch.int64, 624, 2**32)}


def check_optimizer_files(tensors: dict, values: dict, path: Path, state_path: Path) -> dict:
    """The optimizer's tensors (read from ``path``) are named ``state.<index>.<key>`` and finite; its scalars
    (``values``, from ``state_path``) ``<index>.<key>``."""
    for key in tensors:
        if not OPTIMIZER_KEY.fullmatch(key):
            raise UserError(f"{path}: tensor {key!r:.60} is not an optimizer state (state.<index>.<name>)")
    bad = first_nonfinite_tensor(tensors)
    if bad is not None:
        raise UserError(f"{path}: tensor {bad} holds NaN or infinity; the checkpoint is damaged (resume from an "
                        "earlier one)")
    for key in values["scalars"]:
        if not SCALAR_KEY.fullmatch(key):
            raise UserError(f"{state_path}: \"optimizer.scalars\" has the key {key!r:.60}, not "
                            "<index>.<name>")
    return tensors


def check_rng_tensors(tensors: dict, path: Path, prefix: str) -> None:
    """This process's generator states have the dtype and size their generators take."""
    for key, (dtype, count, bound) in RNG_SHAPES.items():
        tensor = tensors.get(key)
        if tensor is None:
            continue  # (no state for this process: the loop says so and goes on)
        if tensor.dtype != dtype or tensor.dim() != 1 or tensor.numel() != count or bound is not None and (
                tensor.min() < 0 or tensor.max() >= bound):
            raise UserError(f"{path}: tensor {prefix}{key} is not a {key} generator state ({count} values of "
                            f"{str(dtype).replace('torch.', '')}); the checkpoint is damaged")
