"""Training checkpoints: everything needed to continue a run exactly, written so that a kill cannot break one.

A checkpoint is a directory ``output_dir/checkpoints/step-N/``::

    step-N/
      adapter/adapter_config.json         the adapter, as every adapter is saved (never the frozen base)
      adapter/adapter_model.safetensors
      optimizer.safetensors               AdamW's moments and step counts, one tensor per (parameter, key)
      rng_state.safetensors               torch (CPU, CUDA), Python and NumPy generator states, per process
      trainer_state.json                  the rest: step, epoch, position in the epoch, best eval loss,
                                          optimizer hyper-parameters, grad-scaler scalars, RNG scalars,
                                          the data's fingerprint (data_fingerprint)

No pickle is written or read: tensors go to safetensors, everything else to JSON.

**Atomic.** The files are written into a hidden temporary directory beside the final one, each file is
``fsync``-ed, then the directory is renamed into place (a rename is atomic on POSIX file systems) and the
parent directory is ``fsync``-ed (:func:`minipeft.files.safe_files.write_directory_atomically`). A process killed at
any moment leaves either no ``step-N`` or a complete one, so the previous checkpoint always stays loadable;
leftover ``.tmp-*`` directories are removed on the next run. The training loop saves a checkpoint only when
the adapter's weights are finite, so every checkpoint is one to go back to.

**Resume.** ``--resume latest`` (or a path) loads the adapter tensors into the freshly built adapter
(strictly: a missing or misshaped tensor is an error, never a silently re-initialised adapter), the
optimizer state, the grad scaler, and the position in the data; the RNG states are restored once the loop has
skipped to that position, so an interrupted and resumed run computes bit for bit what an uninterrupted one
does (on CPU, same settings).

**Checked.** A resume continues *this* run, so :func:`load_checkpoint` refuses, with one line naming the field,
what would continue another one or a damaged one (issue #26):

- every field of ``trainer_state.json`` by type and range (a step of -5, 1e20 or "3", a NaN best loss, a
  misshaped optimizer group or RNG record; :func:`minipeft.training.state.check_saved_state`), and the
  tensors beside it (optimizer moments finite and named as written, generator states of their generators' size);
- a method setting other than the checkpoint's adapter was trained with (``lora_alpha``, ``lora_dropout``,
  ``target_modules`` ...: same shapes, other math, so the strict tensor load alone would not notice);
- the data: each checkpoint records a fingerprint of what decides the batches (:func:`data_fingerprint`: the
  data file's sha256, the template, batch size, maximum length, seed, accumulation). A file changed since the
  checkpoint is refused; given the resuming run's metadata (``current=``), so is another file or setting, and
  with it the settings that change the math (:data:`MATH_SETTINGS`, the base model, its quantization).
  ``new_data=True`` (``--resume_new_data``) continues on the new data on purpose: the weights, optimizer and
  step go on, the new data starts at its first batch.
"""

import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minipeft.model.adapter_files import (CONFIG_NAME, WEIGHTS_NAME, config_to_dict, load_peft_state_dict,
                                          read_adapter_config)
from minipeft.core.errors import UserError
from minipeft.core.finite import first_nonfinite_tensor, is_finite_number, nonfinite_to_none
from minipeft.core.options import flag_of
from minipeft.files.input_files import read_input_text
from minipeft.files.json_limits import loads_bounded
from minipeft.files.atomic import json_text
from minipeft.files.manifest import foreign_files
from minipeft.files.safe_files import write_directory_atomically
from minipeft.training.state import check_saved_state

FORMAT = "minipeft-checkpoint/1"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng_state.safetensors"
ADAPTER_DIR = "adapter"
CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")
# What cuts the data into the same batches in the same order (besides the file): the run's flags of these names.
DATA_SETTINGS = ("template", "batch_size", "max_length", "seed", "gradient_accumulation_steps", "val_size")
# Training flags that change what a step computes (max_steps and epochs may grow: the run goes on longer).
MATH_SETTINGS = ("learning_rate", "lr_schedule", "warmup_steps", "warmup_ratio", "min_lr", "weight_decay",
                 "max_grad_norm", "precision")


