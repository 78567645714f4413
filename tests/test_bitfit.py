"""BitFit: only biases train (GPT-2 small: 102,144); on bias-less Llama, zero-initialised added biases;
target_modules restricts; training, save/load, and no merging."""

import pytest
import torch
from torch import nn

from minipeft import UserError, get_peft_model, load_adapter
from minipeft.methods.bitfit import BitFitConfig, LinearWithAddedBias
from minipeft.loading.models import build_from_known_config
from tests.conftest import train_steps


def test_gpt2_small_trains_every_existing_bias():
    with torch.device("meta"):  # GPT-2 small's exact shapes, no memory and no init time: counting needs no values
        model = build_from_known_config("gpt2")
        existing_biases = sum(p.numel() for name, p in model.named_parameters() if name.endswith(".bias"))
        peft_model = get_peft_model(model, BitFitConfig())
    stats = peft_model.parameter_stats()
    per_block = 768 + 2304 + 768 + 768 + 3072 + 768  # ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj
    assert stats.trainable == existing_biases == 12 * per_block + 768 == 102_144  # + ln_f
    assert stats.total == 124_439_808  # nothing added
    assert not any(isinstance(m, LinearWithAddedBias) for m in model.modules())
    assert all(name.endswith(".bias") for name in peft_model.adapter_parameter_names)


def test_llama_gets_zero_biases_on_every_block_projection(llama_tiny, sample_batch):
    expected = llama_tiny(**sample_batch).logits
    assert not any(name.endswith("bias") for name, _ in llama_tiny.named_parameters())
    peft_model = get_peft_model(llama_tiny, BitFitConfig())
    added = {name.split(".", 3)[-1] for name, m in llama_tiny.named_modules() if isinstance(m, LinearWithAddedBias)}
    assert added == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    # q 64, k 32, v 32 (2 kv heads × 16), o 64, gate 128, up 128, down 64; 2 blocks
    assert peft_model.parameter_stats().trainable == 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert torch.equal(peft_model(**sample_batch).logits, expected)  # zero biases change nothing


def test_smollm2_count():
    with torch.device("meta"):
        stats = get_peft_model(build_from_known_config("smollm2-135m"), BitFitConfig()).parameter_stats()
    assert stats.trainable == 30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576) == 155_520


def test_target_modules_restrict_to_those_biases(tiny_model_factory):
    model = tiny_model_factory()
    targets = ["c_attn"] if hasattr(model, "transformer") else ["q_proj"]
    peft_model = get_peft_model(model, BitFitConfig(target_modules=targets))
    assert peft_model.parameter_stats().trainable == 2 * (192 if targets == ["c_attn"] else 64)


def test_target_without_a_possible_bias_is_an_error(llama_tiny):
    with pytest.raises(UserError, match="--target_modules: model.layers.0.input_layernorm .* has no bias"):
        get_peft_model(llama_tiny, BitFitConfig(target_modules=["input_layernorm"]))


def test_fresh_adapter_leaves_logits_identical(tiny_model_factory, sample_batch):
    expected = tiny_model_factory()(**sample_batch).logits
    peft_model = get_peft_model(tiny_model_factory(), BitFitConfig())
    assert torch.equal(peft_model(**sample_batch).logits, expected)


def test_training_changes_only_biases(tiny_model_factory, sample_batch):
    model = tiny_model_factory()
    weights_before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("bias")}
    peft_model = get_peft_model(model, BitFitConfig())
    losses = train_steps(peft_model, sample_batch)
    assert losses[-1] < losses[0]
    weights_now = {k.replace("base_layer.", ""): v for k, v in model.state_dict().items()}
    assert all(torch.equal(weights_now[k], v) for k, v in weights_before.items())


def test_disable_switches_off_added_biases(llama_tiny, sample_batch):
    expected = llama_tiny(**sample_batch).logits
    peft_model = get_peft_model(llama_tiny, BitFitConfig())
    with torch.no_grad():
        for parameter in peft_model.adapter_parameters().values():
            nn.init.normal_(parameter, std=0.1)
    assert not torch.allclose(peft_model(**sample_batch).logits, expected)
    with peft_model.disable_adapters():
        assert torch.equal(peft_model(**sample_batch).logits, expected)


def test_merge_is_refused(gpt2_tiny):
    peft_model = get_peft_model(gpt2_tiny, BitFitConfig())
    with pytest.raises(UserError, match="cannot be merged"):
        peft_model.merge_adapter()


def test_save_load_and_continue_training(tiny_model_factory, sample_batch, tmp_path):
    peft_model = get_peft_model(tiny_model_factory(), BitFitConfig())
    train_steps(peft_model, sample_batch, steps=2)
    peft_model.save_adapter(tmp_path)
    from safetensors.torch import load_file

    assert all(key.endswith(".bias") for key in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = load_adapter(tiny_model_factory(), tmp_path)
    assert torch.equal(loaded(**sample_batch).logits, peft_model(**sample_batch).logits)
    trainable = load_adapter(tiny_model_factory(), tmp_path, is_trainable=True)
    assert trainable.parameter_stats() == peft_model.parameter_stats()
    losses = train_steps(trainable, sample_batch, steps=3)
    assert losses[-1] < losses[0]
