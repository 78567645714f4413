"""``--device``: one :func:`~minipeft.loading.models.resolve_device` for every command, its choices checked with
CUDA and MPS mocked present or absent (so the test means the same on a laptop, a GPU box and CI)."""

import pytest
import torch

from minipeft.core.errors import UserError
from minipeft.loading.models import resolve_device


@pytest.fixture
def machine(monkeypatch):
    """``machine(cuda=..., mps=...)``: what this machine appears to have."""
    def pretend(cuda: bool, mps: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    return pretend


@pytest.mark.parametrize("cuda, mps, local_rank, expected", [
    (True, True, 0, torch.device("cuda", 0)),  # CUDA first
    (True, False, 3, torch.device("cuda", 3)),  # this process's GPU under torchrun
    (False, True, 0, torch.device("mps")),  # then Apple's MPS
    (False, False, 0, torch.device("cpu")),  # then the CPU
])
def test_auto_picks_cuda_then_mps_then_cpu(machine, cuda, mps, local_rank, expected):
    machine(cuda=cuda, mps=mps)
    assert resolve_device("auto", local_rank) == expected


@pytest.mark.parametrize("flag, local_rank, expected", [
    ("cpu", 0, torch.device("cpu")),
    ("cuda", 0, torch.device("cuda", 0)),
    ("cuda", 2, torch.device("cuda", 2)),  # no index: this process's GPU
    ("cuda:1", 2, torch.device("cuda", 1)),  # an explicit index wins
    ("mps", 0, torch.device("mps")),
])
def test_an_explicit_device_is_used_when_the_machine_has_it(machine, flag, local_rank, expected):
    machine(cuda=True, mps=True)
    assert resolve_device(flag, local_rank) == expected


@pytest.mark.parametrize("flag, message", [
    ("cuda", "--device cuda: CUDA is not available on this machine; use --device cpu"),
    ("cuda:1", "--device cuda:1: CUDA is not available on this machine; use --device cpu"),
    ("mps", "--device mps: MPS is not available on this machine; use --device cpu"),
    ("gpu", "--device gpu: not a device; use auto, cpu, cuda, cuda:1 or mps"),
    ("meta", "--device meta: not a device minipeft runs on; use auto, cpu, cuda, cuda:1 or mps"),  # a traceback
])
def test_a_device_the_machine_lacks_is_one_error_line(machine, flag, message):
    machine(cuda=False, mps=False)
    with pytest.raises(UserError) as error:
        resolve_device(flag)
    assert str(error.value) == message


def test_cpu_needs_nothing(machine):
    machine(cuda=False, mps=False)
    assert resolve_device("cpu") == torch.device("cpu")


def test_every_command_resolves_devices_through_the_same_function():
    from minipeft.cli import compare, generate
    from minipeft.training import distributed

    assert distributed.resolve_device is resolve_device
    assert generate.resolve_device is resolve_device
    assert compare.resolve_device is resolve_device
