"""A safetensors checkpoint directory, read tensor by tensor in the run's own dtype and size.

The door every user takes: a directory written by ``save_pretrained`` (or a hub snapshot)::

    DIR/config.json                          the architecture (model_type, sizes, tie_word_embeddings, rope)
    DIR/model.safetensors                    one file, or
    DIR/model.safetensors.index.json         {"weight_map": {tensor name: shard file}} and its shards
    DIR/model-00001-of-0000N.safetensors     ...
    DIR/tokenizer.json, tokenizer_config.json

**The safetensors format.** 8 bytes (little-endian u64 ``N``), then ``N`` bytes of JSON
``{name: {"dtype": "BF16", "shape": [out, in], "data_offsets": [begin, end]}}``, then the raw tensors,
offsets counted from the end of the header. Sizes, dtypes and shapes are known before one weight is read,
so :func:`estimate_load_bytes` can refuse a model that will not fit *before* loading it.

**How it loads** (:func:`load_checkpoint_dir`):

1. the model is built on the ``meta`` device from ``config.json`` (shapes only, no memory), in ``dtype``;
2. the non-persistent buffers (rotary ``inv_freq``, computed from the config in ``__init__``, never saved)
   are rebuilt on the CPU by constructing their module again;
3. each tensor is read from its file into a fresh tensor of its own size (``readinto``), converted to
   ``dtype`` and put in place; with ``quantize="nf4"`` a linear weight becomes a
   :class:`~minipeft.quantization.nf4.Linear4bit` as it arrives and its float copy is freed at once;
4. tied heads are tied again (the head was never in the file).

Peak memory is the final model plus one tensor in flight (plus the quantizer's row chunks), not the float
model. After each quantized tensor the C heap gives its free pages back (:func:`release_freed_memory`): without
that, the pages of the quantizer's freed temporaries stayed resident and the Llama-3.2-3B shape peaked 0.27 GB
higher (3.02 GB against 2.76 GB, ``bench/bench_loading.py``). The files are read, not memory-mapped: ``safetensors.safe_open`` maps the file, and every mapped page
a conversion touches stays in the process's resident memory until the file is closed (measured: 12 bf16
tensors of 33 MB each, cloned out of ``safe_open``, peak RSS 990 MB for a 400 MB file; read, ~600 MB).

Anything the loader does not expect (a tensor name the model does not have, a parameter the files lack, a
buffer it cannot rebuild) falls back to transformers' ``from_pretrained`` with one line saying why, so a
checkpoint that loads there loads here; only the memory guarantee is lost.
"""

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minipeft.core.c_heap import release_freed_memory
from minipeft.core.errors import UserError
from minipeft.core.inject import replace_module
from minipeft.core.layers import num_hidden_layers
from minipeft.files.input_files import check_regular_files, read_input_text
from minipeft.files.json_limits import loads_bounded
from minipeft.loading.models import StrictDataclassError, _load_pretrained, local_tokenizer, validation_reason
from minipeft.quantization.nf4 import Linear4bit, quantizable_layers, quantize_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed codes + 8-bit absmax + one fp32 scale per 256 blocks


@dataclass
class StoredTensor:
    """Where one tensor lies in a safetensors file: ``[begin, end)`` are absolute byte offsets."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple
    begin: int
    end: int

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


def read_header(path: Path) -> dict:
    """``{name: StoredTensor}`` from one safetensors file's header (the weights are not read)."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000 or length > path.stat().st_size:
                raise ValueError(f"header length {length}")
            header = json.loads(handle.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise UserError(f"--model {path}: not a safetensors file ({error})") from None
    if not isinstance(header, dict):
        raise UserError(f"--model {path}: not a safetensors file (its header is a JSON {type(header).__name__}, "
                        "not an object of tensors)")
    start = 8 + length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not _is_tensor_entry(info):
            raise UserError(f"--model {path}: not a safetensors file (its header's entry {name!r:.80} is not a "
                            'tensor: {"dtype", "shape", "data_offsets"})')
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise UserError(f"--model {path}: tensor {name} has dtype {info.get('dtype')}, which minipeft does "
                            f"not read ({', '.join(SAFETENSORS_DTYPES)})")
        begin, end = info["data_offsets"]
        tensors[name] = StoredTensor(name, path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]),
                                     start + begin, start + end)
    return tensors


