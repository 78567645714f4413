"""Bottleneck adapters: placement (Houlsby/Pfeiffer) per family, identity at init, 2·d·m + d + m counts,
training, disable, save/load, and no merging."""

import pytest
import torch

from minipeft import UserError, get_peft_model, load_adapter
from minipeft.methods.adapter import AdapterConfig, BottleneckAdapter, ProjectionWithAdapter
from minipeft.loading.models import build_from_known_config
from tests.conftest import randomise_adapter, train_steps


def adapter_count(d, m):
    return 2 * d * m + d + m


def wrapped_names(peft_model):
    return sorted(name.removeprefix("base_model.") for name, module in peft_model.named_modules()
                  if isinstance(module, ProjectionWithAdapter))


def test_adapter_module_is_a_zero_initialised_residual_mlp():
    adapter = BottleneckAdapter(hidden_size=32, bottleneck_size=4, activation="tanh")
    hidden = torch.randn(2, 3, 32)
    assert torch.equal(adapter(hidden), hidden)  # up = 0
    assert sum(p.numel() for p in adapter.parameters()) == adapter_count(32, 4)
    torch.nn.init.normal_(adapter.up.weight)
    expected = hidden + adapter.up(torch.tanh(adapter.down(hidden)))
    torch.testing.assert_close(adapter(hidden), expected)


@pytest.mark.parametrize("adapter_type, expected_total", [("houlsby", 2_379_264), ("pfeiffer", 1_189_632)])
def test_gpt2_small_counts(adapter_type, expected_total):
    with torch.device("meta"):  # GPT-2 small's exact shapes, no memory and no init time: counting needs no values
        stats = get_peft_model(build_from_known_config("gpt2"), AdapterConfig(adapter_type=adapter_type)
                               ).parameter_stats()
    per_block = 2 if adapter_type == "houlsby" else 1
    assert adapter_count(768, 64) == 99_136
    assert stats.trainable == 12 * per_block * 99_136 == expected_total
    assert stats.total == 124_439_808 + expected_total


def test_gpt2_small_train_layernorms_adds_the_block_norms():
    with torch.device("meta"):
        stats = get_peft_model(build_from_known_config("gpt2"), AdapterConfig(train_layernorms=True)
                               ).parameter_stats()
    assert stats.trainable == 2_379_264 + 12 * 2 * (768 + 768)  # ln_1 and ln_2, weight and bias; not ln_f


@pytest.mark.parametrize("adapter_type, expected", [
    ("houlsby", {"gpt2": ["attn.c_proj", "mlp.c_proj"], "llama": ["mlp.down_proj", "self_attn.o_proj"]}),
    ("pfeiffer", {"gpt2": ["mlp.c_proj"], "llama": ["mlp.down_proj"]}),
])
def test_default_placement_per_family(gpt2_tiny, llama_tiny, adapter_type, expected):
    for family, model in (("gpt2", gpt2_tiny), ("llama", llama_tiny)):
        peft_model = get_peft_model(model, AdapterConfig(adapter_type=adapter_type, bottleneck_size=8))
        names = wrapped_names(peft_model)
        assert len(names) == 2 * len(expected[family])  # two blocks
        assert sorted({name.split(".", 3)[-1] for name in names}) == expected[family]


def test_llama_count_and_norms(llama_tiny):
    peft_model = get_peft_model(llama_tiny, AdapterConfig(reduction_factor=16, bottleneck_size=None,
                                                          train_layernorms=True))
    # m = 64 // 16 = 4; 2 adapters per block, 2 blocks; + RMSNorm weights (64) twice per block, not model.norm
    assert peft_model.parameter_stats().trainable == 4 * adapter_count(64, 4) + 2 * 2 * 64
    assert not peft_model.base_model.model.norm.weight.requires_grad


@pytest.mark.parametrize("settings, name", [  # the API names the fields (the command line: its flags)
    (dict(bottleneck_size=8, reduction_factor=4), "^bottleneck_size and reduction_factor: give exactly one"),
    (dict(bottleneck_size=None), "^bottleneck_size and reduction_factor"),
    (dict(adapter_type="parallel"), "^adapter_type must be houlsby or pfeiffer"),
    (dict(activation="swish"), "^activation must be one of"),
    (dict(bottleneck_size=0), "^bottleneck_size must be a positive integer"),
    (dict(bottleneck_size=None, reduction_factor=1000), "--adapter_reduction_factor 1000 leaves no bottleneck"),
])
def test_bad_settings_name_the_setting(gpt2_tiny, settings, name):
    with pytest.raises(UserError, match=name):
        get_peft_model(gpt2_tiny, AdapterConfig(**settings))


def test_fresh_adapter_leaves_logits_identical(tiny_model_factory, sample_batch):
    expected = tiny_model_factory()(**sample_batch).logits
    peft_model = get_peft_model(tiny_model_factory(), AdapterConfig(bottleneck_size=8, activation="gelu"))
    assert torch.equal(peft_model(**sample_batch).logits, expected)


def test_training_lowers_the_loss_and_disable_gives_base(tiny_model_factory, sample_batch):
    expected = tiny_model_factory()(**sample_batch).logits
    peft_model = get_peft_model(tiny_model_factory(), AdapterConfig(bottleneck_size=8))
    losses = train_steps(peft_model, sample_batch)
    assert losses[-1] < losses[0]
    with peft_model.disable_adapters():
        assert torch.equal(peft_model(**sample_batch).logits, expected)


def test_merge_is_refused(gpt2_tiny):
    peft_model = get_peft_model(gpt2_tiny, AdapterConfig(bottleneck_size=8))
    with pytest.raises(UserError, match="cannot be merged"):
        peft_model.merge_adapter()
    with pytest.raises(UserError, match="cannot be merged"):
        peft_model.merge_and_unload()


def test_save_load_and_continue_training(tiny_model_factory, sample_batch, tmp_path):
    config = AdapterConfig(adapter_type="pfeiffer", bottleneck_size=None, reduction_factor=8, activation="silu",
                           train_layernorms=True)
    peft_model = get_peft_model(tiny_model_factory(), config)
    randomise_adapter(peft_model)
    peft_model.save_adapter(tmp_path)
    loaded = load_adapter(tiny_model_factory(), tmp_path)
    assert loaded.peft_config.reduction_factor == 8 and loaded.peft_config.activation == "silu"
    assert torch.equal(loaded(**sample_batch).logits, peft_model(**sample_batch).logits)
    trainable = load_adapter(tiny_model_factory(), tmp_path, is_trainable=True)
    assert trainable.parameter_stats() == peft_model.parameter_stats()
    losses = train_steps(trainable, sample_batch, steps=3)
    assert losses[-1] < losses[0]
