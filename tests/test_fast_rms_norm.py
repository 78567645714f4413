"""The memory-lean RMSNorm (:mod:`minipeft.fast.rms_norm`) computes what transformers' LlamaRMSNorm
computes: the same output bits, gradients within float32 rounding (float32) or one bf16 rounding (bf16);
it is swapped in for a run and taken out afterwards."""

from contextlib import nullcontext

import pytest
import torch
from training_fixtures import one_thread  # noqa: F401
from training_fixtures import ListLoader, assert_same_training_steps, make_batches, tiny_model, tiny_peft_model
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from minipeft.fast.rms_norm import LeanRMSNorm, RMSNormFunction, use_memory_lean_rms_norm
from minipeft.training import TrainingConfig, train


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_output_and_gradients_as_llamas_norm(dtype):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(48, dtype=dtype)
    x = (torch.randn(4, 7, 48) * 3).to(dtype).requires_grad_()
    grad = torch.randn(4, 7, 48).to(dtype)

    expected = norm(x)
    expected_grad_x, expected_grad_weight = torch.autograd.grad(expected, (x, norm.weight), grad)
    output = RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    grad_x, grad_weight = torch.autograd.grad(output, (x, norm.weight), grad)

    assert torch.equal(output, expected)  # the forward is transformers' own, operation for operation
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_x, expected_grad_x, **tolerance)
    torch.testing.assert_close(grad_weight, expected_grad_weight, **tolerance)
    assert grad_x.dtype == dtype and grad_weight.dtype == dtype


def test_swapped_for_the_run_and_put_back():
    """Each norm is replaced by a LeanRMSNorm module holding the same weight (no instance's forward is
    assigned), the logits stay the same bits, and the very same norm objects are back afterwards."""
    model = tiny_model("llama")
    norms = {name: module for name, module in model.named_modules() if isinstance(module, LlamaRMSNorm)}
    keys = list(model.state_dict())
    batch = make_batches(1, rows=2, length=12, seed=4)[0]
    expected = model(input_ids=batch["input_ids"]).logits
    with use_memory_lean_rms_norm(model) as swapped:
        assert swapped == len(norms) == 2 * model.config.num_hidden_layers + 1
        for name, norm in norms.items():
            lean = model.get_submodule(name)
            assert isinstance(lean, LeanRMSNorm) and lean.weight is norm.weight
        assert list(model.state_dict()) == keys  # checkpoints written during the run keep their names
        assert not [name for name, module in model.named_modules() if "forward" in vars(module)]
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, expected, rtol=0, atol=0)
    assert all(model.get_submodule(name) is norm for name, norm in norms.items())
    with use_memory_lean_rms_norm(tiny_model("gpt2")) as swapped:
        assert swapped == 0  # GPT-2's LayerNorm is torch's own fused kernel: left alone


class LlamaRMSNormOfAnotherRelease(LlamaRMSNorm):
    """What a future transformers might ship under the same name: Gemma's ``(1 + w)`` scaling."""

    def forward(self, hidden_states):
        return super().forward(hidden_states) / self.weight * (1 + self.weight)


LlamaRMSNormOfAnotherRelease.__name__ = "LlamaRMSNorm"


def test_a_norm_that_computes_something_else_is_left_alone_and_said():
    model = tiny_model("llama")
    layer = model.model.layers[0]
    changed = LlamaRMSNormOfAnotherRelease(64, eps=1e-5)
    changed.weight.data = torch.randn(64)
    layer.input_layernorm = changed
    heard = []
    with use_memory_lean_rms_norm(model, heard.append) as swapped:
        assert swapped == 2 * model.config.num_hidden_layers  # all but the changed one
        assert layer.input_layernorm is changed
    assert len(heard) == 1 and "its forward computes something else" in heard[0]


def test_putting_back_never_raises(monkeypatch):
    """A norm replaced during the run (by another tool) is left where it is, with one warning."""
    model = tiny_model("llama")
    heard = []
    with use_memory_lean_rms_norm(model, heard.append):
        stranger = torch.nn.Identity()
        model.model.layers[1].post_attention_layernorm = stranger
    assert model.model.layers[1].post_attention_layernorm is stranger
    assert isinstance(model.model.layers[0].input_layernorm, LlamaRMSNorm)
    assert len(heard) == 1 and "post_attention_layernorm was replaced during the run" in heard[0]


def test_training_a_llama_goes_through_it_and_learns_the_same(tmp_path, monkeypatch):
    """train() uses it (counted), and the run's losses equal those of a run with transformers' norm."""
    calls = []
    original = RMSNormFunction.forward
    monkeypatch.setattr(RMSNormFunction, "forward", staticmethod(lambda *args: calls.append(1) or original(*args)))
    batches = make_batches(3, rows=2, length=12, seed=5)
    settings = dict(epochs=1, learning_rate=1e-2, log_every=100, device="cpu", precision="fp32")
    lean = tiny_peft_model("lora", family="llama")
    train(lean, ListLoader(batches, shuffle=False), None,
          TrainingConfig(output_dir=str(tmp_path / "lean"), **settings))
    assert calls
    monkeypatch.setattr("minipeft.fast.use_memory_lean_rms_norm", lambda model, warn: nullcontext())
    plain = tiny_peft_model("lora", family="llama")
    train(plain, ListLoader(batches, shuffle=False), None,
          TrainingConfig(output_dir=str(tmp_path / "plain"), **settings))
    assert_same_training_steps(tmp_path / "lean", tmp_path / "plain", steps=3)