# -- random number generators ------------------------------------------------------------------------------
def capture_rng_state() -> tuple:
    """``(tensors, scalars)``: this process's generator states, as safetensors-ready tensors plus JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    python_version, python_words, python_gauss = random.getstate()
    tensors["python"] = torch.tensor(python_words, dtype=torch.int64)  # 624 words + position, all < 2**32
    numpy_kind, numpy_words, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(numpy_words.astype(np.int64))
    scalars = {"python": [python_version, python_gauss],
               "numpy": [numpy_kind, int(numpy_position), int(numpy_has_gauss), float(numpy_gauss)]}
    return tensors, scalars


def restore_rng_state(tensors: dict, scalars: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[key] for key in sorted(tensors, key=str) if key.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    python_version, python_gauss = scalars["python"]
    random.setstate((python_version, tuple(tensors["python"].tolist()), python_gauss))
    numpy_kind, numpy_position, numpy_has_gauss, numpy_gauss = scalars["numpy"]
    np.random.set_state((numpy_kind, tensors["numpy"].numpy().astype(np.uint32), numpy_position,
                         numpy_has_gauss, numpy_gauss))


# -- optimizer ---------------------------------------------------------------------------------------------
def optimizer_state_to_files(optimizer: torch.optim.Optimizer, parameter_names: dict, state_dict: dict = None) -> tuple:
    """``(tensors, json_values)`` for ``state_dict`` (default ``optimizer.state_dict()``; a sharded run passes
    the gathered full one); ``parameter_names`` maps ``id(p)`` -> name.

    Tensors are keyed ``state.<index>.<key>`` (``state.3.exp_avg``); the parameter behind each index is
    recorded by name, so that loading into a differently built model fails loudly instead of mixing moments.
    """
    state_dict = optimizer.state_dict() if state_dict is None else state_dict
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    names = [parameter_names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
    groups = [{key: list(value) if isinstance(value, tuple) else value for key, value in group.items()}
              for group in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "parameter_names": names, "scalars": scalars}


def optimizer_state_from_files(optimizer: torch.optim.Optimizer, tensors: dict, values: dict, parameter_names: dict,
                               source: str) -> dict:
    """The ``optimizer.state_dict()`` that :func:`optimizer_state_to_files` wrote (checked against the names)."""
    names = [parameter_names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]
    if names != values["parameter_names"]:
        raise UserError(f"{source}: the optimizer state was saved for other trainable parameters "
                        "(another --modification_type or method flags?); resume with the run's own settings")
    state = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for key, value in values["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{key: tuple(value) if key == "betas" else value for key, value in group.items()}
              for group in values["param_groups"]]
    return {"state": state, "param_groups": groups}


# -- what the checkpoint continues ---------------------------------------------------------------------------
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
    ``training`` flags): ``dataset_path`` and its ``dataset_sha256`` (None for the built-in data), and the
    :data:`DATA_SETTINGS` the run gave."""
    training = adapter_metadata.get("training") or {}
    settings = {**training, "template": adapter_metadata.get("template")}
    path = training.get("dataset_path")
    sha256 = file_sha256(path) if path is not None and Path(path).is_file() else None
    return {"dataset_path": path, "dataset_sha256": sha256,
            **{key: settings[key] for key in DATA_SETTINGS if key in settings}}


def _data_mismatch(saved: dict, current: dict | None) -> str | None:
    """How the resuming run's data differs from the checkpoint's (None: the same, or nothing to compare)."""
    if current is None:  # the caller gave no fingerprint: at least the file the run read must be unchanged
        path = saved.get("dataset_path")
        if path is None or saved.get("dataset_sha256") is None or not Path(path).is_file():
            return None
        current = {**saved, "dataset_sha256": file_sha256(path)}
    if saved.get("dataset_sha256") != current.get("dataset_sha256") and saved.get("dataset_path") == \
            current.get("dataset_path"):
        return f"--dataset_path {saved['dataset_path']} changed since the run started (its sha256 was " \
               f"{str(saved.get('dataset_sha256'))[:12]}..., now {str(current.get('dataset_sha256'))[:12]}...)"
    for key in ("dataset_path", "dataset_sha256", *DATA_SETTINGS):
        if key in saved and key in current and saved[key] != current[key]:
            flag = "--dataset_path" if key == "dataset_sha256" else f"--{key}"
            return f"{flag} {current[key]} (the run started with {saved[key]})"
    return None


