"""IA3: peft's shapes and defaults, the two scaling rules, identity at init, counts, exact merge/unmerge,
save/load and training on GPT-2 (Conv1D) and Llama (nn.Linear, GQA)."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from minipeft import UserError, get_peft_model, load_adapter
from minipeft.methods.ia3 import IA3Config, IA3Linear
from minipeft.loading.models import build_from_known_config
from tests.conftest import randomise_adapter, train_steps


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_output_side_scales_outputs_and_feedforward_side_scales_inputs(kind):
    torch.manual_seed(0)
    layer = nn.Linear(16, 24) if kind == "linear" else Conv1D(24, 16)  # 16 -> 24
    x = torch.randn(3, 16)
    output_side = IA3Linear(layer, is_feedforward=False, init_ia3_weights=False)
    feedforward = IA3Linear(layer, is_feedforward=True, init_ia3_weights=False)
    assert output_side.ia3_l.shape == (24, 1) and feedforward.ia3_l.shape == (1, 16)  # peft's shapes
    torch.testing.assert_close(output_side(x), layer(x) * output_side.ia3_l.flatten())  # (W x + b) ⊙ l
    torch.testing.assert_close(feedforward(x), layer(x * feedforward.ia3_l.flatten()))  # W (x ⊙ l) + b


@pytest.mark.parametrize("is_feedforward", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_merge_matches_and_unmerge_is_exact(kind, is_feedforward):
    torch.manual_seed(0)
    layer = nn.Linear(16, 24) if kind == "linear" else Conv1D(24, 16)
    weight, bias = layer.weight.clone(), layer.bias.clone()
    ia3 = IA3Linear(layer, is_feedforward=is_feedforward, init_ia3_weights=False)
    x = torch.randn(5, 16)
    unmerged = ia3(x)
    ia3.merge()
    torch.testing.assert_close(ia3(x), unmerged, rtol=0, atol=1e-6)
    assert not torch.equal(layer.weight, weight)
    ia3.unmerge()
    assert torch.equal(layer.weight, weight) and torch.equal(layer.bias, bias)


def test_gpt2_small_defaults_and_count():
    with torch.device("meta"):  # GPT-2 small's exact shapes, no memory and no init time: counting needs no values
        peft_model = get_peft_model(build_from_known_config("gpt2"), IA3Config())
    stats = peft_model.parameter_stats()
    assert peft_model.peft_config.target_modules == ["c_attn", "mlp.c_proj"]
    assert peft_model.peft_config.feedforward_modules == ["mlp.c_proj"]
    assert peft_model.peft_config.fan_in_fan_out is True
    assert stats.trainable == 12 * (2304 + 3072) == 64_512  # c_attn out + mlp.c_proj in, per block
    assert stats.total == 124_439_808 + 64_512


def test_llama_defaults_follow_gqa_shapes(llama_tiny):
    peft_model = get_peft_model(llama_tiny, IA3Config())
    shapes = {name.split("layers.0.")[1]: tuple(p.shape) for name, p in peft_model.adapter_parameters().items()
              if "layers.0." in name}
    # k and v are 2 kv heads × 16 = 32 wide (output side); down_proj scales its 128-wide input
    assert shapes == {"self_attn.k_proj.ia3_l": (32, 1), "self_attn.v_proj.ia3_l": (32, 1),
                      "mlp.down_proj.ia3_l": (1, 128)}
    assert peft_model.parameter_stats().trainable == 2 * (32 + 32 + 128)
    assert peft_model.peft_config.fan_in_fan_out is False


def test_feedforward_modules_must_be_targets(gpt2_tiny):
    with pytest.raises(UserError, match="^feedforward_modules: c_fc not among the target modules"):
        get_peft_model(gpt2_tiny, IA3Config(target_modules=["c_attn"], feedforward_modules=["c_fc"]))


def test_targets_without_feedforward_keep_only_matching_defaults(gpt2_tiny):
    peft_model = get_peft_model(gpt2_tiny, IA3Config(target_modules=["c_attn"]))
    assert peft_model.peft_config.feedforward_modules == []
    assert peft_model.parameter_stats().trainable == 2 * 3 * 64


def test_fresh_adapter_leaves_logits_identical(tiny_model_factory, sample_batch):
    expected = tiny_model_factory()(**sample_batch).logits
    peft_model = get_peft_model(tiny_model_factory(), IA3Config())
    assert torch.equal(peft_model(**sample_batch).logits, expected)


def test_training_lowers_the_loss_and_disable_gives_base(tiny_model_factory, sample_batch):
    expected = tiny_model_factory()(**sample_batch).logits
    peft_model = get_peft_model(tiny_model_factory(), IA3Config())
    losses = train_steps(peft_model, sample_batch, lr=5e-2)
    assert losses[-1] < losses[0]
    with peft_model.disable_adapters():
        assert torch.equal(peft_model(**sample_batch).logits, expected)


def test_merge_matches_and_unmerge_restores_exactly(tiny_model_factory, sample_batch):
    peft_model = get_peft_model(tiny_model_factory(), IA3Config())
    randomise_adapter(peft_model)
    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    unmerged = peft_model(**sample_batch).logits
    peft_model.merge_adapter()
    assert (peft_model(**sample_batch).logits - unmerged).abs().max() <= 1e-5
    peft_model.unmerge_adapter()
    assert all(torch.equal(v, before[k]) for k, v in peft_model.state_dict().items())
    merged_model = peft_model.merge_and_unload()
    assert not any(isinstance(m, IA3Linear) for m in merged_model.modules())
    assert (merged_model(**sample_batch).logits - unmerged).abs().max() <= 1e-5


def test_save_load_and_continue_training(tiny_model_factory, sample_batch, tmp_path):
    peft_model = get_peft_model(tiny_model_factory(), IA3Config())
    randomise_adapter(peft_model)
    peft_model.save_adapter(tmp_path)
    loaded = load_adapter(tiny_model_factory(), tmp_path)
    assert torch.equal(loaded(**sample_batch).logits, peft_model(**sample_batch).logits)
    trainable = load_adapter(tiny_model_factory(), tmp_path, is_trainable=True)
    assert trainable.parameter_stats() == peft_model.parameter_stats()
    losses = train_steps(trainable, sample_batch, steps=3, lr=5e-2)
    assert losses[-1] < losses[0]
