"""The contract every method keeps, checked for every registered method on a GPT-2 and a Llama-GQA model.

One test per promise, parametrised over ``minipeft.methods.METHODS`` × {GPT-2 (``Conv1D``, fused ``c_attn``,
tied head), Llama (grouped-query attention: 4 query heads, 2 key/value heads, tied head)}, so a method added
to the registry is checked here with no edit to this file. It must bring one thing: its trainable-parameter
formula, a function ``contract_trainable_count(shapes, config) -> int`` in its own test module
``tests/test_<name>.py`` (the built-in methods' formulas are in ``tests/contract_formulas.py``); a method
without one fails :func:`test_trainable_count_equals_the_formula`, saying so. Test ids read ``lora-gpt2``,
``prefix-llama``, ...

The promises, (a) to (f) through the public API only (``get_peft_model``, ``PeftModel``, ``load_adapter``,
``METHODS[name]``):

(a) identity at init: a fresh adapter leaves the logits as the base model's (|Δ| ≤ 1e-6), except the
    methods in :data:`CHANGES_OUTPUT_BY_DESIGN` (prompt, prefix: the virtual tokens start random), whose
    output must differ, and whose ``disable_adapters()`` gives the base model back;
(b) formula count: trainable parameters equal a formula written from the method's docstring (in
    tests/contract_formulas.py, or in the method's own test module), and the total is the base model's plus
    what the method adds (tied weights once);
(c) save/load round trip: the directory holds ``adapter_config.json`` + ``adapter_model.safetensors``
    (and minipeft's hidden ``.minipeft`` marker), and the adapter loaded onto a fresh base gives bitwise
    the same logits;
(d) ``disable_adapters()`` gives bitwise the base model's logits, or, for an adapter that trains base weights
    in place (selective; BitFit where the model has biases), refuses with a :class:`UserError`;
(e) merging: ``merge_adapter()`` matches the unmerged logits within 1e-5 (float32; peft's own figure on GPT-2
    small is 3e-6), ``unmerge_adapter()`` restores them bitwise, and ``merge_and_unload()`` is a plain
    transformers model with the same logits, for methods whose record says ``mergeable``; the others
    refuse all three with a one-line :class:`UserError` naming the method;
(f) a loaded adapter is frozen, ``load_adapter(..., is_trainable=True)`` makes exactly the adapter trainable
    again, and one optimizer step over *all* parameters changes every adapter parameter and nothing else.

(g) the layer contract, asked of the layers themselves (minipeft/core/adapter_layer.py, core/virtual_tokens), on the
    built-in GPT-2 and the grouped-query Llama: each method layer is an ``AdapterLayer`` that declares what it adds
    (what the optimizer and bf16 storage treat as added), computes exactly its base layer's output when disabled,
    and merges exactly (or refuses cleanly, layer by layer); each prompt-learning module is a ``PromptEncoder`` that
    says where its virtual tokens are.

Every check except (a) first perturbs the fresh adapter (``randomise_adapter``): a fresh adapter is the
identity by design, so saving, merging or disabling it would prove nothing.
"""

import pytest
import torch
from torch import nn
from transformers import PreTrainedModel

from minipeft import UserError, count_parameters, get_peft_model, load_adapter
from minipeft.builtin import load_builtin_model_and_tokenizer
from minipeft.core.adapter_layer import AdapterLayer, adapter_layers
from minipeft.core.layers import layer_features
from minipeft.core.virtual_tokens import PromptEncoder
from minipeft.fast.loss import positions_prepended
from minipeft.methods import METHODS, adapter_kind, method_for_config
from minipeft.training.optimizer import added_linear_weights
from minipeft.training.precision import adapter_added_parameters
from tests.conftest import make_gpt2_tiny, make_llama_tiny, randomise_adapter
# Shapes and linears: what a method's own formula (tests/test_<name>.py) imports, from here or contract_formulas
from tests.contract_formulas import Shapes, from_own_tests, linears, model_shapes, trainable_formula  # noqa: F401

FAMILIES = {"gpt2": make_gpt2_tiny, "llama": make_llama_tiny}
CASES = [(method, family) for method in METHODS for family in FAMILIES]
CASE_IDS = [f"{method}-{family}" for method, family in CASES]
each_case = pytest.mark.parametrize("method, family", CASES, ids=CASE_IDS)

IDENTITY_TOLERANCE = 1e-6  # (a): every method that promises identity is in fact bit-identical today (|Δ| = 0);
#                            1e-6 leaves room for a method whose zero update is computed rather than skipped
MERGE_TOLERANCE = 1e-5     # (e): float32; peft's own merged-vs-unmerged figure on GPT-2 small is 3e-6