def check_continues_the_run(directory: Path, state: dict, peft_model, current: dict = None,
                            new_data: bool = False) -> None:
    """Refuse a resume that would continue another run than the checkpoint's (the module docstring's list).

    ``current``: the resuming run's adapter metadata (``template``, ``training`` flags, base model); without
    it the checks that need it (another data file or setting, :data:`MATH_SETTINGS`) are skipped.
    """
    saved_config = read_adapter_config(directory / ADAPTER_DIR)
    check_same_method(directory, saved_config, peft_model.peft_config)
    if current is not None:
        check_same_settings(directory, saved_config, current)
    check_same_data(directory, state.get("data"), None if current is None else data_fingerprint(current), new_data)


def check_same_method(directory: Path, saved_config: dict, method_config) -> None:
    """The method settings the checkpoint's adapter was trained with are the ones this run builds."""
    now = json.loads(json_text(config_to_dict(method_config)))
    if saved_config.get("peft_type") != now.get("peft_type"):  # another method: say so, not its first field
        raise UserError(f"--resume {directory}: the checkpoint holds a {saved_config.get('peft_type')} adapter "
                        f"({directory / ADAPTER_DIR / CONFIG_NAME}), this run builds {now.get('peft_type')} "
                        "(--modification_type); resume with the run's own method, or start a new run")
    for key in sorted(set(saved_config) | set(now)):
        if key in ("base_model_name_or_path", "inference_mode", "minipeft"):
            continue  # the base model: check_same_settings; the minipeft block: metadata, init token ids
        if saved_config.get(key) != now.get(key):
            flag = _flag_of(method_config, key)
            raise UserError(f"--resume {directory}: the adapter was trained with {key} = "
                            f"{saved_config.get(key)!r:.60} ({directory / ADAPTER_DIR / CONFIG_NAME}), this run "
                            f"builds {now.get(key)!r:.60}{f' ({flag})' if flag else ''}; resume with the run's own "
                            "method settings, or start a new run")


def check_same_settings(directory: Path, saved_config: dict, current: dict) -> None:
    """The checkpoint's :data:`MATH_SETTINGS`, base model and quantization (its adapter's config) are the
    resuming run's (``current``: the adapter metadata it saves with)."""
    saved_run = saved_config.get("minipeft") if isinstance(saved_config.get("minipeft"), dict) else {}
    saved_run = {**saved_run, "base_model_name_or_path": saved_config.get("base_model_name_or_path")}
    saved_training, training = saved_run.get("training") or {}, current.get("training") or {}
    for key in MATH_SETTINGS:
        if key in saved_training and key in training and saved_training[key] != training[key]:
            raise UserError(f"--resume {directory}: --{key} {training[key]} changes what the run computes (it "
                            f"started with {saved_training[key]}); resume with the run's own --{key}, or start a "
                            "new run")
    for key in ("base_model_name_or_path", "quantization"):
        if saved_run.get(key) != current.get(key):
            raise UserError(f"--resume {directory}: the run trained on {key} {saved_run.get(key)!r}, this run "
                            f"loads {current.get(key)!r}; resume with the run's own --model and --quantize")


def check_same_data(directory: Path, saved: dict, current: dict = None, new_data: bool = False) -> None:
    """The resuming run reads the data the checkpoint's run read, cut the same way (:func:`data_fingerprint`;
    ``current`` None: the file the checkpoint names is unchanged), unless ``new_data``."""
    mismatch = _data_mismatch(saved, current) if isinstance(saved, dict) else None
    if mismatch is not None and not new_data:
        raise UserError(f"--resume {directory}: {mismatch}: the checkpoint's position in the data would point "
                        "into other batches; resume with the original data and settings, or pass "
                        "--resume_new_data to continue on the new data from its first batch")


