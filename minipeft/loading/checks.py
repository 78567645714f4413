"""What a user's model directory must be before a byte of it is used (issue #26).

A directory given as ``--model DIR`` is checked in the order it would fail, each refusal one line naming the
file (and the field or tensor):

0. every file in it is a regular file: a FIFO where ``model.safetensors`` should be would block a read forever,
   a device would never end (:func:`~minipeft.files.input_files.check_regular_files`, ``stat`` only).
1. ``config.json``: within the JSON bounds (:mod:`minipeft.files.json_limits`); every number finite; the
   architecture's sizes (``hidden_size``, ``n_head``, ``vocab_size``, ...) whole numbers ≥ 1; an epsilon
   (``rms_norm_eps``, ``layer_norm_epsilon``) in (0, 1); a dropout in [0, 1]; ``torch_dtype`` a floating
   dtype. A NaN epsilon would load and answer NaN; a size of -5 or 0 dies in a traceback inside transformers.
2. the size of the model it describes, counted on the ``meta`` device (no memory), against the memory
   available (:func:`~minipeft.loading.checkpoint_dir.available_memory_bytes`): ``hidden_size`` 10,000,000 is
   refused here, before transformers' fallback loader would try to allocate it.
3. the safetensors headers: each tensor's byte range matches its dtype and shape and lies inside its file (a
   truncated file is named before anything is read).
4. the tokenizer, when the directory has one: it loads (a ``tokenizer.model`` that needs a converter this
   environment lacks, ``sentencepiece`` or ``tiktoken``, is one line, not a traceback after the weights).

After loading, :func:`check_weights_finite` looks at every floating tensor once (``torch.isfinite(t).all()``,
one tensor at a time) and names the first that holds NaN or infinity, with its file.
"""

import math
from pathlib import Path

import torch

from minipeft.core.errors import UserError
from minipeft.files.input_files import check_regular_files, read_input_text
from minipeft.files.json_limits import loads_bounded
from minipeft.loading.checkpoint_dir import (NF4_BYTES_PER_WEIGHT, available_memory_bytes, build_on_meta,
                                             checkpoint_tensors, match_names)
from minipeft.loading.models import tokenizer_files

# The sizes an architecture is built from: a whole number ≥ 1 where given (null: the model's own default).
ARCHITECTURE_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_head", "n_layer",
                      "n_positions", "n_ctx", "n_inner", "d_model", "ffn_dim", "num_layers", "num_heads")

FLOAT_DTYPES = ("float32", "bfloat16", "float16", "float64")


def check_model_directory(directory, quantize: str = "none", dtype: torch.dtype = torch.float32) -> None:
    """Steps 0 to 4 of the module docstring for ``--model directory``; raises :class:`UserError`."""
    directory = Path(directory)
    check_regular_files(directory, "--model")  # a FIFO in a file's place would block the read forever
    values = check_config(directory / "config.json")
    check_model_fits(directory, quantize, dtype, values)
    check_weight_headers(directory)
    check_tokenizer(directory)


