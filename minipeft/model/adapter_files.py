"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, in Hugging Face peft's layout.

An adapter trained here loads in ``peft.PeftModel.from_pretrained`` (and so in vLLM and TGI), and a
LoRA/IA3/prompt/prefix adapter saved by peft loads here. transformers' ``model.load_adapter()`` loads the LoRA
(and IA3) files too, but refuses prompt-learning adapters (prompt and prefix tuning) with a ``ValueError``.
See ``docs/peft_format.md`` for the format; in short:

- tensor names are the model's own parameter paths under ``base_model.model.`` with no adapter name:
  ``base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`` ``[r, 768]``;
- a ``modules_to_save`` copy is saved under the original module's name (``...lm_head.weight``);
- prompt and prefix tuning save one tensor, ``prompt_embeddings`` (their ``prompt_encoder`` says how);
- only safetensors: no pickle is ever written or read.

minipeft's own facts about an adapter (the prompt template it was trained with; for prompt tuning from text,
the init text's token ids, a field peft's config lacks) go under one extra config key, ``"minipeft"``, which
peft ignores with a warning. Methods peft does not have (bottleneck
adapters, selective freezing, BitFit) use ``peft_type`` values of our own, documented in docs/peft_format.md.

This module reads and writes the files; building a model from them (:func:`minipeft.load_adapter`) is
:mod:`minipeft.model.peft_model`'s, which imports this one.
"""

import dataclasses
import hashlib
import types
import typing
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minipeft.core.errors import UserError
from minipeft.core.finite import first_nonfinite_tensor, is_finite_number, require_finite
from minipeft.methods import method_for_config, method_for_peft_type
from minipeft.files.input_files import check_input_file, duplicate_keys, read_input_text
from minipeft.files.json_limits import loads_bounded
from minipeft.files.atomic import json_text
from minipeft.files.safe_files import write_directory_atomically

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
    """``{tensor name in the file: tensor}`` for everything the adapter trains, plus the method's own tensors
    (its record's ``save_extra``, e.g. VeRA's shared projections ``base_model.vera_A``/``vera_B``)."""
    state = {}
    if peft_model.prompt_encoder is not None:
        state.update(peft_model.prompt_encoder.peft_state_dict())
    for name, parameter in peft_model.adapter_parameters().items():
        if not name.startswith("prompt_encoder."):
            state[to_peft_key(name)] = parameter.detach()
    method = method_for_config(peft_model.peft_config)
    if method.save_extra is not None:
        extra = method.save_extra(peft_model)
        clashes = sorted(set(extra) & set(state))
        if clashes:
            raise ValueError(f"{method.name}: save_extra's tensor {clashes[0]} has the name of an adapter parameter")
        state.update(extra)
    return state


def config_to_dict(config, **metadata) -> dict:
    """A method config as peft writes it (plus ``base_model_name_or_path`` and our ``minipeft`` block)."""
    method = method_for_config(config)
    values = dataclasses.asdict(config)
    for key, value in values.items():
        if isinstance(value, (set, tuple)):
            values[key] = sorted(value)
        elif isinstance(value, float) and value.is_integer() and key in method.whole_number_fields:
            values[key] = int(value)  # peft writes lora_alpha 16, not 16.0
    values["peft_type"] = method.peft_type
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
    """The config dataclass for a saved config; unknown keys are ignored, missing ones take the defaults (peft's,
    where the method's record says in ``file_defaults`` that they differ from its own).

    Numeric fields are checked against the dataclass's annotations before the config is built, and the built
    config by its own ``validate()``, so a file's mistake is reported in the file's terms
    (``adapter_config.json: "r" must be a positive integer, got '8'``;
    ``adapter_config.json: lora_dropout must be in [0, 1), got 1.5``), never by a flag the user did not pass.
    """
    if not isinstance(values, dict) or "peft_type" not in values:
        raise UserError(f"{source}: not an adapter config (no 'peft_type' key)")
    method = method_for_peft_type(values["peft_type"], source)
    config_class = method.config_class
    block = values.get("minipeft") if isinstance(values.get("minipeft"), dict) else {}
    values = {**values, **{key: block[key] for key in MINIPEFT_ONLY_FIELDS if key in block}}
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    given = {**method.file_defaults,
             **{key: value for key, value in values.items() if key in fields}}
    for key, value in given.items():
        if value is not None or fields[key].default is not None:  # `token_dim: int = None` may be null
            _check_number_field(key, value, fields[key].type, source)
        _check_field_shape(key, value, fields[key].type, source)
    try:
        config = config_class(**given)
        config.validate()  # its messages name the fields (``lora_dropout must be in [0, 1)``), after the file
        return config
    except TypeError as error:
        raise UserError(f"{source}: {error}") from None
    except UserError as error:
        raise UserError(f"{source}: {error}") from None


def _check_number_field(key: str, value, annotation, source: str) -> None:
    """An ``int`` field must hold a positive integer, a ``float`` field a finite number (``| None``: or null)."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = set(typing.get_args(annotation)) if union else {annotation}
    if value is None and type(None) in kinds:
        return
    numbers = kinds - {type(None)}
    if numbers == {int}:  # every integer of a method config is a count or a size: r, bottleneck, tokens, layers
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f'{source}: "{key}" must be a positive integer, got {value!r}')
    elif numbers and numbers <= {int, float}:
        require_finite(f'"{key}"', value, source)