def _flag_of(config, key: str):
    """The command-line flag of a method config's field (``r`` -> ``--lora_rank``), or None."""
    try:
        return flag_of(type(config), key)
    except (KeyError, TypeError):
        return None


def _check_state_file(state, source: str) -> dict:
    """The parts of ``trainer_state.json`` besides ``trainer`` (see :func:`check_saved_state`), by type."""
    def refuse(field: str, expected: str, value):
        raise UserError(f"{source}: \"{field}\" must be {expected}, got {value!r:.60}")

    if not isinstance(state, dict):
        raise UserError(f"{source}: expected a JSON object, found {type(state).__name__}")
    if state.get("format") != FORMAT:
        raise UserError(f"{source}: format {state.get('format')!r}, expected {FORMAT!r}")
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
    for index, group in enumerate(groups):
        for key, value in group.items():
            field = f"optimizer.param_groups[{index}].{key}"
            if key == "params":
                if not isinstance(value, list) or not all(isinstance(item, int) and item >= 0 for item in value):
                    refuse(field, "a list of parameter indices", value)
            elif key == "betas":
                if not (isinstance(value, list) and len(value) == 2
                        and all(is_finite_number(beta) and 0 <= beta < 1 for beta in value)):
                    refuse(field, "two numbers in [0, 1)", value)
            elif key in ("lr", "initial_lr", "weight_decay", "eps"):
                if not (is_finite_number(value) and value >= 0):
                    refuse(field, "a finite number ≥ 0", value)
            elif isinstance(value, float) and not math.isfinite(value):
                refuse(field, "a finite number", value)
    scaler = state.get("grad_scaler")
    if scaler is not None and not (isinstance(scaler, dict) and all(
            is_finite_number(value) and value > 0 if key == "scale" else not isinstance(value, float)
            or math.isfinite(value) for key, value in scaler.items())):
        refuse("grad_scaler", "null or an object of finite numbers (a positive scale)", scaler)
    rng = state.get("rng")
    if not isinstance(rng, list) or not all(
            isinstance(entry, dict) and isinstance(entry.get("python"), list) and len(entry["python"]) == 2
            and isinstance(entry.get("numpy"), list) and len(entry["numpy"]) == 4 for entry in rng):
        refuse("rng", "one object of generator scalars per process", rng)
    if "data" in state and state["data"] is not None and not isinstance(state["data"], dict):
        refuse("data", "an object (the data fingerprint)", state["data"])
    check_saved_state(state.get("trainer"), source)
    return state


# -- checkpoints -------------------------------------------------------------------------------------------
def save_checkpoint(directory: Path, peft_model, optimizer, scaler, trainer_state: dict, rng_states: list,
                    adapter_metadata: dict, adapter_tensors: dict = None, optimizer_state: dict = None) -> Path:
    """Write a checkpoint atomically (see the module docstring); ``rng_states`` holds one
    ``(tensors, scalars)`` pair per process, rank 0 first. A sharded run passes the full ``adapter_tensors``
    and ``optimizer_state`` it gathered (:mod:`minipeft.training.sharding`): the files are the same."""
    parameter_names = {id(parameter): name for name, parameter in peft_model.named_parameters()}
    optimizer_tensors, optimizer_values = optimizer_state_to_files(optimizer, parameter_names, optimizer_state)
    rng_tensors = {f"rank{rank}.{key}": tensor for rank, (tensors, _) in enumerate(rng_states)
                   for key, tensor in tensors.items()}
    state = {
        "format": FORMAT,
        "trainer": nonfinite_to_none(trainer_state),  # an eval loss over no tokens is NaN: null in JSON
        "optimizer": optimizer_values,
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "rng": [scalars for _, scalars in rng_states],
        "data": data_fingerprint(adapter_metadata),  # what a resume must read again to continue this run
    }

    def write(temporary: Path) -> None:
        peft_model.save_adapter(temporary / ADAPTER_DIR, adapter_tensors, **adapter_metadata)  # refuses an empty one
        save_file(optimizer_tensors, temporary / OPTIMIZER_NAME, metadata={"format": "pt"})
        save_file(rng_tensors, temporary / RNG_NAME, metadata={"format": "pt"})
        (temporary / STATE_NAME).write_text(json_text(state, indent=1))  # written last

    return write_directory_atomically(directory, write)


