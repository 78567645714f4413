"""Loading a base model with its linear layers in NF4, layer by layer (QLoRA's base, :mod:`minipeft.quantization.nf4`).

:func:`load_base_model` is what every command calls to get its base model: with ``quantize="none"`` it is
:func:`minipeft.loading.models.load_model_and_tokenizer`; with ``"nf4"`` the linear layers are quantized as
their weights arrive, so the float model never exists whole (SmolLM2 streams from its GGUF file).
"""

import gc

import torch
from torch import nn

from minipeft.builtin import MODEL_DIR
from minipeft.core.errors import UserError
from minipeft.core.inject import replace_module
from minipeft.loading.checkpoint_dir import build_on_meta, load_checkpoint_dir, place_tensor
from minipeft.loading.checks import check_config, check_model_directory, check_tokenizer_fits, check_weights_finite
from minipeft.loading.models import SMOLLM2_NAME, load_model_and_tokenizer, local_tokenizer, smollm2_gguf_path
from minipeft.quantization.nf4 import Linear4bit, quantizable_layers, quantize_model
from minipeft.quantization.nf4_format import BLOCKSIZE


def check_not_quantized_folder(name: str) -> None:
    """Refuse a folder that is not a float base model: an adapter folder, or a model already quantized (its
    ``config.json`` is read within bounds and checked first: :func:`minipeft.loading.checks.check_config`)."""
    from pathlib import Path

    folder = Path(name)
    if not folder.is_dir():
        return
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise UserError(f"--model {name}: is an adapter folder, not a base model; give the float base model "
                        "(--quantize nf4 quantizes it while loading) and the adapter with --adapter")
    config = folder / "config.json"
    if config.is_file():
        quantization = check_config(config).get("quantization_config")
        if quantization:
            method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
            raise UserError(f"--model {name}: config.json has a quantization_config "
                            f"({str(method)[:40]}); give the full-precision base model, "
                            "--quantize nf4 quantizes it while loading")


def load_streaming(model: nn.Module, tensors, quantize_lm_head: bool = False,
                   dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype = None) -> list:
    """Fill ``model`` (built on the meta device) from ``tensors``, an iterable of ``(name, float tensor)`` read
    one at a time, quantizing the linear layers as their weights arrive: peak memory is the quantized model
    plus one float tensor, not the float model. Embeddings, norms and biases are kept in ``dtype``.
    Returns the names of the quantized layers."""
    targets = set(quantizable_layers(model, quantize_lm_head))
    for name, tensor in tensors:
        place_tensor(model, name, tensor, targets, dtype, compute_dtype)
        del tensor
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the head shares the embedding (it was never in the file)
    if quantize_lm_head and isinstance(model.get_output_embeddings(), nn.Linear):
        # a tied head: quantized from the embedding
        quantize_model(model, quantize_lm_head=True, compute_dtype=compute_dtype)
    for module_name, module in model.named_modules():  # buffers computed in __init__ (rotary inv_freq)
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)) and "Rotary" in type(module).__name__:
            replace_module(model, module_name, type(module)(config=model.config))
    still_meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if still_meta:
        raise RuntimeError(f"not in the checkpoint: {', '.join(still_meta[:5])}")
    gc.collect()
    return [name for name, module in model.named_modules() if isinstance(module, Linear4bit)]


def gguf_tensors(path, model: nn.Module):
    """``(hf_name, float32 tensor)`` for each tensor of a GGUF file, dequantized one at a time (transformers'
    own name mapping and Llama q/k un-permutation; the file itself is memory-mapped)."""
    import numpy as np
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map, read_field)

    reader = GGUFReader(path)
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=model.config.to_dict())
    mapping = get_gguf_hf_weights_map(model, processor)
    for tensor in reader.tensors:
        rows = tensor.data.shape[0]  # (rows, bytes per row) of a memory-mapped quantized tensor
        weights = None
        for start in range(0, rows, 4096):  # dequantize in row chunks: no full-size temporaries
            chunk = dequantize(tensor.data[start:start + 4096], tensor.tensor_type)
            if weights is None:
                weights = np.empty((rows, *chunk.shape[1:]), dtype=np.float32)
            weights[start:start + len(chunk)] = chunk
        result = processor.process(weights=weights, name=tensor.name, tensor_key_mapping=mapping,
                                   parsed_parameters={})
        if result.name in mapping:
            yield mapping[result.name], torch.from_numpy(np.ascontiguousarray(result.weights))


