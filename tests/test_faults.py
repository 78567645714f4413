"""Fault injection: bad input, damaged files and a hostile environment, as an adversarial user would try them.

Each case asserts what the user sees and what is left on disk:

- the exit status (2 for a mistake or an environment fault, 130 after Ctrl-C, 143 after SIGTERM);
- exactly one ``error:`` line on stderr, naming the file or flag, and never a ``Traceback``;
- a sha256 of every file that must survive, taken before and compared after.

The classes are those of issue #13: (1) unbounded or blocking inputs, (2) destroying what exists, (3) non-finite
values reported as success, (4) environment faults, (5) silent surprises, (6) messages. What only a process can
show (a hang, memory exhaustion, signals, a lock between two processes, a full or read-only disk, argparse's
exit) runs as a real subprocess of the scripts; the other cases call the same ``main`` through
:func:`minipeft.cli.run` in this process, which is what the scripts do, without paying ~5 s of imports each.

Cases that already passed before #13 and stay covered: SIGKILL at every point of a checkpoint save
(``tests/test_training_checkpoint.py::test_a_kill_while_writing_leaves_a_loadable_checkpoint``), damaged
safetensors and pickled adapters (``tests/test_adapter_io.py``); here each is also run once through the CLI.
"""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minipeft.cli import main as cli_main
from minipeft.cli import run
from minipeft.cli.data import main as data_main
from minipeft.cli.modify import main as modify_main
from minipeft.cli.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
MERGE = lambda argv: cli_main(["merge", *argv])  # noqa: E731 (python -m minipeft merge ...)
GENERATE = lambda argv: cli_main(["generate", *argv])  # noqa: E731


def builtin_model_available() -> bool:
    try:
        from minipeft.builtin import MODEL_DIR, default_dataset_path
    except ImportError:
        return False
    return (Path(MODEL_DIR) / "config.json").is_file() and Path(default_dataset_path()).is_file()


pytestmark = pytest.mark.skipif(not builtin_model_available(), reason="the built-in model is not built")

# The fastest real run: the built-in model, two steps, one evaluation batch, no tokenization cache.
TINY_RUN = ["--max_steps", "2", "--eval_max_batches", "1", "--no_cache", "--num_threads", "1"]


# -- helpers ---------------------------------------------------------------------------------------------------
def script(name: str, *args, cwd=None, timeout: float = 120, preexec_fn=None,
           wrapper=()) -> subprocess.CompletedProcess:
    """Run ``python <name> args`` (``-m minipeft`` for ``name="minipeft"``) to completion."""
    command = [sys.executable, "-m", "minipeft"] if name == "minipeft" else [sys.executable, str(ROOT / name)]
    return subprocess.run([*wrapper, *command, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=script_env(), timeout=timeout, preexec_fn=preexec_fn)


def script_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def in_process(main, *args, capsys) -> tuple:
    """``(exit status, stdout, stderr)`` of ``run(main, args)``, as the scripts call it."""
    code = run(main, [str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(code: int, err: str, *fragments, expected_code: int = 2) -> str:
    """Assert the exit status, exactly one ``error:`` line holding ``fragments``, and no traceback."""
    assert code == expected_code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]
    return lines[0]


def digests(*roots) -> dict:
    """sha256 of every file under each root (or of the root itself when it is a file), by path."""
    found = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(path for path in root.rglob("*") if path.is_file())
        for path in files:
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One finished two-step LoRA run of the built-in model (adapter/, best/, checkpoints/, metrics...)."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    result = script("train_llm.py", *TINY_RUN, "--output_dir", run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A private copy of the finished run, for cases that would change it if minipeft did wrong."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def records(count: int, start: int = 0) -> list:
    return [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"{i} plus {i} is {2 * i}."}
            for i in range(start, start + count)]


def write_records(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows))
    return path


def damaged_adapter(source: Path, target: Path, change) -> Path:
    """A copy of an adapter whose tensors went through ``change(dict) -> dict``."""
    target.mkdir()
    shutil.copy(source / "adapter_config.json", target / "adapter_config.json")
    save_file(change(load_file(source / "adapter_model.safetensors")), target / "adapter_model.safetensors")
    return target


