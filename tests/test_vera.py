"""VeRA: counts against Σ (r + out), identity at init, one shared random pair, exact merge/unmerge, gradients,
files (the shared pair stored once, or redrawn from the seed), errors."""

import copy
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from test_faults import TINY_RUN, in_process, one_error

from minipeft import UserError, get_peft_model, load_adapter
from minipeft.cli.train import main as train_main
from minipeft.loading.models import build_from_known_config
from minipeft.methods.vera import VeraConfig, VeRALinear, VeRAProjections, kaiming_uniform, shared_projections


def vera_count(model, names, r):
    """The formula: r + d_out per adapted layer (λ_d and λ_b); the shared A and B are frozen buffers."""
    total = 0
    for name in names:
        layer = model.get_submodule(name)
        d_out = layer.weight.shape[1] if isinstance(layer, Conv1D) else layer.weight.shape[0]
        total += r + d_out
    return total


# For tests/serving_fixtures.py's adapters on the tiny models: a visible update once perturbed (λ_b starts at 0,
# and B and A are small).
SERVING_SETTINGS = dict(r=16, d_initial=1.0)


def contract_trainable_count(shapes, config) -> int:
    """The formula for tests/test_method_contract.py: per block, r + d_out for each target (λ_d and λ_b).

    ``shapes.linears`` maps one block's projection names to ``(in, out)``; ``config`` is the one the contract
    test passed (None targets: the family's default, as :data:`minipeft.methods.vera.DEFAULT_TARGETS`).
    """
    family = "gpt2" if "attn.c_attn" in shapes.linears else "llama"
    targets = config.target_modules or {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}[family]
    outs = [d_out for name, (_, d_out) in shapes.linears.items()
            if any(name == target or name.endswith("." + target) for target in targets)]
    assert outs, f"no projection of {sorted(shapes.linears)} matches {targets}"
    return shapes.layers * sum(config.r + d_out for d_out in outs)


def vera_layers(peft_model):
    return {name: module for name, module in peft_model.named_modules() if isinstance(module, VeRALinear)}


