"""modify_llm.py prints exact parameter statistics offline (GPT-2 small built from its config)."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest

import minipeft.cli.modify
from minipeft.cli import run
from minipeft.loading.models import build_from_known_config
from minipeft.cli.modify import main

ROOT = Path(__file__).resolve().parents[1]
GPT2_SMALL = 124_439_808


@pytest.fixture(scope="module")
def gpt2_small():
    return build_from_known_config("gpt2")


@pytest.fixture(autouse=True)
def build_gpt2_small_once(gpt2_small, monkeypatch):
    """main() builds GPT-2 small from its config (~5 s); here each call gets a copy of one built model."""
    def load_copy(name):
        assert name == "gpt2"
        print("note: gpt2 weights are not available offline; building the architecture from its config")
        return copy.deepcopy(gpt2_small), None
    monkeypatch.setattr(minipeft.cli.modify, "load_model_for_counting", load_copy)


def run_modify(capsys, *argv):
    code = run(main, list(argv) + ["--table", "none"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def stats(out):
    values = {}
    for line in out.splitlines():
        if line.startswith(("Total parameters:", "Trainable parameters:")):
            key, value = line.split(":")
            values[key] = int(value.strip().replace(",", ""))
    return values["Trainable parameters"], values["Total parameters"]


@pytest.mark.parametrize("argv, trainable", [
    # r·(d_in + d_out) × 12 blocks: 8·(768 + 2304)·12
    (["--modification_type", "lora", "--lora_rank", "8", "--target_modules", "c_attn"], 294_912),
    # the seed's flags: r=4, alpha 1.0 (c_attn by default for GPT-2)
    (["--modification_type", "lora", "--lora_rank", "4", "--lora_alpha", "1.0"], 147_456),
    # n · 2 · L · d = 50 · 2 · 12 · 768
    (["--modification_type", "prefix", "--prefix_length", "50"], 921_600),
    # n · d = 20 · 768
    (["--modification_type", "prompt", "--num_virtual_tokens", "20"], 15_360),
    # 2 adapters/block × 12 × (2·768·64 + 768 + 64)
    (["--modification_type", "adapter", "--adapter_size", "64"], 2_379_264),
    # 8 trainable blocks × 7,087,872 + final LayerNorm (768 + 768)
    (["--modification_type", "selective", "--freeze_layers", "0,1,2,3"], 8 * 7_087_872 + 1_536),
])
def test_counts_match_formulas(capsys, argv, trainable):
    code, out, _ = run_modify(capsys, *argv)
    assert code == 0
    added = 0 if argv[1] == "selective" else trainable
    assert stats(out) == (trainable, GPT2_SMALL + added)
    assert out.startswith("note: gpt2 weights are not available offline")


@pytest.mark.parametrize("argv, message", [
    (["--modification_type", "lora", "--lora_rank", "0"], "--lora_rank must be a positive integer, got 0"),
    (["--modification_type", "lora", "--prefix_length", "5"], "--prefix_length applies to --modification_type prefix"),
    (["--modification_type", "lora", "--target_modules", "nope"], "matched no module"),
    (["--modification_type", "selective"], "needs --freeze_layers"),
])
def test_user_errors_are_one_line_and_exit_2(capsys, argv, message):
    code, _, err = run_modify(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_script_exits_2_without_traceback():
    result = subprocess.run([sys.executable, "modify_llm.py", "--modification_type", "lora", "--lora_rank", "-1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: --lora_rank must be a positive integer, got -1"


def test_table_shows_trainability(capsys):
    assert run(main, ["--modification_type", "lora", "--lora_rank", "2", "--target_modules", "c_attn"]) == 0
    out = capsys.readouterr().out
    assert "base_model.transformer.h.*.attn.c_attn.lora_A.weight (x12)" in out
    assert "base_model.transformer.wte.weight" in out


def test_save_adapter_writes_peft_files(capsys, tmp_path):
    code, out, _ = run_modify(capsys, "--modification_type", "lora", "--lora_rank", "2", "--save_adapter",
                              str(tmp_path / "a"))
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [".minipeft", "adapter_config.json",
                                                                  "adapter_model.safetensors"]