# The fields whose annotation (``object``) does not say what a file may hold: module names (peft writes a string,
# a regex, or a list of names), block indices (one or a list), and name -> number maps.
NAME_FIELDS = ("target_modules", "modules_to_save", "feedforward_modules", "layers_pattern")
INDEX_FIELDS = ("layers_to_transform", "freeze_layers", "prompt_tuning_init_token_ids", "projection_prng_key")
PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")


def _check_field_shape(key: str, value, annotation, source: str) -> None:
    """A field holds what its method reads from it (``"target_modules": 5`` is refused here, naming the file and
    the field, not later by a flag the user never gave); numbers are :func:`_check_number_field`'s."""
    def is_int(item) -> bool:
        return isinstance(item, int) and not isinstance(item, bool)

    def refuse(expected: str):
        raise UserError(f'{source}: "{key}" must be {expected}, got {value!r:.80}')

    if key in NAME_FIELDS:
        if not (value is None or isinstance(value, str)
                or isinstance(value, list) and all(isinstance(item, str) for item in value)):
            refuse("a module name, a regular expression or a list of module names")
    elif key in INDEX_FIELDS:
        if not (value is None or is_int(value) or isinstance(value, list) and all(map(is_int, value))):
            refuse("an integer or a list of integers")
    elif key in PATTERN_FIELDS:
        if not (value is None or isinstance(value, dict) and all(
                isinstance(name, str) and is_finite_number(number) for name, number in value.items())):
            refuse("an object of module names to numbers")
    elif annotation is bool and key == "init_lora_weights":  # peft also writes an initialisation's name
        if not isinstance(value, (bool, str)):
            refuse("true, false or an initialisation's name")
    elif annotation is bool:
        if not isinstance(value, bool):
            refuse("true or false")
    elif annotation is str:
        if not (value is None or isinstance(value, str)):
            refuse("a string")


def save_adapter(peft_model, directory, tensors: dict = None, **metadata) -> Path:
    """Write the adapter of ``peft_model`` to ``directory`` (created if needed); returns the directory.

    ``tensors``: the adapter's tensors by file name when the model cannot give them itself (a sharded model's,
    gathered by :func:`minipeft.training.sharding.full_adapter_state`); default :func:`peft_state_dict`.
    ``metadata`` may hold ``base_model_name_or_path`` and anything minipeft should remember (template...).

    The directory is written atomically and marked as minipeft's (:mod:`minipeft.files.safe_files`): an existing
    ``directory`` is replaced only when minipeft wrote it, never a user's own directory.

    Raises:
        UserError: when the adapter holds no tensor (an empty adapter is always a mistake upstream), or a
            tensor that is not finite (a diverged adapter is never saved as if it were one).
    """
    state = peft_state_dict(peft_model) if tensors is None else tensors
    if not state:
        raise UserError(f"{directory}: refusing to save an adapter with no tensors")
    state = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state.items()}
    bad = first_nonfinite_tensor(state)
    if bad is not None:
        raise UserError(f"{directory}: refusing to save an adapter whose tensor {bad} holds NaN or infinity")
    metadata.setdefault("base_model_name_or_path", getattr(peft_model.config, "name_or_path", None) or None)
    config_text = json_text(config_to_dict(peft_model.peft_config, **metadata), sort_keys=True)

    def write(temporary: Path) -> None:
        save_file(state, temporary / WEIGHTS_NAME, metadata={"format": "pt"})
        (temporary / CONFIG_NAME).write_text(config_text)

    return write_directory_atomically(directory, write)


