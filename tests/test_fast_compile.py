"""``--compile`` (:mod:`minipeft.fast.compile`): the compiled blocks train as the eager ones do, and
everything is put back afterwards.

Compiling costs tens of seconds of C++ on 2 cores, so the suite compiles one training run (tiny Llama, the
family of SmolLM2, LoRA on every projection) and compares it with the same run in eager mode: the same
per-step losses and gradient norms within 1e-5 relative, the same adapter within 1e-5 (float32 throughout;
Inductor may sum in another order, nothing else differs). Where no C++ compiler exists these tests skip,
and ``--compile`` says so in one error line (checked without compiling).
"""

import shutil

import pytest
import torch
from torch._dynamo.utils import counters
from training_fixtures import one_thread  # noqa: F401
from training_fixtures import (ListLoader, adapter_tensors, assert_same_training_steps, make_batches, read_records,
                               tiny_model)

from minipeft import get_peft_model
from minipeft.core.errors import UserError
from minipeft.core.layers import transformer_blocks
from minipeft.fast.compile import check_compiler_available, compiled_blocks
from minipeft.fast.lora_dropout import dropout_by_gaps
from minipeft.methods.lora import LoRAConfig, LoRALinear
from minipeft.training import TrainingConfig, train

HAS_COMPILER = any(shutil.which(name) for name in ("g++", "c++", "clang++"))
# torch.compile's own import of torch.jit warns about torch.jit; the suite turns warnings into errors.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
needs_compiler = pytest.mark.skipif(not HAS_COMPILER, reason="torch.compile on a CPU needs a C++ compiler")


def lora_on_every_projection(seed: int = 0):
    model = tiny_model("llama", seed=seed)
    torch.manual_seed(seed + 1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoRAConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))


@needs_compiler
def test_compiled_run_trains_like_the_eager_one_and_puts_everything_back(tmp_path):
    batches = make_batches(4, rows=2, length=12, seed=3)
    batches[1] = {name: tensor[:, :9] for name, tensor in batches[1].items()}  # another length: no recompile
    settings = dict(epochs=1, learning_rate=1e-2, log_every=100, device="cpu", precision="fp32", max_grad_norm=0.0)
    eager, compiled = lora_on_every_projection(), lora_on_every_projection()
    attention_before = compiled.base_model.config._attn_implementation
    train(eager, ListLoader(batches, shuffle=False), ListLoader(batches[:1], shuffle=False),
          TrainingConfig(output_dir=str(tmp_path / "eager"), **settings))
    graphs_before = counters["stats"]["unique_graphs"]
    train(compiled, ListLoader(batches, shuffle=False), ListLoader(batches[:1], shuffle=False),
          TrainingConfig(output_dir=str(tmp_path / "compiled"), compile=True, **settings))
    assert counters["stats"]["unique_graphs"] > graphs_before  # the blocks did go through the compiler

    assert_same_training_steps(tmp_path / "compiled", tmp_path / "eager", steps=4)
    eager_evals = read_records(tmp_path / "eager" / "metrics.jsonl", "eval")
    compiled_evals = read_records(tmp_path / "compiled" / "metrics.jsonl", "eval")
    assert [record["eval_loss"] for record in compiled_evals] == pytest.approx(
        [record["eval_loss"] for record in eager_evals], rel=1e-5)
    for name, tensor in adapter_tensors(eager).items():
        torch.testing.assert_close(adapter_tensors(compiled)[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # put back: uncompiled blocks, no forward assigned on any instance, the attention and cache settings
    assert all(block._compiled_call_impl is None for block in transformer_blocks(compiled))
    assert not [name for name, module in compiled.named_modules() if "forward" in vars(module)]
    assert compiled.base_model.config._attn_implementation == attention_before
    assert compiled.base_model.config.use_cache is True


def test_attention_that_cannot_be_switched_or_put_back_is_a_warning_not_a_traceback(monkeypatch):
    """A transformers release whose ``set_attn_implementation`` refuses: --compile goes on with the model's own
    attention and says so; leaving the context never raises (nothing is compiled until the first call)."""
    peft_model = lora_on_every_projection()
    model = peft_model.base_model
    model.config._attn_implementation = "sdpa"

    def refuse(implementation):
        raise ValueError(f"{implementation} is not supported")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    heard = []
    with compiled_blocks(peft_model, torch.device("cpu"), heard.append):
        assert all(block._compiled_call_impl is not None for block in transformer_blocks(peft_model))
    assert len(heard) == 1 and "could not set the attention implementation to 'eager'" in heard[0]
    assert model.config._attn_implementation == "sdpa"
    assert all(block._compiled_call_impl is None for block in transformer_blocks(peft_model))


@needs_compiler
def test_lora_dropout_under_compile_is_dropout():
    """Compiled, the LoRA branch with dropout by gaps (what a CPU run swaps in) still drops each input entry with
    probability p and scales the rest by 1 / (1 - p) (the mask is drawn eagerly, outside the graph)."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(64, 64), r=64, alpha=64, dropout=0.25, init_lora_weights=False)
    layer.base_layer.weight.data.zero_()
    layer.base_layer.bias.data.zero_()
    layer.lora_A.weight.data = torch.eye(64)  # B A x / (1 - p) with A = B = I and s = 1: x ⊙ mask / (1 - p)
    layer.lora_B.weight.data = torch.eye(64)
    layer.train()
    x = torch.ones(256, 64)
    with dropout_by_gaps(layer):
        output = torch.compile(layer)(x)
    dropped = (output == 0).float().mean().item()
    assert dropped == pytest.approx(0.25, abs=5 * (0.25 * 0.75 / x.numel()) ** 0.5)
    torch.testing.assert_close(output[output != 0], torch.full_like(output[output != 0], 1 / 0.75))


def test_compile_without_a_compiler_is_one_error_line(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="--compile on a CPU needs a C.. compiler"):
        check_compiler_available(torch.device("cpu"))
    check_compiler_available(torch.device("cuda"))  # Inductor writes Triton kernels on a GPU: no C++ needed
