"""The adapter-layer contract (minipeft/core/adapter_layer.py, core/virtual_tokens.PromptEncoder), checked for
every registered method on the built-in GPT-2 and a tiny grouped-query Llama: each method layer is an
``AdapterLayer`` that declares what it adds, computes its base layer's output when disabled, and merges
exactly (or refuses cleanly); each prompt-learning module is a ``PromptEncoder``."""

import pytest
import torch
from torch import nn

from minipeft import UserError, get_peft_model
from minipeft.builtin import load_builtin_model_and_tokenizer
from minipeft.core.adapter_layer import AdapterLayer, adapter_layers
from minipeft.core.layers import layer_features
from minipeft.core.virtual_tokens import PromptEncoder
from minipeft.methods import METHODS, method_for_config
from minipeft.fast.loss import positions_prepended
from minipeft.training.optimizer import added_linear_weights
from minipeft.training.precision import adapter_added_parameters
from tests.conftest import make_llama_tiny

# Small settings per built-in method; a method not listed is used with its config's defaults.
SMALL_SETTINGS = {
    "lora": dict(r=4, lora_alpha=8),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "adapter": dict(bottleneck_size=8),
    "prefix": dict(num_virtual_tokens=3),
    "prompt": dict(num_virtual_tokens=3),
    "selective": dict(freeze_layers=[0]),
}
MODELS = {"builtin-gpt2": lambda: load_builtin_model_and_tokenizer()[0], "llama-gqa": make_llama_tiny}


def make_config(name: str):
    config = METHODS[name].config_class(**SMALL_SETTINGS.get(name, {}))
    assert method_for_config(config) is METHODS[name]
    return config


def perturbed(name: str, family: str):
    """``(base model, a copy with method ``name`` applied and every adapter parameter moved off its start)``."""
    torch.manual_seed(0)
    base = MODELS[family]().eval()
    torch.manual_seed(0)
    peft_model = get_peft_model(MODELS[family]().eval(), make_config(name))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # most methods start as the identity: give every trained parameter a visible change
        for parameter in peft_model.adapter_parameters().values():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
    return base, peft_model


def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 1000, (2, 7), generator=generator)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


@pytest.fixture(params=list(MODELS))
def family(request):
    return request.param


@pytest.mark.parametrize("name", list(METHODS))
def test_method_layers_keep_the_contract(name, family):
    _, peft_model = perturbed(name, family)
    layers = adapter_layers(peft_model)
    method = METHODS[name]
    if layers:  # a method that puts layers in: each says what it adds, and all of that trains
        assert all(layer.mergeable == method.mergeable for layer in layers)
    trained = {id(p) for p in peft_model.adapter_parameters().values()}
    for layer in layers:
        added = layer.adapter_parameters()
        assert added, f"{type(layer).__name__} adds nothing"
        base_ids = {id(p) for p in layer.base_layer.parameters()}
        assert not base_ids & {id(p) for p in added.values()}  # the frozen layer inside is not the method's
        assert {id(p) for p in added.values()} <= trained
        assert not layer.merged and layer.adapter_enabled
        x = torch.randn(2, 5, layer_features(layer.base_layer)[0])  # (B, T, in)
        with torch.no_grad():
            adapted = layer(x)
            layer.adapter_enabled = False
            disabled = layer(x)
            layer.adapter_enabled = True
            assert torch.equal(disabled, layer.base_layer(x))  # disabled = exactly the base layer
            assert not torch.equal(adapted, disabled)  # and the (perturbed) adapter does change it
    # What the optimizer and bf16 storage treat as "added by the method" is what the contract declares.
    declared = {id(p) for layer in layers for p in layer.adapter_parameters().values()}
    encoder = peft_model.prompt_encoder
    if encoder is not None:
        assert isinstance(encoder, PromptEncoder) and not layers
        declared |= {id(p) for p in encoder.adapter_parameters().values()}
        assert {id(p) for p in encoder.parameters()} <= trained
    assert adapter_added_parameters(peft_model) == declared
    assert added_linear_weights(peft_model) <= declared


@pytest.mark.parametrize("name", list(METHODS))
def test_disabling_gives_the_base_model_or_a_clean_refusal(name, family):
    base, peft_model = perturbed(name, family)
    inputs = batch()
    with torch.no_grad():
        expected = base(**inputs).logits
        adapted = peft_model(**inputs).logits
        if peft_model.in_place_parameter_names:  # BitFit on GPT-2, selective: base weights trained in place
            with pytest.raises(UserError, match="trains base weights in place"):
                with peft_model.disable_adapters():
                    pass
            return
        with peft_model.disable_adapters():
            disabled = peft_model(**inputs).logits
            assert positions_prepended(peft_model) == 0
        enabled_again = peft_model(**inputs).logits
    assert torch.equal(disabled, expected)
    assert not torch.allclose(adapted[:, -expected.shape[1]:], expected, atol=1e-4)
    assert torch.equal(enabled_again, adapted)


@pytest.mark.parametrize("name", list(METHODS))
def test_merging_is_exact_or_refused(name, family):
    _, peft_model = perturbed(name, family)
    inputs = batch()
    method = METHODS[name]
    with torch.no_grad():
        before = peft_model(**inputs).logits
        if not method.mergeable:
            with pytest.raises(UserError, match=f"modification_type {name}: cannot be merged"):
                peft_model.merge_adapter()
            for layer in adapter_layers(peft_model):
                with pytest.raises(UserError, match="cannot be merged"):
                    layer.merge()
                assert not layer.merged
            assert torch.equal(peft_model(**inputs).logits, before)
            return
        weights = {key: p.detach().clone() for key, p in peft_model.base_model.named_parameters()}
        peft_model.merge_adapter()
        assert all(layer.merged for layer in adapter_layers(peft_model))
        merged = peft_model(**inputs).logits
        with pytest.raises(UserError, match="cannot disable a merged adapter"):
            with peft_model.disable_adapters():
                pass
        peft_model.unmerge_adapter()
        after = peft_model(**inputs).logits
    torch.testing.assert_close(merged, before, atol=1e-4, rtol=1e-4)  # float32 rounding of W + ΔW
    assert torch.equal(after, before)  # unmerge restores the exact weights
    assert all(torch.equal(p, weights[key]) for key, p in peft_model.base_model.named_parameters())


def test_prompt_encoders_say_where_their_virtual_tokens_are(llama_tiny):
    prompt = get_peft_model(make_llama_tiny(), make_config("prompt"))
    prefix = get_peft_model(make_llama_tiny(), make_config("prefix"))
    assert prompt.prompt_encoder.in_sequence and not prefix.prompt_encoder.in_sequence
    assert positions_prepended(prompt) == 3 and positions_prepended(prefix) == 0
    assert positions_prepended(llama_tiny) == 0  # a plain model
    with torch.no_grad():
        assert prompt(**batch()).logits.shape[1] == 3 + 7  # the n virtual positions come first
        assert prefix(**batch()).logits.shape[1] == 7


def test_a_layer_that_is_not_mergeable_refuses_by_default():
    class ScaledOutput(AdapterLayer):
        def __init__(self, base_layer):
            super().__init__(base_layer)
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            result = self.base_layer(x)
            return result * self.scale if self.adapter_enabled else result

    layer = ScaledOutput(nn.Linear(3, 2))
    assert not layer.mergeable and list(layer.adapter_parameters()) == ["scale"]
    with pytest.raises(UserError, match="ScaledOutput: this method's update cannot be merged"):
        layer.merge()
    with pytest.raises(UserError, match="cannot be merged"):
        layer.unmerge()