def check_config(config_path: Path) -> dict:
    """Step 1: ``config.json``'s values (returns them)."""
    try:
        values = loads_bounded(read_input_text(config_path, "--model"))
    except ValueError as error:  # json.JSONDecodeError (and the bounds' JSONLimitError) are ValueErrors
        raise UserError(f"--model {config_path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise UserError(f"--model {config_path}: expected a JSON object of settings, found {type(values).__name__}")
    for field, value in _numbers(values):
        key = field.rpartition(".")[2]
        if isinstance(value, float) and not math.isfinite(value):
            problem = "a finite number"
        elif key in ARCHITECTURE_SIZES:
            problem = None if value is None or _is_int(value) and value >= 1 else "a whole number ≥ 1"
        elif "eps" in key:
            problem = None if value is None or _is_number(value) and 0 < value < 1 else "a number in (0, 1)"
        elif "dropout" in key or key.endswith("pdrop"):
            problem = None if value is None or _is_number(value) and 0 <= value <= 1 else "a number in [0, 1]"
        else:
            continue
        if problem is not None:
            raise UserError(f'--model {config_path}: "{field}" must be {problem}, got {value!r:.60}')
    for field in ("torch_dtype", "dtype"):  # the weights' dtype: "int8" would be read as floats in silence
        if values.get(field) not in (None, "auto", *FLOAT_DTYPES):
            raise UserError(f'--model {config_path}: "{field}" must be a floating-point dtype '
                            f'({", ".join(FLOAT_DTYPES)}), got {values[field]!r:.60}')
    return values


def _numbers(values: dict, prefix: str = ""):
    """``(dotted field, value)`` for every field of a config holding a number, or a size or epsilon of
    another kind (so that ``"vocab_size": "big"`` is seen); nested objects (``rope_scaling``) included."""
    for key, value in values.items():
        field = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _numbers(value, field + ".")
        elif _is_number(value) or isinstance(value, float) or key in ARCHITECTURE_SIZES or "eps" in key:
            yield field, value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_model_fits(directory: Path, quantize: str, dtype: torch.dtype, values: dict) -> None:
    """Step 2: the parameters of the architecture ``config.json`` describes, counted on ``meta``, against the
    memory available (``values``: the config's, named in the message; in ``dtype``; with NF4, every weight at
    NF4's 4.13 bits: a lower bound)."""
    config_path = directory / "config.json"
    per_weight = NF4_BYTES_PER_WEIGHT if quantize == "nf4" else torch.finfo(dtype).bits / 8
    least = parameters_at_least(values)  # before building: a billion layers take hours even on meta
    if least * per_weight > available_memory_bytes():
        _refuse_size(config_path, values, least, least * per_weight, quantize, "at least ")
    try:
        model = build_on_meta(directory, dtype)
    except (RuntimeError, ArithmeticError, TypeError, AssertionError, AttributeError, IndexError) as error:
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"--model {config_path}: transformers cannot build the architecture it describes "
                        f"({first_line[:200]}); check its sizes") from None
    parameters = sum(parameter.numel() for parameter in model.parameters())
    if parameters * per_weight > available_memory_bytes():
        _refuse_size(config_path, values, parameters, parameters * per_weight, quantize, config=model.config)


def parameters_at_least(values: dict) -> int:
    """A lower bound on the parameters a config describes, from its numbers alone: each layer holds at least
    the query and output projections (2 · hidden²), plus the embedding (vocab · hidden)."""
    def first(*keys):
        return next((values[key] for key in keys if _is_int(values.get(key))), 0)

    hidden = first("hidden_size", "n_embd", "d_model")
    return first("num_hidden_layers", "n_layer", "num_layers") * 2 * hidden ** 2 + first("vocab_size") * hidden


def _refuse_size(config_path: Path, values: dict, parameters: int, needed: float, quantize: str,
                 bound: str = "", config=None) -> None:
    """The refusal of a model too large, naming the sizes it is built from: ``config`` (the built model's) where
    given, with the sizes ``config.json`` holds that its model type does not read (GPT-2's ``n_embd`` under
    ``"model_type": "llama"``: the model took its own defaults); else the file's ``values``."""
    sizes = ", ".join(f"{key} {values[key]:,}" for key in ARCHITECTURE_SIZES if _is_int(values.get(key)))
    unread = ""
    if config is not None:
        own, aliases = _config_fields(config)
        used = {key: getattr(config, key, None) for key in ARCHITECTURE_SIZES if key in own}
        sizes = ", ".join(f"{key} {value:,}" for key, value in used.items() if _is_int(value))
        ignored = [key for key in ARCHITECTURE_SIZES if _is_int(values.get(key)) and own and key not in own | aliases]
        if ignored:
            unread = (f"; {', '.join(ignored)} in it {'is' if len(ignored) == 1 else 'are'} not read by a "
                      f"{getattr(config, 'model_type', '?')} model (\"model_type\"), which takes its defaults")
    raise UserError(f"--model {config_path}: describes a model of {bound}{parameters:,} parameters, about "
                    f"{needed / 1e9:,.1f} GB{' in NF4' if quantize == 'nf4' else ''}, more than the "
                    f"{available_memory_bytes() / 1e9:,.1f} GB of memory available ({sizes}){unread}")


