"""The speed-ups change no result: each optimised path against the straightforward one, loss and gradients.

* The loss computes logits only where a shifted label is not -100 (``logits_to_keep`` as a boolean mask,
  :func:`minipeft.training.loss.causal_lm_loss_sum`); the reference computes every logit and ignores -100
  (:func:`~minipeft.training.loss.causal_lm_loss_sum_all_logits`). Same NLL sum, same target count, same
  gradient for every trainable parameter: for every method (prompt tuning prepends positions, prefix
  tuning passes a cache, LoRA/DoRA/IA3/adapters edit layers, selective fine-tuning trains the LM head
  itself), on GPT-2 and Llama, right-padded, left-padded and packed batches, in float32 and under bf16
  autocast.
"""

import pytest
import torch

from minipeft import get_peft_model
from minipeft.adapters import AdapterConfig
from minipeft.freeze import SelectiveConfig
from minipeft.ia3 import IA3Config
from minipeft.lora import LoRAConfig
from minipeft.prefix import PrefixTuningConfig
from minipeft.prompt import PromptTuningConfig
from minipeft.training.loss import causal_lm_loss_sum, causal_lm_loss_sum_all_logits, count_target_tokens
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
