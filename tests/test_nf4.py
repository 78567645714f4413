"""QLoRA's 4-bit base: Linear4bit computes x·W_nf4ᵀ + b for nn.Linear and Conv1D, LoRA/DoRA/IA3 train on it,
the memory arithmetic of the docstring holds, counts follow peft, merging dequantizes, and misuse is one line
with exit status 2. (Bit-for-bit equality with bitsandbytes: test_nf4_oracle.py.)"""

import json
import math
import re

import pytest
import torch
from torch import nn
from training_fixtures import one_thread  # noqa: F401
from transformers.pytorch_utils import Conv1D

from minipeft.cli import run
from minipeft.core.errors import UserError
from minipeft.methods.ia3 import IA3Config
from minipeft.core.inject import count_parameters
from minipeft.methods.lora import LoRAConfig
from minipeft.quantization.nf4 import Linear4bit, dequantize_model, memory_stats, quantize_model
from minipeft.quantization.nf4_format import dequantize_nf4, quantize_nf4
from minipeft.model.peft_model import get_peft_model
from tests.conftest import train_steps


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_linear4bit_computes_with_the_dequantized_weight_in_the_original_layout(kind):
    torch.manual_seed(0)
    layer = nn.Linear(128, 96) if kind == "linear" else Conv1D(96, 128)  # both: in 128, out 96
    quantized = Linear4bit(layer, compute_dtype=torch.float32)
    weight_out_in = layer.weight.T if kind == "conv1d" else layer.weight  # (96, 128)
    assert torch.equal(quantized.dequantize(), dequantize_nf4(quantize_nf4(weight_out_in.detach())))
    assert quantized.weight.shape == layer.weight.shape  # the original layout, (in, out) for Conv1D
    x = torch.randn(2, 5, 128, requires_grad=True)
    expected = x @ quantized.dequantize().T + layer.bias
    result = quantized(x)
    assert result.shape == (2, 5, 96)
    assert torch.allclose(result, expected, atol=1e-5)
    # the error of 4 bits is small but real: compare with the float layer
    assert 0 < (result - layer(x)).abs().max() < 0.1 * layer(x).abs().max()
    # backward: only x gets a gradient, and it is W_nf4ᵀ · grad
    result.sum().backward()
    assert torch.allclose(x.grad, torch.ones(2, 5, 96) @ quantized.dequantize(), atol=1e-5)
    assert [name for name, _ in quantized.named_parameters()] == ["bias"]
    assert not quantized.bias.requires_grad
    dense = quantized.to_dense()
    assert type(dense) is type(layer) and torch.equal(dense.weight, quantized.weight)


def test_compute_dtype_bf16_returns_the_input_dtype():
    layer = Linear4bit(nn.Linear(64, 32), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 64)
    result = layer(x)
    assert result.dtype == torch.float32
    expected = (x.bfloat16() @ layer.dequantize(torch.bfloat16).T + layer.bias.bfloat16()).float()
    assert torch.equal(result, expected)


def test_memory_is_four_bits_plus_double_quantized_scales():
    weight = torch.randn(1536, 576)  # SmolLM2's MLP shape: n = 884,736 weights, 13,824 blocks
    n = weight.numel()
    nf4 = quantize_nf4(weight, double_quant=True)
    assert nf4.nbytes() == n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4  # codes, 8-bit absmax, scales, offset
    assert 8 * nf4.nbytes() / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-3)  # ≈ 4.127 bits
    assert 8 * quantize_nf4(weight, double_quant=False).nbytes() / n == 4 + 32 / 64  # 4.5 bits


def test_quantize_model_keeps_embeddings_norms_and_the_head_unless_asked(tiny_model_factory):
    model = tiny_model_factory()
    linear_names = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, Conv1D))]
    names = quantize_model(model)
    head = model.get_output_embeddings()
    assert not isinstance(head, Linear4bit) and set(names) == set(linear_names) - {"lm_head"}
    assert all(isinstance(model.get_submodule(name), Linear4bit) for name in names)
    assert isinstance(tiny_model_factory(), nn.Module)
    model = tiny_model_factory()
    assert "lm_head" in quantize_model(model, quantize_lm_head=True)
    assert isinstance(model.get_output_embeddings(), Linear4bit)


