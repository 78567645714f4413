"""DistributedDataParallel around a 4-bit base sends nothing frozen: no buffer is re-broadcast before each
forward (DDP's default would re-send every NF4 code, every step) and the frozen base is not broadcast at
construction; the trainable adapter still is, and its gradients are still all-reduced.

One in-process gloo group of one process (a file store; no ports, no subprocesses): the bytes DDP hands to its
broadcast are counted where DDP sends them (``_distributed_broadcast_coalesced``), for minipeft's wrapper
and for DDP's defaults on the same model (the count that shows the test can fail).
"""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from training_fixtures import method_config, one_thread, tiny_model  # noqa: F401

from minipeft.model.peft_model import get_peft_model
from minipeft.quantization.nf4 import quantize_model
from minipeft.training.distributed import data_parallel, frozen_state_names


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def nf4_lora_model():
    model = tiny_model("llama")
    assert quantize_model(model)
    torch.manual_seed(1)
    return get_peft_model(model, method_config(model, "lora"))


def bytes_broadcast_per_forward(ddp, batch) -> int:
    sent = []
    send = ddp._distributed_broadcast_coalesced

    def counting(tensors, buffer_size, authoritative_rank=0):
        sent.extend(tensor.numel() * tensor.element_size() for tensor in tensors)
        return send(tensors, buffer_size, authoritative_rank)

    ddp._distributed_broadcast_coalesced = counting  # counts what this DDP instance sends (a test probe)
    ddp(**batch).logits.sum().backward()
    return sum(sent)


def test_ddp_around_an_nf4_base_sends_nothing_frozen(gloo_group):
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]])}
    default = DistributedDataParallel(nf4_lora_model())  # DDP's defaults: broadcast_buffers=True
    buffer_bytes = sum(buffer.numel() * buffer.element_size() for buffer in default.module.buffers())
    assert bytes_broadcast_per_forward(default, batch) == buffer_bytes > 0  # every buffer, every forward

    model = nf4_lora_model()
    ddp = data_parallel(model, torch.device("cpu"))
    assert bytes_broadcast_per_forward(ddp, batch) == 0
    assert ddp.parameters_to_ignore == set(frozen_state_names(model))
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable and not trainable & ddp.parameters_to_ignore  # the adapter is still synchronised
    assert all(parameter.grad is not None for parameter in model.parameters() if parameter.requires_grad)
