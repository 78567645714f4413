"""What a resume checks before it continues a run from a checkpoint (:mod:`minipeft.training.checkpoint`).

A resume continues *this* run, so :func:`~minipeft.training.checkpoint.load_checkpoint` refuses, with one line
naming the field, what would continue another one or a damaged one (issue #26):

- every field of ``trainer_state.json`` by type and range (a step of -5, 1e20 or "3", a NaN best loss, a
  misshaped optimizer group or RNG record: :func:`check_saved_state`, :func:`check_state_file`), and the
  tensors beside it (optimizer moments finite and named as written, generator states of their generators' size:
  :func:`check_optimizer_files`, :func:`check_rng_tensors`);
- a position the run cannot reach (past its data's epoch or its last step: :func:`check_position_fits`);
- a method setting other than the checkpoint's adapter was trained with (``lora_alpha``, ``lora_dropout``,
  ``target_modules`` ...: same shapes, other math, so the strict tensor load alone would not notice);
- the data: each checkpoint records a fingerprint of what decides the batches (:func:`data_fingerprint`: the
  data file's sha256, the template, batch size, maximum length, seed, accumulation). A file changed since the
  checkpoint is refused; given the resuming run's metadata (``current=``), so is another file or setting, and
  with it the settings that change the math (:data:`MATH_SETTINGS`, the base model, its quantization).
  ``new_data=True`` (``--resume_new_data``) continues on the new data on purpose: the weights, optimizer and
  step go on, the new data starts at its first batch.

**What may change on resume** is decided here, once, for the checkpoint's checks and for the command line's
earlier ones (``train_llm.py --resume`` compares the flags it is given with the run's before it loads a model):
:data:`MATH_SETTINGS` never, the data's (:data:`DATA_FLAGS`) only with ``--resume_new_data``
(:func:`refused_change`), :data:`RESUMABLE_CHANGES` freely (how long, how often to log or save: not what a step
computes); any other flag given anew is named in a note.
"""

import functools
import hashlib
import json
import math
import os
import re
import time
import types
import typing
from dataclasses import fields
from pathlib import Path

import torch

from minipeft.core.errors import UserError
from minipeft.core.finite import first_nonfinite_tensor, is_finite_number
from minipeft.core.options import flag_of
from minipeft.files.manifest import changed_content
from minipeft.files.safe_files import json_text
from minipeft.model.adapter_files import CONFIG_NAME, config_from_dict, config_to_dict, read_adapter_config
from minipeft.training.state import TrainState

# What cuts the data into the same batches in the same order (besides the file): the run's flags of these names.
DATA_SETTINGS = ("template", "batch_size", "max_length", "seed", "gradient_accumulation_steps", "val_size",
                 "max_records", "train_on_inputs", "packing", "group_by_length", "shuffle", "instruction_column",
                 "input_column", "output_column")
DATA_FLAGS = ("dataset_path", *DATA_SETTINGS)  # ... and the file: what --resume_new_data lets change
# Training flags that change what a step computes (max_steps and epochs may grow: the run goes on longer).
MATH_SETTINGS = ("learning_rate", "lr_schedule", "warmup_steps", "warmup_ratio", "min_lr", "weight_decay",
                 "max_grad_norm", "precision")
# The base the adapter trains on: another one is another run (its adapter's shapes may even fit the new base).
BASE_SETTINGS = ("model", "quantize", "quantize_lm_head")
# Flags that may change between an interrupted run and its resumption without changing what it computes.
RESUMABLE_CHANGES = {"resume", "resume_new_data", "overwrite_output_dir", "max_steps", "epochs", "log_every",
                     "eval_every", "save_every", "save_total_limit", "early_stopping_patience", "cache_dir",
                     "no_cache", "num_workers", "eval_max_batches", "sharding", "fsdp_cpu_offload", "num_threads"}


# -- what may change ---------------------------------------------------------------------------------------
def refused_change(saved: dict, current: dict, new_data: bool = False) -> str | None:
    """The first flag (by name) that ``saved`` and ``current`` both set, to different values, and that a resume
    refuses to change: one of :data:`MATH_SETTINGS` always, ``dataset_path`` or one of :data:`DATA_SETTINGS`
    unless ``new_data`` (``--resume_new_data``). None when every change is one a resume may make."""
    for key in sorted(set(saved) & set(current)):
        if saved[key] != current[key] and (key in MATH_SETTINGS or key in BASE_SETTINGS
                                           or key in DATA_FLAGS and not new_data):
            return key
    return None


def changed_setting_message(source: str, key: str, now, before, leave_out: bool = False) -> str:
    """The refusal of :func:`refused_change`'s ``key``: ``source`` says who refuses (``--resume DIR``);
    ``leave_out``: the flag was given on the command line, where leaving it out takes the run's own value."""
    remedy = " or pass --resume_new_data to continue on the new data" if key in DATA_FLAGS else ""
    started = (f"it started with {before}" if before is not None else
               "it started on the built-in data" if key == "dataset_path" else f"it started without --{key}")
    return (f"{source}: --{key} {now} changes what the run computes ({started}); resume with the "
            f"run's own --{key}{' (leave it out)' if leave_out else ''}{remedy}, or start a new run")


