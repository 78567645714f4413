"""LoRA: counts against r·(d_in + d_out), identity at init, exact merge/unmerge, gradients, errors."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from minipeft import LoRAConfig, LoRALinear, UserError, get_peft_model
from minipeft.methods.lora import merge_lora, unmerge_lora
from minipeft.loading.models import build_from_known_config


def lora_count(model, names, r):
    """The formula: r·(d_in + d_out) per adapted layer."""
    total = 0
    for name in names:
        layer = model.get_submodule(name)
        d_in, d_out = (layer.weight.shape if isinstance(layer, Conv1D) else layer.weight.shape[::-1])
        total += r * (d_in + d_out)
    return total


@pytest.fixture(scope="module")
def gpt2_small():
    return build_from_known_config("gpt2")


@pytest.fixture(scope="module")
def smollm2_shapes():
    return build_from_known_config("smollm2-135m")


@pytest.mark.parametrize("r, targets, trainable, total", [
    (8, ["c_attn"], 294_912, 124_734_720),
    (4, ["c_attn", "c_proj", "c_fc"], 589_824, 125_029_632),  # c_proj matches attn.c_proj and mlp.c_proj
])
def test_gpt2_small_counts_equal_peft_figures_and_formula(gpt2_small, r, targets, trainable, total):
    model = copy.deepcopy(gpt2_small)
    names = [n for n, _ in model.named_modules() if any(n.endswith("." + t) for t in targets)]
    stats = get_peft_model(model, LoRAConfig(r=r, lora_alpha=16, target_modules=targets)).parameter_stats()
    assert stats.trainable == trainable == lora_count(gpt2_small, names, r)
    assert stats.total == total == 124_439_808 + trainable


def test_llama_family_counts_follow_gqa_shapes(smollm2_shapes):
    model = copy.deepcopy(smollm2_shapes)
    base_total = sum(p.numel() for p in smollm2_shapes.parameters())
    stats = get_peft_model(model, LoRAConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
                           ).parameter_stats()
    # per layer: q 8·(576+576), k and v 8·(576+192) (3 kv heads × 64), o 8·(576+576); 30 layers
    assert stats.trainable == 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192)) == 921_600
    assert stats.total == base_total + stats.trainable == 134_515_008 + 921_600


@pytest.mark.parametrize("layer", [nn.Linear(16, 24), Conv1D(24, 16)], ids=["linear", "conv1d"])
def test_fresh_adapter_leaves_layer_output_bit_identical(layer):
    x = torch.randn(3, 5, 16)
    expected = layer(x)
    lora = LoRALinear(layer, r=4, alpha=8, dropout=0.1).train()
    assert torch.equal(lora(x), expected)
    assert lora.lora_A.weight.shape == (4, 16) and lora.lora_B.weight.shape == (24, 4)
    bound = 1 / 16 ** 0.5  # kaiming-uniform(a=√5) on (r, in): bound 1/√in
    assert lora.lora_A.weight.abs().max() <= bound and lora.lora_A.weight.abs().max() > bound / 2


def test_fresh_adapter_leaves_model_logits_identical(tiny_model_factory, sample_batch):
    base = tiny_model_factory()
    expected = base(**sample_batch).logits
    peft_model = get_peft_model(tiny_model_factory(), LoRAConfig(r=4))  # the family's default targets
    assert torch.equal(peft_model(**sample_batch).logits, expected)


@pytest.mark.parametrize("layer_kind", ["linear", "conv1d"])
def test_delta_weight_matches_forward(layer_kind):
    torch.manual_seed(0)
    layer = nn.Linear(16, 24) if layer_kind == "linear" else Conv1D(24, 16)
    lora = LoRALinear(layer, r=4, alpha=8, init_lora_weights=False)
    x = torch.randn(7, 16)
    # Linear: x Wᵀ; Conv1D: x W (weight stored (in, out))
    delta = lora.delta_weight()
    by_hand = x @ (delta.T if layer_kind == "linear" else delta)
    assert torch.allclose(lora(x) - layer(x), by_hand, atol=1e-6)
    assert torch.allclose(lora.delta_weight().abs().sum(), (lora.scaling * lora.lora_B.weight @ lora.lora_A.weight).abs().sum())


def test_merge_matches_unmerged_and_unmerge_restores_weights_exactly(tiny_model_factory, sample_batch):
    peft_model = get_peft_model(tiny_model_factory(), LoRAConfig(r=4, lora_alpha=8, init_lora_weights=False))
    before = {n: p.clone() for n, p in peft_model.base_model.named_parameters()}
    unmerged = peft_model(**sample_batch).logits
    peft_model.merge_adapter()
    assert all(m.merged for m in peft_model.modules() if isinstance(m, LoRALinear))
    merged = peft_model(**sample_batch).logits
    assert (merged - unmerged).abs().max() <= 1e-5
    peft_model.unmerge_adapter()
    for name, parameter in peft_model.base_model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    assert torch.equal(peft_model(**sample_batch).logits, unmerged)


def test_merge_and_unload_returns_plain_model_on_a_copy(gpt2_tiny, sample_batch):
    peft_model = get_peft_model(gpt2_tiny, LoRAConfig(r=4, init_lora_weights=False))
    expected = peft_model(**sample_batch).logits
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert (merged(**sample_batch).logits - expected).abs().max() <= 1e-5
    assert not any(m.merged for m in peft_model.modules() if isinstance(m, LoRALinear))  # original untouched


def test_only_lora_parameters_receive_gradients(tiny_model_factory, sample_batch):
    peft_model = get_peft_model(tiny_model_factory(), LoRAConfig(r=4))
    peft_model.train()
    out = peft_model(**sample_batch, labels=sample_batch["input_ids"])
    out.loss.backward()
    for name, parameter in peft_model.named_parameters():
        if "lora_" in name:
            assert parameter.requires_grad
            # B starts at zero, so A gets no gradient at step 0; B does.
            if "lora_B" in name:
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name


def test_rslora_scaling_and_dropout_identity():
    layer = nn.Linear(8, 8)
    assert LoRALinear(layer, r=16, alpha=8, use_rslora=True).scaling == pytest.approx(8 / 4)
    assert LoRALinear(layer, r=16, alpha=8).scaling == pytest.approx(0.5)
    assert isinstance(LoRALinear(layer, r=2, alpha=2, dropout=0.0).lora_dropout, nn.Identity)


def test_bias_modes(gpt2_tiny):
    all_bias = get_peft_model(copy.deepcopy(gpt2_tiny), LoRAConfig(r=2, bias="all"))
    trainable = [n for n, p in all_bias.named_parameters() if p.requires_grad]
    n_biases = sum(1 for n, _ in gpt2_tiny.named_parameters() if n.endswith("bias"))
    assert sum(n.endswith("bias") for n in trainable) == n_biases
    lora_only = get_peft_model(copy.deepcopy(gpt2_tiny), LoRAConfig(r=2, bias="lora_only"))
    biases = [n for n, p in lora_only.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert biases == [f"base_model.transformer.h.{i}.attn.c_attn.base_layer.bias" for i in range(2)]


def test_target_matching_by_suffix_regex_and_layers(gpt2_tiny):
    by_regex = get_peft_model(copy.deepcopy(gpt2_tiny), LoRAConfig(r=2, target_modules=r".*\.1\.mlp\.c_fc"))
    assert [n for n, m in by_regex.named_modules() if isinstance(m, LoRALinear)] == [
        "base_model.transformer.h.1.mlp.c_fc"]
    by_layer = get_peft_model(copy.deepcopy(gpt2_tiny), LoRAConfig(r=2, target_modules=["c_proj"],
                                                                    layers_to_transform=[0]))
    assert [n for n, m in by_layer.named_modules() if isinstance(m, LoRALinear)] == [
        "base_model.transformer.h.0.attn.c_proj", "base_model.transformer.h.0.mlp.c_proj"]


def test_modules_to_save_trains_a_copy_of_the_tied_head(gpt2_tiny, sample_batch):
    peft_model = get_peft_model(gpt2_tiny, LoRAConfig(r=2, modules_to_save=["lm_head"]))
    vocab, width = gpt2_tiny.config.vocab_size, gpt2_tiny.config.n_embd
    stats = peft_model.parameter_stats()
    assert stats.trainable == 2 * 2 * (64 + 192) + vocab * width  # LoRA + the full head copy
    head = peft_model.base_model.lm_head
    assert head.modules_to_save.weight is not head.original_module.weight
    assert head.original_module.weight is peft_model.base_model.transformer.wte.weight  # still tied
    with peft_model.disable_adapters():
        base_logits = peft_model(**sample_batch).logits
    assert torch.equal(peft_model(**sample_batch).logits, base_logits)  # the copy starts equal to the head
    with torch.no_grad():
        head.modules_to_save.weight.add_(0.1)
    assert not torch.allclose(peft_model(**sample_batch).logits, base_logits)
    assert torch.equal(peft_model.base_model.transformer.wte.weight, gpt2_tiny.transformer.wte.weight)


@pytest.mark.parametrize("config, message", [
    (LoRAConfig(r=0), "positive integer"),
    (LoRAConfig(r=4, target_modules=["nope"]), "matched no module"),
    (LoRAConfig(r=4, target_modules=["ln_1"]), "LoRA adapts nn.Linear"),
    (LoRAConfig(r=4, bias="some"), "none, all or lora_only"),
])
def test_errors_name_the_problem(gpt2_tiny, config, message):
    with pytest.raises(UserError, match=message):
        get_peft_model(gpt2_tiny, config)


def test_disable_adapters_runs_the_base_model(tiny_model_factory, sample_batch):
    base_logits = tiny_model_factory()(**sample_batch).logits
    peft_model = get_peft_model(tiny_model_factory(), LoRAConfig(r=4, init_lora_weights=False))
    assert not torch.allclose(peft_model(**sample_batch).logits, base_logits)
    with peft_model.disable_adapters():
        assert torch.equal(peft_model(**sample_batch).logits, base_logits)
    assert not torch.allclose(peft_model(**sample_batch).logits, base_logits)


def test_merge_helpers_on_plain_module(gpt2_tiny, sample_batch):
    peft_model = get_peft_model(gpt2_tiny, LoRAConfig(r=2, init_lora_weights=False))
    expected = peft_model(**sample_batch).logits
    merge_lora(peft_model)
    assert (peft_model(**sample_batch).logits - expected).abs().max() < 1e-5
    unmerge_lora(peft_model)
    assert torch.equal(peft_model(**sample_batch).logits, expected)


def test_disable_refuses_when_base_weights_train_in_place(gpt2_tiny):
    """bias="all" trains the model's own biases: there is no untouched base to switch back to."""
    peft_model = get_peft_model(gpt2_tiny, LoRAConfig(r=2, bias="all"))
    assert "base_model.transformer.h.0.ln_1.bias" in peft_model.in_place_parameter_names
    with pytest.raises(UserError, match="trains base weights in place"):
        with peft_model.disable_adapters():
            pass


def test_adapter_follows_the_base_layer_device_and_keeps_float32():
    layer = nn.Linear(8, 8, dtype=torch.bfloat16, device="meta")
    lora = LoRALinear(layer, r=2, alpha=4)
    assert lora.lora_A.weight.device.type == "meta" and lora.lora_A.weight.dtype == torch.float32
