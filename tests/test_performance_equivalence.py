"""Two speed-ups of the training run that change no result (the optimisations of ``minipeft/fast`` have their
own tests, ``tests/test_fast_*.py``):

* ``--precision bf16`` stores the frozen weights in bf16 (:func:`minipeft.training.precision.cast_frozen_weights`);
  against autocast over float32 weights: the same loss to bf16's precision, float32 gradients.
* The fused AdamW (:func:`minipeft.training.optimizer.build_optimizer`) takes the same step as the
  per-parameter one.
"""

import pytest
import torch

from minipeft import get_peft_model
from minipeft.methods.lora import LoRAConfig
from minipeft.training.loss import causal_lm_loss_sum
from minipeft.training.optimizer import build_optimizer, parameter_groups
from minipeft.training.precision import cast_frozen_weights
from tests.conftest import MODEL_FACTORIES
from tests.test_fast_loss import METHOD_CONFIGS, instruction_batch

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
