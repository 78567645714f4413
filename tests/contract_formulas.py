"""The trainable-parameter formulas of the built-in methods, for the contract suite (tests/test_method_contract.py,
promise (b)): each written from the count its method's docstring states, from the model's shapes alone.

A method added later brings its own formula, ``contract_trainable_count(shapes, config) -> int`` in its own
test module ``tests/test_<name>.py`` (it may import :func:`linears` and :class:`Shapes` from here).
"""

import dataclasses
import importlib


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


def from_own_tests(method: str, name: str, default=None):
    """``name`` from the method's own test module ``tests/test_<method>.py``, else ``default``: what a method
    added later brings to the shared suites without an edit to them (its count formula, its tiny settings)."""
    try:
        module = importlib.import_module(f"tests.test_{method}")
    except ModuleNotFoundError as error:
        if error.name != f"tests.test_{method}":
            raise
        return default
    return getattr(module, name, default)


def trainable_formula(method: str):
    """The count formula of ``method``: :data:`TRAINABLE_FORMULAS`, else ``contract_trainable_count`` in the
    method's own test module ``tests/test_<method>.py``, else None."""
    if method in TRAINABLE_FORMULAS:
        return TRAINABLE_FORMULAS[method]
    return from_own_tests(method, "contract_trainable_count")