def test_counts_follow_peft_and_memory_stats_are_real_bytes(tiny_model_factory):
    model = tiny_model_factory()
    float_total = count_parameters(model).total
    quantize_model(model)
    # peft counts a packed byte as 2 parameters: the total is the float model's (every weight count is even here)
    assert count_parameters(model).total == float_total
    stats = memory_stats(model)
    assert stats.float_params_total == float_total
    buffers = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, Linear4bit)
                  for b in m.buffers())
    assert stats.linear_nf4_bytes == buffers
    assert stats.linear_float_bytes == 4 * stats.linear_params
    lines = "\n".join(stats.lines())
    assert "real bytes" in lines and "2 per byte" in lines


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_adapters_train_on_a_4bit_base_and_leave_it_unchanged(tiny_model_factory, sample_batch, method):
    model = tiny_model_factory()
    quantize_model(model, compute_dtype=torch.float32)
    frozen = {name: buffer.clone() for name, buffer in model.named_buffers()}
    config = IA3Config() if method == "ia3" else LoRAConfig(r=4, lora_alpha=8, use_dora=method == "dora")
    peft_model = get_peft_model(model, config)
    adapted = [m for m in peft_model.modules() if hasattr(m, "adapter_enabled")]
    assert adapted and all(isinstance(m.base_layer, Linear4bit) for m in adapted)
    learning_rate = 0.1 if method == "ia3" else 1e-2  # IA3's few scales need a larger step
    losses = train_steps(peft_model, sample_batch, steps=8, lr=learning_rate)
    assert losses[-1] < losses[0] - 0.05
    for name, buffer in peft_model.base_model.named_buffers():
        key = name.replace(".base_layer", "")
        if key in frozen:
            assert torch.equal(buffer, frozen[key]), name


def test_merging_into_4bit_refuses_and_dequantizing_first_merges_exactly(tiny_model_factory, sample_batch):
    model = tiny_model_factory()
    quantize_model(model, compute_dtype=torch.float32)
    peft_model = get_peft_model(model, LoRAConfig(r=4, lora_alpha=8, init_lora_weights=False))
    with pytest.raises(UserError, match="cannot merge into a 4-bit"):
        peft_model.merge_and_unload()
    with torch.no_grad():
        before = peft_model(**sample_batch).logits
        assert dequantize_model(peft_model.base_model) > 0
        assert torch.allclose(peft_model(**sample_batch).logits, before, atol=1e-5)  # same weights, float layers
        merged = peft_model.merge_and_unload()
        assert torch.allclose(merged(**sample_batch).logits, before, atol=1e-4)


# --- command line ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    from data_fixtures import save_tiny_run_inputs

    return save_tiny_run_inputs(tmp_path_factory.mktemp("tiny_nf4"), width=64)


def train_args(inputs, output_dir, *extra):
    model_dir, records = inputs
    return ["--model", str(model_dir), "--dataset_path", str(records), "--no_cache", "--output_dir", str(output_dir),
            "--batch_size", "4", "--max_steps", "3", "--log_every", "1", *extra]


def test_train_generate_and_merge_on_nf4(tiny_inputs, tmp_path, capsys):
    from minipeft.cli.generate import main as generate_main
    from minipeft.cli.merge import main as merge_main
    from minipeft.cli.train import main as train_main

    assert run(train_main, train_args(tiny_inputs, tmp_path / "run", "--quantize", "nf4")) == 0
    out = capsys.readouterr().out
    assert "Quantized 8 linear layers to NF4" in out
    adapter = tmp_path / "run" / "adapter"
    recorded = json.loads((adapter / "adapter_config.json").read_text())
    assert recorded["minipeft"]["quantization"] == {"quantize": "nf4", "quantize_lm_head": False}
    assert recorded["fan_in_fan_out"] is True  # GPT-2's Conv1D, as on the float base

    assert run(generate_main, ["--adapter", str(adapter), "--prompt", "hi", "--max_new_tokens", "3",
                               "--no_stream"]) == 0
    err = capsys.readouterr().err
    assert "the adapter was trained on a 4-bit (nf4) base" in err and "Quantized 8 linear layers" in err

    assert run(merge_main, ["--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--requantize"]) == 0
    out = capsys.readouterr().out
    assert "dequantized to float32" in out and "ΔW is added in float32" in out
    requantized = json.loads((tmp_path / "merged" / "minipeft_merge.json").read_text())
    assert requantized["max_abs_logit_difference"] < 1e-3  # merge into the dequantized base: exact
    assert requantized["max_abs_logit_difference_requantized"] > 1e-3  # re-quantizing rounds: measured
    assert f"{requantized['max_abs_logit_difference_requantized']:.2e}" in out


