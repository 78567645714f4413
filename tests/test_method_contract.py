"""The contract every method keeps, checked for every registered method on a GPT-2 and a Llama-GQA model.

One test per promise, parametrised over ``minipeft.methods.METHODS`` × {GPT-2 (``Conv1D``, fused ``c_attn``,
tied head), Llama (grouped-query attention: 4 query heads, 2 key/value heads, tied head)}, so a method added
to the registry is checked here with no edit to this file. It must bring one thing: its trainable-parameter
formula, a function ``contract_trainable_count(shapes, config) -> int`` in its own test module
``tests/test_<name>.py`` (the built-in methods' formulas are in :data:`TRAINABLE_FORMULAS` below); a method
without one fails :func:`test_trainable_count_equals_the_formula`, saying so. Test ids read ``lora-gpt2``,
``prefix-llama``, ...

The promises, each through the public API only (``get_peft_model``, ``PeftModel``, ``load_adapter``,
``METHODS[name]``):

(a) identity at init: a fresh adapter leaves the logits as the base model's (|Δ| ≤ 1e-6), except the
    methods in :data:`CHANGES_OUTPUT_BY_DESIGN` (prompt, prefix: the virtual tokens start random), whose
    output must differ, and whose ``disable_adapters()`` gives the base model back;
(b) formula count: trainable parameters equal a formula written from the method's docstring (below, or in
    the method's own test module), and the total is the base model's plus what the method adds (tied weights
    once);
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

Every check except (a) first perturbs the fresh adapter (``randomise_adapter``): a fresh adapter is the
identity by design, so saving, merging or disabling it would prove nothing.
"""

import dataclasses
import importlib

import pytest
import torch
from transformers import PreTrainedModel

from minipeft import UserError, count_parameters, get_peft_model, load_adapter
from minipeft.methods import METHODS
from tests.conftest import make_gpt2_tiny, make_llama_tiny, randomise_adapter

FAMILIES = {"gpt2": make_gpt2_tiny, "llama": make_llama_tiny}
CASES = [(method, family) for method in METHODS for family in FAMILIES]
CASE_IDS = [f"{method}-{family}" for method, family in CASES]
each_case = pytest.mark.parametrize("method, family", CASES, ids=CASE_IDS)

IDENTITY_TOLERANCE = 1e-6  # (a): every method that promises identity is in fact bit-identical today (|Δ| = 0);
#                            1e-6 leaves room for a method whose zero update is computed rather than skipped
MERGE_TOLERANCE = 1e-5     # (e): float32; peft's own merged-vs-unmerged figure on GPT-2 small is 3e-6

# Settings for the contract run, where a method's defaults are not what should be checked: DoRA is
# ``LoRAConfig(use_dora=True)`` as in peft; small sizes keep the tiny models tiny; selective freezes one of the
# two blocks so that "which blocks train" matters. A method not listed runs with its config's defaults.
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


# --- the models' shapes, read from their transformers configs ------------------------------------------------

@dataclasses.dataclass
class Shapes:
    """What the formulas need to know about a model, from its config alone.

    ``linears``: ``{suffix: (in, out)}`` of one block's projections (GPT-2's ``Conv1D`` included);
    ``block_norms`` / ``final_norm``: parameters per norm (GPT-2 LayerNorm: weight and bias; Llama RMSNorm:
    weight only); ``has_biases``: whether the projections have biases.
    """

    layers: int
    hidden: int
    kv_width: int  # key/value heads × head dim: the width of k, v and of a prefix per layer
    linears: dict
    block_norms: list
    final_norm: int
    has_biases: bool


def model_shapes(config) -> Shapes:
    if config.model_type == "gpt2":
        d, inner = config.n_embd, config.n_inner or 4 * config.n_embd
        return Shapes(layers=config.n_layer, hidden=d, kv_width=d,
                      linears={"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, inner),
                               "mlp.c_proj": (inner, d)},
                      block_norms=[2 * d, 2 * d], final_norm=2 * d, has_biases=True)
    if config.model_type == "llama":
        d, inner = config.hidden_size, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
        q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        assert not config.attention_bias and not config.mlp_bias
        return Shapes(layers=config.num_hidden_layers, hidden=d, kv_width=kv_width,
                      linears={"self_attn.q_proj": (d, q_width), "self_attn.k_proj": (d, kv_width),
                               "self_attn.v_proj": (d, kv_width), "self_attn.o_proj": (q_width, d),
                               "mlp.gate_proj": (d, inner), "mlp.up_proj": (d, inner), "mlp.down_proj": (inner, d)},
                      block_norms=[d, d], final_norm=d, has_biases=False)
    raise AssertionError(f"no shapes for {config.model_type}")


def family_of(shapes: Shapes) -> str:
    return "gpt2" if shapes.has_biases else "llama"


def linears(shapes: Shapes, suffixes) -> list:
    """``[(in, out)]`` of one block's projections whose name is or ends with one of ``suffixes``."""
    chosen = [shape for name, shape in shapes.linears.items()
              if any(name == suffix or name.endswith("." + suffix) for suffix in suffixes)]
    assert chosen, f"no projection of {sorted(shapes.linears)} ends with one of {suffixes}"
    return chosen


