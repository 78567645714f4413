"""Training checkpoints: everything needed to continue a run exactly, written so that a kill cannot break one.

A checkpoint is a directory ``output_dir/checkpoints/step-N/``::

    step-N/
      adapter/adapter_config.json         the adapter, as every adapter is saved (never the frozen base)
      adapter/adapter_model.safetensors
      optimizer.safetensors               AdamW's moments and step counts, one tensor per (parameter, key)
      rng_state.safetensors               torch (CPU, CUDA), Python and NumPy generator states, per process
      prompt_encoder.safetensors          only for prefix tuning's MLP (--prefix_projection): its weights, which
                                          the adapter file folds into the prefixes it produces
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

**Checked.** A resume continues *this* run: before a tensor is loaded, :func:`load_checkpoint` refuses what
would continue another run or a damaged checkpoint (each field of ``trainer_state.json``, the tensors, the
method settings, the settings that change the math, the data's fingerprint), with one line naming the field:
the checks live in :mod:`minipeft.training.resume_checks`.
"""

import json
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minipeft.model.adapter_files import WEIGHTS_NAME, load_peft_state_dict
from minipeft.core.errors import UserError
from minipeft.core.finite import first_nonfinite_tensor, nonfinite_to_none
from minipeft.files.input_files import read_input_text
from minipeft.files.json_limits import loads_bounded
from minipeft.files.atomic import json_text
from minipeft.files.manifest import (MARKER_NAME, changed_content, foreign_files, is_older_marker, marker_problem,
                                     read_manifest)
from minipeft.files.safe_files import delete_marker_last, write_directory_atomically
from minipeft.training.resume_checks import (check_continues_the_run, data_fingerprint, data_mismatch,
                                             refuse_changed_file)
from minipeft.training.state_checks import check_optimizer_files, check_rng_tensors, check_state_file

FORMAT = "minipeft-checkpoint/1"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng_state.safetensors"
ENCODER_NAME = "prompt_encoder.safetensors"  # a prompt encoder's training form, where its file holds another
ADAPTER_DIR = "adapter"
CHECKPOINT_PATTERN = re.compile(r"step-(\d+)")


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
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    names = [parameter_names[id(parameter)] for parameter in parameters]
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
    for index, entries in state.items():  # another run's moments of other shapes would crash the fused step
        for name, value in entries.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            if index >= len(parameters):
                raise UserError(f"{source}: optimizer state for parameter {index}, but the run has "
                                f"{len(parameters)}: this checkpoint was saved by another run")
            if value.shape != parameters[index].shape:
                raise UserError(f"{source}: the optimizer state {name!r} of {names[index]} has shape "
                                f"{list(value.shape)}, the parameter {list(parameters[index].shape)}: this "
                                "checkpoint was saved by another run; resume with the run's own settings")
    groups = [{key: tuple(value) if key == "betas" else value for key, value in group.items()}
              for group in values["param_groups"]]
    return {"state": state, "param_groups": groups}


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

    encoder = _training_state(peft_model)

    def write(temporary: Path) -> None:
        peft_model.save_adapter(temporary / ADAPTER_DIR, adapter_tensors, **adapter_metadata)  # refuses an empty one
        if encoder is not None:
            save_file({name: tensor.to("cpu").contiguous() for name, tensor in encoder.items()},
                      temporary / ENCODER_NAME, metadata={"format": "pt"})
        save_file(optimizer_tensors, temporary / OPTIMIZER_NAME, metadata={"format": "pt"})
        save_file(rng_tensors, temporary / RNG_NAME, metadata={"format": "pt"})
        (temporary / STATE_NAME).write_text(json_text(state, indent=1))  # written last

    return write_directory_atomically(directory, write)


def _training_state(peft_model):
    """The prompt encoder's tensors that the adapter file does not hold (:meth:`PrefixEncoder.training_state`:
    the prefix MLP), or None."""
    encoder = getattr(peft_model, "prompt_encoder", None)
    return encoder.training_state() if hasattr(encoder, "training_state") else None


def _read_tensors(path: Path) -> dict:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{path}: not a readable safetensors file ({error})") from None


