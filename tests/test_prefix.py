"""Prefix tuning: the math (a prefix is keys/values of tokens seen before), counts, training, files,
padding, and gradient checkpointing; on GPT-2 and on a grouped-query Llama."""

import pytest
import torch
from transformers import DynamicCache

from minipeft import UserError, get_peft_model, load_adapter
from minipeft.loading.models import build_from_known_config
from minipeft.methods.prefix import PrefixTuningConfig, key_value_shape
from minipeft.core.transformers_api import cache_keyword_argument, cache_of, enable_activation_checkpointing

TOKENS = torch.tensor([[5, 17, 256, 3, 999, 42, 8], [700, 11, 64, 1, 2, 3, 4]])


def prefix_parameter_count(config, with_projection: bool) -> int:
    """The module docstring's formulas."""
    n, layers, token_dim, hidden = (config.num_virtual_tokens, config.num_layers, config.token_dim,
                                    config.encoder_hidden_size)
    if not with_projection:
        return n * 2 * layers * token_dim
    return n * token_dim + (token_dim + 1) * hidden + (hidden + 1) * 2 * layers * token_dim


def table_from_cache(cache) -> torch.Tensor:
    """peft's flat layout from a KV cache of one row: E.view(n, 2L, H, hd)[:, 2i] = key of layer i."""
    keys_values = []
    for layer in cache.layers:
        keys_values += [layer.keys[0], layer.values[0]]  # each (H, n, hd)
    stacked = torch.stack(keys_values)  # (2L, H, n, hd)
    return stacked.permute(2, 0, 1, 3).reshape(stacked.shape[2], -1)  # (n, 2L·H·hd)


def test_config_is_filled_from_the_model(gpt2_tiny, llama_tiny):
    gpt2 = get_peft_model(gpt2_tiny, PrefixTuningConfig(num_virtual_tokens=3)).peft_config
    assert (gpt2.num_layers, gpt2.num_attention_heads, gpt2.token_dim, gpt2.encoder_hidden_size) == (2, 4, 64, 64)
    llama = get_peft_model(llama_tiny, PrefixTuningConfig(num_virtual_tokens=3)).peft_config
    # grouped-query attention: the cache holds 2 key/value heads of 16 dims, not 4 heads
    assert (llama.num_layers, llama.num_attention_heads, llama.token_dim) == (2, 2, 32)


@pytest.mark.parametrize("projection", [False, True])
def test_parameter_count_is_the_documented_formula(tiny_model_factory, projection):
    base = tiny_model_factory()
    base_total = sum(p.numel() for p in base.parameters())
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=projection,
                                                    encoder_hidden_size=24 if projection else None))
    expected = prefix_parameter_count(model.peft_config, projection)
    stats = model.parameter_stats()
    assert stats.trainable == expected
    assert stats.total == base_total + expected
    assert set(model.adapter_parameter_names) == {name for name, _ in model.prompt_encoder.named_parameters(
        prefix="prompt_encoder")}


def test_gpt2_small_and_smollm2_counts():
    with torch.device("meta"):  # shapes only: instant, and the same counts
        gpt2 = build_from_known_config("gpt2")
        smollm2 = build_from_known_config("smollm2-135m")
    stats = get_peft_model(gpt2, PrefixTuningConfig(num_virtual_tokens=50)).parameter_stats()
    assert stats.trainable == 50 * 2 * 12 * 768 == 921_600
    stats = get_peft_model(gpt2, PrefixTuningConfig(num_virtual_tokens=20)).parameter_stats()
    assert (stats.trainable, stats.total) == (368_640, 124_808_448)
    model = get_peft_model(gpt2, PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True))
    assert model.parameter_stats().trainable == prefix_parameter_count(model.peft_config, True) == 14_780_160
    model = get_peft_model(smollm2, PrefixTuningConfig(num_virtual_tokens=20))
    assert (model.peft_config.token_dim, model.peft_config.num_attention_heads) == (192, 3)
    assert model.parameter_stats().trainable == 20 * 2 * 30 * 192 == 230_400