# -- 1. unbounded or blocking inputs ------------------------------------------------------------------------------
def test_dev_zero_is_refused_not_read_until_memory_runs_out(tmp_path):
    # an address-space limit turns a regression (reading /dev/zero) into a quick failure, not a dead machine
    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))

    result = script("data_pipeline.py", "--dataset_path", "/dev/zero", "--no_cache", preexec_fn=limit_memory)
    one_error(result.returncode, result.stderr, "/dev/zero: is a device", "only regular files")


def test_a_fifo_without_writer_is_refused_not_waited_for(tmp_path):
    fifo = tmp_path / "data.json"
    os.mkfifo(fifo)
    result = script("train_llm.py", *TINY_RUN, "--dataset_path", fifo, "--output_dir", tmp_path / "out", timeout=60)
    one_error(result.returncode, result.stderr, f"{fifo}: is a FIFO")
    assert not (tmp_path / "out").exists()


def test_directory_and_oversized_inputs(tmp_path, capsys, monkeypatch):
    one_error(*in_process(data_main, "--dataset_path", tmp_path, "--no_cache", capsys=capsys)[::2],
              f"{tmp_path}: is a directory")
    big = write_records(tmp_path / "big.json", records(200))
    monkeypatch.setenv("MINIPEFT_MAX_INPUT_MB", "0.001")  # the limit is stated and can be changed
    one_error(*in_process(data_main, "--dataset_path", big, "--no_cache", capsys=capsys)[::2],
              "larger than the input limit of 0 MB", "MINIPEFT_MAX_INPUT_MB")


# -- 2. destroying what exists ------------------------------------------------------------------------------------
def test_merge_overwrite_never_deletes_the_adapter_its_run_or_a_users_files(run_copy, tmp_path, capsys):
    adapter = run_copy / "adapter"
    data = write_records(tmp_path / "data.json", records(3))
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    before = digests(run_copy, data, users)
    cases = [(adapter, "--out", "is --adapter"), (run_copy, "--out", "contains --adapter"),
             (adapter / "merged", "--out", "lies inside --adapter"), (data, "--out", "is a file, not a directory"),
             (users, "--out", "already exists")]
    for out, flag, message in cases:
        code, _, err = in_process(MERGE, "--adapter", adapter, "--out", out, capsys=capsys)
        one_error(code, err, f"{flag} {out}", message)
    for out, what in ((data, "is a file"), (users, "holds files minipeft did not write")):
        code, _, err = in_process(MERGE, "--adapter", adapter, "--out", out,
                                  "--overwrite", capsys=capsys)
        one_error(code, err, what)
    assert digests(run_copy, data, users) == before


def test_modify_save_adapter_never_replaces_a_trained_adapter(run_copy, capsys):
    before = digests(run_copy / "adapter")
    code, _, err = in_process(modify_main, "--model", "builtin", "--save_adapter", run_copy / "adapter", capsys=capsys)
    one_error(code, err, f"--save_adapter {run_copy / 'adapter'}: already holds an adapter")
    assert digests(run_copy / "adapter") == before


def test_a_new_run_never_replaces_a_finished_run_whose_checkpoints_were_removed(run_copy, capsys):
    shutil.rmtree(run_copy / "checkpoints")
    before = digests(run_copy)
    code, _, err = in_process(train_main, *TINY_RUN, "--output_dir", run_copy, capsys=capsys)
    one_error(code, err, f"--output_dir {run_copy}: holds an earlier run's outputs", "--overwrite_output_dir")
    assert digests(run_copy) == before


def test_overwrite_output_dir_refuses_a_folder_minipeft_did_not_write(tmp_path, capsys):
    folder = tmp_path / "results"
    (folder / "best").mkdir(parents=True)
    (folder / "best" / "paper.tex").write_text("my paper")
    (folder / "metrics.json").write_text('{"mine": 1}')
    before = digests(folder)
    code, _, err = in_process(train_main, *TINY_RUN, "--output_dir", folder, "--overwrite_output_dir", capsys=capsys)
    one_error(code, err, f"--output_dir {folder}: holds best, metrics.json, which minipeft did not write")
    assert digests(folder) == before


def test_a_locked_output_dir_is_refused_and_left_alone(tmp_path, capsys):
    from minipeft.files.lock import OutputLock

    out = tmp_path / "out"
    with OutputLock(out):  # this process (alive) holds it, as a running training would
        before = digests(out)
        code, _, err = in_process(train_main, *TINY_RUN, "--output_dir", out, capsys=capsys)
        one_error(code, err, f"--output_dir {out}: another minipeft process (pid {os.getpid()}")
        assert digests(out) == before


