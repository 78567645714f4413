"""Many adapters on one base: switching equals a standalone PeftModel, disable/delete, mixed-adapter batches
equal per-row runs, weighted combinations equal the hand-computed ΔW (and "linear" its documented formula)."""

import pytest
import torch

from conftest import make_gpt2_tiny, make_llama_tiny
from minipeft import LoRAConfig, UserError, get_peft_model, load_adapter
from minipeft.methods.bitfit import BitFitConfig
from minipeft.methods.ia3 import IA3Config
from minipeft.inference.multi_adapter import MultiAdapterModel, MultiLoRALinear, combine_lora_weights
from minipeft.methods.prefix import PrefixTuningConfig

FACTORIES = {"gpt2": make_gpt2_tiny, "llama": make_llama_tiny}


def perturbed(peft_model, seed):
    """Give every adapter parameter a visible, seeded value (fresh adapters are often the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in peft_model.adapter_parameters().values():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return peft_model


def saved_adapter(factory, config, directory, seed):
    peft_model = perturbed(get_peft_model(factory(), config), seed)
    peft_model.save_adapter(directory)
    return directory


def standalone_logits(factory, directory, batch):
    return load_adapter(factory(), directory)(**batch).logits


def lora_config(family, r=4, **kwargs):
    targets = ["c_attn", "c_fc"] if family == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    return LoRAConfig(r=r, lora_alpha=2 * r, target_modules=targets, **kwargs)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 1000, (3, 10), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@pytest.mark.parametrize("family", list(FACTORIES))
def test_switching_between_methods_equals_each_adapter_alone(family, batch, tmp_path):
    factory = FACTORIES[family]
    configs = {"lora": lora_config(family), "ia3": IA3Config(), "prefix": PrefixTuningConfig(num_virtual_tokens=3),
               "bitfit": BitFitConfig()}
    directories = {name: saved_adapter(factory, config, tmp_path / name, seed)
                   for seed, (name, config) in enumerate(configs.items())}
    base_logits = factory()(**batch).logits
    model = MultiAdapterModel(factory())
    for name, directory in directories.items():
        model.load_adapter(directory, name)
    assert model.list_adapters() == list(configs) and model.active_adapter is None
    assert torch.equal(model(**batch).logits, base_logits)  # loading activates nothing
    for name in ["bitfit", "lora", "prefix", "ia3", "bitfit", "lora"]:  # back and forth, base tensors too
        model.set_adapter(name)
        expected = standalone_logits(factory, directories[name], batch)
        torch.testing.assert_close(model(**batch).logits, expected, atol=1e-6, rtol=0)
        assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter does change the outputs
        with model.disable_adapters():
            assert torch.equal(model(**batch).logits, base_logits)
        assert model.active_adapter == name
        if name == "prefix":  # generation goes through the active adapter too (its prefix in the KV cache)
            expected_tokens = load_adapter(factory(), directories[name]).generate(batch["input_ids"], max_new_tokens=3)
            assert torch.equal(model.generate(batch["input_ids"], max_new_tokens=3), expected_tokens)
    model.set_adapter(None)
    assert torch.equal(model(**batch).logits, base_logits)


def test_base_tensors_trained_in_place_are_restored_exactly(batch):
    base = make_gpt2_tiny()
    original_bias = base.transformer.h[0].ln_1.bias.detach().clone()
    model = MultiAdapterModel(base)
    model.add_adapter("bitfit", BitFitConfig())
    model.set_adapter("bitfit")
    with torch.no_grad():
        base.transformer.h[0].ln_1.bias.add_(1.0)  # "training" changes a base bias in place
    assert base.transformer.h[0].ln_1.bias.requires_grad
    model.set_adapter(None)
    assert torch.equal(base.transformer.h[0].ln_1.bias, original_bias)
    assert not any(parameter.requires_grad for parameter in base.parameters())
    model.set_adapter("bitfit")  # the trained value comes back, trainable again
    assert torch.equal(base.transformer.h[0].ln_1.bias, original_bias + 1.0)
    assert base.transformer.h[0].ln_1.bias.requires_grad


def test_delete_adapter_and_errors(batch, tmp_path):
    model = MultiAdapterModel(make_gpt2_tiny())
    model.add_adapter("a", lora_config("gpt2", init_lora_weights=False))
    model.add_adapter("b", lora_config("gpt2", r=2, init_lora_weights=False))
    model.set_adapter("a")
    logits_a = model(**batch).logits
    model.delete_adapter("a")
    assert model.list_adapters() == ["b"] and model.active_adapter is None
    assert torch.equal(model(**batch).logits, make_gpt2_tiny()(**batch).logits)
    with pytest.raises(UserError, match="'a' is not loaded"):
        model.set_adapter("a")
    with pytest.raises(UserError, match="new, non-empty name"):
        model.add_adapter("b", lora_config("gpt2"))
    model.set_adapter("b")
    assert not torch.allclose(model(**batch).logits, logits_a)
    model.save_adapter("b", tmp_path / "b")  # saving works from the model that holds it
    torch.testing.assert_close(standalone_logits(make_gpt2_tiny, tmp_path / "b", batch), model(**batch).logits)


def test_failed_load_leaves_the_model_unchanged(batch, tmp_path):
    saved_adapter(make_gpt2_tiny, lora_config("gpt2"), tmp_path / "gpt2-lora", seed=0)
    model = MultiAdapterModel(make_llama_tiny())
    with pytest.raises(UserError):
        model.load_adapter(tmp_path / "gpt2-lora", "wrong")
    assert model.list_adapters() == []
    assert torch.equal(model(**batch).logits, make_llama_tiny()(**batch).logits)


@pytest.mark.parametrize("family", list(FACTORIES))
def test_mixed_adapter_batch_equals_each_row_alone(family, batch):
    factory = FACTORIES[family]
    model = MultiAdapterModel(factory())
    # Different ranks (zero-padded to 8 in the stack), different targets, rsLoRA, and DoRA.
    model.add_adapter("r4", lora_config(family, r=4, init_lora_weights=False))
    model.add_adapter("r8", LoRAConfig(r=8, lora_alpha=4, use_rslora=True, init_lora_weights=False,
                                       target_modules=["c_proj"] if family == "gpt2" else ["o_proj", "up_proj"]))
    model.add_adapter("dora", lora_config(family, r=2, use_dora=True, init_lora_weights=False))
    rows = [["r4", None, "r8"], ["dora", "r8", "r4"], [None, None, "dora"]]
    for adapter_names in rows:
        mixed = model(**batch, adapter_names=adapter_names).logits
        for row, name in enumerate(adapter_names):
            model.set_adapter(name)
            alone = model(input_ids=batch["input_ids"][row:row + 1]).logits[0]
            torch.testing.assert_close(mixed[row], alone, atol=1e-5, rtol=0)
        model.set_adapter(None)
    assert not any(isinstance(module, MultiLoRALinear) for module in model.modules())  # swapped back out


def test_mixed_adapter_generation_equals_each_row_alone():
    model = MultiAdapterModel(make_llama_tiny())
    model.add_adapter("a", lora_config("llama", r=4, init_lora_weights=False))
    model.add_adapter("b", lora_config("llama", r=2, init_lora_weights=False))
    model.set_adapter("b")
    prompts = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([11, 12]), torch.tensor([13, 14, 15])]
    names = ["a", None, "b"]
    width = max(len(p) for p in prompts)
    input_ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), torch.ones_like(p)])
                        for p in prompts])
    mixed = model.generate(input_ids, attention_mask=mask, adapter_names=names, max_new_tokens=6)
    assert model.active_adapter == "b"  # restored afterwards
    for row, (prompt, name) in enumerate(zip(prompts, names)):
        model.set_adapter(name)
        alone = model.generate(prompt[None], max_new_tokens=6)
        assert torch.equal(mixed[row], alone[0])


def test_mixed_batch_refuses_adapters_that_cannot_be_picked_per_row(batch):
    model = MultiAdapterModel(make_gpt2_tiny())
    model.add_adapter("lora", lora_config("gpt2"))
    model.add_adapter("ia3", IA3Config())
    model.add_adapter("head", lora_config("gpt2", modules_to_save=["lm_head"]))
    for name in ("ia3", "head"):
        with pytest.raises(UserError, match=f"adapter '{name}': only LoRA/DoRA"):
            model(**batch, adapter_names=["lora", name, None])
    with pytest.raises(UserError, match="3 rows but 2 adapter names"):
        model(**batch, adapter_names=["lora", None])


# --- weighted combination ------------------------------------------------------------------------------------

def delta_weights(model, name):
    """``{module path: s · B @ A}`` (out, in) of one adapter, computed by hand from its layers."""
    adapter = model.get_adapter(name)
    return {path: layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
            for path, (_, layer) in adapter.layers.items()}


@pytest.fixture
def two_adapters():
    model = MultiAdapterModel(make_gpt2_tiny())
    model.add_adapter("a", LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    model.add_adapter("b", LoRAConfig(r=2, lora_alpha=6, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    return model


@pytest.mark.parametrize("combination_type, rank", [("cat", 6), ("svd", 6), ("svd", 12)])
def test_weighted_combination_equals_hand_computed_delta(two_adapters, combination_type, rank, batch):
    model, weights = two_adapters, (0.7, -1.3)
    new = model.add_weighted_adapter(["a", "b"], list(weights), "mix", combination_type,
                                     svd_rank=rank if combination_type == "svd" else None)
    assert new.config.r == rank and new.config.lora_alpha == rank  # scaling 1
    delta_a, delta_b = delta_weights(model, "a"), delta_weights(model, "b")
    combined = delta_weights(model, "mix")
    assert set(combined) == set(delta_b) and set(delta_a) < set(delta_b)  # the union of targets
    for path, delta in combined.items():
        expected = weights[0] * delta_a.get(path, 0) + weights[1] * delta_b[path]
        torch.testing.assert_close(delta, expected, atol=1e-5, rtol=0)
    # The combined adapter's forward equals the base model plus the hand-computed ΔW in every layer.
    model.set_adapter("mix")
    mixed_logits = model(**batch).logits
    model.set_adapter(None)
    base = model.base_model
    with torch.no_grad():
        for path in combined:
            layer = base.get_submodule(path)
            expected = weights[0] * delta_a.get(path, 0) + weights[1] * delta_b[path]
            layer.weight += expected.T  # GPT-2 Conv1D stores (in, out)
    torch.testing.assert_close(mixed_logits, base(**batch).logits, atol=1e-5, rtol=0)


def test_svd_below_the_full_rank_is_the_best_low_rank_approximation(two_adapters):
    model = two_adapters
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "low", "svd", svd_rank=3)
    delta_a, delta_b = delta_weights(model, "a"), delta_weights(model, "b")
    path = "transformer.h.0.attn.c_attn"
    full = delta_a[path] + delta_b[path]  # rank 6
    singular_values = torch.linalg.svdvals(full)
    error = torch.linalg.matrix_norm(delta_weights(model, "low")[path] - full)
    # Eckart–Young: the error of the best rank-3 approximation is the norm of the dropped singular values.
    torch.testing.assert_close(error, singular_values[3:].norm(), atol=1e-5, rtol=1e-4)


def test_linear_combination_is_peft_formula_not_the_weighted_sum():
    torch.manual_seed(0)
    a1, b1, a2, b2 = torch.randn(4, 16), torch.randn(24, 4), torch.randn(4, 16), torch.randn(24, 4)
    s1, s2, w1, w2 = 2.0, 0.5, 0.6, -0.3
    lora_a, lora_b = combine_lora_weights([(a1, b1, s1), (a2, b2, s2)], [w1, w2], "linear", 4)
    weighted_sum = w1 * s1 * b1 @ a1 + w2 * s2 * b2 @ a2
    # A = Σ sign(w)√|w s| A_i, B = Σ √|w s| B_i: the product has the cross terms B_1 A_2 and B_2 A_1.
    c1, c2 = (abs(w1 * s1)) ** 0.5, (abs(w2 * s2)) ** 0.5
    cross = c1 * (-c2) * b1 @ a2 + c2 * c1 * b2 @ a1
    torch.testing.assert_close(lora_b @ lora_a, weighted_sum + cross, atol=1e-5, rtol=1e-5)
    assert (lora_b @ lora_a - weighted_sum).abs().max() > 0.1  # not Σ w ΔW
    single_a, single_b = combine_lora_weights([(a1, b1, s1)], [w1], "linear", 4)  # one adapter: exact
    torch.testing.assert_close(single_b @ single_a, w1 * s1 * b1 @ a1, atol=1e-5, rtol=1e-5)


def test_weighted_combination_errors(two_adapters):
    model = two_adapters
    with pytest.raises(UserError, match="linear needs equal ranks"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "x", "linear")
    with pytest.raises(UserError, match="one weight per adapter"):
        model.add_weighted_adapter(["a", "b"], [1], "x", "cat")
    with pytest.raises(UserError, match="combination_type"):
        model.add_weighted_adapter(["a", "b"], [1, 1], "x", "ties")
    model.add_adapter("dora", LoRAConfig(r=4, target_modules=["c_attn"], use_dora=True))
    with pytest.raises(UserError, match="'dora': only plain LoRA"):
        model.add_weighted_adapter(["a", "dora"], [1, 1], "x", "cat")
    assert model.list_adapters() == ["a", "b", "dora"]


@pytest.mark.oracle
@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
def test_weighted_combination_matches_peft(combination_type, tmp_path, batch):
    peft = pytest.importorskip("peft")
    r_b = 4 if combination_type == "linear" else 2
    configs = {"a": LoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn"]),
               "b": LoRAConfig(r=r_b, lora_alpha=6, target_modules=["c_attn"])}
    model = MultiAdapterModel(make_gpt2_tiny())
    for seed, (name, config) in enumerate(configs.items()):
        saved_adapter(make_gpt2_tiny, config, tmp_path / name, seed)
        model.load_adapter(tmp_path / name, name)
    model.add_weighted_adapter(["a", "b"], [0.8, 0.5], "mix", combination_type)
    model.set_adapter("mix")
    reference = peft.PeftModel.from_pretrained(make_gpt2_tiny(), str(tmp_path / "a"), adapter_name="a")
    reference.load_adapter(str(tmp_path / "b"), adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], [0.8, 0.5], "mix", combination_type=combination_type)
    reference.set_adapter("mix")
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, atol=1e-5, rtol=0)
