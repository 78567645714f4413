"""The speed-ups change no result: each optimised path against the straightforward one, loss and gradients.

* The loss computes logits only where a shifted label is not -100 (``logits_to_keep`` as a boolean mask,
  :func:`minipeft.training.loss.causal_lm_loss_sum`); the reference computes every logit and ignores -100
  (:func:`~minipeft.training.loss.causal_lm_loss_sum_all_logits`). Same NLL sum, same target count, same
  gradient for every trainable parameter: for every method (prompt tuning prepends positions, prefix
  tuning passes a cache, LoRA/DoRA/IA3/adapters edit layers, selective fine-tuning trains the LM head
  itself), on GPT-2 and Llama, right-padded, left-padded and packed batches, in float32 and under bf16
  autocast. With a plain ``nn.Linear`` head that loss runs head + cross-entropy in chunks of rows
  (:func:`~minipeft.training.loss.linear_cross_entropy_sum`), checked here alone with many chunks too.
* ``--precision bf16`` stores the frozen weights in bf16 (:func:`minipeft.training.precision.cast_frozen_weights`);
  against autocast over float32 weights: the same loss to bf16's precision, float32 gradients.
* The fused AdamW (:func:`minipeft.training.optimizer.build_optimizer`) takes the same step as the
  per-parameter one.
* Right-padded batches reach the model without their padding mask
  (:func:`minipeft.training.loss.without_right_padding_mask`): the tests above compare that path with the
  reference, which keeps the mask.
* LoRA's dropout draws its mask from the gaps between dropped entries
  (:func:`minipeft.methods.lora.zero_dropped_entries`): the same distribution as a Bernoulli draw per entry
  (share of zeros and of adjacent zero pairs within 5 standard errors of p and p²), the LoRA output equals
  ``W x + s/(1-p) · B A (x ⊙ mask)`` for the mask drawn, and no gradient reaches a dropped entry.
* Its down-projection (:class:`minipeft.methods.lora.DroppedInputProjection`) keeps ``x`` and the positions
  for the backward instead of the masked copy: the same output and gradients as autograd through the copy.
"""

import math


import pytest
import torch

from minipeft import get_peft_model
from minipeft.methods.adapter import AdapterConfig
from minipeft.methods.selective import SelectiveConfig
from minipeft.methods.ia3 import IA3Config
from minipeft.methods.lora import (DroppedInputProjection, LoRAConfig, LoRALinear, dropped_positions,
                                   zero_dropped_entries)
from minipeft.methods.prefix import PrefixTuningConfig
from minipeft.methods.prompt import PromptTuningConfig
from minipeft.training.loss import (causal_lm_loss_sum, causal_lm_loss_sum_all_logits, count_target_tokens,
                                    linear_cross_entropy_sum, without_right_padding_mask)
from minipeft.training.optimizer import build_optimizer, parameter_groups
from minipeft.training.precision import cast_frozen_weights
from tests.conftest import MODEL_FACTORIES

METHOD_CONFIGS = {
    "lora": lambda: LoRAConfig(r=4, lora_alpha=8, init_lora_weights=False),
    "lora_lm_head": lambda: LoRAConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False),
    "lora_modules_to_save": lambda: LoRAConfig(r=4, lora_alpha=8, modules_to_save=["lm_head"]),
    "dora": lambda: LoRAConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False),
    "ia3": lambda: IA3Config(),
    "adapter": lambda: AdapterConfig(),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=3),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=3),
    "selective": lambda: SelectiveConfig(train_lm_head=True, train_embeddings=True),
}


def instruction_batch(padding_side: str = "right", seed: int = 0) -> dict:
    """Three records of different lengths, prompt tokens masked with -100, padded to the longest."""
    generator = torch.Generator().manual_seed(seed)
    lengths, prompt_lengths, width = [10, 7, 4], [4, 2, 3], 10
    batch = {"input_ids": torch.zeros(3, width, dtype=torch.long),
             "attention_mask": torch.zeros(3, width, dtype=torch.long),
             "labels": torch.full((3, width), -100, dtype=torch.long)}
    for row, (length, prompt_length) in enumerate(zip(lengths, prompt_lengths)):
        ids = torch.randint(1, 1000, (length,), generator=generator)
        real = slice(0, length) if padding_side == "right" else slice(width - length, width)
        batch["input_ids"][row, real] = ids
        batch["attention_mask"][row, real] = 1
        labels = ids.clone()
        labels[:prompt_length] = -100
        batch["labels"][row, real] = labels
    return batch


