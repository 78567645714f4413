"""train_llm.py end to end: every method trains, the outputs are where the docs say, user mistakes are one line
with exit status 2, Ctrl-C saves a checkpoint and exits cleanly, and the default (built-in) run works."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from data_fixtures import save_tiny_run_inputs, write_json
from training_fixtures import one_thread  # noqa: F401

from minipeft.model.peft_model import load_adapter
from minipeft.cli import run
from minipeft.methods import METHODS
from minipeft.cli.train import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_run_inputs(tmp_path_factory):
    """A tiny GPT-2 directory with a real tokenizer (``--model DIR``) and an Alpaca JSON file."""
    return save_tiny_run_inputs(tmp_path_factory.mktemp("tiny_run"), width=32)


def tiny_args(inputs, output_dir, *extra) -> list:
    model_dir, records = inputs
    return ["--model", str(model_dir), "--dataset_path", str(records), "--no_cache", "--output_dir", str(output_dir),
            "--batch_size", "4", "--max_steps", "3", "--log_every", "1", *extra]


METHOD_FLAGS = {"selective": ["--freeze_layers", "0"], "prefix": ["--prefix_length", "4"],
                "prompt": ["--num_virtual_tokens", "4"], "adapter": ["--adapter_size", "8"]}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_through_train_llm(tiny_run_inputs, tmp_path, capsys, method):
    if importlib.util.find_spec(METHODS[method].module) is None:
        pytest.skip(f"{METHODS[method].module} does not exist yet")
    argv = tiny_args(tiny_run_inputs, tmp_path, "--modification_type", method, *METHOD_FLAGS.get(method, []))
    assert run(main, argv) == 0
    out = capsys.readouterr().out
    assert "Epoch 0 | Step 1/3 | Loss: " in out and f"adapter:      {tmp_path / 'adapter'}" in out

    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["steps"] == 3 and summary["modification_type"] == method
    assert summary["trainable_params"] > 0 and 0 < summary["trainable_ratio_percent"] < 100
    for key in ("eval_loss_before", "eval_loss", "eval_perplexity", "train_loss", "train_minutes",
                "peak_memory_mb", "adapter_size_bytes", "train_tokens_per_s", "inference_tokens_per_s"):
        assert summary[key] is not None and summary[key] > 0, key
    assert summary["eval_perplexity"] == pytest.approx(math.exp(summary["eval_loss"]), rel=1e-12)
    assert summary["eval_loss"] != summary["eval_loss_before"]  # the adapter trained
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [record["step"] for record in records if record["kind"] == "train"] == [1, 2, 3]
    config = json.loads((tmp_path / "train_config.json").read_text())
    assert config["plan"]["total_steps"] == 3 and config["training"]["max_steps"] == 3

    # the saved adapter is the trained one: it loads strictly onto a fresh base and carries its metadata
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == METHODS[method].peft_type
    assert adapter_config["minipeft"]["template"] == "alpaca"
    assert adapter_config["minipeft"]["training"]["max_steps"] == 3
    from transformers import AutoModelForCausalLM

    load_adapter(AutoModelForCausalLM.from_pretrained(tiny_run_inputs[0]), tmp_path / "adapter")
    assert (tmp_path / "best" / "adapter_model.safetensors").is_file()
    kept = {path.name for path in (tmp_path / "checkpoints").iterdir()} - {".minipeft"}
    assert kept == {"step-2", "step-3", f"step-{summary['best_step']}"}  # the last 2 and the best


def test_resume_from_the_command_line_continues_the_run(tiny_run_inputs, tmp_path, capsys):
    assert run(main, tiny_args(tiny_run_inputs, tmp_path, "--lr_schedule", "constant")) == 0
    assert run(main, tiny_args(tiny_run_inputs, tmp_path)) == 2
    assert "holds checkpoints of an earlier run; pass --resume latest" in capsys.readouterr().err
    argv = tiny_args(tiny_run_inputs, tmp_path, "--lr_schedule", "constant", "--resume", "latest")
    argv[argv.index("--max_steps") + 1] = "5"
    assert run(main, argv) == 0
    assert "resumed from" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_with_only_the_output_dir_takes_the_runs_own_settings(tiny_run_inputs, tmp_path, capsys):
    """``--output_dir DIR --resume latest`` alone continues the run as it was started (rank, method, data,
    learning rate from its train_config.json); a flag given again overrides the saved value."""
    model_dir, records = tiny_run_inputs
    first = tiny_args(tiny_run_inputs, tmp_path, "--lora_rank", "4", "--learning_rate", "1e-3")
    assert run(main, first) == 0
    capsys.readouterr()
    assert run(main, ["--output_dir", str(tmp_path), "--resume", "latest", "--max_steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "settings that differ" not in out
    saved = json.loads((tmp_path / "train_config.json").read_text())["arguments"]
    assert (saved["lora_rank"], saved["learning_rate"], saved["model"]) == (4, 1e-3, str(model_dir))
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {tuple(t.shape)[0] for name, t in tensors.items() if "lora_A" in name} == {4}
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("extra, message", [
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA GPU"),
    (["--resume", "no-such-run"], "--resume no-such-run: no checkpoint in no-such-run"),  # (latest: starts over)
    (["--lora_rank", "0"], "--lora_rank"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be a positive integer"),
    (["--warmup_steps", "2", "--warmup_ratio", "0.1"], "give one of them, not both"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--min_lr", "1"], "--"),
    (["--modification_type", "prefix", "--gradient_checkpointing"], "--gradient_checkpointing cannot be used"),
    (["--val_size", "0", "--early_stopping_patience", "2"], "--early_stopping_patience needs a validation set"),
    (["--val_size", "0", "--eval_every", "2"], "--eval_every needs a validation set"),
    (["--val_size", "0", "--eval_batch_size", "3"], "--eval_batch_size needs a validation set"),  # round seven
    (["--lr_schedule", "constant", "--min_lr", "1e-5"], "--min_lr 1e-05: is where the linear and cosine schedules "
                                                        "end; --lr_schedule constant keeps --learning_rate"),
])
def test_user_mistakes_are_one_line_and_exit_status_2(tiny_run_inputs, tmp_path, capsys, extra, message):
    assert run(main, tiny_args(tiny_run_inputs, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("name, status", [("SIGINT", 130), ("SIGHUP", 129)])  # SIGHUP: the terminal closed
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_run_inputs, tmp_path, name, status):
    argv = tiny_args(tiny_run_inputs, tmp_path)
    argv[argv.index("--max_steps") + 1] = "100000"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(ROOT / "train_llm.py"), *argv, "--save_every", "100000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(getattr(signal, name))
    out, err = process.communicate(timeout=120)
    assert process.returncode == status, err
    assert "Traceback" not in err and f"{name}: finishing this step and saving a checkpoint" in out + err
    assert "interrupted at step" in out and "--resume latest" in out
    checkpoints = list((tmp_path / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "adapter" / "adapter_model.safetensors").is_file()


def builtin_model_available() -> bool:
    try:
        from minipeft.builtin import MODEL_DIR, default_dataset_path
    except ImportError:
        return False
    return (Path(MODEL_DIR) / "config.json").is_file() and Path(default_dataset_path()).is_file()


@pytest.mark.skipif(not builtin_model_available(), reason="the built-in model (minipeft/builtin/model) is not built")
@pytest.mark.parametrize("dataset", ["builtin", "alpaca_json"])
def test_the_seed_command_runs_on_the_builtin_model(tmp_path, capsys, dataset):
    argv = ["--modification_type", "lora", "--lora_rank", "4", "--lora_alpha", "8", "--epochs", "3",
            "--learning_rate", "1e-5", "--output_dir", str(tmp_path), "--max_steps", "3", "--no_cache",
            "--eval_max_batches", "2"]
    if dataset == "alpaca_json":  # the seed's --dataset_path: real Alpaca-format records (the first 200)
        path = ROOT.parent / "shared" / "data" / "gpteacher_roleplay.json"
        if not path.is_file():
            pytest.skip(f"{path} is absent")
        records = json.loads(path.read_text(encoding="utf-8"))[:200]
        argv += ["--dataset_path", str(write_json(tmp_path / "alpaca_data.json", records)), "--max_length", "128"]
    assert run(main, argv) == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["model"] == "builtin" and summary["steps"] == 3
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == "builtin"


def test_smoothed_train_loss_is_token_weighted():
    from minipeft.training.metrics import smooth_losses

    losses, tokens = [4.0, 1.0, 2.0], [10, 990, 100]
    # window 2 at the last step: (1·990 + 2·100) / 1090, the NLL per target token of those two steps
    assert smooth_losses(losses, tokens, 2) == pytest.approx([4.0, (40 + 990) / 1000, (990 + 200) / 1090], abs=1e-12)
    assert smooth_losses(losses, tokens, 3)[-1] == pytest.approx((40 + 990 + 200) / 1100, abs=1e-12)
    assert smooth_losses(losses, [1, 1, 1], 3)[-1] == pytest.approx(7.0 / 3)  # equal tokens: the plain mean


def test_plan_line_spells_out_the_effective_batch():
    from minipeft.training.metrics import format_plan_line

    line = format_plan_line(113, 113, 8, 2, 2, 1480.4, 1e-3, "cosine", 5, "fp32", "cpu")
    assert ("113 optimizer steps (113 per epoch) | 8 records per micro-batch × 2 accumulation × 2 processes = "
            "32 records per optimizer step, ~5,922 tokens per step") in line


def test_loss_curve_is_drawn_with_matplotlib_and_explained_without(tmp_path, capsys, monkeypatch):
    from minipeft.training.metrics import MetricsLog, plot_loss_curve

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 60):
        log.write({"kind": "train", "step": step, "loss": 3.0 / step, "lr": 1e-3})
    log.write({"kind": "train", "step": 60, "loss": float("nan"), "lr": 1e-3})  # a skipped step: null
    log.write({"kind": "eval", "step": 60, "eval_loss": 0.5})
    pytest.importorskip("matplotlib")
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss_curve.png")
    assert png == tmp_path / "loss_curve.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    assert plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "other.png") is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "matplotlib is not installed" in out[0] and not (tmp_path / "other.png").exists()


def test_cpu_threads_one_for_a_small_model_unless_told_otherwise(monkeypatch):
    from minipeft.core.errors import UserError
    from minipeft.cli.train import SMALL_MODEL_PARAMETERS, choose_cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_cpu_threads(None, SMALL_MODEL_PARAMETERS - 1) == 1
    assert choose_cpu_threads(None, SMALL_MODEL_PARAMETERS) == torch.get_num_threads()
    assert choose_cpu_threads(3, 1_000) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_cpu_threads(None, 1_000) == torch.get_num_threads()
    with pytest.raises(UserError, match="--num_threads 0"):
        choose_cpu_threads(0, 1_000)


@pytest.mark.skipif(not builtin_model_available(), reason="the built-in model (minipeft/builtin/model) is not built")
def test_default_settings_cut_the_builtin_eval_loss_by_30_percent_within_50_steps(tmp_path, capsys):
    # the full default run (225 steps) reaches about -58% on all 200 validation records; 50 steps, judged on
    # 64 of them, already pass -30%
    argv = ["--output_dir", str(tmp_path), "--max_steps", "50", "--eval_every", "50", "--eval_max_batches", "8",
            "--no_cache", "--log_every", "50"]
    assert run(main, argv) == 0
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["eval_loss"] <= 0.7 * summary["eval_loss_before"], summary