def test_a_prefix_is_the_keys_and_values_of_tokens_seen_before(tiny_model_factory):
    """Load the KV cache of 5 real tokens as the prefix: the prefixed model must then give exactly the
    logits of the base model run on those 5 tokens followed by the input (mask, positions n…, layout,
    grouped-query heads all have to be right for this to hold)."""
    base = tiny_model_factory()
    context = torch.tensor([[31, 415, 9, 600, 77]])
    with torch.no_grad():
        cache = cache_of(base(input_ids=context, use_cache=True))
        expected = base(input_ids=torch.cat([context.expand(2, -1), TOKENS], dim=1)).logits[:, 5:]
    model = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=5))
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.copy_(table_from_cache(cache))
        logits = model(input_ids=TOKENS, attention_mask=torch.ones_like(TOKENS)).logits
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_key_values_shapes(llama_tiny):
    model = get_peft_model(llama_tiny, PrefixTuningConfig(num_virtual_tokens=6))
    pairs = model.prompt_encoder.key_values(batch_size=3, dtype=torch.float32)
    assert len(pairs) == 2 and all(k.shape == v.shape == (3, 2, 6, 16) for k, v in pairs)
    assert key_value_shape(llama_tiny) == (2, 2, 16)


def test_disabled_adapter_gives_the_base_model(tiny_model_factory):
    base_logits = tiny_model_factory()(input_ids=TOKENS).logits
    model = get_peft_model(tiny_model_factory(), PrefixTuningConfig(num_virtual_tokens=4))
    assert not torch.allclose(model(input_ids=TOKENS).logits, base_logits, atol=1e-3)
    with model.disable_adapters():
        assert torch.equal(model(input_ids=TOKENS).logits, base_logits)