@pytest.mark.slow
def test_a_second_run_into_the_same_output_dir_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, str(ROOT / "train_llm.py"), *TINY_RUN, "--max_steps", "100000",
                              "--output_dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=script_env())
    try:
        deadline = time.monotonic() + 120
        while not (out / ".minipeft.lock").is_file():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        second = script("train_llm.py", *TINY_RUN, "--output_dir", out)
        one_error(second.returncode, second.stderr, f"--output_dir {out}: another minipeft process (pid {first.pid}")
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 130
    assert not (out / ".minipeft.lock").exists()  # released on the way out


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".minipeft.lock").write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")
    code, out_text, err = in_process(train_main, *TINY_RUN, "--output_dir", out, capsys=capsys)
    assert code == 0, err
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / ".minipeft.lock").exists()


# -- 3. non-finite values -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--weight_decay", "nan"), ("--learning_rate", "inf"),
                                         ("--lora_alpha", "nan"), ("--lora_dropout", "nan"),
                                         ("--warmup_ratio", "nan"), ("--max_grad_norm", "1e999")])
def test_non_finite_flags_are_usage_errors(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(train_main, [*TINY_RUN, "--output_dir", str(tmp_path / "out"), flag, value])
    err = capsys.readouterr().err
    one_error(exit_info.value.code, err, f"argument {flag}", "not a finite number")
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_names_the_non_finite_value_and_a_checkpoint_with_finite_weights(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = in_process(train_main, *TINY_RUN, "--max_steps", "8", "--learning_rate", "1e5", "--eval_every",
                              "1", "--max_nonfinite_steps", "2", "--precision", "fp32", "--output_dir", out,
                              capsys=capsys)
    line = one_error(code, err, "training diverged: the gradient norm was not finite", "while the loss was finite",
                     "lower --learning_rate", "the last good checkpoint (finite weights) is")
    assert "--precision fp32" not in line  # it is an fp32 run already
    checkpoint = Path(line.rsplit(" is ", 1)[1])
    tensors = load_file(checkpoint / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in tensors.values())
    best = load_file(out / "best" / "adapter_model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in best.values())
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()  # nothing reported as success


def test_divergence_message_suggests_fp32_only_when_it_is_not_fp32():
    from minipeft.training.loop import divergence_message

    assert "--precision fp32" in divergence_message("loss", 3, "bf16", [])
    assert "--precision fp32" not in divergence_message("loss", 3, "fp32", [])
    assert "no checkpoint was saved" in divergence_message("loss", 3, "fp32", [])
    assert divergence_message("loss", 3, "fp32", []).startswith("training diverged: the loss was not finite for 3")


def test_nan_and_integer_adapters_are_refused_when_loaded(finished_run, tmp_path, capsys):
    adapter = finished_run / "adapter"
    nan = damaged_adapter(adapter, tmp_path / "nan", lambda t: {k: v.fill_(float("nan")) for k, v in t.items()})
    integer = damaged_adapter(adapter, tmp_path / "int", lambda t: {k: v.to(torch.int32) for k, v in t.items()})
    for directory, message in ((nan, "holds NaN or infinity"), (integer, "has dtype int32")):
        code, out, err = in_process(GENERATE, "--adapter", directory, "--prompt",
                                    "Hi", "--max_new_tokens", "2", capsys=capsys)
        one_error(code, err, f"{directory / 'adapter_model.safetensors'}: tensor", message)
        assert out == ""


def test_a_nan_in_adapter_config_is_refused_and_never_written(finished_run, tmp_path, capsys):
    adapter = Path(shutil.copytree(finished_run / "adapter", tmp_path / "adapter"))
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, lora_alpha=float("nan"))))  # Python writes the NaN literal
    code, _, err = in_process(GENERATE, "--adapter", adapter, "--prompt", "Hi",
                              capsys=capsys)
    one_error(code, err, f"{config_path}: \"lora_alpha\" must be a finite number, got nan")
    for path in finished_run.rglob("*.json"):  # and minipeft itself never wrote a NaN into any JSON file
        json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{path} holds {name}"))