OPTIMIZER_KEY = re.compile(r"state\.\d+\.\w+")
SCALAR_KEY = re.compile(r"\d+\.\w+")
# The generator states restore_rng_state sets: (dtype, number of values, largest value + 1 or None).
RNG_SHAPES = {"torch_cpu": (torch.uint8, torch.get_rng_state().numel(), None),
              "python": (torch.int64, 625, 2**32), "numpy": (torch.int64, 624, 2**32)}


def _check_optimizer_files(tensors: dict, values: dict, path: Path) -> dict:
    """The optimizer's tensors are named ``state.<index>.<key>`` and finite; its scalars ``<index>.<key>``."""
    for key in tensors:
        if not OPTIMIZER_KEY.fullmatch(key):
            raise UserError(f"{path}: tensor {key!r:.60} is not an optimizer state (state.<index>.<name>)")
    bad = first_nonfinite_tensor(tensors)
    if bad is not None:
        raise UserError(f"{path}: tensor {bad} holds NaN or infinity; the checkpoint is damaged (resume from an "
                        "earlier one)")
    for key in values["scalars"]:
        if not SCALAR_KEY.fullmatch(key):
            raise UserError(f"{path.with_name(STATE_NAME)}: \"optimizer.scalars\" has the key {key!r:.60}, not "
                            "<index>.<name>")
    return tensors


def _check_rng_tensors(tensors: dict, path: Path, prefix: str) -> None:
    """This process's generator states have the dtype and size their generators take."""
    for key, (dtype, count, bound) in RNG_SHAPES.items():
        tensor = tensors.get(key)
        if tensor is None:
            continue  # (no state for this process: the loop says so and goes on)
        if tensor.dtype != dtype or tensor.dim() != 1 or tensor.numel() != count or bound is not None and (
                tensor.min() < 0 or tensor.max() >= bound):
            raise UserError(f"{path}: tensor {prefix}{key} is not a {key} generator state ({count} values of "
                            f"{str(dtype).replace('torch.', '')}); the checkpoint is damaged")


def _read_tensors(path: Path) -> dict:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error})") from None


