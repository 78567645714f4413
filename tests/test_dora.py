"""DoRA: magnitude init = row norms of W, identity at init, the paper's formula with a detached norm,
counts = LoRA + out_features, exact merge/unmerge, save/load, training on GPT-2 and Llama."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from minipeft import LoRAConfig, get_peft_model, load_adapter
from minipeft.methods.dora import DoRALinear
from minipeft.loading.models import build_from_known_config
from tests.conftest import randomise_adapter, train_steps

TARGETS = {"GPT2LMHeadModel": ["c_attn", "mlp.c_proj"], "LlamaForCausalLM": ["q_proj", "v_proj", "down_proj"]}


def dora_config(model, **overrides):
    return LoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS[type(model).__name__], use_dora=True, **overrides)


def make_layer(kind, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(16, 24) if kind == "linear" else Conv1D(24, 16)  # both map 16 -> 24


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_magnitude_starts_at_row_norms_of_w(kind):
    layer = make_layer(kind)
    dora = DoRALinear(layer, r=4, alpha=8)
    weight_out_in = layer.weight if kind == "linear" else layer.weight.T  # Conv1D stores (in, out)
    assert dora.lora_magnitude_vector.shape == (24,)
    torch.testing.assert_close(dora.lora_magnitude_vector, weight_out_in.norm(dim=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_is_the_papers_formula(kind):
    layer = make_layer(kind)
    dora = DoRALinear(layer, r=4, alpha=8, init_lora_weights=False)  # B random: a real direction change
    with torch.no_grad():
        dora.lora_magnitude_vector.mul_(1.5)
    x = torch.randn(3, 5, 16)
    weight = layer.weight if kind == "linear" else layer.weight.T  # (out, in)
    direction = weight + dora.scaling * dora.lora_B.weight @ dora.lora_A.weight  # W + s·B A
    adapted = dora.lora_magnitude_vector[:, None] * direction / direction.norm(dim=1, keepdim=True)
    expected = x @ adapted.T + layer.bias  # m · (W + s·BA) / ‖W + s·BA‖_c x + b
    torch.testing.assert_close(dora(x), expected, rtol=0, atol=1e-5)


def test_norm_is_a_constant_in_backward():
    """Gradients equal those of the formula with ‖W + s·BA‖_c detached (paper §4.3), not the full one."""
    layer = make_layer("linear")
    dora = DoRALinear(layer, r=4, alpha=8, init_lora_weights=False)
    x = torch.randn(7, 16)
    dora(x).pow(2).sum().backward()

    def manual_grad(detach_norm):
        lora_a = dora.lora_A.weight.detach().clone().requires_grad_(True)
        direction = layer.weight + dora.scaling * dora.lora_B.weight.detach() @ lora_a
        norm = direction.norm(dim=1, keepdim=True)
        norm = norm.detach() if detach_norm else norm
        y = x @ (dora.lora_magnitude_vector.detach()[:, None] * direction / norm).T + layer.bias
        y.pow(2).sum().backward()
        return lora_a.grad

    torch.testing.assert_close(dora.lora_A.weight.grad, manual_grad(detach_norm=True), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(dora.lora_A.weight.grad, manual_grad(detach_norm=False), rtol=1e-3, atol=1e-4)


def test_dropout_is_inactive_in_eval():
    layer = make_layer("conv1d")
    with_dropout = DoRALinear(layer, r=4, alpha=8, dropout=0.5, init_lora_weights=False)
    without = DoRALinear(layer, r=4, alpha=8)
    without.load_state_dict(with_dropout.state_dict())
    x = torch.randn(4, 16)
    assert torch.equal(with_dropout.eval()(x), without(x))
    assert not torch.allclose(with_dropout.train()(x), without(x))


def test_gpt2_small_count_is_lora_plus_out_features():
    with torch.device("meta"):  # GPT-2 small's exact shapes, no memory and no init time: counting needs no values
        model = build_from_known_config("gpt2")
        stats = get_peft_model(model, LoRAConfig(r=8, lora_alpha=16, target_modules=["c_attn"],
                                                 use_dora=True)).parameter_stats()
    lora = 12 * 8 * (768 + 2304)  # r·(in + out) per block
    assert stats.trainable == lora + 12 * 2304 == 322_560
    assert stats.total == 124_439_808 + 322_560


def test_tiny_counts_follow_the_formula(tiny_model_factory):
    model = tiny_model_factory()
    config = dora_config(model)
    names = [n for n, _ in model.named_modules() if any(n.endswith("." + t) for t in config.target_modules)]
    expected = 0
    for name in names:
        layer = model.get_submodule(name)
        d_in, d_out = layer.weight.shape if isinstance(layer, Conv1D) else layer.weight.shape[::-1]
        expected += 4 * (d_in + d_out) + d_out
    assert get_peft_model(model, config).parameter_stats().trainable == expected


def test_fresh_adapter_leaves_logits_identical(tiny_model_factory, sample_batch):
    expected = tiny_model_factory()(**sample_batch).logits
    model = tiny_model_factory()
    peft_model = get_peft_model(model, dora_config(model))
    assert torch.equal(peft_model(**sample_batch).logits, expected)


def test_training_lowers_the_loss_and_leaves_the_base_frozen(tiny_model_factory, sample_batch):
    model = tiny_model_factory()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, dora_config(model))
    losses = train_steps(peft_model, sample_batch)
    assert losses[-1] < losses[0]
    magnitudes = [m for n, m in peft_model.named_parameters() if n.endswith("lora_magnitude_vector")]
    assert magnitudes and all(m.requires_grad for m in magnitudes)
    base_now = {k.replace("base_layer.", ""): v for k, v in model.state_dict().items()}
    assert all(torch.equal(base_now[k], v) for k, v in base_state.items())


def test_disable_adapters_gives_base_logits(tiny_model_factory, sample_batch):
    expected = tiny_model_factory()(**sample_batch).logits
    model = tiny_model_factory()
    peft_model = get_peft_model(model, dora_config(model))
    randomise_adapter(peft_model)
    assert not torch.allclose(peft_model(**sample_batch).logits, expected)
    with peft_model.disable_adapters():
        assert torch.equal(peft_model(**sample_batch).logits, expected)


def test_merge_matches_and_unmerge_restores_exactly(tiny_model_factory, sample_batch):
    model = tiny_model_factory()
    peft_model = get_peft_model(model, dora_config(model))
    randomise_adapter(peft_model)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    unmerged = peft_model(**sample_batch).logits
    peft_model.merge_adapter()
    assert (peft_model(**sample_batch).logits - unmerged).abs().max() <= 1e-5
    peft_model.unmerge_adapter()
    assert all(torch.equal(v, before[k]) for k, v in peft_model.state_dict().items())
    merged_model = peft_model.merge_and_unload()
    assert not any(isinstance(m, DoRALinear) for m in merged_model.modules())
    assert (merged_model(**sample_batch).logits - unmerged).abs().max() <= 1e-5


def test_save_load_and_continue_training(tiny_model_factory, sample_batch, tmp_path):
    model = tiny_model_factory()
    peft_model = get_peft_model(model, dora_config(model))
    train_steps(peft_model, sample_batch, steps=3)
    peft_model.save_adapter(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    magnitude_keys = [k for k in saved if k.endswith(".lora_magnitude_vector")]
    assert magnitude_keys and all(k.startswith("base_model.model.") for k in saved)
    assert all(saved[k].dim() == 1 for k in magnitude_keys)  # (out_features,), peft's on-disk name and shape

    loaded = load_adapter(tiny_model_factory(), tmp_path)
    assert torch.equal(loaded(**sample_batch).logits, peft_model(**sample_batch).logits)
    assert not any(p.requires_grad for p in loaded.parameters())

    trainable = load_adapter(tiny_model_factory(), tmp_path, is_trainable=True)
    assert trainable.parameter_stats() == peft_model.parameter_stats()
    losses = train_steps(trainable, sample_batch, steps=3)
    assert losses[-1] < losses[0]
