"""Devices and data parallelism: one process, or ``torchrun --nproc_per_node=N`` with DistributedDataParallel.

``torchrun`` starts N copies of the script and sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; each copy
builds the same model, reads its own shard of every batch (the data pipeline's distributed sampler), and DDP
averages the gradients across processes during ``backward``. Only rank 0 writes files and prints.

- backend: ``nccl`` between GPUs, ``gloo`` on CPU;
- only parameters with ``requires_grad`` are synchronised, so the frozen base costs no communication;
  every trainable parameter is used in every forward (the loop checks it after the first steps), which is
  why ``find_unused_parameters`` stays off;
- gradient accumulation: all but the last micro-batch of a window run under ``no_sync()``, so gradients are
  exchanged once per optimizer step.

``--sharding fsdp`` replaces DDP by PyTorch's FSDP2, which keeps 1/N of every tensor on each process
(:mod:`minipeft.training.sharding`); it needs torchrun's environment, even for one process.
"""

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from minipeft.core.errors import UserError
from minipeft.loading.models import resolve_device


@dataclass
class DistributedContext:
    """Where this process runs and which part of the job it is."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    sharding: str = "ddp"  # or "fsdp": the model is sharded with FSDP2 (a process group even at world size 1)

    @property
    def is_sharded(self) -> bool:
        return self.sharding == "fsdp"

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, values: list) -> list:
        """Sum a few numbers over all processes (float64 on this process's device); the same list alone."""
        if not self.is_distributed:
            return [float(value) for value in values]
        tensor = torch.tensor([float(value) for value in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_gather_objects(self, value) -> list:
        """``[value of rank 0, value of rank 1, ...]`` (small Python objects, e.g. RNG states)."""
        if not self.is_distributed:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def init_distributed(device_flag: str = "auto", sharding: str = "ddp") -> DistributedContext:
    """Read torchrun's environment and start the process group; a plain run gets a one-process context."""
    if sharding == "fsdp" and not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):
        raise UserError("--sharding fsdp: start the run with torchrun (torchrun --nproc_per_node=N train_llm.py "
                        "...), which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; see docs/sharding.md")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag, local_rank)
    if world_size > 1 or sharding == "fsdp":
        if device.type == "mps":
            raise UserError("--device mps: distributed training needs CUDA (nccl) or CPU (gloo)")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device,
                              sharding=sharding)


def frozen_state_names(model: torch.nn.Module) -> list:
    """Names of every buffer and every frozen parameter of ``model``: what DDP need never send. Each process
    loaded the same files (an NF4 base's codes are buffers, or frozen uint8 parameters), and buffers such as
    rotary ``inv_freq`` are computed from the config, so they are equal everywhere without a broadcast."""
    frozen = [name for name, parameter in model.named_parameters() if not parameter.requires_grad]
    return frozen + [name for name, _ in model.named_buffers()]


def wrap_for_data_parallel(model: torch.nn.Module, context: DistributedContext) -> torch.nn.Module:
    """``DistributedDataParallel(model)`` under torchrun, else ``model`` itself (FSDP2 shards it in place).

    DDP sends nothing frozen: with its default ``broadcast_buffers=True`` it would re-send every buffer from
    rank 0 before *each* forward (an NF4 base's codes: ~0.52 byte per base weight, every step), and at
    construction it broadcasts the whole model once. Buffers and frozen parameters are listed in
    ``_ddp_params_and_buffers_to_ignore`` (the attribute DDP reads for this), so DDP has no buffer to sync
    (``broadcast_buffers=False`` would skip only the per-forward part, and torch 2.13 deprecates it); only the
    trainable parameters are broadcast once and all-reduced each step."""
    if not context.is_distributed or context.is_sharded:
        return model
    return data_parallel(model, context.device)


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``model`` in the started process group, sending nothing frozen."""
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen_state_names(model))
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Context for one micro-batch's backward: DDP exchanges gradients only when ``sync`` (the last one);
    FSDP2 reduce-scatters them only then (its switch stays set until the next call sets it)."""
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(sync)
        return nullcontext()
    if sync or not hasattr(model, "no_sync"):
        return nullcontext()
    return model.no_sync()


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
