"""The fast loss (:mod:`minipeft.fast.loss`) equals the reference (:func:`minipeft.training.loss.causal_lm_loss_sum`).

* :func:`~minipeft.fast.loss.target_only_loss_sum` computes logits only where a shifted label is not -100
  (``logits_to_keep`` as a boolean mask); the reference computes every logit and ignores -100. Same NLL sum,
  same target count, same gradient for every trainable parameter (rtol 1e-5, atol 1e-6 in float32): for every
  method (prompt tuning prepends positions, prefix tuning passes a cache, LoRA/DoRA/IA3/adapters edit layers,
  selective fine-tuning trains the LM head itself), on GPT-2 and Llama, right-padded, left-padded and packed
  batches; under bf16 autocast the loss to a relative 1e-2. With a plain ``nn.Linear`` head it runs head +
  cross-entropy in chunks of rows (:func:`~minipeft.fast.loss.linear_cross_entropy_sum`), checked here alone
  with many chunks too (loss rtol 1e-6 / atol 1e-5, gradients 1e-5).
* Right-padded batches reach the model without their padding mask
  (:func:`~minipeft.fast.loss.without_right_padding_mask`): the tests above compare that path with the
  reference, which keeps the mask.
"""

import pytest
import torch

from minipeft import get_peft_model
from minipeft.fast.loss import linear_cross_entropy_sum, target_only_loss_sum, without_right_padding_mask
from minipeft.methods.adapter import AdapterConfig
from minipeft.methods.ia3 import IA3Config
from minipeft.methods.lora import LoRAConfig
from minipeft.methods.prefix import PrefixTuningConfig
from minipeft.methods.prompt import PromptTuningConfig
from minipeft.methods.selective import SelectiveConfig
from minipeft.training.loss import causal_lm_loss_sum, count_target_tokens
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
    fast = loss_and_gradients(target_only_loss_sum, model, batch, autocast)
    plain = loss_and_gradients(causal_lm_loss_sum, model, batch, autocast)
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
        fast, fast_targets = target_only_loss_sum(model, batch)
        plain, plain_targets = causal_lm_loss_sum(model, batch)
    assert int(fast_targets) == int(plain_targets) == count_target_tokens(batch)
    torch.testing.assert_close(fast, plain, rtol=1e-2, atol=0.0)


def test_plain_transformers_model_and_a_batch_without_targets(gpt2_tiny):
    for parameter in gpt2_tiny.parameters():
        parameter.requires_grad_(False)
    gpt2_tiny.lm_head.weight.requires_grad_(True)  # tied to wte: both uses get a gradient
    assert_same(gpt2_tiny, instruction_batch("right"))
    batch = instruction_batch("right")
    batch["labels"][:] = -100
    for loss_sum in (target_only_loss_sum, causal_lm_loss_sum):
        nll_sum, n_targets = loss_sum(gpt2_tiny, batch)
        assert float(nll_sum.detach()) == 0.0 and int(n_targets) == 0


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
