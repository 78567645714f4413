"""The one-pass NF4 dequantization (minipeft.fast.nf4_dequant) gives the reference's bits, in every dtype,
with and without double quantization; switched on for a model it changes no output and is undone on exit."""

import pytest
import torch
from torch import nn
from training_fixtures import one_thread  # noqa: F401

from minipeft.fast.nf4_dequant import dequantize_nf4_fused, fused_nf4_dequantization
from minipeft.quantization.nf4 import Linear4bit
from minipeft.quantization.nf4_format import dequantize_nf4, quantize_nf4


@pytest.mark.parametrize("shape", [(192, 64), (96, 320), (7, 64)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_dequantization_equals_the_reference_bit_for_bit(shape, double_quant, dtype):
    weight = quantize_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05, double_quant)
    fused, reference = dequantize_nf4_fused(weight, dtype), dequantize_nf4(weight, dtype)
    assert fused.shape == reference.shape == shape and fused.dtype == dtype
    assert torch.equal(fused, reference)


def test_a_ragged_weight_takes_the_reference_path():
    weight = quantize_nf4(torch.randn(5, 13))  # 65 weights: not whole blocks, odd
    assert torch.equal(dequantize_nf4_fused(weight, torch.bfloat16), dequantize_nf4(weight, torch.bfloat16))


def test_switched_on_for_a_model_the_outputs_are_the_same_and_it_is_undone():
    torch.manual_seed(0)
    model = nn.Sequential(Linear4bit(nn.Linear(64, 128)), nn.GELU(), Linear4bit(nn.Linear(128, 64)))
    x = torch.randn(3, 64, requires_grad=True)
    reference = model(x)
    (reference_grad,) = torch.autograd.grad(reference.sum(), x)
    with fused_nf4_dequantization(model) as count:
        assert count == 2 and all(layer.dequantize_with is not None for layer in model[::2])
        fused = model(x)
        (fused_grad,) = torch.autograd.grad(fused.sum(), x)
    assert torch.equal(fused, reference) and torch.equal(fused_grad, reference_grad)
    assert all(layer.dequantize_with is None for layer in model[::2])
