"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, in Hugging Face peft's layout.

An adapter trained here loads in ``peft.PeftModel.from_pretrained`` (and so in vLLM and TGI), and a
LoRA/IA3/prompt/prefix adapter saved by peft loads here. transformers' ``model.load_adapter()`` loads the LoRA
(and IA3) files too, but refuses prompt-learning adapters (prompt and prefix tuning) with a ``ValueError``.
See ``PEFT_FORMAT.md`` (shared with the project) for the observed format; in short:

- tensor names are the model's own parameter paths under ``base_model.model.`` with no adapter name:
  ``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`` ``[r, 768]``;
- a ``modules_to_save`` copy is saved under the original module's name (``...lm_head.weight``);
- prompt and prefix tuning save one tensor, ``prompt_embeddings`` (their ``prompt_encoder`` says how);
- only safetensors: no pickle is ever written or read.

minipeft's own facts about an adapter (the prompt template it was trained with; for prompt tuning from text,
the init text's token ids, a field peft's config lacks) go under one extra config key, ``"minipeft"``, which
peft ignores with a warning. Methods peft does not have (bottleneck
adapters, selective freezing, BitFit) use ``peft_type`` values of our own, documented in the README.
"""

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minipeft.errors import UserError
from minipeft.file_modes import use_umask
from minipeft.methods import method_for_config, method_for_peft_type

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
# Config fields of peft's methods that peft's own config classes lack: saved inside the "minipeft" block, so that
# peft warns about one unknown key, not two.
MINIPEFT_ONLY_FIELDS = ("prompt_tuning_init_token_ids",)


def to_peft_key(name: str) -> str:
    """Our parameter name inside a PeftModel -> the tensor name in the adapter file.

    ``base_model.transformer.h.0.attn.c_attn.lora_A.weight`` -> ``base_model.model.transformer...``;
    ``base_model.lm_head.modules_to_save.weight`` -> ``base_model.model.lm_head.weight``.
    """
    if not name.startswith("base_model."):
        raise ValueError(name)
    path = name[len("base_model."):].replace(".modules_to_save.", ".")
    return "base_model.model." + path


def peft_state_dict(peft_model) -> dict:
    """``{tensor name in the file: tensor}`` for everything the adapter trains."""
    state = {}
    if peft_model.prompt_encoder is not None:
        state.update(peft_model.prompt_encoder.peft_state_dict())
    for name, parameter in peft_model.adapter_parameters().items():
        if not name.startswith("prompt_encoder."):
            state[to_peft_key(name)] = parameter.detach()
    return state


def config_to_dict(config, **metadata) -> dict:
    """A method config as peft writes it (plus ``base_model_name_or_path`` and our ``minipeft`` block)."""
    values = dataclasses.asdict(config)
    for key, value in values.items():
        if isinstance(value, (set, tuple)):
            values[key] = sorted(value)
        elif isinstance(value, float) and value.is_integer() and key in ("lora_alpha",):
            values[key] = int(value)  # peft writes 16, not 16.0
    values["peft_type"] = method_for_config(config).peft_type
    values["task_type"] = "CAUSAL_LM"
    values["inference_mode"] = True
    values["base_model_name_or_path"] = metadata.pop("base_model_name_or_path", None)
    for key in MINIPEFT_ONLY_FIELDS:  # fields peft's config does not have go into our block, not the top level
        if key in values:
            value = values.pop(key)
            if value is not None:
                metadata[key] = value
    if metadata:
        values["minipeft"] = metadata
    return values


def config_from_dict(values: dict, source: str = CONFIG_NAME):
    """The config dataclass for a saved config; unknown keys are ignored, missing ones take the defaults."""
    if not isinstance(values, dict) or "peft_type" not in values:
        raise UserError(f"{source}: not an adapter config (no 'peft_type' key)")
    method = method_for_peft_type(values["peft_type"], source)
    config_class = method.config_class
    block = values.get("minipeft") if isinstance(values.get("minipeft"), dict) else {}
    values = {**values, **{key: block[key] for key in MINIPEFT_ONLY_FIELDS if key in block}}
    names = {field.name for field in dataclasses.fields(config_class)}
    try:
        return config_class(**{key: value for key, value in values.items() if key in names})
    except TypeError as error:
        raise UserError(f"{source}: {error}") from None


def _write_atomically(path: Path, write) -> None:
    """Write via a temporary file in the same directory and ``os.replace``: never a half-written file."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        use_umask(temporary)  # mkstemp's 0600 -> the mode any new file gets
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_adapter(peft_model, directory, **metadata) -> Path:
    """Write the adapter of ``peft_model`` to ``directory`` (created if needed); returns the directory.

    ``metadata`` may hold ``base_model_name_or_path`` and anything minipeft should remember (template...).

    Raises:
        UserError: when the adapter holds no tensor (an empty adapter is always a mistake upstream).
    """
    state = peft_state_dict(peft_model)
    if not state:
        raise UserError(f"{directory}: refusing to save an adapter with no tensors")
    state = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state.items()}
    metadata.setdefault("base_model_name_or_path", getattr(peft_model.config, "name_or_path", None) or None)
    config = config_to_dict(peft_model.peft_config, **metadata)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomically(directory / WEIGHTS_NAME, lambda path: save_file(state, path, metadata={"format": "pt"}))
    _write_atomically(directory / CONFIG_NAME,
                      lambda path: Path(path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    return directory


def read_adapter_config(directory) -> dict:
    """The raw ``adapter_config.json`` of an adapter directory."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise UserError(f"{directory}: no such adapter directory")
    if not config_path.is_file():
        raise UserError(f"{directory}: no {CONFIG_NAME} (is this an adapter directory?)")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_path}: not valid JSON ({error})") from None


def load_adapter(base_model, directory, is_trainable: bool = False):
    """Apply the adapter saved in ``directory`` to ``base_model``; returns a :class:`PeftModel`.

    With ``is_trainable=True`` the adapter's parameters can be trained further (any method, prompt and
    prefix tuning included); otherwise everything is frozen.

    Raises:
        UserError: for a missing or pickled weights file, or the first tensor whose name or shape does
            not fit this model.
    """
    from minipeft.peft_model import get_peft_model

    config, state, source = read_adapter(directory)
    peft_model = get_peft_model(base_model, config)
    load_peft_state_dict(peft_model, state, source=source)
    peft_model.set_trainable(is_trainable)
    return peft_model


def read_adapter(directory):
    """``(config, tensors, weights file name)`` of an adapter directory, not yet applied to any model."""
    directory = Path(directory)
    config = config_from_dict(read_adapter_config(directory), str(directory / CONFIG_NAME))
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        if (directory / PICKLE_WEIGHTS_NAME).is_file():
            raise UserError(f"{directory / PICKLE_WEIGHTS_NAME}: pickled adapter weights are not read "
                            "(they can run code); re-save the adapter with safetensors")
        raise UserError(f"{directory}: no {WEIGHTS_NAME}")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{weights_path}: not a readable safetensors file ({error})") from None
    return config, state, str(weights_path)


@torch.no_grad()
def load_peft_state_dict(peft_model, state: dict, source: str = WEIGHTS_NAME) -> None:
    """Copy the file's tensors into ``peft_model``; every tensor must fit, and every adapter tensor be there."""
    state = dict(state)
    if peft_model.prompt_encoder is not None:
        prompt_state = {key: state.pop(key) for key in list(state) if not key.startswith("base_model.")}
        peft_model.prompt_encoder.load_peft_state_dict(prompt_state, source)
    targets = {to_peft_key(name): parameter for name, parameter in peft_model.adapter_parameters().items()
               if not name.startswith("prompt_encoder.")}
    for key in sorted(state):
        if key not in targets:
            raise UserError(f"{source}: tensor {key} has no place in this model "
                            "(was the adapter trained on another model or with other target modules?)")
        if tuple(state[key].shape) != tuple(targets[key].shape):
            raise UserError(f"{source}: tensor {key} has shape {list(state[key].shape)}, "
                            f"this model expects {list(targets[key].shape)}")
    missing = sorted(set(targets) - set(state))
    if missing:
        raise UserError(f"{source}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    for key, tensor in state.items():
        targets[key].copy_(tensor.to(targets[key].dtype))

