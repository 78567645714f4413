"""Selective freezing: layer specs, exact counts (GPT-2 small: 56,704,512), tied embeddings, extras,
training only the unfrozen blocks, save/load, and no merging."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from minipeft import UserError, get_peft_model, load_adapter
from minipeft.methods.selective import SelectiveConfig
from minipeft.core.layers import num_hidden_layers, parse_layer_spec, transformer_blocks
from minipeft.loading.models import build_from_known_config


def block_count(model, index):
    return sum(p.numel() for p in transformer_blocks(model)[index].parameters())


def train_steps(peft_model, batch, steps=5, lr=1e-3):
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("spec, expected", [
    ("0,1,2,3", [0, 1, 2, 3]),
    ("0-5", [0, 1, 2, 3, 4, 5]),
    ("-1,-2", [10, 11]),
    (" 3, 1,1 ,0-1,-12", [0, 1, 3]),
    ("11", [11]),
])
def test_parse_layer_spec(spec, expected):
    assert parse_layer_spec(spec, 12, "--freeze_layers") == expected


@pytest.mark.parametrize("spec, message", [
    ("12", "layer 12 is out of range; this model has 12 layers"),
    ("-13", "layer -13 is out of range"),
    ("3-1", "runs backwards"),
    ("a,b", "'a' is not a layer index"),
    ("", "is not a layer index"),
    ("0-12", "layer 12 is out of range"),
])
def test_parse_layer_spec_errors_name_the_flag(spec, message):
    with pytest.raises(UserError, match=f"^--layers_to_transform: .*{message}"):
        parse_layer_spec(spec, 12, "--layers_to_transform")


def test_gpt2_small_freezing_blocks_0_to_3():
    with torch.device("meta"):  # GPT-2 small's exact shapes, no memory and no init time: counting needs no values
        model = build_from_known_config("gpt2")
        assert num_hidden_layers(model) == 12
        assert block_count(model, 0) == 7_087_872
        stats = get_peft_model(model, SelectiveConfig(freeze_layers=[0, 1, 2, 3])).parameter_stats()
    assert stats.trainable == 8 * 7_087_872 + 1_536 == 56_704_512  # blocks 4-11 + ln_f (weight and bias)
    assert stats.total == 124_439_808
    assert f"{stats.ratio:.4f}" == "45.5678"


def test_tiny_counts_follow_the_formula(tiny_model_factory):
    model = tiny_model_factory()
    final_norm = sum(p.numel() for p in (model.transformer.ln_f if hasattr(model, "transformer")
                                        else model.model.norm).parameters())
    expected = block_count(model, 1) + final_norm
    peft_model = get_peft_model(model, SelectiveConfig(freeze_layers=[-2]))
    assert peft_model.peft_config.freeze_layers == [0]  # resolved at apply
    assert peft_model.parameter_stats().trainable == expected
    assert all(not p.requires_grad for p in transformer_blocks(model)[0].parameters())


def test_no_final_norm_and_empty_freeze_list(gpt2_tiny):
    peft_model = get_peft_model(gpt2_tiny, SelectiveConfig(freeze_layers=[], train_final_norm=False))
    assert peft_model.parameter_stats().trainable == block_count(gpt2_tiny, 0) + block_count(gpt2_tiny, 1)


def test_tied_embeddings_must_train_together(gpt2_tiny):
    with pytest.raises(UserError, match="--train_embeddings/--train_lm_head: .* one tensor"):
        get_peft_model(gpt2_tiny, SelectiveConfig(freeze_layers=[0, 1], train_embeddings=True))


def test_tied_embeddings_trained_once_with_position_embeddings(gpt2_tiny):
    peft_model = get_peft_model(gpt2_tiny, SelectiveConfig(freeze_layers=[0, 1], train_embeddings=True,
                                                           train_lm_head=True, train_final_norm=False))
    # wte (1000 × 64, shared with lm_head, counted once) + wpe (128 × 64)
    assert peft_model.parameter_stats().trainable == 1000 * 64 + 128 * 64
    assert gpt2_tiny.lm_head.weight.requires_grad


def test_untied_llama_head_and_embeddings_are_separate():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                         tie_word_embeddings=False))
    peft_model = get_peft_model(model, SelectiveConfig(freeze_layers=[0, 1], train_lm_head=True,
                                                       train_final_norm=False))
    assert peft_model.parameter_stats().trainable == 100 * 32
    assert model.lm_head.weight.requires_grad and not model.model.embed_tokens.weight.requires_grad


@pytest.mark.parametrize("freeze_layers", [[2], [-3], [0, 5]])
def test_out_of_range_layers_name_the_flag(tiny_model_factory, freeze_layers):
    with pytest.raises(UserError, match="^--freeze_layers: layer -?[0-9]+ is out of range"):
        get_peft_model(tiny_model_factory(), SelectiveConfig(freeze_layers=freeze_layers))


def test_freezing_everything_leaves_nothing_to_train(gpt2_tiny):
    with pytest.raises(UserError, match="no parameter to train"):
        get_peft_model(gpt2_tiny, SelectiveConfig(freeze_layers=[0, 1], train_final_norm=False))


def test_training_changes_only_the_unfrozen_blocks(tiny_model_factory, sample_batch):
    model = tiny_model_factory()
    frozen_before = {k: v.clone() for k, v in transformer_blocks(model)[0].state_dict().items()}
    trained_before = {k: v.clone() for k, v in transformer_blocks(model)[1].state_dict().items()}
    peft_model = get_peft_model(model, SelectiveConfig(freeze_layers=[0]))
    losses = train_steps(peft_model, sample_batch)
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, frozen_before[k]) for k, v in transformer_blocks(model)[0].state_dict().items())
    assert not all(torch.equal(v, trained_before[k]) for k, v in transformer_blocks(model)[1].state_dict().items())


def test_merge_is_refused(gpt2_tiny):
    peft_model = get_peft_model(gpt2_tiny, SelectiveConfig(freeze_layers=[0]))
    with pytest.raises(UserError, match="cannot be merged"):
        peft_model.merge_adapter()


def test_save_load_and_continue_training(tiny_model_factory, sample_batch, tmp_path):
    peft_model = get_peft_model(tiny_model_factory(), SelectiveConfig(freeze_layers=[-2]))
    train_steps(peft_model, sample_batch, steps=2)
    peft_model.save_adapter(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == peft_model.parameter_stats().trainable
    loaded = load_adapter(tiny_model_factory(), tmp_path)
    assert loaded.peft_config.freeze_layers == [0]
    assert torch.equal(loaded(**sample_batch).logits, peft_model(**sample_batch).logits)
    trainable = load_adapter(tiny_model_factory(), tmp_path, is_trainable=True)
    assert trainable.parameter_stats() == peft_model.parameter_stats()
    losses = train_steps(trainable, sample_batch, steps=3)
    assert losses[-1] < losses[0]
