"""Hugging Face peft as an oracle for IA3 and DoRA: adapters cross over in both directions with equal logits
(max |Δ| ≤ 1e-5) and equal parameter counts, on tiny GPT-2 (Conv1D) and tiny Llama (GQA), and GPT-2 small."""

import pytest
import torch
from safetensors.torch import load_file

from minipeft import LoRAConfig, get_peft_model, load_adapter
from minipeft.methods.ia3 import IA3Config
from minipeft.loading.models import build_from_known_config

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.oracle, pytest.mark.filterwarnings("ignore:fan_in_fan_out is set")]

# (method, settings per family); None for target_modules means the family's default.
CASES = {
    "ia3-defaults": ("ia3", {"gpt2": {}, "llama": {}}),
    "ia3-custom": ("ia3", {
        "gpt2": dict(target_modules=["c_attn", "c_fc", "mlp.c_proj"], feedforward_modules=["c_fc", "mlp.c_proj"]),
        "llama": dict(target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                      feedforward_modules=["o_proj", "down_proj"]),
    }),
    "dora": ("dora", {
        "gpt2": dict(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"]),
        "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"]),
    }),
    "dora-rslora": ("dora", {
        "gpt2": dict(r=8, lora_alpha=16, target_modules=["c_proj", "c_fc"], use_rslora=True),
        "llama": dict(r=8, lora_alpha=16, target_modules=["o_proj", "gate_proj", "up_proj"], use_rslora=True),
    }),
}


def family(model):
    return "gpt2" if hasattr(model, "transformer") else "llama"


def our_config(method, settings):
    return IA3Config(**settings) if method == "ia3" else LoRAConfig(**settings, use_dora=True)


def peft_config(method, settings):
    if method == "ia3":
        return peft.IA3Config(task_type="CAUSAL_LM", **settings)
    return peft.LoraConfig(task_type="CAUSAL_LM", **settings, use_dora=True)


def randomise(model):
    """Give every trainable tensor non-trivial values (a fresh adapter is the identity and proves nothing)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)


def max_logit_gap(first, second, batch):
    with torch.no_grad():
        return (first(**batch).logits - second(**batch).logits).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_minipeft_adapter_loads_in_peft(tiny_model_factory, sample_batch, tmp_path, case):
    method, per_family = CASES[case]
    base = tiny_model_factory()
    ours = get_peft_model(base, our_config(method, per_family[family(base)]))
    randomise(ours)
    ours.save_adapter(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model_factory(), tmp_path)
    assert max_logit_gap(ours, theirs, sample_batch) <= 1e-5
    assert max_logit_gap(ours, tiny_model_factory(), sample_batch) > 1e-3  # the adapter really does something
    assert theirs.get_nb_trainable_parameters()[1] == ours.parameter_stats().total


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_minipeft(tiny_model_factory, sample_batch, tmp_path, case):
    method, per_family = CASES[case]
    settings = per_family[family(tiny_model_factory())]
    theirs = peft.get_peft_model(tiny_model_factory(), peft_config(method, settings))
    fresh_counts = theirs.get_nb_trainable_parameters()
    randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_model_factory(), tmp_path)
    assert max_logit_gap(ours, theirs, sample_batch) <= 1e-5
    fresh_ours = get_peft_model(tiny_model_factory(), our_config(method, settings)).parameter_stats()
    assert (fresh_ours.trainable, fresh_ours.total) == fresh_counts


@pytest.mark.parametrize("case", list(CASES))
def test_files_hold_the_same_tensor_names_and_shapes(tiny_model_factory, tmp_path, case):
    method, per_family = CASES[case]
    settings = per_family[family(tiny_model_factory())]
    get_peft_model(tiny_model_factory(), our_config(method, settings)).save_adapter(tmp_path / "ours")
    peft.get_peft_model(tiny_model_factory(), peft_config(method, settings)).save_pretrained(tmp_path / "theirs")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("method, settings, trainable", [
    ("ia3", {}, 64_512),
    ("dora", dict(r=8, lora_alpha=16, target_modules=["c_attn"]), 322_560),
])
def test_counts_equal_peft_on_gpt2_small(method, settings, trainable):
    with torch.device("meta"):  # GPT-2 small's exact shapes, no memory and no init time: counting needs no values
        theirs = peft.get_peft_model(build_from_known_config("gpt2"), peft_config(method, settings))
        ours = get_peft_model(build_from_known_config("gpt2"), our_config(method, settings)).parameter_stats()
    assert (ours.trainable, ours.total) == theirs.get_nb_trainable_parameters() == (trainable,
                                                                                     124_439_808 + trainable)