def _is_tensor_entry(info) -> bool:
    """A safetensors header entry: a dtype name, a shape of sizes ≥ 0, and two byte offsets, begin ≤ end."""
    def sizes(value, count=None):
        return (isinstance(value, list) and (count is None or len(value) == count)
                and all(type(item) is int and item >= 0 for item in value))

    return (isinstance(info, dict) and isinstance(info.get("dtype"), str) and sizes(info.get("shape"))
            and sizes(info.get("data_offsets"), 2) and info["data_offsets"][0] <= info["data_offsets"][1])


def checkpoint_tensors(directory: Path) -> dict:
    """``{name: StoredTensor}`` over every weight file of a checkpoint directory (one file or an index and
    its shards); None for PyTorch ``pytorch_model*.bin`` files. A directory without weights, or whose index
    names a missing shard, is refused, and so is a FIFO or a device in a file's place (never opened)."""
    check_regular_files(directory, "--model")
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            values = loads_bounded(read_input_text(index, "--model"))  # regular, bounded in size and depth
        except ValueError as error:  # json.JSONDecodeError and the bounds' JSONLimitError
            raise UserError(f"--model {index}: not valid JSON ({error})") from None
        weight_map = values.get("weight_map") if isinstance(values, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise UserError(f"--model {index}: not a safetensors index; expected "
                            '{"weight_map": {tensor: shard file}}')
        outside = [shard for shard in weight_map.values() if Path(shard).name != shard or shard in ("", ".", "..")]
        if outside:  # "../other/model.safetensors", "/etc/passwd": only files of this directory are weights
            raise UserError(f"--model {index}: names the shard {outside[0]!r:.80}, which is not a file of "
                            f"{directory}; an index lists the shard files beside it")
        shards = sorted(set(weight_map.values()))
        missing = [shard for shard in shards if not (directory / shard).is_file()]
        if missing:
            raise UserError(f"--model {directory / missing[0]}: shard missing ({len(missing)} of {len(shards)} "
                            f"listed in {INDEX_FILE} are absent); download or copy the whole checkpoint")
        tensors = {}
        for shard in shards:
            for name, stored in read_header(directory / shard).items():
                if name in tensors:  # which copy is the weight? neither is taken over the other in silence
                    placed = weight_map.get(name, "neither")
                    raise UserError(f"--model {directory / shard}: holds tensor {name}, which "
                                    f"{tensors[name].file.name} holds too ({INDEX_FILE} names {placed}); a checkpoint "
                                    "stores each tensor once")
                tensors[name] = stored
        unlisted = sorted(set(weight_map) - set(tensors))
        if unlisted:
            raise UserError(f"--model {directory / weight_map[unlisted[0]]}: has no tensor {unlisted[0]} although "
                            f"{INDEX_FILE} says so; the shard is truncated or from another checkpoint")
        return tensors
    if (directory / SINGLE_FILE).is_file():
        return read_header(directory / SINGLE_FILE)
    if any(directory.glob("pytorch_model*.bin")):
        return None  # PyTorch pickles: transformers reads them (see load_checkpoint_dir)
    raise UserError(f"--model {directory}: no weights: neither {SINGLE_FILE}, {INDEX_FILE} nor "
                    "pytorch_model.bin; save the model with save_pretrained")


def read_tensor(stored: StoredTensor, handle) -> torch.Tensor:
    """One tensor read from an open file into memory of its own (no mapping of the file)."""
    data = torch.empty(stored.end - stored.begin, dtype=torch.uint8)
    handle.seek(stored.begin)
    if handle.readinto(data.numpy()) != data.numel():
        raise UserError(f"--model {stored.file}: ends inside tensor {stored.name}; the file is truncated")
    return data.view(stored.dtype).reshape(stored.shape)


def available_memory_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo`` (what can be allocated without swapping); elsewhere, the
    physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate_load_bytes(tensors: dict, quantized: set, dtype: torch.dtype) -> tuple:
    """``(final, transient)`` bytes of loading: ``final`` the model in memory (a weight in ``quantized``:
    ``NF4_BYTES_PER_WEIGHT`` per weight, ≈ 4.13 bits; any other floating tensor in ``dtype``); ``transient``
    the largest tensor in flight (read in its file dtype, converted to ``dtype``)."""
    size = torch.finfo(dtype).bits // 8
    final = sum(int(t.numel * NF4_BYTES_PER_WEIGHT) if t.name in quantized
                else t.numel * (size if t.dtype.is_floating_point else t.dtype.itemsize) for t in tensors.values())
    transient = max((t.end - t.begin + t.numel * size for t in tensors.values()), default=0)
    return final, transient


def check_fits_in_memory(directory: Path, final: int, transient: int, what: str) -> None:
    available = available_memory_bytes()
    if final + transient > available:
        raise UserError(f"--model {directory}: loading needs about {(final + transient) / 1e9:.1f} GB ({what}; "
                        f"estimated from the safetensors headers) but {available / 1e9:.1f} GB is available; "
                        "free memory, use --quantize nf4, or a smaller model")


def build_on_meta(directory: Path, dtype: torch.dtype):
    """The architecture of ``directory/config.json``, built on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_path = directory / "config.json"
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError) as error:
        raise UserError(f"--model {config_path}: {str(error).splitlines()[0]}") from None
    except StrictDataclassError as error:  # a config class's own validation (hidden size vs heads): no ValueError
        raise UserError(f"--model {config_path}: {validation_reason(error)}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except KeyError as error:  # a name transformers looks up in a table: hidden_act "relu6x" (ACT2FN[...])
        fields = [key for key, value in config.to_dict().items() if isinstance(value, str) and value == error.args[0]]
        raise UserError(f"--model {config_path}: " + (f'"{fields[0]}" is ' if fields else "")
                        + f"{error.args[0]!r}, which transformers does not know; check the spelling") from None
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):  # GPT-2: "embed_dim must be divisible by ..."
            raise UserError(f"--model {config_path}: {str(error).splitlines()[0][:200]}") from None
        raise UserError(f"--model {config_path}: model_type {config.model_type!r} "
                        f"({', '.join(config.architectures or ['no architectures'])}) is not a causal language "
                        "model transformers can build; minipeft fine-tunes causal LMs (GPT-2, Llama, ...)") from None
    return model


def rebuild_rotary_buffers(model: nn.Module) -> list:
    """Construct again (on the CPU) every module whose non-persistent buffers are still on ``meta``, when it
    is a rotary embedding (``(config)`` builds it). Returns the buffers that are still on ``meta``."""
    persistent = set(model.state_dict())
    for name, module in list(model.named_modules()):
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)) and "Rotary" in type(module).__name__:
            with torch.device("cpu"):
                replace_module(model, name, type(module)(config=model.config))
    return [name for name, buffer in model.named_buffers() if buffer.is_meta and name not in persistent]


BLOCK_INDEX = re.compile(r"\.(?:h|layers|blocks)\.(\d+)\.")  # transformer.h.5.attn..., model.layers.5.mlp...


def check_no_extra_blocks(directory, model: nn.Module, unknown: list) -> None:
    """Weights of blocks past the layers ``config.json`` describes (a lowered ``num_hidden_layers``): transformers'
    loader drops them with a note, and the model runs without them, as if nothing were wrong."""
    try:
        layers = num_hidden_layers(model)
    except (AttributeError, TypeError, ValueError):
        return
    beyond = [(int(match.group(1)), name) for name in unknown for match in [BLOCK_INDEX.search(name)]
              if match and int(match.group(1)) >= layers]
    if beyond:
        index, name = max(beyond)
        raise UserError(f"--model {directory}: the weights hold block {index} ({name}), but config.json describes "
                        f"{layers} layers; config.json and the weights disagree (a changed layer count)")


def match_names(model: nn.Module, stored: dict) -> tuple:
    """``(file name -> model name, problems)``: a file's names are the model's, or lack/carry the base
    model's prefix (``transformer.``, ``model.``). ``problems`` says what does not match."""
    known = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") + "."
    mapping, unknown = {}, []
    for name in stored:
        for candidate in (name, prefix + name, name[len(prefix):] if name.startswith(prefix) else None):
            if candidate in known:
                mapping[name] = candidate
                break
        else:
            unknown.append(name)
    required = {name for name, _ in model.named_parameters()}  # tied parameters once (the head is the embedding)
    required |= {name for name, _ in model.named_buffers()} & known
    missing = sorted(required - set(mapping.values()))
    problems = []
    if unknown:
        problems.append(f"names the model does not have: {', '.join(unknown[:3])}")
    if missing:
        problems.append(f"parameters the files lack: {', '.join(missing[:3])}")
    return mapping, problems


def check_shapes(model: nn.Module, stored: dict, mapping: dict) -> None:
    """Every stored tensor has the shape ``config.json`` gives it in ``model`` (built on the meta device), read
    from the headers before any weight is (a changed ``vocab_size``: transformers' load report, ten lines)."""
    expected = model.state_dict()
    for name, target in mapping.items():
        shape = tuple(expected[target].shape) if target in expected else None
        if shape is not None and shape != tuple(stored[name].shape):
            raise UserError(f"--model {stored[name].file}: tensor {name} has shape {list(stored[name].shape)} in the "
                            f"weights, but config.json describes {list(shape)}; config.json and the weights disagree")


def place_tensor(model: nn.Module, name: str, tensor: torch.Tensor, targets: set, dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype = None, source: str = "--model") -> None:
    """Put one checkpoint tensor into a model built on the meta device; a weight of a layer in ``targets``
    is quantized on arrival (the layer becomes a :class:`Linear4bit`), so its float copy lives only here.
    Every other floating tensor is stored in ``dtype`` (the 4-bit codes are those of the weight as read);
    the 4-bit layers compute in ``compute_dtype`` (None: the default); ``source`` names the file in messages."""
    module_name, _, attribute = name.rpartition(".")
    module = model.get_submodule(module_name)
    expected = getattr(module, attribute, None)
    if isinstance(expected, torch.Tensor) and tuple(expected.shape) != tuple(tensor.shape):
        raise UserError(f"{source}: tensor {name} has shape {list(tensor.shape)} in the weights, but config.json "
                        f"describes {list(expected.shape)}; config.json and the weights disagree")
    if isinstance(expected, torch.Tensor) and expected.is_floating_point() and not tensor.is_floating_point():
        raise UserError(f"{source}: tensor {name} is stored as {str(tensor.dtype).replace('torch.', '')}, but the "
                        "model computes it in floating point; the checkpoint is damaged or not this model's")
    quantize = module_name in targets and attribute == "weight"
    if not quantize and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if attribute in module._parameters:
        setattr(module, attribute, nn.Parameter(tensor, requires_grad=False))
    else:
        module.register_buffer(attribute, tensor)
    if quantize:
        # a bias arriving later lands on the Linear4bit
        replace_module(model, module_name, Linear4bit(module, compute_dtype=compute_dtype))


def load_checkpoint_dir(directory, quantize: str = "none", quantize_lm_head: bool = False,
                        dtype: torch.dtype = torch.float32, log=print, device="cpu", compute_dtype=None):
    """``(model, tokenizer)`` from a checkpoint directory, tensor by tensor (see the module docstring); the
    tokenizer is None when the directory has none.

    Args:
        directory: a folder with ``config.json`` and safetensors weights.
        quantize: ``"nf4"`` quantizes every linear layer but the head (and the head with ``quantize_lm_head``)
            as its weight is read.
        dtype: every other floating tensor's dtype (embeddings, norms, biases, a full-precision head).
        device: where each tensor goes as it is read (and is quantized: a GPU quantizes in milliseconds).
        compute_dtype: what the 4-bit layers multiply in (None: the default of their device).

    Raises:
        UserError: no weights, a missing shard, an architecture that is not a causal LM, or a model larger
            than the memory available (estimated from the file headers before loading).
    """
    from transformers import GenerationConfig

    directory = Path(directory)
    stored = checkpoint_tensors(directory)
    if stored is None:
        log(f"note: {directory} has PyTorch .bin weights, not safetensors; loading them through transformers' "
            "from_pretrained (peak memory: the whole model in its dtype)")
        return _load_pretrained(str(directory), dtype)
    model = build_on_meta(directory, dtype)
    mapping, problems = match_names(model, stored)
    check_no_extra_blocks(directory, model, [name for name in stored if name not in mapping])
    check_shapes(model, stored, mapping)
    lacking = sorted({name for name, _ in model.named_parameters()} - set(mapping.values()))
    if lacking:  # from_pretrained would start them at random and say so only in a note: a model nobody trained
        raise UserError(f"--model {directory}: config.json describes {len(lacking)} parameter(s) the weights lack "
                        f"({', '.join(lacking[:3])}{', ...' if len(lacking) > 3 else ''}); config.json and the "
                        "weights disagree (a changed layer count, or a tensor missing from the files)")
    targets = set(quantizable_layers(model, quantize_lm_head)) if quantize == "nf4" else set()
    quantized = {name for name, target in mapping.items() if target.rpartition(".")[0] in targets
                 and target.endswith(".weight")}
    final, transient = estimate_load_bytes(stored, quantized, dtype)
    what = f"{'NF4 linear layers, ' if quantize == 'nf4' else ''}{str(dtype).replace('torch.', '')}"
    check_fits_in_memory(directory, final, transient, what)
    problems += [f"buffers it cannot rebuild: {', '.join(names[:3])}" for names in [rebuild_rotary_buffers(model)]
                 if names]
    if problems:
        log(f"note: {directory} does not read tensor by tensor ({'; '.join(problems)}); loading it through "
            "transformers' from_pretrained instead (peak memory: the whole model in its dtype)")
        return _load_pretrained(str(directory), dtype)

    handles = {}
    quantized_targets = {mapping[name] for name in quantized}
    try:
        for name, tensor_info in sorted(stored.items(), key=lambda item: (str(item[1].file), item[1].begin)):
            handle = handles.get(tensor_info.file) or handles.setdefault(tensor_info.file, open(tensor_info.file, "rb"))
            place_tensor(model, mapping[name], read_tensor(tensor_info, handle).to(device), targets, dtype,
                         compute_dtype, f"--model {tensor_info.file}")
            if mapping[name] in quantized_targets:
                release_freed_memory()  # the quantizer's temporaries, which would otherwise stay resident
    finally:
        for handle in handles.values():
            handle.close()
    finish_loading(model, quantize_lm_head and quantize == "nf4", compute_dtype)
    model.to(device)  # the rebuilt rotary buffers
    files = sorted({t.file for t in stored.values()})
    in_memory = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    log(f"Loaded {directory}: {len(stored)} tensors from {len(files)} file(s), "
        f"{sum(f.stat().st_size for f in files) / 1e9:.3f} GB on disk -> {in_memory / 1e9:.3f} GB in memory "
        f"({what}{', ' + str(len(quantized)) + ' in NF4' if quantized else ''})")
    model.config._name_or_path = model.name_or_path = str(directory)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval(), local_tokenizer(directory)


def finish_loading(model: nn.Module, quantize_tied_head: bool, compute_dtype: torch.dtype = None) -> None:
    """Tie the head again (it was never in the file), quantize a tied head when asked, check nothing is left
    on ``meta``."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    if quantize_tied_head and isinstance(model.get_output_embeddings(), nn.Linear):
        quantize_model(model, quantize_lm_head=True, compute_dtype=compute_dtype)  # tied: from the embedding
    still_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if still_meta:
        raise RuntimeError(f"not in the checkpoint: {', '.join(still_meta[:5])}")