def packed_batch() -> dict:
    """One row holding two records (positions restart), labels -100 on each record's first token."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (1, 9), generator=generator)
    labels = ids.clone()
    labels[0, [0, 1, 5]] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]])}


def loss_and_gradients(loss_function, model, batch, autocast=False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        nll_sum, n_targets = loss_function(model, batch)
    nll_sum.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                 if parameter.requires_grad and parameter.grad is not None}
    return nll_sum.detach(), int(n_targets), gradients


def assert_same(model, batch, autocast=False, rtol=1e-5, atol=1e-6):
    fast = loss_and_gradients(causal_lm_loss_sum, model, batch, autocast)
    plain = loss_and_gradients(causal_lm_loss_sum_all_logits, model, batch, autocast)
    assert fast[1] == plain[1] == count_target_tokens(batch)
    torch.testing.assert_close(fast[0], plain[0], rtol=rtol, atol=atol)
    assert fast[2].keys() == plain[2].keys() and fast[2]  # the same parameters got a gradient, and some did
    for name in plain[2]:
        torch.testing.assert_close(fast[2][name], plain[2][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("family", list(MODEL_FACTORIES))
@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_loss_at_labelled_positions_equals_all_logits(family, method):
    torch.manual_seed(0)
    model = get_peft_model(MODEL_FACTORIES[family](), METHOD_CONFIGS[method]())
    model.train()
    for module in model.modules():  # dropout would draw different masks in the two forwards
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert_same(model, instruction_batch("right"))
    if method not in ("prefix", "prompt"):  # prompt learning refuses packed rows (a UserError, tested there)
        assert_same(model, packed_batch())
    assert_same(model, instruction_batch("left"))


@pytest.mark.parametrize("family", list(MODEL_FACTORIES))
def test_loss_at_labelled_positions_under_bf16_autocast(family):
    """Under bf16 autocast the two paths give the same loss to bf16's precision (a relative 1e-2).

    Gradients are compared in float32 only (the test above): on a tiny random model the bf16 rounding of the
    backward is as large as the gradient itself, in *both* paths (measured: each is ~100% away from the
    float32 gradient), so an elementwise bf16 comparison would test the rounding, not the optimisation.
    """
    model = get_peft_model(MODEL_FACTORIES[family](), METHOD_CONFIGS["lora"]())
    model.train()
    batch = instruction_batch("right")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast, fast_targets = causal_lm_loss_sum(model, batch)
        plain, plain_targets = causal_lm_loss_sum_all_logits(model, batch)
    assert int(fast_targets) == int(plain_targets) == count_target_tokens(batch)
    torch.testing.assert_close(fast, plain, rtol=1e-2, atol=0.0)


def test_plain_transformers_model_and_a_batch_without_targets(gpt2_tiny):
    for parameter in gpt2_tiny.parameters():
        parameter.requires_grad_(False)
    gpt2_tiny.lm_head.weight.requires_grad_(True)  # tied to wte: both uses get a gradient
    assert_same(gpt2_tiny, instruction_batch("right"))
    batch = instruction_batch("right")
    batch["labels"][:] = -100
    nll_sum, n_targets = causal_lm_loss_sum(gpt2_tiny, batch)
    assert float(nll_sum) == 0.0 and int(n_targets) == 0


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_head_and_cross_entropy_equal_the_plain_ones(with_bias):
    """Loss and the gradients of hidden states, weight and bias: 1 chunk, 7 chunks of 3 rows, a ragged end."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (20,), generator=generator)
    leaves = [hidden, weight] + ([bias] if with_bias else [])
    plain = torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, bias), targets,
                                              reduction="sum")
    plain_grads = torch.autograd.grad(2.5 * plain, leaves)
    for chunk_logits in (10**6, 150):  # all rows at once; 3 rows a chunk
        chunked = linear_cross_entropy_sum(hidden, weight, bias, targets, chunk_logits)
        torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-5)
        for mine, theirs in zip(torch.autograd.grad(2.5 * chunked, leaves), plain_grads):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # evaluation: no gradient work, same loss
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, bias, targets, 150), plain.detach(),
                                   rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("family", list(MODEL_FACTORIES))