def read_adapter_config(directory) -> dict:
    """The raw ``adapter_config.json`` of an adapter directory."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        what = "is a file, expected an adapter directory" if directory.exists() else "no such adapter directory"
        raise UserError(f"{directory}: {what}")
    if not config_path.exists():  # (a FIFO is there, not a file: read_input_text refuses it without opening it)
        raise UserError(f"{directory}: no {CONFIG_NAME} (is this an adapter directory?)")
    try:
        values = loads_bounded(read_input_text(config_path))
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        kind = {list: "an array", str: "a string"}.get(type(values), "a " + type(values).__name__)
        raise UserError(f"{config_path}: expected a JSON object of settings, found {kind}")
    if duplicate_keys(values):
        raise UserError(f"{config_path}: the key {duplicate_keys(values)[0]!r} is given twice; keep one")
    if values.get("minipeft") is not None and not isinstance(values["minipeft"], dict):  # (a list of pairs too)
        raise UserError(f"{config_path}: \"minipeft\" must be a JSON object (the run's template, base model, "
                        f"...) or absent, got {values['minipeft']!r:.60}")
    return dict(values)


def read_adapter(directory):
    """``(config, tensors, weights file name)`` of an adapter directory, not yet applied to any model."""
    directory = Path(directory)
    config = config_from_dict(read_adapter_config(directory), str(directory / CONFIG_NAME))
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.exists():  # (a FIFO is there: check_input_file refuses it without opening it)
        if (directory / PICKLE_WEIGHTS_NAME).is_file():
            raise UserError(f"{directory / PICKLE_WEIGHTS_NAME}: pickled adapter weights are not read "
                            "(they can run code); re-save the adapter with safetensors")
        raise UserError(f"{directory}: no {WEIGHTS_NAME}")
    check_input_file(weights_path)
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{weights_path}: not a readable safetensors file ({error})") from None
    check_adapter_tensors(state, str(weights_path))
    return config, state, str(weights_path)


def check_adapter_tensors(state: dict, source: str) -> None:
    """Adapter tensors are finite floating-point numbers: an integer tensor would be rounded into the adapter's
    float parameters in silence, and a NaN would make every answer empty."""
    for key in sorted(state):
        if not state[key].is_floating_point():
            raise UserError(f"{source}: tensor {key} has dtype {str(state[key].dtype).replace('torch.', '')}; "
                            "adapter tensors are floating point (is the file damaged, or not an adapter?)")
    bad = first_nonfinite_tensor(state)
    if bad is not None:
        raise UserError(f"{source}: tensor {bad} holds NaN or infinity (the training that wrote it diverged); "
                        "use an earlier checkpoint's adapter")


def adapter_fingerprint(directory) -> str:
    """sha256 of an adapter's weights file: which adapter a merged model holds (see :mod:`minipeft.inference.merge`)."""
    digest = hashlib.sha256()
    with open(Path(directory) / WEIGHTS_NAME, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def load_peft_state_dict(peft_model, state: dict, source: str = WEIGHTS_NAME) -> None:
    """Copy the file's tensors into ``peft_model``; every tensor must fit, and every adapter tensor be there.

    Tensors that no adapter parameter claims go to the method's ``load_extra`` (see
    :class:`~minipeft.core.method.Method`); a method without one has no such tensors, so any is an error.
    Every tensor is checked before any adapter parameter is copied.
    """
    state = dict(state)
    if peft_model.prompt_encoder is not None:
        prompt_state = {key: state.pop(key) for key in list(state) if not key.startswith("base_model.")}
        peft_model.prompt_encoder.load_peft_state_dict(prompt_state, source)
    targets = {to_peft_key(name): parameter for name, parameter in peft_model.adapter_parameters().items()
               if not name.startswith("prompt_encoder.")}
    load_extra = method_for_config(peft_model.peft_config).load_extra
    unclaimed = {}  # the method's own tensors, for its load_extra
    for key in sorted(state):
        if key not in targets and load_extra is not None:
            unclaimed[key] = state.pop(key)
        elif key not in targets:
            raise UserError(f"{source}: tensor {key} has no place in this model "
                            "(was the adapter trained on another model or with other target modules?)")
        elif tuple(state[key].shape) != tuple(targets[key].shape):
            raise UserError(f"{source}: tensor {key} has shape {list(state[key].shape)}, "
                            f"this model expects {list(targets[key].shape)}")
    missing = sorted(set(targets) - set(state))
    if missing:
        raise UserError(f"{source}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    if load_extra is not None:
        load_extra(peft_model, unclaimed, source)  # checks its tensors and copies them, or raises
    for key, tensor in state.items():
        targets[key].copy_(tensor.to(targets[key].dtype))