def randomise(peft_model, seed: int = 1):
    """Non-trivial λ's (a fresh VeRA adapter is the identity, so it would prove nothing)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in peft_model.adapter_parameters().values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)


@pytest.fixture(scope="module")
def gpt2_small():
    return build_from_known_config("gpt2")


@pytest.fixture(scope="module")
def smollm2_shapes():
    return build_from_known_config("smollm2-135m")


@pytest.mark.parametrize("r, targets, trainable", [
    (256, ["c_attn"], 30_720),                     # (256 + 2304) × 12
    (128, ["c_attn", "c_proj", "c_fc"], 89_088),    # c_proj matches attn.c_proj and mlp.c_proj
])
def test_gpt2_small_counts_follow_the_formula(gpt2_small, r, targets, trainable):
    model = copy.deepcopy(gpt2_small)
    names = [n for n, _ in model.named_modules() if any(n.endswith("." + t) for t in targets)]
    stats = get_peft_model(model, VeraConfig(r=r, target_modules=targets)).parameter_stats()
    assert stats.trainable == trainable == vera_count(gpt2_small, names, r)
    assert stats.total == 124_439_808 + trainable


def test_llama_family_counts_follow_gqa_shapes(smollm2_shapes):
    model = copy.deepcopy(smollm2_shapes)
    peft_model = get_peft_model(model, VeraConfig(r=256, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    # per layer: 4 λ_d of 256, λ_b of q 576, k and v 192 (3 kv heads × 64), o 576; 30 layers
    assert peft_model.parameter_stats().trainable == 30 * (4 * 256 + 576 + 192 + 192 + 576) == 76_800
    projections = shared_projections(peft_model)
    assert projections.vera_A.shape == (256, 576) and projections.vera_B.shape == (576, 256)


@pytest.mark.parametrize("layer", [nn.Linear(16, 24), Conv1D(24, 16)], ids=["linear", "conv1d"])
def test_fresh_adapter_leaves_layer_output_bit_identical(layer):
    x = torch.randn(3, 5, 16)
    expected = layer(x)
    vera = VeRALinear(layer, VeRAProjections(r=8, max_in=16, max_out=24, seed=0), dropout=0.1).train()
    assert torch.equal(vera(x), expected)
    assert torch.equal(vera.vera_lambda_b, torch.zeros(24))                      # λ_b = 0: the identity
    assert torch.equal(vera.vera_lambda_d, torch.full((8,), 0.1))                # λ_d = d_initial


def test_fresh_adapter_leaves_model_logits_identical(tiny_model_factory, sample_batch):
    expected = tiny_model_factory()(**sample_batch).logits
    peft_model = get_peft_model(tiny_model_factory(), VeraConfig(r=16))  # the family's default targets
    assert torch.equal(peft_model(**sample_batch).logits, expected)


def test_one_random_pair_is_shared_and_sized_to_the_largest_target(gpt2_tiny):
    peft_model = get_peft_model(copy.deepcopy(gpt2_tiny), VeraConfig(r=8, target_modules=["c_attn", "c_fc",
                                                                              "mlp.c_proj"]))
    layers = vera_layers(peft_model)
    assert len(layers) == 6 and len({id(layer.projections) for layer in layers.values()}) == 1
    projections = shared_projections(peft_model)
    # in: c_attn 64, c_fc 64, mlp.c_proj 256 -> 256; out: c_attn 192, c_fc 256, mlp.c_proj 64 -> 256
    assert projections.vera_A.shape == (8, 256) and projections.vera_B.shape == (256, 8)
    generator = torch.Generator().manual_seed(0)  # projection_prng_key=0: A is drawn first, then B
    assert torch.equal(projections.vera_A, kaiming_uniform((8, 256), generator))
    assert torch.equal(projections.vera_B, kaiming_uniform((256, 8), generator))
    bound_A, bound_B = math.sqrt(6 / 256), math.sqrt(6 / 8)  # kaiming-uniform: √(6 / fan_in)
    assert bound_A / 2 < projections.vera_A.abs().max() <= bound_A
    assert bound_B / 2 < projections.vera_B.abs().max() <= bound_B
    c_attn = layers["base_model.transformer.h.0.attn.c_attn"]
    A, B = c_attn.sliced_projections()
    assert A.shape == (8, 64) and B.shape == (192, 8) and torch.equal(A, projections.vera_A[:, :64])
    assert not any("vera_A" in name or "vera_B" in name for name, _ in peft_model.named_parameters())
    other_key = get_peft_model(copy.deepcopy(gpt2_tiny), VeraConfig(r=8, projection_prng_key=7))
    assert not torch.equal(shared_projections(other_key).vera_A[:, :64], projections.vera_A[:, :64])


@pytest.mark.parametrize("layer_kind", ["linear", "conv1d"])
def test_delta_weight_matches_forward(layer_kind):
    torch.manual_seed(0)
    layer = nn.Linear(16, 24) if layer_kind == "linear" else Conv1D(24, 16)
    vera = VeRALinear(layer, VeRAProjections(r=4, max_in=20, max_out=30, seed=3), init_weights=False)
    x = torch.randn(7, 16)
    delta = vera.delta_weight()  # Linear: (out, in); Conv1D: (in, out), as the base weight
    by_hand = x @ (delta.T if layer_kind == "linear" else delta)
    assert torch.allclose(vera(x) - layer(x), by_hand, atol=1e-5)
    A, B = vera.projections.vera_A[:, :16], vera.projections.vera_B[:24, :]
    formula = torch.diag(vera.vera_lambda_b) @ B @ torch.diag(vera.vera_lambda_d) @ A  # Λ_b B Λ_d A
    assert torch.allclose(delta.T if layer_kind == "conv1d" else delta, formula, atol=1e-6)


def test_merge_matches_unmerged_and_unmerge_restores_weights_exactly(tiny_model_factory, sample_batch):
    peft_model = get_peft_model(tiny_model_factory(), VeraConfig(r=8, init_weights=False))
    before = {n: p.clone() for n, p in peft_model.base_model.named_parameters()}
    unmerged = peft_model(**sample_batch).logits
    peft_model.merge_adapter()
    assert all(layer.merged for layer in vera_layers(peft_model).values())
    merged = peft_model(**sample_batch).logits
    assert (merged - unmerged).abs().max() <= 1e-5
    peft_model.unmerge_adapter()
    for name, parameter in peft_model.base_model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    assert torch.equal(peft_model(**sample_batch).logits, unmerged)


def test_merge_and_unload_returns_plain_model_on_a_copy(tiny_model_factory, sample_batch):
    peft_model = get_peft_model(tiny_model_factory(), VeraConfig(r=8, init_weights=False))
    expected = peft_model(**sample_batch).logits
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, (VeRALinear, VeRAProjections)) for m in merged.modules())
    assert (merged(**sample_batch).logits - expected).abs().max() <= 1e-5
    assert not any(layer.merged for layer in vera_layers(peft_model).values())  # original untouched


def test_only_the_vectors_receive_gradients(tiny_model_factory, sample_batch):
    peft_model = get_peft_model(tiny_model_factory(), VeraConfig(r=8))
    peft_model.train()
    peft_model(**sample_batch, labels=sample_batch["input_ids"]).loss.backward()
    for name, parameter in peft_model.named_parameters():
        if "vera_lambda_" in name:
            assert parameter.requires_grad
            if "vera_lambda_b" in name:  # λ_b = 0 at step 0: λ_d gets no gradient yet, λ_b does
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
            else:
                assert parameter.grad is not None and parameter.grad.abs().sum() == 0, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    assert not shared_projections(peft_model).vera_A.requires_grad


def test_disable_adapters_runs_the_base_model(tiny_model_factory, sample_batch):
    base_logits = tiny_model_factory()(**sample_batch).logits
    peft_model = get_peft_model(tiny_model_factory(), VeraConfig(r=8, init_weights=False))
    assert not torch.allclose(peft_model(**sample_batch).logits, base_logits)
    with peft_model.disable_adapters():
        assert torch.equal(peft_model(**sample_batch).logits, base_logits)


def test_bias_modes(gpt2_tiny):
    vera_only = get_peft_model(copy.deepcopy(gpt2_tiny), VeraConfig(r=4, bias="vera_only"))
    biases = [n for n, p in vera_only.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert biases == [f"base_model.transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)]
    all_bias = get_peft_model(copy.deepcopy(gpt2_tiny), VeraConfig(r=4, bias="all"))
    n_biases = sum(1 for n, _ in gpt2_tiny.named_parameters() if n.endswith("bias"))
    assert sum(n.endswith("bias") for n, p in all_bias.named_parameters() if p.requires_grad) == n_biases


def test_vectors_stay_float32_on_a_bf16_base(llama_tiny, sample_batch):
    peft_model = get_peft_model(llama_tiny.to(torch.bfloat16), VeraConfig(r=8, init_weights=False))
    layer = next(iter(vera_layers(peft_model).values()))
    assert layer.vera_lambda_b.dtype == layer.vera_lambda_d.dtype == torch.float32
    assert shared_projections(peft_model).vera_A.dtype == torch.float32
    assert peft_model(**sample_batch).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_and_load_round_trip(tiny_model_factory, sample_batch, tmp_path, save_projection):
    peft_model = get_peft_model(tiny_model_factory(), VeraConfig(r=8, save_projection=save_projection,
                                                                 projection_prng_key=5))
    randomise(peft_model)
    expected = peft_model(**sample_batch).logits
    peft_model.save_adapter(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) == save_projection
    assert len([key for key in keys if key.endswith(".vera_lambda_b")]) == len(vera_layers(peft_model))
    loaded = load_adapter(tiny_model_factory(), tmp_path)
    assert torch.equal(loaded(**sample_batch).logits, expected)
    assert torch.equal(shared_projections(loaded).vera_A, shared_projections(peft_model).vera_A)
    trainable = load_adapter(tiny_model_factory(), tmp_path, is_trainable=True)
    assert sorted(trainable.adapter_parameters()) == sorted(peft_model.adapter_parameters())
    assert all(p.requires_grad for p in trainable.adapter_parameters().values())


def test_saved_projections_are_used_when_loading(gpt2_tiny, sample_batch, tmp_path):
    """The file's A and B win over the seed: an adapter loads as trained even if the generator changed."""
    peft_model = get_peft_model(copy.deepcopy(gpt2_tiny), VeraConfig(r=8, init_weights=False))
    with torch.no_grad():
        shared_projections(peft_model).vera_A.mul_(2.0)  # as if another torch had drawn other numbers
    expected = peft_model(**sample_batch).logits
    peft_model.save_adapter(tmp_path)
    assert torch.equal(load_adapter(copy.deepcopy(gpt2_tiny), tmp_path)(**sample_batch).logits, expected)