def without_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def train_steps(model, steps=5, lr=0.1):
    """A few AdamW steps on one batch; returns the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=TOKENS, attention_mask=torch.ones_like(TOKENS), labels=TOKENS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("projection", [False, True])
def test_training_lowers_the_loss_and_touches_only_the_prefix(tiny_model_factory, projection):
    model = get_peft_model(without_dropout(tiny_model_factory()),
                           PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=projection))
    frozen = {name: p.detach().clone() for name, p in model.base_model.named_parameters()}
    losses = train_steps(model)
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[name]) for name, p in model.base_model.named_parameters())


def padded(rows, side):
    width = max(len(row) for row in rows)
    input_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        columns = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        input_ids[i, columns], attention_mask[i, columns] = torch.tensor(row), 1
    return input_ids, attention_mask


def test_left_and_right_padding_give_each_row_its_unpadded_logits(tiny_model_factory):
    model = get_peft_model(tiny_model_factory(), PrefixTuningConfig(num_virtual_tokens=3)).eval()
    rows = [[5, 17, 256, 3, 999], [700, 11], [64, 1, 2]]
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([row])).logits[0] for row in rows]
        for side in ("left", "right"):
            input_ids, attention_mask = padded(rows, side)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            for i, row in enumerate(rows):
                real = logits[i][attention_mask[i].bool()]
                torch.testing.assert_close(real, alone[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("projection", [False, True])
def test_save_load_gives_identical_logits_and_training_continues(tiny_model_factory, tmp_path, projection):
    model = get_peft_model(without_dropout(tiny_model_factory()),
                           PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=projection))
    train_steps(model, steps=2)
    model.eval()
    expected = model(input_ids=TOKENS).logits
    model.save_adapter(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert list(saved) == ["prompt_embeddings"]
    assert saved["prompt_embeddings"].shape == (4, 2 * 2 * model.peft_config.token_dim)  # same with the MLP

    loaded = load_adapter(tiny_model_factory(), tmp_path)
    torch.testing.assert_close(loaded(input_ids=TOKENS).logits, expected, atol=1e-6, rtol=1e-6)
    assert loaded.parameter_stats().trainable == 0

    resumed = load_adapter(without_dropout(tiny_model_factory()), tmp_path, is_trainable=True)
    # a loaded adapter is the plain table, also when it was trained through the MLP
    assert resumed.parameter_stats().trainable == 4 * 2 * 2 * model.peft_config.token_dim
    losses = train_steps(resumed, steps=4)
    assert losses[-1] < losses[0]


def test_loading_onto_another_model_names_the_problem(gpt2_tiny, llama_tiny, tmp_path):
    get_peft_model(gpt2_tiny, PrefixTuningConfig(num_virtual_tokens=4)).save_adapter(tmp_path)
    with pytest.raises(UserError, match="num_attention_heads is 4 but LlamaForCausalLM needs 2"):
        load_adapter(llama_tiny, tmp_path)


def test_a_wrong_tensor_is_a_user_error(gpt2_tiny):
    model = get_peft_model(gpt2_tiny, PrefixTuningConfig(num_virtual_tokens=4))
    with pytest.raises(UserError, match=r"prompt_embeddings has shape \[3, 256\]"):
        model.prompt_encoder.load_peft_state_dict({"prompt_embeddings": torch.zeros(3, 256)}, "f.safetensors")
    with pytest.raises(UserError, match="tensor prompt_encoder.embedding.weight has no place"):
        model.prompt_encoder.load_peft_state_dict({"prompt_encoder.embedding.weight": torch.zeros(4, 256)}, "f")


@pytest.mark.parametrize("settings, flag", [(dict(num_virtual_tokens=0), "^num_virtual_tokens must be"),
                                            (dict(encoder_hidden_size=-3), "^encoder_hidden_size must be"),
                                            (dict(num_transformer_submodules=2), "num_transformer_submodules")])
def test_bad_settings_are_user_errors(gpt2_tiny, settings, flag):
    with pytest.raises(UserError, match=flag):
        get_peft_model(gpt2_tiny, PrefixTuningConfig(**settings))


def test_gradient_checkpointing_is_refused_in_training_and_harmless_in_eval(tiny_model_factory):
    model = get_peft_model(without_dropout(tiny_model_factory()), PrefixTuningConfig(num_virtual_tokens=3))
    model.eval()
    expected = model(input_ids=TOKENS).logits
    enable_activation_checkpointing(model.base_model)  # as --gradient_checkpointing does
    torch.testing.assert_close(model(input_ids=TOKENS).logits, expected)  # eval mode: no checkpointing
    model.train()
    with pytest.raises(UserError, match="gradient_checkpointing cannot be used with prefix tuning"):
        model(input_ids=TOKENS, labels=TOKENS)


def test_why_transformers_checkpointing_loses_the_prefix(tiny_model_factory):
    """The reason for the refusal: in training mode, checkpointed layers drop the KV cache, so a
    prefix cache never reaches attention (here the mask, sized for n + T keys, then meets T keys).
    If this test fails, transformers keeps the cache now and prefix tuning could allow checkpointing."""
    base = without_dropout(tiny_model_factory())
    layers, heads, head_dim = key_value_shape(base)
    prefix = [(torch.randn(2, heads, 3, head_dim), torch.randn(2, heads, 3, head_dim)) for _ in range(layers)]
    inputs = dict(input_ids=TOKENS, attention_mask=torch.ones(2, 3 + TOKENS.shape[1], dtype=torch.long),
                  position_ids=torch.arange(3, 3 + TOKENS.shape[1])[None])
    base.train()
    expected = base(**inputs, **cache_keyword_argument(DynamicCache(prefix, config=base.config))).logits
    enable_activation_checkpointing(base)
    try:
        logits = base(**inputs, **cache_keyword_argument(DynamicCache(prefix, config=base.config))).logits
    except RuntimeError:
        return  # the prefix was dropped and the mask no longer fits
    assert not torch.allclose(logits, expected, atol=1e-4)
