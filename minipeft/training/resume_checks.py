"""What a resume checks before it continues a run from a checkpoint (:mod:`minipeft.training.checkpoint`).

A resume continues *this* run, so :func:`~minipeft.training.checkpoint.load_checkpoint` refuses, with one line
naming the field, what would continue another one or a damaged one (issue #26):

- every field of ``trainer_state.json`` by type and range, and the tensors beside it
  (:mod:`minipeft.training.state_checks`);
- a file that is not the one minipeft wrote there, by the sha256 the checkpoint's marker records
  (:func:`refuse_changed_file`);
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
import os
import time
import typing
from pathlib import Path

from minipeft.core.errors import UserError
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
    if changed_content(adapter_dir, names=(CONFIG_NAME,)):  # before its values are compared with the flags'
        refuse_changed_file(directory, adapter_dir / CONFIG_NAME)
    check_same_method_type(directory, saved_config, peft_model.peft_config, adapter_dir / CONFIG_NAME)  # most basic
    if current is not None:  # then the base: on another model, the method's own settings differ as a consequence
        check_same_settings(directory, saved_config, current)
    check_same_method(directory, saved_config, peft_model.peft_config, adapter_dir / CONFIG_NAME)
    check_same_data(directory, state.get("data"), None if current is None else data_fingerprint(current), new_data)


def refuse_changed_file(directory: Path, path: Path) -> typing.NoReturn:
    """Refuse the checkpoint ``directory`` for ``path``, a file of it whose bytes are not those minipeft wrote
    (:func:`~minipeft.files.manifest.changed_content`: another checkpoint's copied in, or edited)."""
    raise UserError(f"--resume {directory}: {path} is not the file minipeft wrote there (its sha256 differs from the "
                    "checkpoint's record); resume from another checkpoint")


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
    if mismatch is not None and not new_data and mismatch.startswith("this run has"):  # the data is the same
        started = saved["processes"]
        how = "torchrun --nproc_per_node=" + str(started) if started > 1 else "one process (no torchrun)"
        raise UserError(f"--resume {directory}: {mismatch}: continue it as it was started, with {how}; or pass "
                        "--resume_new_data to go on with this number of processes, from the first batch of the data")
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
