"""Every registered method on a 4-bit (NF4) base either works (applies, trains a step, saves an adapter that
records the 4-bit base) or is refused before anything is loaded or written: one ``error:`` line naming
``--quantize nf4`` and the method, exit status 2. Which one is the method's own record
(``Method.why_not_on_4bit``), so a new method is in this test by being registered."""

import json

import pytest
import torch
from training_fixtures import one_thread  # noqa: F401

from minipeft.cli import run
from minipeft.quantization.nf4 import Linear4bit, quantize_model
from minipeft.methods import METHODS
from minipeft.model.peft_model import get_peft_model

REFUSED = [name for name, method in METHODS.items() if method.why_not_on_4bit]
WORKING = [name for name in METHODS if name not in REFUSED]


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    from data_fixtures import save_tiny_run_inputs

    return save_tiny_run_inputs(tmp_path_factory.mktemp("tiny_nf4_methods"), width=64)


def train_args(inputs, output_dir, method):
    model_dir, records = inputs
    return ["--model", str(model_dir), "--dataset_path", str(records), "--no_cache", "--output_dir", str(output_dir),
            "--batch_size", "4", "--max_steps", "1", "--quantize", "nf4", "--modification_type", method]


def test_the_registry_has_both_kinds_and_the_working_ones_include_the_adapters():
    assert set(REFUSED) == {"selective", "bitfit"}  # they train base weights; a 4-bit base is frozen
    assert {"lora", "dora", "ia3", "adapter", "prefix", "prompt"} <= set(WORKING)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_works_on_nf4_or_is_refused_before_loading(tiny_inputs, tmp_path, capsys, monkeypatch, method):
    from minipeft.cli.train import main as train_main
    import minipeft.loading.streaming

    output_dir = tmp_path / "run"
    if method in REFUSED:
        def no_loading(*args, **kwargs):
            raise AssertionError("the base model was loaded before the refusal")

        monkeypatch.setattr(minipeft.loading.streaming, "load_base_model", no_loading)
        assert run(train_main, train_args(tiny_inputs, output_dir, method)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --quantize nf4 with --modification_type " + method), err
        assert "--quantize none" in err[0]
        assert not output_dir.exists()  # nothing written
        return
    assert run(train_main, train_args(tiny_inputs, output_dir, method)) == 0
    out = capsys.readouterr().out
    assert "Quantized 8 linear layers to NF4" in out and "Trained 1 step in" in out
    config = json.loads((output_dir / "adapter" / "adapter_config.json").read_text())
    assert config["minipeft"]["quantization"]["quantize"] == "nf4"
    assert (output_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 0


def test_modify_refuses_the_same_methods_before_loading(tiny_inputs, capsys, monkeypatch):
    from minipeft.cli.modify import main as modify_main
    import minipeft.cli.modify

    monkeypatch.setattr(minipeft.cli.modify, "load_model_for_counting",
                        lambda *args, **kwargs: pytest.fail("loaded before the refusal"))
    for method in REFUSED:
        assert run(modify_main, ["--model", str(tiny_inputs[0]), "--quantize", "nf4", "--modification_type",
                                 method]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--quantize nf4 with --modification_type {method}" in err[0]


def test_bottleneck_adapters_wrap_4bit_projections_and_start_as_the_identity(tiny_model_factory, sample_batch):
    from minipeft.methods.adapter import AdapterConfig, ProjectionWithAdapter

    model = tiny_model_factory()
    quantize_model(model, compute_dtype=torch.float32)
    with torch.no_grad():
        before = model(**sample_batch).logits
    peft_model = get_peft_model(model, AdapterConfig())
    wrapped = [m for m in peft_model.modules() if isinstance(m, ProjectionWithAdapter)]
    assert wrapped and all(isinstance(m.base_layer, Linear4bit) for m in wrapped)
    with torch.no_grad():
        assert torch.equal(peft_model(**sample_batch).logits, before)  # up = 0: the 4-bit base's own output
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in name for name in trainable)
