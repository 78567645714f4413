"""Hugging Face peft as an oracle: LoRA adapters cross over in both directions with equal logits and counts."""

import pytest
import torch

from minipeft import LoRAConfig, get_peft_model, load_adapter
from minipeft.loading.models import build_from_known_config

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.oracle

CASES = [
    dict(r=4, lora_alpha=8, target_modules=["c_attn", "q_proj", "v_proj"]),
    dict(r=8, lora_alpha=16, target_modules=["c_proj", "c_fc", "o_proj", "down_proj"], use_rslora=True),
    dict(r=2, lora_alpha=4, target_modules=["c_attn", "q_proj"], bias="lora_only"),
    dict(r=2, lora_alpha=4, target_modules=["c_attn", "k_proj"], modules_to_save=["lm_head"]),
]


def present_targets(model, targets):
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    return [t for t in targets if t.rsplit(".", 1)[-1] in names]


def randomise(peft_model_or_modules):
    """Give every adapter tensor non-trivial values (a fresh LoRA is a no-op and would prove nothing)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model_or_modules.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05 + parameter)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_minipeft_adapter_loads_in_peft(tiny_model_factory, sample_batch, tmp_path, case):
    settings = dict(CASES[case])
    settings["target_modules"] = present_targets(tiny_model_factory(), settings["target_modules"])
    ours = get_peft_model(tiny_model_factory(), LoRAConfig(**settings))
    randomise(ours)
    ours.save_adapter(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model_factory(), tmp_path)
    delta = (theirs(**sample_batch).logits - ours(**sample_batch).logits).abs().max()
    assert delta <= 1e-5
    trainable, total = theirs.get_nb_trainable_parameters()
    # peft loads for inference (nothing trainable); compare totals, and trainable counts below
    assert total == ours.parameter_stats().total


@pytest.mark.parametrize("case", range(len(CASES)))
def test_peft_adapter_loads_in_minipeft(tiny_model_factory, sample_batch, tmp_path, case):
    settings = dict(CASES[case])
    settings["target_modules"] = present_targets(tiny_model_factory(), settings["target_modules"])
    theirs = peft.get_peft_model(tiny_model_factory(), peft.LoraConfig(**settings))
    randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_model_factory(), tmp_path)
    delta = (theirs(**sample_batch).logits - ours(**sample_batch).logits).abs().max()
    assert delta <= 1e-5
    fresh = get_peft_model(tiny_model_factory(), LoRAConfig(**settings))
    assert (fresh.parameter_stats().trainable, fresh.parameter_stats().total) == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("settings", [dict(r=8, lora_alpha=16, target_modules=["c_attn"]),
                                      dict(r=4, target_modules=["c_attn", "c_proj", "c_fc"])])
def test_counts_equal_peft_on_gpt2_small(settings):
    theirs = peft.get_peft_model(build_from_known_config("gpt2"), peft.LoraConfig(**settings))
    ours = get_peft_model(build_from_known_config("gpt2"), LoRAConfig(**settings)).parameter_stats()
    assert (ours.trainable, ours.total) == theirs.get_nb_trainable_parameters()
