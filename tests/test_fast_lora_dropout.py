"""LoRA's dropout by gaps (:mod:`minipeft.fast.lora_dropout`) is the reference's dropout
(:class:`minipeft.methods.lora.LoRALinear` with ``nn.Dropout``), cheaper on a CPU.

* The mask drawn from the gaps between dropped entries (:func:`~minipeft.fast.lora_dropout.zero_dropped_entries`)
  has the Bernoulli distribution: share of zeros and of adjacent zero pairs within 5 standard errors of p and
  p², and no gradient reaches a dropped entry.
* A LoRA layer with the swap in (:func:`~minipeft.fast.lora_dropout.dropout_by_gaps`) computes
  ``W x + b + s/(1-p) · B A (x ⊙ mask)`` for the mask drawn (rtol 1e-5 / atol 1e-6 in float32, 2e-2 under bf16
  autocast), with the gradients of autograd through that formula, and ``W x + b + s · B A x`` in evaluation.
* Its down-projection (:class:`~minipeft.fast.lora_dropout.DroppedInputProjection`) keeps ``x`` and the
  positions for the backward instead of the masked copy: the same output and gradients as autograd through the
  copy (rtol 1e-5 / atol 1e-6 in float32, 1e-2 in bf16).
* The swap keeps the Parameter and the ``state_dict`` keys, and is undone (a training run switches it on).
"""

import math

import pytest
import torch

from minipeft import get_peft_model
from minipeft.fast import switched_on
from minipeft.fast.lora_dropout import (DroppedInputProjection, DroppedProjection, dropout_by_gaps,
                                        dropped_positions, zero_dropped_entries)
from minipeft.methods.lora import LoRAConfig, LoRALinear
from tests.conftest import MODEL_FACTORIES

@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_dropout_by_gaps_has_the_bernoulli_distribution(p):
    torch.manual_seed(0)
    n = 200_000
    dropped = (zero_dropped_entries(torch.ones(n), p) == 0).double()
    standard_error = math.sqrt(p * (1 - p) / n)
    assert abs(float(dropped.mean()) - p) < 5 * standard_error
    pairs = dropped[1:] * dropped[:-1]  # independence of neighbours: P(both dropped) = p²
    # overlapping pairs are not independent of each other: twice the i.i.d. standard error as the margin
    assert abs(float(pairs.mean()) - p * p) < 10 * math.sqrt(p * p * (1 - p * p) / n)
    assert not torch.equal(zero_dropped_entries(torch.ones(n), p), zero_dropped_entries(torch.ones(n), p))
    x = torch.randn(64, 33, requires_grad=True)
    kept = zero_dropped_entries(x, p)
    kept.sum().backward()
    assert torch.equal(x.grad, (kept != 0).float())  # a dropped entry gets no gradient


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_dropout_output_is_the_dropout_formula(autocast):
    """``W x + b + s/(1-p) · B A (x ⊙ mask)``, with the mask the layer drew (same seed), float32 and bf16: the
    output and the gradients of x, A and B."""
    torch.manual_seed(0)
    p = 0.25
    lora = LoRALinear(torch.nn.Linear(16, 24), r=4, alpha=8, dropout=p, init_lora_weights=False).train()
    x = torch.randn(5, 7, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with dropout_by_gaps(lora) as swapped:
            assert swapped == 1
            torch.manual_seed(1)
            output = lora(x)
            fast_grads = torch.autograd.grad(output.float().sum(), (x, lora.lora_A.weight, lora.lora_B.weight))
        torch.manual_seed(1)
        masked = zero_dropped_entries(x, p)
        expected = lora.base_layer(x) + lora.lora_B(lora.lora_A(masked)) * (lora.scaling / (1 - p))
        expected_grads = torch.autograd.grad(expected.float().sum(), (x, lora.lora_A.weight, lora.lora_B.weight))
    assert output.dtype == expected.dtype
    tolerance = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output, expected, **tolerance)
    for mine, theirs in zip(fast_grads, expected_grads):
        torch.testing.assert_close(mine, theirs, **tolerance)
    assert not torch.equal(masked, x) and torch.equal(masked == 0, (x == 0) | (masked == 0))
    with torch.no_grad(), dropout_by_gaps(lora):
        torch.testing.assert_close(lora.eval()(x), lora.base_layer(x) + lora.lora_B(lora.lora_A(x)) * lora.scaling)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropped_input_projection_equals_autograd_through_the_masked_copy(dtype):
    torch.manual_seed(0)
    x = torch.randn(6, 5, 32, dtype=dtype, requires_grad=True)
    weight = torch.randn(4, 32, requires_grad=True)  # float32, as lora_A's weight
    positions = dropped_positions(x.numel(), 0.3)
    grad = torch.randn(6, 5, 4, dtype=dtype)
    output = DroppedInputProjection.apply(x, weight, positions)
    grad_x, grad_weight = torch.autograd.grad(output, (x, weight), grad)
    masked = x.reshape(-1).index_fill(0, positions, 0).view(x.shape)
    expected = masked @ weight.to(dtype).T
    expected_grad_x, expected_grad_weight = torch.autograd.grad(expected, (x, weight), grad)
    assert output.dtype == dtype and grad_weight.dtype == torch.float32
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(output, expected, **tolerance)
    torch.testing.assert_close(grad_x, expected_grad_x, **tolerance)
    torch.testing.assert_close(grad_weight, expected_grad_weight, **tolerance)
    assert torch.all(grad_x.reshape(-1)[positions] == 0) and positions.numel() > 0


def test_swapped_for_the_run_on_a_cpu_and_put_back():
    """The same Parameter and state_dict keys while swapped; the originals back afterwards; only on a CPU (a GPU
    draws per entry in one kernel), and only where there is dropout."""
    model = get_peft_model(MODEL_FACTORIES["llama"](), LoRAConfig(r=4, lora_dropout=0.1))
    layers = [module for module in model.modules() if isinstance(module, LoRALinear)]
    before = [(layer.lora_A, layer.lora_dropout, layer.lora_A.weight) for layer in layers]
    keys = list(model.state_dict())
    with switched_on(model, torch.device("cpu"), compile=False):
        for layer, (_, _, weight) in zip(layers, before):
            assert isinstance(layer.lora_A, DroppedProjection) and layer.lora_A.weight is weight
            assert isinstance(layer.lora_dropout, torch.nn.Identity)
        assert list(model.state_dict()) == keys
    assert [(layer.lora_A, layer.lora_dropout, layer.lora_A.weight) for layer in layers] == before
    with switched_on(model, torch.device("cuda"), compile=False):  # only a device type: nothing runs there
        assert all(isinstance(layer.lora_A, torch.nn.Linear) for layer in layers)
    no_dropout = get_peft_model(MODEL_FACTORIES["llama"](), LoRAConfig(r=4))
    with dropout_by_gaps(no_dropout) as swapped:
        assert swapped == 0


def test_putting_back_never_raises():
    lora = LoRALinear(torch.nn.Linear(8, 8), r=2, alpha=2, dropout=0.5)
    heard = []
    with dropout_by_gaps(lora, heard.append):
        del lora.lora_A.weight  # what a broken run might leave behind
    assert len(heard) == 1 and "could not put LoRA's dropout back" in heard[0]