# Settings for the contract run, where a method's defaults are not what should be checked: DoRA is
# ``LoRAConfig(use_dora=True)`` as in peft; small sizes keep the tiny models tiny; selective freezes one of the
# two blocks so that "which blocks train" matters. A method not listed runs with ``CONTRACT_SETTINGS`` of its own
# test module ``tests/test_<name>.py``, or else with its config's defaults.
CONTRACT_SETTINGS = {
    "lora": dict(r=4, lora_alpha=8),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "adapter": dict(bottleneck_size=8),
    "prefix": dict(num_virtual_tokens=5),
    "prompt": dict(num_virtual_tokens=5),
    "selective": dict(freeze_layers=[0]),
}

# Methods whose fresh adapter changes the output on purpose (random virtual tokens, as in peft and the papers).
CHANGES_OUTPUT_BY_DESIGN = {"prefix", "prompt"}


# --- helpers -------------------------------------------------------------------------------------------------

def contract_config(method: str):
    settings = CONTRACT_SETTINGS[method] if method in CONTRACT_SETTINGS else from_own_tests(method, "CONTRACT_SETTINGS", {})
    config = METHODS[method].config_class(**settings)
    assert method_for_config(config) is METHODS[method]
    return config


def fresh_base(family: str):
    return FAMILIES[family](seed=0)  # config-built, random weights, the same for every call


def make_peft_model(method: str, family: str, seed: int = 0):
    model = fresh_base(family)
    torch.manual_seed(seed)  # the adapter's own initialisation
    return get_peft_model(model, contract_config(method)).eval()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 1000, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # one left-padded row: the mask is part of the contract too
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    """The logits of the real tokens, ``(B, T, V)`` (prompt tuning's output has ``n`` virtual positions first)."""
    return model(**batch).logits[:, -batch["input_ids"].shape[1]:]


@torch.no_grad()
def base_logits(family: str, batch) -> torch.Tensor:
    return logits(fresh_base(family).eval(), batch)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def trains_base_weights_in_place(peft_model) -> bool:
    return bool(peft_model.in_place_parameter_names)


# --- (a) identity at init ------------------------------------------------------------------------------------

@each_case
def test_fresh_adapter_is_the_identity_or_changes_the_output_by_design(method, family, batch):
    peft_model = make_peft_model(method, family)
    expected = base_logits(family, batch)
    difference = max_difference(logits(peft_model, batch), expected)
    if method in CHANGES_OUTPUT_BY_DESIGN:
        assert difference > 1e-3, f"{method}: a fresh adapter should change the output (random virtual tokens)"
        with peft_model.disable_adapters():
            assert torch.equal(logits(peft_model, batch), expected)
    else:
        assert difference <= IDENTITY_TOLERANCE, f"{method}: a fresh adapter changed the logits by {difference:.3g}"


# --- (b) formula count ---------------------------------------------------------------------------------------

@each_case
def test_trainable_count_equals_the_formula(method, family):
    formula = trainable_formula(method)
    if formula is None:
        pytest.fail(f"--modification_type {method} has no trainable-parameter formula: define "
                    f"contract_trainable_count(shapes, config) -> int in tests/test_{method}.py, written from the "
                    "count its module docstring states (shapes: see Shapes in tests/contract_formulas.py)")
    config = contract_config(method)
    base = fresh_base(family)
    base_total = sum(parameter.numel() for parameter in base.parameters())  # tied weights once
    shapes = model_shapes(base.config)
    peft_model = get_peft_model(base, config)
    stats = peft_model.parameter_stats()
    assert stats.trainable == formula(shapes, config) > 0
    assert count_parameters(peft_model) == stats
    assert sum(parameter.numel() for parameter in peft_model.adapter_parameters().values()) == stats.trainable
    # Added parameters add to the total; base weights trained in place (selective, BitFit's own biases) do not.
    parameters = dict(peft_model.named_parameters())
    in_place = sum(parameters[name].numel() for name in peft_model.in_place_parameter_names)
    assert stats.total == base_total + stats.trainable - in_place


# --- (c) save/load round trip --------------------------------------------------------------------------------

@each_case
def test_save_and_load_onto_a_fresh_base_gives_the_same_logits(method, family, batch, tmp_path):
    peft_model = make_peft_model(method, family)
    randomise_adapter(peft_model)
    expected = logits(peft_model, batch)
    peft_model.save_adapter(tmp_path / "adapter")
    files = sorted(path.name for path in (tmp_path / "adapter").iterdir() if not path.name.startswith("."))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = load_adapter(fresh_base(family), tmp_path / "adapter").eval()
    assert torch.equal(logits(loaded, batch), expected)
    assert max_difference(expected, base_logits(family, batch)) > 1e-3  # the adapter is not a no-op


# --- (d) disable equals base ---------------------------------------------------------------------------------

@each_case
def test_disabled_adapter_gives_the_base_model_or_refuses(method, family, batch):
    peft_model = make_peft_model(method, family)
    randomise_adapter(peft_model)
    if trains_base_weights_in_place(peft_model):
        with pytest.raises(UserError, match="in place") as error:
            with peft_model.disable_adapters():
                pass
        assert "\n" not in str(error.value)
        return
    expected = base_logits(family, batch)
    assert max_difference(logits(peft_model, batch), expected) > 1e-3
    with peft_model.disable_adapters():
        assert torch.equal(logits(peft_model, batch), expected)
    assert max_difference(logits(peft_model, batch), expected) > 1e-3  # enabled again on leaving