def load_smollm2_streaming(quantize_lm_head: bool = False, dtype: torch.dtype = torch.float32,
                           compute_dtype: torch.dtype = None):
    """SmolLM2-135M with NF4 linear layers, quantized while its GGUF file is read (see :func:`load_streaming`);
    the rest of the model in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = load_streaming(model, gguf_tensors(path, model), quantize_lm_head, dtype, compute_dtype)
    model.config.name_or_path = model.name_or_path = SMOLLM2_NAME
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), names


def base_model_on_meta(name: str, quantize: str = "none", quantize_lm_head: bool = False,
                       dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype = None):
    """``(model, tokenizer)``: the model :func:`load_base_model` gives, built on the meta device (its modules,
    shapes and dtypes, the 4-bit layers included; no bytes, no weight read), and its tokenizer (None when a
    folder has none). What a process other than 0 builds under ``--sharding fsdp``: FSDP2 then allocates its
    pieces and process 0 sends their values (:func:`minipeft.training.sharding.build_sharded`)."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


    check_not_quantized_folder(name)
    folder, where, source = Path(name), name, {}
    if folder.is_dir() and (folder / "config.json").is_file():
        with torch.device("meta"):
            model = build_on_meta(folder, dtype)
        tokenizer = local_tokenizer(folder)
    else:
        if name == SMOLLM2_NAME:
            path = smollm2_gguf_path()
            where, source = str(path.parent), dict(gguf_file=path.name)
        elif name == "builtin":
            where = str(MODEL_DIR)
        try:
            config = AutoConfig.from_pretrained(where, **source)
            tokenizer = AutoTokenizer.from_pretrained(where, **source)
        except OSError as error:  # (process 0, loading it for real, says the same in its own words)
            raise UserError(f"--model {name}: could not be loaded: {str(error).splitlines()[0]}") from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if quantize == "nf4":
        with torch.device("meta"):
            quantize_model(model, quantize_lm_head, compute_dtype=compute_dtype)
    return model.eval(), tokenizer


def load_base_model(name: str, quantize: str = "none", quantize_lm_head: bool = False,
                    dtype: torch.dtype = torch.float32, log=print, compute_dtype: torch.dtype = None,
                    on_meta: bool = False):
    """``(model, tokenizer)`` like :func:`minipeft.loading.models.load_model_and_tokenizer`, with the linear layers in
    NF4 when ``quantize == "nf4"``, everything else in ``dtype``. A checkpoint directory (``config.json`` and
    safetensors) is read tensor by tensor, each linear weight quantized as it is read
    (:func:`~minipeft.loading.checkpoint_dir.load_checkpoint_dir`); SmolLM2 streams from its GGUF file the
    same way. Other models (the built-in one, hub ids not yet in a local folder) are loaded in ``dtype``,
    then quantized one layer at a time (peak: the float model). ``compute_dtype``: what the 4-bit layers
    multiply in (``train_llm.py --precision fp32``: float32); None:
    :func:`~minipeft.quantization.nf4.default_compute_dtype`. ``on_meta``: the same model on the meta device,
    nothing read (:func:`base_model_on_meta`)."""
    from pathlib import Path

    if on_meta:
        return base_model_on_meta(name, quantize, quantize_lm_head, dtype, compute_dtype)
    check_not_quantized_folder(name)
    if Path(name).is_dir() and (Path(name) / "config.json").is_file():
        check_model_directory(name, quantize, dtype)  # config, size, headers, tokenizer: before reading weights
        model, tokenizer = load_checkpoint_dir(name, quantize, quantize_lm_head, dtype, log,
                                               compute_dtype=compute_dtype)
        check_weights_finite(model, name)
        check_tokenizer_fits(model, tokenizer, name)
        names = [layer for layer, module in model.named_modules() if isinstance(module, Linear4bit)]
        if quantize == "none":
            return model, tokenizer
        if not names:  # the loader fell back to from_pretrained: quantize the dense model layer by layer
            names = quantize_model(model, quantize_lm_head, compute_dtype=compute_dtype)
    elif quantize == "nf4" and name == SMOLLM2_NAME:
        model, tokenizer, names = load_smollm2_streaming(quantize_lm_head, dtype, compute_dtype)
    elif quantize == "nf4":
        model, tokenizer = load_model_and_tokenizer(name, dtype)
        names = quantize_model(model, quantize_lm_head, compute_dtype=compute_dtype)
    else:
        return load_model_and_tokenizer(name, dtype)
    layer = model.get_submodule(names[0])
    log(f"Quantized {len(names)} linear layers to NF4 (block {BLOCKSIZE}, double quant; compute dtype "
        f"{str(layer.compute_dtype).replace('torch.', '')})" + (", LM head included" if quantize_lm_head else ""))
    return model, tokenizer