# -- 4. environment faults ------------------------------------------------------------------------------------------
def test_output_paths_that_cannot_be_directories(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    before = digests(a_file)
    for output_dir, message in ((a_file, "is a file, expected a directory"),
                                (a_file / "run", "a part of the path is a file"),
                                ("/proc/self/minipeft-run", "/proc/self/minipeft-run")):
        code, _, err = in_process(train_main, *TINY_RUN, "--output_dir", output_dir, capsys=capsys)
        one_error(code, err, message)
    assert digests(a_file) == before


def test_output_file_that_is_a_directory_and_a_missing_local_model(finished_run, tmp_path, capsys):
    code, _, err = in_process(GENERATE, "--adapter", finished_run / "adapter",
                              "--prompt", "Hi", "--output_file", tmp_path, capsys=capsys)
    one_error(code, err, f"--output_file {tmp_path}: is a directory")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a color.\n")
    before = digests(prompts)
    code, _, err = in_process(GENERATE, "--adapter", finished_run / "adapter", "--prompts_file", prompts,
                              "--output_file", prompts, capsys=capsys)
    one_error(code, err, f"--output_file {prompts}: is --prompts_file")
    assert digests(prompts) == before
    missing = tmp_path / "no" / "such" / "model"
    code, _, err = in_process(train_main, *TINY_RUN, "--model", missing, "--output_dir", tmp_path / "out",
                              capsys=capsys)
    one_error(code, err, f"--model {missing}: no such directory")


def test_adapter_config_that_is_a_json_list_or_has_a_string_rank(finished_run, tmp_path, capsys):
    for name, content, message in (("list", "[1, 2]", "expected a JSON object of settings, found an array"),
                                   ("rank", None, "\"r\" must be a positive integer, got '8'")):
        adapter = Path(shutil.copytree(finished_run / "adapter", tmp_path / name))
        config_path = adapter / "adapter_config.json"
        if content is None:
            content = json.dumps(dict(json.loads(config_path.read_text()), r="8"))
        config_path.write_text(content)
        code, _, err = in_process(GENERATE, "--adapter", adapter, "--prompt", "Hi",
                                  capsys=capsys)
        one_error(code, err, f"{config_path}: {message}")


def test_resume_with_a_smaller_data_set_fails_and_keeps_train_config(tmp_path, capsys):
    out = tmp_path / "out"
    data = write_records(tmp_path / "data.json", records(60))
    common = ["--no_cache", "--num_threads", "1", "--batch_size", "4", "--val_size", "4", "--output_dir", out]
    code, _, err = in_process(train_main, *common, "--dataset_path", data, "--max_steps", "5", capsys=capsys)
    assert code == 0, err
    before = digests(out)
    small = write_records(tmp_path / "small.json", records(8))
    code, _, err = in_process(train_main, *common, "--dataset_path", small, "--max_steps", "9", "--resume", "latest",
                              capsys=capsys)
    one_error(code, err, "--resume: --dataset_path", "changes what the run computes", "--resume_new_data")
    assert digests(out) == before  # train_config.json included: a later correct resume compares against the truth
    code, _, err = in_process(train_main, *common, "--dataset_path", small, "--max_steps", "9", "--resume", "latest",
                              "--resume_new_data", capsys=capsys)  # asked for: the new data from its first batch
    assert code == 0, err
    out = tmp_path / "again"
    common[common.index("--output_dir") + 1] = out
    code, _, err = in_process(train_main, *common, "--dataset_path", data, "--max_steps", "5", capsys=capsys)
    assert code == 0, err
    code, out_text, err = in_process(train_main, *common, "--dataset_path", data, "--max_steps", "6",
                                     "--resume", "latest", capsys=capsys)
    assert code == 0 and "settings that differ" not in out_text, err


def test_a_full_disk_leaves_the_previous_output_file_intact(finished_run, tmp_path):
    from minipeft.files.manifest import sidecar_of
    from minipeft.files.safe_files import write_output_file

    # an earlier run's, replaced with --overwrite
    answers = write_output_file(tmp_path / "answers.jsonl", '{"old": 1}\n', "--output_file")
    before = digests(answers, sidecar_of(answers))

    def small_files_only():  # a "disk" that takes 200 bytes per file: writes beyond fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    result = script("minipeft", "generate", "--adapter", finished_run / "adapter", "--prompt", "Name a color.",
                    "--prompt", "Name a fruit.", "--max_new_tokens", "40", "--output_file", answers, "--overwrite",
                    preexec_fn=small_files_only)
    one_error(result.returncode, result.stderr, f"{answers}: cannot be written", "nothing there was changed")
    assert digests(answers, sidecar_of(answers)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".answers.jsonl.minipeft", "answers.jsonl"]


