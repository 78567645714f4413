"""Hugging Face peft as an oracle for the default targets: where a method has a default for a model family, it is
peft's (``TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING``), and on a tiny model of each family with grouped-query
attention the trainable count equals peft's ``get_nb_trainable_parameters()``."""

import pytest
import torch

from minipeft import get_peft_model
from minipeft.methods import ia3, lora, vera

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.oracle

TABLES = {  # ours, peft's
    "lora": (lora.DEFAULT_TARGETS, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"),
    "vera": (vera.DEFAULT_TARGETS, "TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING"),
    "ia3": (ia3.DEFAULT_TARGETS, "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING"),
    "ia3 feedforward": (ia3.DEFAULT_FEEDFORWARD, "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING"),
}


@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_default_is_peft_s(table):
    """(IA3 on Qwen2 took k_proj where peft takes q_proj: another count on a model with fewer key heads.)"""
    from peft.utils import constants

    ours, name = TABLES[table]
    theirs = getattr(constants, name)
    assert {family: ours[family] for family in ours} == {family: theirs.get(family) for family in ours}


def tiny(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "gemma", "gemma2"])
@pytest.mark.parametrize("method", ["lora", "vera", "ia3"])
def test_the_default_trainable_count_is_peft_s(method, model_type):
    from minipeft.methods import METHODS

    peft_config = {"lora": lambda: peft.LoraConfig(r=8), "vera": lambda: peft.VeraConfig(r=8),
                   "ia3": lambda: peft.IA3Config()}[method]()
    theirs = peft.get_peft_model(tiny(model_type), peft_config).get_nb_trainable_parameters()[0]
    config = METHODS[method].config_class(**({"r": 8} if method != "ia3" else {}))
    ours = get_peft_model(tiny(model_type), config).parameter_stats().trainable
    assert ours == theirs
