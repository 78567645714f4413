"""Sharded data parallelism with PyTorch's FSDP2 (``--sharding fsdp``): a base larger than one device.

Under DDP (:mod:`minipeft.training.distributed`) every rank holds the whole model. Under FSDP2
(``torch.distributed.fsdp.fully_shard``) every tensor of the model is cut along its first dimension into N
pieces, and rank r keeps piece r only. With a frozen base and a small adapter, N ranks::

                        DDP (--sharding ddp)                   FSDP2 (--sharding fsdp)
    frozen base         whole, on every rank                   1/N of every tensor (a DTensor, Shard(0))
    adapter (A, B)      whole, on every rank                   1/N of every tensor
    its gradients       whole; all-reduced after backward      1/N; reduce-scattered after backward
    AdamW moments       whole (2 per adapter weight)           1/N (they follow the parameters)
    forward / backward  the local copy                         per block: all-gather its pieces -> compute ->
                                                               free (forward), again for backward
    saving              rank 0 reads its copy                  the adapter's pieces gathered to rank 0 only
                                                               (trainable parameters, never the base)

Units: :func:`shard_model` calls ``fully_shard`` on each transformer block, then on the whole model (the
root: embeddings, final norm, head, prompt encoder). A block's weights exist whole only while that block
computes, so the peak is 1/N of the model + one block whole, instead of the whole model.

The loop is the same as under DDP (FSDP2 averages gradients over ranks, as DDP does): accumulation skips the
reduce-scatter on all but the last micro-batch (``set_requires_gradient_sync(False)``, DDP's ``no_sync``);
``clip_grad_norm_`` sums the squares of every rank's pieces, so the norm is the full one.

Loading (:func:`build_sharded`): every rank builds the model on the meta device (shapes, no bytes) and shards
it; rank 0 alone builds it for real (reads the checkpoint) and broadcasts each tensor, of which every rank keeps
its piece. Rank r > 0 never holds more than its pieces and one tensor in flight. ``train_llm.py --sharding fsdp``
loads this way (:func:`load_sharded`).

Files: an adapter or checkpoint is the *full* tensors, gathered (:func:`full_adapter_state`,
:func:`full_optimizer_state`), in the same format as a one-process run, so a run may resume with another
number of processes or under DDP.
"""

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from minipeft.core.errors import UserError
from minipeft.core.layers import transformer_blocks
from minipeft.methods import METHODS
from minipeft.model.adapter_files import peft_state_dict, to_peft_key
from minipeft.quantization.nf4 import Linear4bit
from minipeft.training.precision import cast_frozen_weights

def check_can_shard(method: str) -> None:
    """Raise :class:`UserError` (naming the flag) for a method ``--sharding fsdp`` does not run: one whose
    adapter file is not a copy of trainable parameters (its record's ``why_not_sharded``). Such adapters are a
    few thousand weights outside the blocks: nothing to shard; DDP trains them."""
    why = METHODS[method].why_not_sharded
    if why:
        raise UserError(f"--sharding fsdp with --modification_type {method}: {why}; "
                        "use --sharding ddp (its adapter is tiny and lives outside the blocks)")


def check_offload_device(cpu_offload: bool, device: torch.device) -> None:
    """``--fsdp_cpu_offload`` on a run that computes on the CPU is refused (FSDP's offload policy asks for an
    accelerator: a ``RuntimeError`` deep inside the first forward otherwise)."""
    if cpu_offload and device.type == "cpu":
        raise UserError("--fsdp_cpu_offload keeps a GPU run's pieces in host memory; this run computes on the CPU, "
                        "where they are already: leave the flag out")


