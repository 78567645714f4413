"""Hugging Face peft as an oracle: VeRA adapters cross over in both directions with equal logits and counts.

Both directions go through files only (``save_adapter`` -> ``peft.PeftModel.from_pretrained``, and
``save_pretrained`` -> :func:`minipeft.load_adapter`), with the shared pair stored (peft's default) and
redrawn from ``projection_prng_key`` (``save_projection=False``: then both libraries must draw the same bits).
"""

import pytest
import torch
from safetensors.torch import load_file

from minipeft import get_peft_model, load_adapter
from minipeft.loading.models import build_from_known_config
from minipeft.methods.vera import VeraConfig, shared_projections

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.oracle,
              pytest.mark.filterwarnings("ignore:Specified to not (save|load) vera_A:UserWarning")]

CASES = [
    dict(r=8, target_modules=["c_attn", "q_proj", "v_proj"]),
    dict(r=16, target_modules=["c_attn", "c_fc", "mlp.c_proj", "q_proj", "k_proj", "down_proj"],
         projection_prng_key=3, d_initial=0.2),  # targets of different shapes: the pair is sliced per layer
    dict(r=4, target_modules=["c_attn", "k_proj"], save_projection=False, projection_prng_key=11),
    dict(r=4, target_modules=["c_attn", "o_proj"], bias="vera_only"),
    dict(r=4, target_modules=["c_proj", "q_proj"], modules_to_save=["lm_head"]),
]
TOLERANCE = 1e-5


def present_targets(model, targets):
    names = {name for name, _ in model.named_modules()}
    return [t for t in targets if any(name == t or name.endswith("." + t) for name in names)]


def settings_for(model, case):
    settings = dict(CASES[case])
    settings["target_modules"] = present_targets(model, settings["target_modules"])
    return settings


def randomise(model):
    """Give every trainable tensor non-trivial values (a fresh VeRA adapter, λ_b = 0, is a no-op)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)


def max_logit_difference(theirs, ours, batch) -> float:
    return (theirs(**batch).logits - ours(**batch).logits).abs().max().item()


def assert_adapter_matters(peft_model, base_model, batch) -> None:
    """The randomised adapter moves the logits well beyond the tolerance (else equal logits prove nothing)."""
    assert (peft_model(**batch).logits - base_model(**batch).logits).abs().max() > 100 * TOLERANCE


@pytest.mark.parametrize("case", range(len(CASES)))
def test_minipeft_adapter_loads_in_peft(tiny_model_factory, sample_batch, tmp_path, case):
    settings = settings_for(tiny_model_factory(), case)
    ours = get_peft_model(tiny_model_factory(), VeraConfig(**settings))
    randomise(ours)
    ours.save_adapter(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model_factory(), tmp_path)
    delta = max_logit_difference(theirs, ours, sample_batch)
    print(f"minipeft -> peft, case {case}: max |Δlogits| = {delta:.3g}")
    assert delta <= TOLERANCE
    assert_adapter_matters(ours, tiny_model_factory(), sample_batch)
    assert torch.equal(theirs.base_model.vera_A["default"], shared_projections(ours).vera_A)
    _, total = theirs.get_nb_trainable_parameters()  # loaded for inference: nothing trainable in peft
    assert total == ours.parameter_stats().total


@pytest.mark.parametrize("case", range(len(CASES)))
def test_peft_adapter_loads_in_minipeft(tiny_model_factory, sample_batch, tmp_path, case):
    settings = settings_for(tiny_model_factory(), case)
    theirs = peft.get_peft_model(tiny_model_factory(), peft.VeraConfig(**settings))
    randomise(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_model_factory(), tmp_path)
    delta = max_logit_difference(theirs, ours, sample_batch)
    print(f"peft -> minipeft, case {case}: max |Δlogits| = {delta:.3g}")
    assert delta <= TOLERANCE
    assert_adapter_matters(ours, tiny_model_factory(), sample_batch)
    fresh = get_peft_model(tiny_model_factory(), VeraConfig(**settings))
    assert (fresh.parameter_stats().trainable, fresh.parameter_stats().total) == theirs.get_nb_trainable_parameters()


def test_fresh_adapters_draw_the_same_pair_as_peft(tiny_model_factory):
    """Same seed, same targets: the shared A and B are bit-identical before any file is involved."""
    settings = settings_for(tiny_model_factory(), 1)
    theirs = peft.get_peft_model(tiny_model_factory(), peft.VeraConfig(**settings))
    ours = shared_projections(get_peft_model(tiny_model_factory(), VeraConfig(**settings)))
    assert torch.equal(theirs.base_model.vera_A["default"], ours.vera_A)
    assert torch.equal(theirs.base_model.vera_B["default"], ours.vera_B)


@pytest.mark.parametrize("case", [0, 1, 2])
def test_files_hold_the_same_tensor_names_and_shapes_as_peft(tiny_model_factory, tmp_path, case):
    settings = settings_for(tiny_model_factory(), case)
    get_peft_model(tiny_model_factory(), VeraConfig(**settings)).save_adapter(tmp_path / "ours")
    peft.get_peft_model(tiny_model_factory(), peft.VeraConfig(**settings)).save_pretrained(tmp_path / "theirs")
    ours, theirs = (load_file(tmp_path / side / "adapter_model.safetensors") for side in ("ours", "theirs"))
    assert {key: tuple(value.shape) for key, value in ours.items()} == {
        key: tuple(value.shape) for key, value in theirs.items()}
    assert ("base_model.vera_A" in ours) == settings.get("save_projection", True)


@pytest.mark.parametrize("settings", [dict(r=256, target_modules=["c_attn"]),
                                      dict(r=128, target_modules=["c_attn", "c_proj", "c_fc"])])
def test_counts_equal_peft_on_gpt2_small(settings):
    theirs = peft.get_peft_model(build_from_known_config("gpt2"), peft.VeraConfig(**settings))
    ours = get_peft_model(build_from_known_config("gpt2"), VeraConfig(**settings)).parameter_stats()
    assert (ours.trainable, ours.total) == theirs.get_nb_trainable_parameters()


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_adapters_cross_over_both_ways(fresh_smollm2, smollm2, tmp_path):
    """The real SmolLM2-135M (GQA, 30 layers), VeRA r=256 on q/k/v/o: counts equal peft's, and logits match
    both ways through files."""
    import copy

    model, tokenizer = fresh_smollm2
    batch = tokenizer(["Give three tips for staying healthy.", "What is the capital of France?"],
                      return_tensors="pt", padding=True)
    settings = dict(r=256, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    ours = get_peft_model(model, VeraConfig(**settings))
    theirs = peft.get_peft_model(copy.deepcopy(smollm2[0]), peft.VeraConfig(**settings))
    assert (ours.parameter_stats().trainable, ours.parameter_stats().total) == theirs.get_nb_trainable_parameters()
    randomise(ours)
    randomise(theirs)
    with torch.no_grad():
        ours.save_adapter(tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")
        ours_in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(smollm2[0]), tmp_path / "ours")
        theirs_in_ours = load_adapter(copy.deepcopy(smollm2[0]), tmp_path / "theirs")
        forward = max_logit_difference(ours_in_peft, ours, batch)
        backward = max_logit_difference(theirs, theirs_in_ours, batch)
        assert_adapter_matters(ours, smollm2[0], batch)
        assert_adapter_matters(theirs_in_ours, smollm2[0], batch)
    print(f"SmolLM2: minipeft -> peft max |Δlogits| = {forward:.3g}; peft -> minipeft = {backward:.3g}")
    assert forward <= 1e-4 and backward <= 1e-4