# -- the same data -----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)  # a run saves many checkpoints of one unchanged file: hashed once
def _sha256(path: str, size: int, modified_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, recomputed when its size or modification time changed, or when that time
    is under two seconds old (a file system's clock ticks coarsely: an edit of the same size within one tick
    keeps the time, so a recent time proves nothing; git calls such files "racily clean")."""
    info = os.stat(path)
    if time.time_ns() - info.st_mtime_ns < 2_000_000_000:
        return _sha256.__wrapped__(str(path), info.st_size, info.st_mtime_ns)
    return _sha256(str(Path(path).resolve()), info.st_size, info.st_mtime_ns)


def data_fingerprint(adapter_metadata: dict) -> dict:
    """What decides a run's batches, from the metadata its adapters are saved with (``template`` and the
    ``training`` flags): ``dataset_path`` and its ``dataset_sha256`` (None for the built-in data), the
    :data:`DATA_SETTINGS` the run gave, and its number of ``processes`` (each takes its share of a step's batch)."""
    training = adapter_metadata.get("training") or {}
    settings = {**training, "template": adapter_metadata.get("template")}
    path = training.get("dataset_path")
    sha256 = file_sha256(path) if path is not None and Path(path).is_file() else None
    processes = {"processes": adapter_metadata["processes"]} if "processes" in adapter_metadata else {}
    return {"dataset_path": path, "dataset_sha256": sha256,
            **{key: settings[key] for key in DATA_SETTINGS if key in settings}, **processes}


def data_mismatch(saved: dict, current: dict | None) -> str | None:
    """How the resuming run's data differs from the checkpoint's (None: the same, or nothing to compare)."""
    if current is None:  # the caller gave no fingerprint: at least the file the run read must be unchanged
        path = saved.get("dataset_path")
        if path is None or saved.get("dataset_sha256") is None or not Path(path).is_file():
            return None
        current = {**saved, "dataset_sha256": file_sha256(path)}
    if saved.get("dataset_sha256") != current.get("dataset_sha256") and saved.get("dataset_path") == \
            current.get("dataset_path"):
        if saved.get("dataset_path") is None:  # the built-in data has no file to hash: the record was edited
            sha256 = str(saved.get("dataset_sha256"))[:12]
            return f"its data fingerprint names the built-in data with a sha256 ({sha256}...), which the " \
                   "built-in data never has: the checkpoint's trainer_state.json was edited"
        return f"--dataset_path {saved['dataset_path']} changed since the run started (its sha256 was " \
               f"{str(saved.get('dataset_sha256'))[:12]}..., now {str(current.get('dataset_sha256'))[:12]}...)"
    if "processes" in saved and "processes" in current and saved["processes"] != current["processes"]:
        return (f"this run has {current['processes']} process{'es' * (current['processes'] != 1)}, the run started "
                f"with {saved['processes']} (a step takes --batch_size × --gradient_accumulation_steps × processes "
                "records)")
    for key in ("dataset_path", "dataset_sha256", *DATA_SETTINGS):
        if key in saved and key in current and saved[key] != current[key]:
            flag = "--dataset_path" if key == "dataset_sha256" else f"--{key}"
            return f"{flag} {current[key]} (the run started with {saved[key]})"
    return None


# -- the same run ------------------------------------------------------------------------------------
def check_continues_the_run(directory: Path, adapter_dir: Path, state: dict, peft_model, current: dict = None,
                            new_data: bool = False) -> None:
    """Refuse a resume that would continue another run than the checkpoint's in ``directory`` (the module
    docstring's list; ``adapter_dir``: its adapter).

    ``current``: the resuming run's adapter metadata (``template``, ``training`` flags, base model); without
    it the checks that need it (another data file or setting, :data:`MATH_SETTINGS`) are skipped.
    """
    saved_config = read_adapter_config(adapter_dir)
    config_from_dict(saved_config, str(adapter_dir / CONFIG_NAME))  # each field by its type, named as the file's
    if adapter_dir / CONFIG_NAME in changed_content(adapter_dir):  # before its values are compared with the flags'
        raise UserError(f"--resume {directory}: {adapter_dir / CONFIG_NAME} is not the file minipeft wrote there "
                        "(its sha256 differs from the checkpoint's record); resume from another checkpoint")
    check_same_method_type(directory, saved_config, peft_model.peft_config, adapter_dir / CONFIG_NAME)  # most basic
    if current is not None:  # then the base: on another model, the method's own settings differ as a consequence
        check_same_settings(directory, saved_config, current)
    check_same_method(directory, saved_config, peft_model.peft_config, adapter_dir / CONFIG_NAME)
    check_same_data(directory, state.get("data"), None if current is None else data_fingerprint(current), new_data)


def check_same_method_type(directory: Path, saved_config: dict, method_config, config_path: Path) -> None:
    """The checkpoint's adapter is of the method this run builds (another method: said so, before any of its
    settings, its learning rate included, is compared)."""
    now = config_to_dict(method_config).get("peft_type")
    if saved_config.get("peft_type") != now:
        raise UserError(f"--resume {directory}: the checkpoint holds a {saved_config.get('peft_type')} adapter "
                        f"({config_path}), this run builds {now} (--modification_type); resume with the run's own "
                        "method, or start a new run")


def check_same_method(directory: Path, saved_config: dict, method_config, config_path: Path) -> None:
    """The method settings the checkpoint's adapter was trained with (``saved_config``, read from
    ``config_path``) are the ones this run builds (of the same method: :func:`check_same_method_type`)."""
    now = json.loads(json_text(config_to_dict(method_config)))
    for key in sorted(set(saved_config) | set(now)):
        if key in ("base_model_name_or_path", "inference_mode", "minipeft"):
            continue  # the base model: check_same_settings; the minipeft block: metadata, init token ids
        if saved_config.get(key) != now.get(key):
            flag = _flag_of(method_config, key)
            raise UserError(f"--resume {directory}: the adapter was trained with {key} = "
                            f"{saved_config.get(key)!r:.60} ({config_path}), this run "
                            f"builds {now.get(key)!r:.60}{f' (set by {flag})' if flag else ''}; resume with the "
                            "run's own method settings, or start a new run")


def check_same_settings(directory: Path, saved_config: dict, current: dict) -> None:
    """The checkpoint's :data:`MATH_SETTINGS`, base model and quantization (its adapter's config) are the
    resuming run's (``current``: the adapter metadata it saves with)."""
    saved_run = saved_config.get("minipeft") if isinstance(saved_config.get("minipeft"), dict) else {}
    saved_run = {**saved_run, "base_model_name_or_path": saved_config.get("base_model_name_or_path")}
    saved_training, training = saved_run.get("training") or {}, current.get("training") or {}
    key = refused_change(saved_training, training, new_data=True)  # the data: check_same_data, by its fingerprint
    if key is not None:
        raise UserError(changed_setting_message(f"--resume {directory}", key, training[key], saved_training[key]))
    if saved_run.get("base_model_name_or_path") != current.get("base_model_name_or_path"):
        raise UserError(f"--resume {directory}: the run trained on --model {saved_run.get('base_model_name_or_path')}, "
                        f"this run loads {current.get('base_model_name_or_path')}; resume with the run's own --model")
    if saved_run.get("quantization") != current.get("quantization"):
        raise UserError(f"--resume {directory}: the run trained on {_base_kind(saved_run.get('quantization'))}, this "
                        f"run loads {_base_kind(current.get('quantization'))}; resume with the run's own --quantize "
                        "and --quantize_lm_head")


def _base_kind(quantization) -> str:
    """A base's quantization (an adapter's ``minipeft.quantization``: None, or the flags) in words."""
    if not isinstance(quantization, dict):
        return "an unquantized base (--quantize none)"
    lm_head = " with --quantize_lm_head" if quantization.get("quantize_lm_head") else ""
    return f"a base quantized to {quantization.get('quantize')}{lm_head}"


def check_same_data(directory: Path, saved: dict, current: dict = None, new_data: bool = False) -> None:
    """The resuming run reads the data the checkpoint's run read, cut the same way (:func:`data_fingerprint`;
    ``current`` None: the file the checkpoint names is unchanged), unless ``new_data``."""
    mismatch = data_mismatch(saved, current) if isinstance(saved, dict) else None
    if mismatch is not None and not new_data:
        raise UserError(f"--resume {directory}: {mismatch}: the checkpoint's position in the data would point "
                        "into other batches; resume with the original data and settings, or pass "
                        "--resume_new_data to continue on the new data from its first batch")


def check_position_fits(state: TrainState, checkpoint: Path, resume: str, batches_per_epoch: int,
                        total_steps: int) -> None:
    """The checkpoint's place (``state``, loaded from ``checkpoint`` for ``--resume resume``) fits this run:
    within an epoch of its data (``batches_per_epoch``), at least its epoch count (every epoch takes a step: more
    epochs than steps is a damaged ``trainer_state.json``), and not past its last step (``total_steps``: the run
    would "finish" having trained nothing)."""
    if state.batches_done > batches_per_epoch:
        raise UserError(f"--resume {resume}: {checkpoint} is {state.batches_done} batches into epoch "
                        f"{state.epoch}, but this run's data gives only {batches_per_epoch} batches per "
                        "epoch; resume with the original --dataset_path and data settings")
    if state.epoch > state.step:
        raise UserError(f"--resume {checkpoint / 'trainer_state.json'}: epoch {state.epoch} with only {state.step} "
                        "steps (every epoch takes at least one); the file is damaged: resume from an earlier "
                        "checkpoint")
    if state.step > total_steps:
        raise UserError(f"--resume {checkpoint}: is at step {state.step:,}, past this run's last step "
                        f"({total_steps:,}: --max_steps, --epochs); give more steps to continue it, or use its "
                        "adapter as it is")


def _flag_of(config, key: str):
    """The command-line flag of a method config's field (``r`` -> ``--lora_rank``), or None."""
    try:
        return flag_of(type(config), key)
    except (KeyError, TypeError):
        return None


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