def _config_fields(config) -> tuple:
    """``(fields, aliases)``: the fields a config class reads (its default instance's) and the other names its
    ``attribute_map`` gives them; both empty when the class cannot be built without arguments."""
    try:
        own = set(type(config)().to_dict())
    except Exception:  # noqa: BLE001 - a config class that needs arguments: nothing to tell apart
        return set(), set()
    return own, set(getattr(type(config), "attribute_map", {}))


def check_weight_headers(directory: Path) -> None:
    """Step 3: every tensor's byte range is its dtype × shape and lies inside its file."""
    stored = checkpoint_tensors(directory)  # (refuses an unreadable header, a missing shard)
    sizes = {}
    for tensor in (stored or {}).values():
        size = sizes.get(tensor.file) or sizes.setdefault(tensor.file, tensor.file.stat().st_size)
        expected = tensor.numel * tensor.dtype.itemsize
        if any(dimension < 0 for dimension in tensor.shape) or tensor.end - tensor.begin != expected:
            raise UserError(f"--model {tensor.file}: tensor {tensor.name}: its header gives "
                            f"{tensor.end - tensor.begin:,} bytes for shape {list(tensor.shape)} of "
                            f"{str(tensor.dtype).replace('torch.', '')} ({expected:,}); the file is damaged")
        if tensor.end > size:
            raise UserError(f"--model {tensor.file}: ends inside tensor {tensor.name} (the header says {tensor.end:,} "
                            f"bytes, the file has {size:,}); the file is truncated")


def check_tokenizer(directory: Path) -> None:
    """Step 4: a tokenizer the directory holds loads here."""
    present = tokenizer_files(directory)
    if not present:
        return
    from transformers import AutoTokenizer

    for name in [name for name in present if name.endswith(".json")] + ["special_tokens_map.json"]:
        path = directory / name  # which file is wrong, named before transformers trips over it somewhere
        if path.is_file():
            try:
                value = loads_bounded(read_input_text(path, "--model"))
            except ValueError as error:
                raise UserError(f"--model {path}: not valid JSON ({error}); save the tokenizer again with "
                                "tokenizer.save_pretrained") from None
            if not isinstance(value, dict):
                kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")
                raise UserError(f"--model {path}: holds a JSON {kind}, not the object a tokenizer "
                                "file is; save the tokenizer again with tokenizer.save_pretrained")
    try:
        AutoTokenizer.from_pretrained(directory)
    except Exception as error:  # the tokenizers library raises a bare Exception ("Token `Ġ` out of vocabulary")
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise UserError(f"--model {directory}: the tokenizer ({', '.join(present)}) does not load "
                        f"({first_line[:200]}); install what it names, or save the tokenizer again with "
                        "tokenizer.save_pretrained") from None


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """``torch.isfinite(tensor).all()``, a few million values at a time: on a bf16 embedding of 262M values
    the whole-tensor check took 1.2 GB of temporaries (more than the 4-bit model it checked)."""
    flat = tensor.detach().reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


def check_tokenizer_fits(model: torch.nn.Module, tokenizer, directory) -> None:
    """The tokenizer beside the weights gives no id past the model's embedding (another model's tokenizer copied
    beside them, or embeddings resized without it): such an id indexed nothing, an IndexError in generate."""
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer is not None and len(tokenizer) > rows:
        raise UserError(f"--model {directory}: its tokenizer has {len(tokenizer):,} tokens, but the model's embedding "
                        f"has {rows:,} rows (config.json: vocab_size); the tokenizer and the model do not belong "
                        "together")


def check_weights_finite(model: torch.nn.Module, directory) -> None:
    """After loading: the first floating tensor holding NaN or infinity, named with the file it came from."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not tensor.is_meta and not all_finite(tensor):
            raise UserError(f"--model {_stored_name(model, Path(directory), name)}: holds NaN or infinity; the "
                            "checkpoint is damaged (download or save it again)")


def _stored_name(model, directory: Path, name: str) -> str:
    """``"<file>: tensor <name in the file>"`` for a model parameter's name, where the files say."""
    stored = checkpoint_tensors(directory) or {}
    mapping, _ = match_names(model, stored)
    for stored_name, model_name in mapping.items():
        if model_name == name:
            return f"{stored[stored_name].file}: tensor {stored_name}"
    return f"{directory}: tensor {name}"