def test_file_errors_name_the_tensor(gpt2_tiny, tmp_path):
    peft_model = get_peft_model(copy.deepcopy(gpt2_tiny), VeraConfig(r=8))
    peft_model.save_adapter(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({key: value for key, value in state.items() if key != "base_model.vera_B"}, weights)
    with pytest.raises(UserError, match="base_model.vera_B is missing"):
        load_adapter(copy.deepcopy(gpt2_tiny), tmp_path)
    save_file({**state, "base_model.vera_A": torch.zeros(8, 32)}, weights)
    with pytest.raises(UserError, match=r"base_model.vera_A has shape \[8, 32\], this model expects \[8, 64\]"):
        load_adapter(copy.deepcopy(gpt2_tiny), tmp_path)
    save_file({**state, "base_model.vera_C": torch.zeros(3)}, weights)
    with pytest.raises(UserError, match="base_model.vera_C has no place"):
        load_adapter(copy.deepcopy(gpt2_tiny), tmp_path)


@pytest.mark.parametrize("config, message", [
    (VeraConfig(r=0), "positive integer"),
    (VeraConfig(r=4, projection_prng_key=-1), "projection_prng_key"),
    (VeraConfig(r=4, target_modules=["nope"]), "matched no module"),
    (VeraConfig(r=4, target_modules=["ln_1"]), "VeRA adapts nn.Linear"),
    (VeraConfig(r=4, bias="lora_only"), "bias must be none, all or vera_only"),
    (VeraConfig(r=4, vera_dropout=1.0), r"\[0, 1\)"),
])
def test_errors_name_the_problem(gpt2_tiny, config, message):
    with pytest.raises(UserError, match=message):
        get_peft_model(gpt2_tiny, config)


def test_a_rank_beyond_the_machine_is_refused_before_allocating(tmp_path, capsys):
    """The shared pair of a huge ``--vera_rank`` would ask for more memory than the machine has: one line,
    before anything is allocated or written (the check of tests/test_faults_round2.py, for VeRA's own flag)."""
    out = tmp_path / "out"
    code, _, err = in_process(train_main, *TINY_RUN, "--output_dir", out, "--modification_type", "vera",
                              "--vera_rank", "1000000000", capsys=capsys)
    one_error(code, err, "--vera_rank 1000000000:", "GB, more than")
    assert not out.exists()