@pytest.mark.slow
def test_a_full_disk_during_training_keeps_every_earlier_checkpoint_and_adapter(run_copy):
    kept = [run_copy / name for name in ("adapter", "best", "checkpoints", "train_config.json", "metrics.json")]
    before = digests(*kept)

    def small_files_only():  # adapter files (~80 kB) no longer fit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    result = script("train_llm.py", *TINY_RUN, "--max_steps", "4", "--output_dir", run_copy, "--resume", "latest",
                    preexec_fn=small_files_only)
    one_error(result.returncode, result.stderr, f"{run_copy}/", "cannot be written", "nothing there was changed")
    assert digests(*kept) == before
    assert not [path for path in run_copy.rglob(".tmp-*")] and not (run_copy / ".minipeft.lock").exists()


def unshare_available() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not unshare_available(), reason="needs `unshare -m` (a private mount namespace): a read-only mount")
def test_a_read_only_disk_is_one_line_and_changes_nothing(run_copy):
    before = digests(run_copy)
    mount = f"mount --bind {run_copy} {run_copy} && mount -o remount,bind,ro {run_copy} && exec \"$@\""
    result = script("train_llm.py", *TINY_RUN, "--output_dir", run_copy, "--overwrite_output_dir",
                    wrapper=("unshare", "-m", "sh", "-c", mount, "sh"))
    one_error(result.returncode, result.stderr, str(run_copy), "read-only")
    assert digests(run_copy) == before


def test_ctrl_c_or_sigterm_while_the_libraries_load_exits_quietly(tmp_path):
    cases = [("train_llm.py", signal.SIGINT, 130, 1.0), ("modify_llm.py", signal.SIGINT, 130, 1.0),
             ("data_pipeline.py", signal.SIGINT, 130, 1.0), ("train_llm.py", signal.SIGTERM, 143, 1.0),
             # python -m minipeft: early (numpy half-imported once ended in a RecursionError) and later (exit -2)
             ("-m minipeft train", signal.SIGINT, 130, 0.3), ("-m minipeft train", signal.SIGINT, 130, 1.0),
             ("-m minipeft data", signal.SIGTERM, 143, 0.6)]
    for name, signal_number, status, delay in cases:
        command = name.split() if name.startswith("-m") else [str(ROOT / name)]
        process = subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=script_env(), cwd=tmp_path)
        time.sleep(delay)  # python is up, torch and transformers are still loading (they take seconds)
        process.send_signal(signal_number)
        _, err = process.communicate(timeout=60)
        assert process.returncode == status and err.strip().endswith("interrupted"), (name, err)
        assert "Traceback" not in err and list(tmp_path.iterdir()) == [], (name, err)


@pytest.mark.slow
def test_sigterm_during_training_saves_a_checkpoint_and_exits_143(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(ROOT / "train_llm.py"), *TINY_RUN, "--max_steps", "100000",
                                "--save_every", "100000", "--output_dir", str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=script_env())
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and '"kind": "train"' in (out / "metrics.jsonl").read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "Traceback" not in err, err
    assert "--resume latest" in output and list((out / "checkpoints").glob("step-*/trainer_state.json"))


@pytest.mark.slow
def test_sigkill_during_training_then_resume_finishes_the_run(tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(ROOT / "train_llm.py"), *TINY_RUN, "--max_steps", "100000",
                                "--save_every", "1", "--output_dir", str(out)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=script_env())
    deadline = time.monotonic() + 120
    while len(list((out / "checkpoints").glob("step-*/trainer_state.json"))) < 2:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.kill()  # SIGKILL: no cleanup of any kind, maybe in the middle of a checkpoint
    process.wait()
    result = script("train_llm.py", *TINY_RUN, "--max_steps", "4", "--output_dir", out, "--resume", "latest")
    assert result.returncode == 0, result.stderr  # the stale lock of the killed run is taken over
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# -- 5. silent surprises ------------------------------------------------------------------------------------------
def test_an_adapter_is_not_applied_to_a_model_that_already_holds_it_merged(finished_run, tmp_path, capsys):
    merged = tmp_path / "merged"
    code, _, err = in_process(MERGE, "--adapter", finished_run / "adapter", "--out",
                              merged, capsys=capsys)
    assert code == 0, err
    code, _, err = in_process(GENERATE, "--model", merged, "--adapter",
                              finished_run / "adapter", "--prompt", "Hi", capsys=capsys)
    one_error(code, err, "already holds this adapter merged", "minipeft_merge.json")
    code, _, err = in_process(MERGE, "--model", merged, "--adapter",
                              finished_run / "adapter", "--out", tmp_path / "twice", capsys=capsys)
    one_error(code, err, "already holds this adapter merged")
    assert not (tmp_path / "twice").exists()


