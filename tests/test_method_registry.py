"""The method registry: one ``METHOD`` record per module of ``minipeft/methods/``, found by discovery, holding
the objects themselves; and the record's hooks for method-level tensors (``save_extra`` / ``load_extra``),
checked with a small made-up method (not a real one), so that they are generic."""

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file

import minipeft.methods
from minipeft import LoRAConfig, UserError, get_peft_model, load_adapter
from minipeft.core.method import LAST, Method
from minipeft.methods import METHODS, default_learning_rate, method_for_config, method_for_peft_type
from minipeft.methods.lora import apply_lora
from tests.conftest import make_gpt2_tiny

# The order users see (--modification_type choices, compare): unchanged by the registry's rewrite.
BUILTIN_ORDER = ["lora", "dora", "ia3", "adapter", "prefix", "prompt", "selective", "bitfit"]


def test_every_module_of_the_methods_folder_is_a_registered_method():
    names = sorted(info.name for info in pkgutil.iter_modules(minipeft.methods.__path__))
    assert sorted(METHODS) == names  # a method's name is its module's name
    for name in names:
        assert importlib.import_module(f"minipeft.methods.{name}").METHOD is METHODS[name]


def test_methods_keep_the_order_users_see():
    assert list(METHODS)[:len(BUILTIN_ORDER)] == BUILTIN_ORDER
    assert [method.order for method in METHODS.values()] == sorted(method.order for method in METHODS.values())


def test_records_hold_direct_references():
    for name, method in METHODS.items():
        module = importlib.import_module(f"minipeft.methods.{name}")
        assert method.module == module.__name__
        assert getattr(module, method.apply.__name__) is method.apply  # the function itself, not its name
        assert dataclasses.is_dataclass(method.config_class) and isinstance(method.config_class, type)
        assert method.config_class.peft_type == method.peft_type
        assert method.learning_rate > 0 and method.learning_rate_source
        assert method.mergeable == (not method.why_not_mergeable)  # a refusal always says why
        assert default_learning_rate(name) == method.learning_rate


def test_config_and_peft_type_lookups():
    assert method_for_config(LoRAConfig()).name == "lora"
    assert method_for_config(LoRAConfig(use_dora=True)).name == "dora"  # DoRA is LoRA with use_dora, as in peft
    for name, method in METHODS.items():
        if method.config_class is not LoRAConfig:
            assert method_for_config(method.config_class()) is method
    assert method_for_peft_type("LORA").name == "lora"
    with pytest.raises(UserError, match="adapter_config.json: peft_type 'NOPE' is not supported"):
        method_for_peft_type("NOPE")
    with pytest.raises(UserError, match="int is not the config of a minipeft method"):
        method_for_config(3)


# --- method-level tensors: a made-up method with one tensor shared by all its layers ------------------------
SHARED_KEY = "base_model.shared_projection"


@dataclass
class SharedProjectionConfig(LoRAConfig):
    """LoRA plus one frozen random ``(r, 64)`` tensor kept by the model as a whole (like VeRA's projections)."""

    peft_type: ClassVar[str] = "SHARED_PROJECTION_TEST"


def apply_shared_projection(model, config):
    apply_lora(model, config)
    model.shared_projection = torch.randn(config.r, model.config.n_embd)


def save_shared_projection(peft_model) -> dict:
    return {SHARED_KEY: peft_model.base_model.shared_projection}


def load_shared_projection(peft_model, tensors: dict, source: str) -> None:
    for key in tensors:
        if key != SHARED_KEY:
            raise UserError(f"{source}: tensor {key} is not this method's")
    if SHARED_KEY not in tensors:
        raise UserError(f"{source}: tensor {SHARED_KEY} is missing")
    peft_model.base_model.shared_projection.copy_(tensors[SHARED_KEY])


@pytest.fixture
def shared_projection_method(monkeypatch):
    method = Method(name="shared_projection", config_class=SharedProjectionConfig, apply=apply_shared_projection,
                    peft_type="SHARED_PROJECTION_TEST", mergeable=True, learning_rate=1e-3,
                    learning_rate_source="a test", save_extra=save_shared_projection,
                    load_extra=load_shared_projection)
    monkeypatch.setitem(METHODS, method.name, method)
    return method


def test_method_tensors_are_saved_under_their_own_keys_and_loaded_back(shared_projection_method, tmp_path,
                                                                       sample_batch):
    assert shared_projection_method.order == LAST
    torch.manual_seed(1)
    peft_model = get_peft_model(make_gpt2_tiny(), SharedProjectionConfig(r=4, init_lora_weights=False))
    peft_model.save_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(tensors[SHARED_KEY], peft_model.base_model.shared_projection)  # exactly this key
    assert len(tensors) == 1 + 4  # the shared tensor, and lora_A, lora_B of 2 blocks

    torch.manual_seed(2)  # another random projection, replaced by the file's
    loaded = load_adapter(make_gpt2_tiny(), tmp_path)
    assert torch.equal(loaded.base_model.shared_projection, peft_model.base_model.shared_projection)
    assert torch.equal(loaded(**sample_batch).logits, peft_model(**sample_batch).logits)


def test_load_extra_gets_only_unclaimed_tensors_and_decides_about_them(shared_projection_method, tmp_path):
    get_peft_model(make_gpt2_tiny(), SharedProjectionConfig(r=4)).save_adapter(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({**tensors, "base_model.other": torch.zeros(2)}, path)
    with pytest.raises(UserError, match=r"adapter_model.safetensors: tensor base_model.other is not this method's"):
        load_adapter(make_gpt2_tiny(), tmp_path)
    save_file({key: value for key, value in tensors.items() if key != SHARED_KEY}, path)
    with pytest.raises(UserError, match="tensor base_model.shared_projection is missing"):
        load_adapter(make_gpt2_tiny(), tmp_path)


def test_without_load_extra_a_method_tensor_has_no_place(shared_projection_method, monkeypatch, tmp_path):
    get_peft_model(make_gpt2_tiny(), SharedProjectionConfig(r=4)).save_adapter(tmp_path)
    monkeypatch.setitem(METHODS, "shared_projection", dataclasses.replace(shared_projection_method,
                                                                          load_extra=None))
    with pytest.raises(UserError, match=r"tensor base_model.shared_projection has no place in this model"):
        load_adapter(make_gpt2_tiny(), tmp_path)