def load_checkpoint(directory: Path, peft_model, optimizer, scaler, rank: int = 0, load_adapter=None,
                    load_optimizer=None, current: dict = None, new_data: bool = False) -> dict:
    """Load a checkpoint into a freshly built ``peft_model``, ``optimizer`` and ``scaler``, once it is checked
    to continue this run (the module docstring's "Checked"; ``current``, ``new_data``: see
    :func:`check_continues_the_run`).

    ``load_adapter(peft_model, tensors, source)`` and ``load_optimizer(peft_model, optimizer, state_dict)`` put
    the full tensors into a sharded model (:mod:`minipeft.training.sharding`); by default they are copied.

    Returns the trainer state (a dict) with ``"rng"`` = this process's ``(tensors, scalars)``, or None when the
    checkpoint has no state for this rank (a different number of processes).
    """
    directory = Path(directory)
    state_path = directory / STATE_NAME
    if not state_path.is_file():
        raise UserError(f"--resume {directory}: not a checkpoint (no {STATE_NAME}); "
                        "checkpoints are the step-N directories under <output_dir>/checkpoints")
    try:
        state = _check_state_file(loads_bounded(read_input_text(state_path)), str(state_path))
    except json.JSONDecodeError as error:
        raise UserError(f"{state_path}: not valid JSON ({error})") from None
    check_continues_the_run(directory, state, peft_model, current, new_data)
    weights = directory / ADAPTER_DIR / WEIGHTS_NAME
    adapter = _read_tensors(weights)
    bad = first_nonfinite_tensor(adapter)  # the loop saves finite weights only: this file was changed since
    if bad is not None:
        raise UserError(f"--resume {directory}: {weights}: tensor {bad} holds NaN or infinity (minipeft saves "
                        "finite checkpoints only: the file was damaged or edited); resume from an earlier "
                        "checkpoint (--resume DIR)")
    (load_adapter or load_peft_state_dict)(peft_model, adapter, str(weights))
    parameter_names = {id(parameter): name for name, parameter in peft_model.named_parameters()}
    optimizer_path = directory / OPTIMIZER_NAME
    optimizer_tensors = _check_optimizer_files(_read_tensors(optimizer_path), state["optimizer"], optimizer_path)
    optimizer_state = optimizer_state_from_files(optimizer, optimizer_tensors, state["optimizer"], parameter_names,
                                                 str(optimizer_path))
    try:
        if load_optimizer is not None:
            load_optimizer(peft_model, optimizer, optimizer_state)
        else:
            optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as error:
        raise UserError(f"{optimizer_path}: does not fit this run's optimizer ({str(error).splitlines()[0]:.200}); "
                        "the checkpoint is damaged or from another run") from None
    if scaler is not None and state["grad_scaler"]:
        scaler.load_state_dict(state["grad_scaler"])
    rng_tensors = _read_tensors(directory / RNG_NAME)
    prefix = f"rank{rank}."
    mine = {key[len(prefix):]: tensor for key, tensor in rng_tensors.items() if key.startswith(prefix)}
    _check_rng_tensors(mine, directory / RNG_NAME, prefix)
    trainer = dict(state["trainer"])
    if new_data and _data_mismatch(state.get("data") or {}, None if current is None else data_fingerprint(current)):
        trainer.update(batches_done=0, epoch_nll=0.0, epoch_target_tokens=0)  # the new data from its first batch
    trainer["rng"] = (mine, state["rng"][rank]) if mine and rank < len(state["rng"]) else None
    return trainer


def checkpoint_step(path: Path):
    match = CHECKPOINT_PATTERN.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoints_dir: Path) -> list:
    """Complete checkpoints under ``checkpoints_dir``, oldest first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = [path for path in checkpoints_dir.iterdir()
             if checkpoint_step(path) is not None and (path / STATE_NAME).is_file()]
    return sorted(found, key=checkpoint_step)


def resolve_resume(flag: str, output_dir: Path) -> Path:
    """``--resume latest`` -> the newest checkpoint of ``output_dir``; a run directory -> its newest; else the
    checkpoint directory itself."""
    path = Path(output_dir) if flag == "latest" else Path(flag)
    if (path / STATE_NAME).is_file():
        return path
    checkpoints = list_checkpoints(path / "checkpoints")
    if not checkpoints:
        where = f"{path / 'checkpoints'}" if flag == "latest" else str(path)
        raise UserError(f"--resume {flag}: no checkpoint in {where} (expected step-N directories with {STATE_NAME})")
    return checkpoints[-1]


def prune_checkpoints(checkpoints_dir: Path, keep_last: int, keep_steps=()) -> list:
    """Delete all but the newest ``keep_last`` checkpoints and those at ``keep_steps`` (the best one).

    A checkpoint holding a file minipeft did not write (a user's note) is kept, never deleted with it: the
    returned list names those (the loop says so once)."""
    checkpoints = list_checkpoints(checkpoints_dir)
    kept = []
    for path in checkpoints[:-keep_last] if keep_last > 0 else checkpoints:
        if checkpoint_step(path) in set(keep_steps):
            continue
        if foreign_files(path):
            kept.append(path)
            continue
        doomed = path.with_name(f".old-{path.name}-{os.getpid()}")
        os.rename(path, doomed)  # first out of sight (atomic), so a kill never leaves half a checkpoint
        shutil.rmtree(doomed, ignore_errors=True)
    return kept
