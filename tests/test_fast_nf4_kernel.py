"""The C NF4 kernel (minipeft.fast.nf4_cpu_kernel) gives the reference's bits; switched on for a model through its
workspace, every output and input gradient is the reference's, and the weights it hands out to keep are new tensors."""

import pytest
import torch
from torch import nn
from training_fixtures import one_thread  # noqa: F401

from minipeft.fast.nf4_cpu_kernel import dequantize_nf4_kernel, kernel_handles, nf4_kernel
from minipeft.fast.nf4_dequant import CPUKernelDequantization, fused_nf4_dequantization
from minipeft.quantization.nf4 import Linear4bit
from minipeft.quantization.nf4_format import dequantize_nf4, quantize_nf4

needs_kernel = pytest.mark.skipif(nf4_kernel() is None, reason="no C compiler: the kernel cannot be built")


@needs_kernel
@pytest.mark.parametrize("shape", [(192, 64), (96, 320), (300, 256 * 64 // 300 + 64), (1536, 576)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("wide", [True, False], ids=["avx512-where-present", "plain-loop"])
def test_kernel_equals_the_reference_bit_for_bit(shape, double_quant, dtype, threads, wide):
    shape = (shape[0], shape[1] // 64 * 64)
    generator = torch.Generator().manual_seed(0)
    weight = quantize_nf4(torch.randn(shape, generator=generator) * 0.05, double_quant)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fast = dequantize_nf4_kernel(weight, dtype, wide=wide)
    finally:
        torch.set_num_threads(previous)
    assert kernel_handles(weight, dtype)
    assert fast.shape == shape and fast.dtype == dtype and torch.equal(fast, dequantize_nf4(weight, dtype))


@needs_kernel
def test_bf16_rounding_ties_go_to_even_as_torch_rounds():
    # weights at absmax · level whose float32 product sits exactly between two bf16 values are rare in random
    # data; large blocks of many absmaxes make sure the rounding of every product matches torch's .to(bfloat16)
    weight = quantize_nf4(torch.randn(4096, 512, generator=torch.Generator().manual_seed(1)) * 3.0)
    assert torch.equal(dequantize_nf4_kernel(weight, torch.bfloat16), dequantize_nf4(weight, torch.bfloat16))


@pytest.mark.parametrize("weight", [quantize_nf4(torch.randn(5, 13)), quantize_nf4(torch.randn(64, 64))],
                         ids=["ragged", "float16 out"])
def test_what_the_kernel_does_not_handle_takes_the_reference_path(weight):
    dtype = torch.bfloat16 if weight.shape == (5, 13) else torch.float16
    assert not kernel_handles(weight, dtype)
    assert torch.equal(dequantize_nf4_kernel(weight, dtype), dequantize_nf4(weight, dtype))


@needs_kernel
def test_switched_on_outputs_and_gradients_are_the_reference_and_the_workspace_is_shared():
    torch.manual_seed(0)
    model = nn.Sequential(Linear4bit(nn.Linear(64, 128)), nn.GELU(), Linear4bit(nn.Linear(128, 96)), nn.GELU(),
                          Linear4bit(nn.Linear(96, 128)))  # layers 2 and 4: the same size, one workspace tensor
    x = torch.randn(3, 64, requires_grad=True)
    reference = model(x)
    (reference_grad,) = torch.autograd.grad(reference.square().sum(), x)
    kept_reference = model[0].weight
    with fused_nf4_dequantization(model) as count:
        dequantizer = model[0].dequantize_with
        assert count == 3 and isinstance(dequantizer, CPUKernelDequantization)
        assert all(layer.dequantize_with is dequantizer for layer in model[::2])
        fast = model(x)
        (fast_grad,) = torch.autograd.grad(fast.square().sum(), x)
        element = torch.finfo(model[0].compute_dtype).bits // 8
        assert sorted(size for size, _ in dequantizer.workspace) == [64 * 128, 96 * 128]
        assert dequantizer.workspace_bytes() == (64 * 128 + 96 * 128) * element
        kept = model[0].weight  # outlives the call: a new tensor, not the workspace
        model[0](x)  # writes the workspace again
        assert torch.equal(kept, kept_reference)
    assert torch.equal(fast, reference) and torch.equal(fast_grad, reference_grad)
    assert all(layer.dequantize_with is None for layer in model[::2])


@needs_kernel
def test_bf16_compute_generation_style_forward_is_the_reference():
    torch.manual_seed(0)
    layer = Linear4bit(nn.Linear(256, 192), compute_dtype=torch.bfloat16)
    x = torch.randn(2, 5, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        reference = layer(x)
        with fused_nf4_dequantization(layer):
            assert torch.equal(layer(x), reference)


@needs_kernel
def test_training_runs_and_generation_switch_the_kernel_on_and_off():
    """``fast.switched_on`` (a training run on a CPU) and ``fast.fast_generation`` (generate, the end-of-run
    speed probe) put every 4-bit layer on the kernel, and take it off again on the way out."""
    from minipeft.fast import fast_generation, switched_on

    model = nn.Sequential(Linear4bit(nn.Linear(64, 128)), nn.GELU(), Linear4bit(nn.Linear(128, 64)))
    for context in (switched_on(model, torch.device("cpu"), compile=False), fast_generation(model)):
        with context:
            assert all(isinstance(layer.dequantize_with, CPUKernelDequantization) for layer in model[::2])
        assert all(layer.dequantize_with is None for layer in model[::2])