def test_duplicate_keys_and_a_short_max_length_are_reported(tmp_path, capsys):
    rows = [json.dumps(row) for row in records(20)]
    rows[3] = '{"instruction": "Say hi.", "input": "", "output": "hi", "output": "bye"}'
    data = tmp_path / "data.json"
    data.write_text("[" + ",\n".join(rows) + "]")
    code, out, err = in_process(data_main, "--dataset_path", data, "--no_cache", "--max_length", "12", capsys=capsys)
    assert code == 0, err
    assert "record 3: the field 'output' is given twice" in out
    warnings = [line for line in out.splitlines() if line.startswith("warning: --max_length 12")]
    assert len(warnings) == 1 and "cuts the response" in warnings[0]


def test_changing_eval_max_batches_on_resume_warns(run_copy, capsys):
    code, _, err = in_process(train_main, *TINY_RUN, "--max_steps", "3", "--eval_max_batches", "2",
                              "--output_dir", run_copy, "--resume", "latest", capsys=capsys)
    assert code == 0, err
    assert "warning: --eval_max_batches 2 (was 1)" in err and "no longer compare" in err


# -- 6. messages --------------------------------------------------------------------------------------------------
def test_a_mistyped_flag_is_one_line_and_a_hint_not_the_usage():
    result = script("train_llm.py", "--lora_rnak", "4")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: unrecognized arguments: --lora_rnak 4",
                                          "(see python train_llm.py --help)"]


def test_empty_data_files_say_they_hold_no_records(tmp_path, capsys):
    for name, content in (("empty.json", "[]"), ("blank.jsonl", "\n")):
        path = tmp_path / name
        path.write_text(content)
        code, _, err = in_process(data_main, "--dataset_path", path, "--no_cache", capsys=capsys)
        one_error(code, err, f"{path}: holds no records")


def test_damaged_and_pickled_adapters_through_the_cli(finished_run, tmp_path, capsys):
    damaged = Path(shutil.copytree(finished_run / "adapter", tmp_path / "damaged"))
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    pickled = Path(shutil.copytree(finished_run / "adapter", tmp_path / "pickled"))
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    for adapter, message in ((damaged, "not a readable safetensors file"),
                             (pickled, "pickled adapter weights are not read")):
        code, _, err = in_process(GENERATE, "--adapter", adapter, "--prompt", "Hi",
                                  capsys=capsys)
        one_error(code, err, message)


@pytest.mark.parametrize("flag, value", [("--learning_rate", "0.5"), ("--batch_size", "2"), ("--seed", "7"),
                                         ("--gradient_accumulation_steps", "2")])
def test_a_resume_that_would_compute_another_run_is_refused_before_loading(flag, value, tmp_path, capsys):
    """A flag given again with another value that changes the steps' math or the batches they read: one line
    naming it, before the model loads, nothing touched; left out, the run's own value is taken and it resumes."""
    out = tmp_path / "out"
    common = [*TINY_RUN, "--batch_size", "4", "--save_every", "1", "--output_dir", out]
    code, _, err = in_process(train_main, *common, capsys=capsys)
    assert code == 0, err
    before = digests(out)
    code, _, err = in_process(train_main, *common, "--max_steps", "3", "--resume", "latest", flag, value,
                              capsys=capsys)
    one_error(code, err, f"--resume: {flag} {value} changes what the run computes", "leave it out")
    assert digests(out) == before
    code, _, err = in_process(train_main, "--output_dir", out, "--max_steps", "3", "--resume", "latest",
                              capsys=capsys)
    assert code == 0, err