def load_checkpoint(directory: Path, peft_model, optimizer, scaler, rank: int = 0, load_adapter=None,
                    load_optimizer=None, current: dict = None, new_data: bool = False) -> dict:
    """Load a checkpoint into a freshly built ``peft_model``, ``optimizer`` and ``scaler``, once it is checked
    to continue this run (the module docstring's "Checked"; ``current``, ``new_data``: see
    :func:`~minipeft.training.resume_checks.check_continues_the_run`).

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
        state = check_state_file(loads_bounded(read_input_text(state_path)), str(state_path), FORMAT)
    except json.JSONDecodeError as error:
        raise UserError(f"{state_path}: not valid JSON ({error})") from None
    # Its record of each file's sha256 is what tells the checkpoint from an edited copy: without one (no marker,
    # or one that records no file: damaged, or an older minipeft's) it cannot be checked.
    unmarked = marker_problem(directory)
    identity = (read_manifest(directory) or {}).get(STATE_NAME)
    if unmarked is None and not (isinstance(identity, dict) and "sha256" in identity):
        unmarked = (f"its {MARKER_NAME} marker is not minipeft's record of its files (damaged, or an older "
                    "minipeft's)" if is_older_marker(directory) else
                    f"its {MARKER_NAME} marker records no sha256 of {STATE_NAME}")
    if unmarked is not None:
        raise UserError(f"--resume {directory}: {unmarked} (minipeft writes one into every checkpoint, recording "
                        "its files): it cannot be told from an edited copy; resume from another checkpoint")
    named_step = checkpoint_step(directory)
    if named_step is not None and named_step != state["trainer"]["step"]:  # a state file copied from another one
        raise UserError(f"{state_path}: \"step\" is {state['trainer']['step']}, but its folder is step "
                        f"{named_step}; the checkpoint is damaged: resume from another one")
    check_continues_the_run(directory, directory / ADAPTER_DIR, state, peft_model, current, new_data)
    weights = directory / ADAPTER_DIR / WEIGHTS_NAME
    adapter = _read_tensors(weights)
    bad = first_nonfinite_tensor(adapter)  # the loop saves finite weights only: this file was changed since
    if bad is not None:
        raise UserError(f"--resume {directory}: {weights}: tensor {bad} holds NaN or infinity (minipeft saves "
                        "finite checkpoints only: the file was damaged or edited); resume from an earlier "
                        "checkpoint (--resume DIR)")
    if _training_state(peft_model) is None:
        (load_adapter or load_peft_state_dict)(peft_model, adapter, str(weights))
    else:  # the adapter file holds the MLP's output; training goes on from the MLP itself
        encoder_path = directory / ENCODER_NAME
        if not encoder_path.is_file():
            raise UserError(f"--resume {directory}: no {ENCODER_NAME} (the prefix MLP's weights, which "
                            f"--prefix_projection trains; its adapter holds only their output): this checkpoint "
                            "cannot be continued; start a new run, or use its adapter as it is")
        encoder = _read_tensors(encoder_path)
        bad = first_nonfinite_tensor(encoder)
        if bad is not None:
            raise UserError(f"--resume {directory}: {encoder_path}: tensor {bad} holds NaN or infinity; resume "
                            "from an earlier checkpoint (--resume DIR)")
        peft_model.prompt_encoder.load_training_state(encoder, str(encoder_path))
    parameter_names = {id(parameter): name for name, parameter in peft_model.named_parameters()}
    optimizer_path = directory / OPTIMIZER_NAME
    optimizer_tensors = check_optimizer_files(_read_tensors(optimizer_path), state["optimizer"], optimizer_path,
                                              state_path)
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
    check_rng_tensors(mine, directory / RNG_NAME, prefix)
    # Last, once every file passed the checks that name what is wrong in it: a file of the right shapes and finite
    # values that is still not the one written here (another checkpoint's, copied in; a trainer_state.json whose
    # "batches_done" was edited within its range).
    changed = changed_content(directory) + changed_content(directory / ADAPTER_DIR)
    if changed:
        refuse_changed_file(directory, changed[0])
    trainer = dict(state["trainer"])
    if new_data and data_mismatch(state.get("data") or {}, None if current is None else data_fingerprint(current)):
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
    """``--resume latest`` -> the newest checkpoint of ``output_dir``; a run directory, or its ``checkpoints``
    folder -> its newest; else the checkpoint directory itself."""
    path = Path(output_dir) if flag == "latest" else Path(flag)
    if (path / STATE_NAME).is_file():
        return path
    if flag != "latest" and path.name == "checkpoints" and list_checkpoints(path):
        path = path.parent  # the folder of a run's checkpoints: its newest, as for the run
    checkpoints = list_checkpoints(path / "checkpoints")
    if not checkpoints:
        where = f"{path / 'checkpoints'}" if flag == "latest" else str(path)
        raise UserError(f"--resume {flag}: no checkpoint in {where} (expected step-N directories with {STATE_NAME})")
    newer = sorted((folder for folder in (path / "checkpoints").iterdir() if (checkpoint_step(folder) or 0) >
                    checkpoint_step(checkpoints[-1]) and not (folder / STATE_NAME).is_file()), key=checkpoint_step)
    if newer:  # (a checkpoint is written whole: one without its state lost a file since)
        print(f"note: --resume {flag}: {newer[-1]} has no {STATE_NAME} (incomplete); resuming from "
              f"{checkpoints[-1]}, and the run will write its later checkpoints anew", file=sys.stderr)
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
        delete_marker_last(doomed)  # (its marker last: a kill inside leaves a folder the next run deletes)
    return kept