@pytest.mark.parametrize("extra, message", [
    (["--quantize", "nf8"], "--quantize 'nf8': choose none or nf4"),
    (["--quantize_lm_head"], "--quantize_lm_head needs --quantize nf4"),
    (["--quantize", "nf4", "--modification_type", "selective", "--freeze_layers", "0"], "selective trains base"),
    (["--quantize", "nf4", "--modification_type", "bitfit"], "bitfit trains the biases"),
    (["--quantize", "nf4", "--lora_bias", "all"], "--lora_bias all"),
])
def test_quantize_mistakes_are_one_line_and_exit_status_2(tiny_inputs, tmp_path, capsys, extra, message):
    from minipeft.cli.train import main as train_main

    assert run(train_main, train_args(tiny_inputs, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_a_quantized_or_adapter_folder_is_refused_as_base_model(tiny_inputs, tmp_path, capsys):
    from minipeft.cli.modify import main as modify_main

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert run(modify_main, ["--model", str(adapter), "--quantize", "nf4"]) == 2
    assert "is an adapter folder, not a base model" in capsys.readouterr().err
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    (quantized / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    assert run(modify_main, ["--model", str(quantized), "--quantize", "nf4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has a quantization_config (bitsandbytes)" in err[0]


def test_modify_prints_bytes_per_parameter_before_and_after(tiny_inputs, capsys):
    from minipeft.cli.modify import main as modify_main

    assert run(modify_main, ["--model", str(tiny_inputs[0]), "--quantize", "nf4", "--table", "none"]) == 0
    out = capsys.readouterr().out
    assert "Bytes per base parameter: 4.000 ->" in out and "bits per weight" in out
    assert "as peft does" in out


@pytest.mark.parametrize("precision, dtype", [("fp32", "float32"), ("bf16", "bfloat16")])
def test_precision_sets_the_compute_dtype_of_the_4bit_layers(tiny_inputs, tmp_path, capsys, precision, dtype):
    from minipeft.cli.train import main as train_main

    assert run(train_main, train_args(tiny_inputs, tmp_path / "run", "--quantize", "nf4", "--max_steps", "1",
                                      "--precision", precision)) == 0
    out = capsys.readouterr().out
    assert f"double quant; compute dtype {dtype})" in out


def test_the_summary_states_the_loss_change_of_quantizing(tiny_inputs, tmp_path, capsys):
    from minipeft.cli.train import main as train_main

    assert run(train_main, train_args(tiny_inputs, tmp_path / "run", "--quantize", "nf4", "--max_steps", "1",
                                      "--precision", "fp32")) == 0
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    line = next(line for line in out.splitlines() if line.startswith("Loss change of quantizing the base to NF4"))
    assert f"eval loss {metrics['eval_loss_float_base']:.4f} (float base) -> " \
           f"{metrics['eval_loss_nf4_base']:.4f} (NF4 base)" in line
    assert f"on the first {metrics['quantization_cost_batches']} validation batch(es)" in line
    # the NF4 side is the base this run trained on: a fresh LoRA (B = 0) leaves it as it is
    assert metrics["eval_loss_nf4_base"] == pytest.approx(metrics["eval_loss_before"], abs=1e-5)
    assert metrics["eval_loss_float_base"] != metrics["eval_loss_nf4_base"]
    assert re.search(r"generation [\d,.]+ tokens/s", out)


def test_quantization_cost_is_the_float_and_the_nf4_eval_loss_on_the_same_batches(tiny_model_factory, sample_batch):
    import contextlib
    import copy

    from minipeft.training.loss import causal_lm_loss_sum
    from minipeft.training.quantization_cost import measure_quantization_cost

    batch = {**sample_batch, "labels": sample_batch["input_ids"].clone()}
    model = tiny_model_factory()
    reference = copy.deepcopy(model)
    cost = measure_quantization_cost(model, [batch, batch], contextlib.nullcontext(), torch.device("cpu"),
                                     compute_dtype=torch.float32)
    assert any(isinstance(m, Linear4bit) for m in model.modules())  # quantized in place
    with torch.no_grad():
        nll, n = causal_lm_loss_sum(reference.eval(), batch)
        float_loss = (nll / n).item()
        quantize_model(reference, compute_dtype=torch.float32)
        nll, n = causal_lm_loss_sum(reference, batch)
    assert cost.float_loss == pytest.approx(float_loss, rel=1e-6)
    assert cost.nf4_loss == pytest.approx((nll / n).item(), rel=1e-6)
    assert cost.batches == 2 and cost.target_tokens == 2 * int(n)
    assert "+" in cost.line() or "-" in cost.line()


@pytest.mark.parametrize("value, shown", [(0.2134, "0.21"), (0.0456, "0.046"), (14.8, "15"), (578.3, "578"),
                                          (12345.6, "12,346"), (0.0, "0")])
def test_speeds_are_printed_in_significant_digits(value, shown):
    from minipeft.training.report import significant

    assert significant(value) == shown


def test_modify_states_the_loss_change_of_quantizing(tiny_inputs, capsys):
    from minipeft.cli.modify import main as modify_main

    assert run(modify_main, ["--model", str(tiny_inputs[0]), "--quantize", "nf4", "--table", "none"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"Loss change of quantizing the base to NF4: eval loss \d+\.\d{4} \(float base\) -> "
                        r"\d+\.\d{4} \(NF4 base\), [+-]\d+\.\d%, on the first 4 validation batch\(es\), [\d,]+ target "
                        r"tokens of the built-in data \(batch 8, (bf16|fp32)\)", line), line

@pytest.mark.parametrize("size", [64 * 37, 64 * 37 + 22, 1001])  # whole blocks, a ragged last block, odd
def test_quantizing_in_chunks_gives_the_same_bits(monkeypatch, size):
    """A large weight is quantized a chunk of whole blocks at a time (bounded temporaries, loading); the codes
    and absmaxes are those of quantizing it whole."""
    from minipeft.quantization import nf4_format

    weight = torch.randn(size, generator=torch.Generator().manual_seed(0))
    whole = quantize_nf4(weight)
    monkeypatch.setattr(nf4_format, "QUANTIZE_CHUNK", 256)  # 4 blocks per chunk
    chunked = quantize_nf4(weight)
    assert whole.tensors().keys() == chunked.tensors().keys()
    for name, tensor in whole.tensors().items():
        assert torch.equal(tensor, chunked.tensors()[name]), name


def test_modify_reads_a_large_model_folder_in_its_final_footprint(tiny_inputs, capsys, monkeypatch):
    """A model folder over ``MEASURED_UP_TO_BYTES`` in float32 (here: any, the bound lowered) goes through the
    tensor-by-tensor loader, quantized as it is read: the same counts as loading it whole, no float32 copy,
    and the loss change is said not to be measured rather than measured on a float model never held."""
    from minipeft.cli import modify

    assert run(modify.main, ["--model", str(tiny_inputs[0]), "--quantize", "nf4", "--table", "none"]) == 0
    whole = capsys.readouterr().out
    monkeypatch.setattr(modify, "MEASURED_UP_TO_BYTES", 0)
    assert run(modify.main, ["--model", str(tiny_inputs[0]), "--quantize", "nf4", "--table", "none"]) == 0
    streamed = capsys.readouterr().out
    assert "Loaded " in streamed and "Loaded " not in whole  # the checkpoint loader's one line
    assert "Quantized " in streamed and "not measured for a model this size" in streamed
    counts = [line for line in whole.splitlines() if line.startswith(("Trainable", "trainable"))]
    assert counts and counts == [line for line in streamed.splitlines() if line.startswith(("Trainable", "trainable"))]
