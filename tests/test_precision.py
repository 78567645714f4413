"""``--precision auto``: bf16 where the hardware computes it natively, fp32 elsewhere; and the evidence that
bf16 (frozen weights stored in bf16, LoRA in float32, autocast) trains as well as fp32."""

import math

import pytest
import torch

from minipeft.training import precision as precision_module
from minipeft.training.prepare import resolve_precision
from minipeft.training.precision import native_bf16
from tests.test_training_cli import builtin_model_available


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma", "amx_bf16", "amx_tile"}, "bf16"),
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),
    ({"avx2", "fma", "avx512f"}, "fp32"),  # bf16 would be emulated: many times slower than fp32
    (set(), "fp32"),  # /proc/cpuinfo unreadable (macOS, Windows): the safe choice
])
def test_auto_resolves_to_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, flags, expected):
    monkeypatch.setattr(precision_module, "cpu_flags", lambda: frozenset(flags))
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"  # an explicit choice is kept
    assert native_bf16(torch.device("meta")) is False  # other devices: fp32


def test_auto_on_cuda_follows_the_gpu(monkeypatch):
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert resolve_precision("auto", torch.device("cuda")) == expected


@pytest.mark.slow
@pytest.mark.skipif(not builtin_model_available(), reason="the built-in model (minipeft/builtin/model) is not built")
def test_bf16_and_fp32_training_reach_the_same_eval_loss_within_2_percent(tmp_path):
    """200 LoRA steps on the built-in model and data from the same seed, fp32 against bf16: the final eval
    losses agree within 2% (relative), and both learned (each below 0.8× the loss before training)."""
    from minipeft import get_peft_model
    from minipeft.data import build_dataloaders
    from minipeft.data.config import DataConfig
    from minipeft.methods.lora import LoRAConfig
    from minipeft.loading.models import load_model_and_tokenizer
    from minipeft.training.config import TrainingConfig
    from minipeft.training.loop import train

    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model, tokenizer = load_model_and_tokenizer("builtin")
        peft_model = get_peft_model(model, LoRAConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"]))
        train_loader, val_loader, _ = build_dataloaders(DataConfig(batch_size=4, max_length=64, val_size=32, cache_dir=None),
                                                        tokenizer, progress=False)
        result = train(peft_model, train_loader, val_loader, TrainingConfig(
            output_dir=str(tmp_path / precision), max_steps=200, eval_every=200, learning_rate=2e-3,
            precision=precision, device="cpu", log_every=1000, save_every=1000))
        results[precision] = result.state
    fp32, bf16 = results["fp32"].eval_loss, results["bf16"].eval_loss
    assert math.isfinite(bf16) and abs(bf16 - fp32) <= 0.02 * fp32, (fp32, bf16)
    for state in results.values():
        assert state.eval_loss < 0.8 * state.eval_loss_before, state