def shard_model(peft_model: nn.Module, device: torch.device, world_size: int, precision: str,
                cpu_offload: bool = False) -> nn.Module:
    """``fully_shard`` each transformer block, then the root, in place; returns the model (now an FSDPModule).

    bf16: a ``MixedPrecisionPolicy`` gathers floating-point parameters in bf16 and reduces gradients in
    float32 (integers, such as NF4 codes, are never cast). ``cpu_offload``: pieces, gradients and the optimizer
    step live in host memory, and each unit is copied to the device when it computes.
    """
    check_offload_device(cpu_offload, device)
    for layer in peft_model.modules():
        if isinstance(layer, Linear4bit):
            layer.store_codes_as_parameters()  # buffers are not sharded; frozen uint8 parameters are
    mesh = init_device_mesh(device.type, (world_size,))
    precision_policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                        if precision == "bf16" else MixedPrecisionPolicy())
    settings = dict(mesh=mesh, mp_policy=precision_policy,
                    offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for block in transformer_blocks(peft_model.base_model):
        fully_shard(block, **settings)
    fully_shard(peft_model, **settings)
    return peft_model


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` has already been applied to ``model`` (:func:`build_sharded`)."""
    return isinstance(model, FSDPModule)


def non_persistent_buffers(model: nn.Module) -> dict:
    """``{module name: [buffer names]}`` of the buffers that are in no state dict (rotary ``inv_freq``)."""
    return {prefix: sorted(name for name in module._non_persistent_buffers_set if module._buffers.get(name) is not None)
            for prefix, module in model.named_modules() if module._non_persistent_buffers_set}


def build_sharded(build: Callable[[], nn.Module], device: torch.device, world_size: int, precision: str,
                  cpu_offload: bool = False, build_on_meta: Callable[[], nn.Module] = None) -> nn.Module:
    """The model ``build()`` returns, sharded, with rank 0's values; every rank must call it (collectives).

    1. every rank: ``build()`` under ``torch.device("meta")``: the modules and shapes, no bytes; sharded
       (:func:`shard_model`), then ``to_empty``: each rank allocates its pieces only, uninitialised;
    2. rank 0 only: ``build()`` for real (the checkpoint read, the adapter initialised), its state dict;
    3. ``set_model_state_dict(..., broadcast_from_rank0=True)``: rank 0 sends one tensor at a time, each rank
       keeps its piece (given a copy of the dict: it replaces the dict's values in place);
    4. non-persistent buffers (rotary ``inv_freq``) are in no state dict: rank 0 sends its own, computed on a
       real device by the modules' ``__init__``, so every rank has the exact values.

    ``build`` must give the same model every call (it seeds its own random initialisation).
    ``build_on_meta``: what step 1 calls instead of ``build`` (one that reads no file: ``build`` under the meta
    device would still read the checkpoint); the same modules, shapes and dtypes.
    """
    source = build() if dist.get_rank() == 0 else None
    if source is not None:
        cast_frozen_weights(source, precision)
    with torch.device("meta"):
        model = (build_on_meta or build)()
    cast_frozen_weights(model, precision)  # the pieces in the dtype the rank-0 model stores
    shard_model(model, device, world_size, precision, cpu_offload)
    model.to_empty(device=device)
    full = dict(source.state_dict()) if source is not None else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for prefix, names in non_persistent_buffers(model).items():
        module = model.get_submodule(prefix)
        for name in names:  # after to_empty: the right shape, uninitialised
            values = source.get_submodule(prefix)._buffers[name].to(device) if source is not None \
                else module._buffers[name]
            dist.broadcast(values, src=0)
            module._buffers[name] = values
    del source, full
    return model


def load_sharded(build: Callable[[bool], tuple], context, precision: str, cpu_offload: bool = False) -> tuple:
    """``train_llm.py --sharding fsdp``: ``(peft model, base model, tokenizer)``, the model sharded, with rank 0's
    values (:func:`build_sharded`): rank 0 loads the base (``build(False)``: the checkpoint read, the adapter
    initialised), every rank builds it on the meta device (``build(True)``: no weight read; its tokenizer is
    the one returned). A rank other than 0 never holds the base whole: its pieces and one tensor in flight."""
    tokenizers = []

    def on_meta() -> nn.Module:
        peft_model, _, tokenizer = build(True)
        tokenizers.append(tokenizer)
        return peft_model

    peft_model = build_sharded(lambda: build(False)[0], context.device, context.world_size, precision,
                               cpu_offload, build_on_meta=on_meta)
    return peft_model, peft_model.base_model, tokenizers[0]


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """``clip_grad_norm_``'s result over DTensor gradients is a DTensor: its full value (the same on every rank)."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (all-gathered, on every rank) for a DTensor; the tensor itself otherwise."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_bytes(tensors) -> int:
    """Bytes this rank holds of ``tensors`` (its pieces of DTensors)."""
    pieces = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(piece.numel() * piece.element_size() for piece in pieces)


# -- files: the full adapter and optimizer state, gathered to rank 0 / loaded on every rank ------------------
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def full_adapter_state(peft_model) -> dict:
    """``{tensor name in peft's file: full tensor}`` on rank 0, ``{}`` on the others (every rank must call it).

    Only the trainable parameters are gathered, one at a time, onto rank 0's CPU: an adapter's size, never the
    base's. (Saving each rank's own pieces is the bug of accelerate PR #4206: rank 0's half of every tensor.)
    """
    gathered = get_model_state_dict(peft_model, options=FULL_ON_RANK0)
    if not gathered:
        return {}
    return {to_peft_key(name): gathered[name] for name in peft_model.adapter_parameters()}


def adapter_tensors(peft_model, sharded: bool) -> dict:
    """The adapter's tensors by file name: gathered to rank 0 when ``sharded`` (``{}`` on the other ranks, and
    every rank must call it), else the model's own (:func:`~minipeft.model.adapter_files.peft_state_dict`)."""
    return full_adapter_state(peft_model) if sharded else peft_state_dict(peft_model)


def load_full_adapter_state(peft_model, tensors: dict, source: str) -> None:
    """Every rank: the full tensors of an adapter file into the sharded model (each keeps its piece)."""
    names = {to_peft_key(name): name for name in peft_model.adapter_parameters()}
    missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    if missing or extra:
        raise UserError(f"{source}: tensor {(missing or extra)[0]} is {'missing' if missing else 'unexpected'} "
                        "(was the checkpoint written with other method flags?)")
    state = {names[key]: tensor for key, tensor in tensors.items()}
    set_model_state_dict(peft_model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def _parameter_names(peft_model, optimizer) -> list:
    """The optimizer's parameters by name, in ``optimizer.state_dict()``'s index order."""
    names = {id(parameter): name for name, parameter in peft_model.named_parameters()}
    return [names[id(parameter)] for group in optimizer.param_groups for parameter in group["params"]]


def full_optimizer_state(peft_model, optimizer) -> dict:
    """AdamW's full state on rank 0 (``{}`` elsewhere), in ``optimizer.state_dict()``'s own layout (integer
    indices), so that a checkpoint is the same file under FSDP2, DDP or one process."""
    gathered = get_optimizer_state_dict(peft_model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
    if not gathered:
        return {}
    index = {name: position for position, name in enumerate(_parameter_names(peft_model, optimizer))}
    return {"state": {index[name]: values for name, values in gathered["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in gathered["param_groups"]]}


def load_full_optimizer_state(peft_model, optimizer, state_dict: dict) -> None:
    """Every rank: a full optimizer state (``optimizer.state_dict()`` layout) into the sharded optimizer."""
    names = _parameter_names(peft_model, optimizer)
    by_name = {"state": {names[index]: values for index, values in state_dict["state"].items()},
               "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                                for group in state_dict["param_groups"]]}
    set_optimizer_state_dict(peft_model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