# --- (e) merge equals unmerged, or a clean refusal ---------------------------------------------------------

@each_case
def test_merge_matches_unmerged_or_refuses_cleanly(method, family, batch):
    peft_model = make_peft_model(method, family)
    randomise_adapter(peft_model)
    unmerged = logits(peft_model, batch)
    if not METHODS[method].mergeable:
        for merge in (peft_model.merge_adapter, peft_model.merge_and_unload):
            with pytest.raises(UserError, match=method) as error:
                merge()
            assert "\n" not in str(error.value)
        assert torch.equal(logits(peft_model, batch), unmerged)  # nothing half-done
        return
    merged_model = peft_model.merge_and_unload()  # on a copy
    assert isinstance(merged_model, PreTrainedModel) and type(merged_model) is type(peft_model.base_model)
    assert not any(name.endswith("base_layer") for name, _ in merged_model.named_modules())
    assert max_difference(logits(merged_model.eval(), batch), unmerged) <= MERGE_TOLERANCE
    assert torch.equal(logits(peft_model, batch), unmerged)  # the PeftModel itself is unchanged
    peft_model.merge_adapter()
    assert max_difference(logits(peft_model, batch), unmerged) <= MERGE_TOLERANCE
    peft_model.unmerge_adapter()
    assert torch.equal(logits(peft_model, batch), unmerged)


# --- (f) reload as trainable ---------------------------------------------------------------------------------

@each_case
def test_loaded_adapter_trains_again_and_a_step_changes_only_the_adapter(method, family, batch, tmp_path):
    peft_model = make_peft_model(method, family)
    randomise_adapter(peft_model)
    peft_model.save_adapter(tmp_path / "adapter")
    frozen = load_adapter(fresh_base(family), tmp_path / "adapter")
    assert frozen.parameter_stats().trainable == 0
    loaded = load_adapter(fresh_base(family), tmp_path / "adapter", is_trainable=True).train()
    trainable = {name for name, parameter in loaded.named_parameters() if parameter.requires_grad}
    assert trainable == set(loaded.adapter_parameter_names) == set(peft_model.adapter_parameter_names)
    before = {name: parameter.detach().clone() for name, parameter in loaded.named_parameters()}
    optimizer = torch.optim.SGD(loaded.parameters(), lr=0.1)  # all of them: frozen ones must get no gradient
    loaded(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    changed = {name for name, parameter in loaded.named_parameters() if not torch.equal(parameter, before[name])}
    assert changed == trainable


# --- (g) the layer contract ----------------------------------------------------------------------------------
# On the built-in GPT-2 (the model a learner meets first) and the tiny grouped-query Llama.

LAYER_MODELS = {"builtin-gpt2": lambda: load_builtin_model_and_tokenizer()[0], "llama-gqa": make_llama_tiny}
each_layer_case = pytest.mark.parametrize("name, model", [(name, model) for name in METHODS for model in LAYER_MODELS],
                                          ids=[f"{name}-{model}" for name in METHODS for model in LAYER_MODELS])


def perturbed(name: str, model: str):
    """``(base model, a copy with method ``name`` applied and every adapter parameter moved off its start)``."""
    torch.manual_seed(0)
    base = LAYER_MODELS[model]().eval()
    torch.manual_seed(0)
    peft_model = get_peft_model(LAYER_MODELS[model]().eval(), contract_config(name))
    randomise_adapter(peft_model)
    return base, peft_model


def small_batch():
    input_ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))


@each_layer_case
def test_method_layers_keep_the_contract(name, model):
    _, peft_model = perturbed(name, model)
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


@each_layer_case
def test_disabling_gives_the_base_model_or_a_clean_refusal(name, model):
    base, peft_model = perturbed(name, model)
    inputs = small_batch()
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


@each_layer_case
def test_merging_is_exact_or_refused(name, model):
    _, peft_model = perturbed(name, model)
    inputs = small_batch()
    method = METHODS[name]
    with torch.no_grad():
        before = peft_model(**inputs).logits
        if not method.mergeable:
            with pytest.raises(UserError, match=f"{adapter_kind(name)} cannot be merged"):
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
    prompt = get_peft_model(make_llama_tiny(), contract_config("prompt"))
    prefix = get_peft_model(make_llama_tiny(), contract_config("prefix"))
    n = prompt.peft_config.num_virtual_tokens
    assert prompt.prompt_encoder.in_sequence and not prefix.prompt_encoder.in_sequence
    assert positions_prepended(prompt) == n and positions_prepended(prefix) == 0
    assert positions_prepended(llama_tiny) == 0  # a plain model
    with torch.no_grad():
        assert prompt(**small_batch()).logits.shape[1] == n + 7  # the n virtual positions come first
        assert prefix(**small_batch()).logits.shape[1] == 7


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