def test_bf16_frozen_weights_match_autocast_over_float32_weights(family):
    """Frozen weights stored in bf16: the loss within bf16's precision (relative 2e-2) of autocast over
    float32 weights; trainable parameters and their gradients stay float32; a plain forward still works."""
    reference = get_peft_model(MODEL_FACTORIES[family](), METHOD_CONFIGS["lora"]())
    model = get_peft_model(MODEL_FACTORIES[family](), METHOD_CONFIGS["lora"]())
    model.load_state_dict(reference.state_dict())
    assert cast_frozen_weights(model, "bf16") > 0
    for parameter in model.parameters():
        assert parameter.dtype == (torch.float32 if parameter.requires_grad else torch.bfloat16)
    batch = instruction_batch("right")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, _ = causal_lm_loss_sum(model, batch)
        plain, _ = causal_lm_loss_sum(reference, batch)
    torch.testing.assert_close(fast, plain, rtol=2e-2, atol=0.0)
    fast.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=batch["input_ids"]).logits).all()  # outside autocast: generation


def test_bf16_cast_skipped_when_a_base_parameter_trains():
    """BitFit-like runs (a base bias trains) keep float32 weights: a plain forward must not mix dtypes."""
    model = get_peft_model(MODEL_FACTORIES["gpt2"](), LoRAConfig(r=4, lora_alpha=8, bias="all"))
    assert cast_frozen_weights(model, "bf16") == 0
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())


def test_fused_adamw_takes_the_same_step_as_the_per_parameter_one():
    model = get_peft_model(MODEL_FACTORIES["llama"](), METHOD_CONFIGS["lora"]())
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.grad = torch.randn_like(parameter)
    fused = build_optimizer(model, 1e-2, 0.01)
    assert fused.defaults["fused"]
    before = [parameter.detach().clone() for parameter in trainable]
    plain = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-2, foreach=False)
    for _ in range(2):
        fused.step()
    fused_after = [parameter.detach().clone() for parameter in trainable]
    with torch.no_grad():
        for parameter, value in zip(trainable, before):
            parameter.copy_(value)
    for _ in range(2):
        plain.step()
    for mine, theirs in zip(fused_after, trainable):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-5, atol=1e-6)


def test_padding_mask_dropped_only_for_right_padded_batches():
    from minipeft.data.batching import model_inputs

    right = model_inputs(instruction_batch("right"))
    assert "attention_mask" in right and "attention_mask" not in without_right_padding_mask(right)
    left = model_inputs(instruction_batch("left"))  # position_ids given: kept as is
    assert without_right_padding_mask(left) is left
    packed = model_inputs(packed_batch())
    assert without_right_padding_mask(packed) is packed
    holes = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 0, 1, 1], [1] * 4])}
    assert without_right_padding_mask(holes) is holes  # a 0 before a 1 is not right padding


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
    """``W x + b + s/(1-p) · B A (x ⊙ mask)``, with the mask the layer drew (same seed), float32 and bf16."""
    torch.manual_seed(0)
    p = 0.25
    lora = LoRALinear(torch.nn.Linear(16, 24), r=4, alpha=8, dropout=p, init_lora_weights=False).train()
    x = torch.randn(5, 7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        torch.manual_seed(1)
        output = lora(x)
        torch.manual_seed(1)
        masked = zero_dropped_entries(x, p)
        expected = lora.base_layer(x) + lora.lora_B(lora.lora_A(masked)) * (lora.scaling / (1 - p))
    assert output.dtype == expected.dtype
    tolerance = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output, expected, **tolerance)
    assert not torch.equal(masked, x) and torch.equal(masked == 0, (x == 0) | (masked == 0))
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