# --- (b) the formulas, one per method, as each method's docstring states them --------------------------------
# Each takes the model's shapes and the config the test passed (before get_peft_model fills in defaults), and
# writes the defaults it relies on out here, so a changed default fails loudly.

def lora_count(shapes: Shapes, config) -> int:
    """``r · (in + out)`` per adapted layer; default targets: GPT-2 ``c_attn``, Llama ``q_proj``, ``v_proj``."""
    targets = config.target_modules or {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}[family_of(shapes)]
    return shapes.layers * sum(config.r * (d_in + d_out) for d_in, d_out in linears(shapes, targets))


def dora_count(shapes: Shapes, config) -> int:
    """``r · (in + out) + out`` per adapted layer (LoRA's count plus the magnitude vector ``m``, ``(out,)``)."""
    targets = config.target_modules or {"gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}[family_of(shapes)]
    return shapes.layers * sum(config.r * (d_in + d_out) + d_out for d_in, d_out in linears(shapes, targets))


def ia3_count(shapes: Shapes, config) -> int:
    """``out`` per attention-side layer, ``in`` per feed-forward layer. Defaults: GPT-2 ``c_attn`` +
    ``mlp.c_proj`` (feed-forward); Llama ``k_proj``, ``v_proj`` + ``down_proj`` (feed-forward)."""
    attention, feedforward = {"gpt2": (["attn.c_attn"], ["mlp.c_proj"]),
                              "llama": (["k_proj", "v_proj"], ["down_proj"])}[family_of(shapes)]
    per_block = sum(d_out for _, d_out in linears(shapes, attention))
    per_block += sum(d_in for d_in, _ in linears(shapes, feedforward))
    return shapes.layers * per_block


def adapter_count(shapes: Shapes, config) -> int:
    """``2·d·m + d + m`` per adapter; Houlsby (the default): 2 per block, Pfeiffer: 1."""
    d, m = shapes.hidden, config.bottleneck_size
    per_block = 2 if config.adapter_type == "houlsby" else 1
    return shapes.layers * per_block * (2 * d * m + d + m)


def prefix_count(shapes: Shapes, config) -> int:
    """``n · 2L · token_dim`` without the MLP, ``token_dim = kv_heads · head_dim`` (grouped-query attention)."""
    assert not config.prefix_projection, "the MLP's count is n·td + (td + 1)·h + (h + 1)·2L·td; not written here"
    return config.num_virtual_tokens * 2 * shapes.layers * shapes.kv_width


def prompt_count(shapes: Shapes, config) -> int:
    """``n · d``: ``n`` virtual-token embeddings of the model's width."""
    return config.num_virtual_tokens * shapes.hidden


def selective_count(shapes: Shapes, config) -> int:
    """``Σ params(block i)`` for the blocks not in ``freeze_layers``, plus the final norm (on by default)."""
    assert not config.train_embeddings and not config.train_lm_head
    block = sum(d_in * d_out + (d_out if shapes.has_biases else 0) for d_in, d_out in shapes.linears.values())
    block += sum(shapes.block_norms)
    trained_blocks = shapes.layers - len({index % shapes.layers for index in config.freeze_layers})
    return trained_blocks * block + (shapes.final_norm if config.train_final_norm else 0)


def bitfit_count(shapes: Shapes, config) -> int:
    """``Σ len(b)``: every bias (GPT-2: each projection's and each LayerNorm's), and on a bias-less Llama one
    new zero bias per projection inside the blocks (``out`` each); RMSNorm has no bias to train."""
    assert config.target_modules is None
    projection_biases = sum(d_out for _, d_out in shapes.linears.values())
    if shapes.has_biases:  # LayerNorm bias = half of its parameters
        return shapes.layers * (projection_biases + sum(shapes.block_norms) // 2) + shapes.final_norm // 2
    return shapes.layers * projection_biases


TRAINABLE_FORMULAS = {
    "lora": lora_count,
    "dora": dora_count,
    "ia3": ia3_count,
    "adapter": adapter_count,
    "prefix": prefix_count,
    "prompt": prompt_count,
    "selective": selective_count,
    "bitfit": bitfit_count,
}


def trainable_formula(method: str):
    """The count formula of ``method``: :data:`TRAINABLE_FORMULAS`, else ``contract_trainable_count`` in the
    method's own test module ``tests/test_<method>.py``, else None."""
    if method in TRAINABLE_FORMULAS:
        return TRAINABLE_FORMULAS[method]
    try:
        module = importlib.import_module(f"tests.test_{method}")
    except ModuleNotFoundError as error:
        if error.name != f"tests.test_{method}":
            raise
        return None
    return getattr(module, "contract_trainable_count", None)


# --- helpers -------------------------------------------------------------------------------------------------

def contract_config(method: str):
    return METHODS[method].config_class(**CONTRACT_SETTINGS.get(method, {}))


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
                    "count its module docstring states (shapes: see Shapes in tests/test_method_contract.py)")
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
