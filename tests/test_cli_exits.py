"""How commands end. A second Ctrl-C (or a SIGTERM) that lands once a command has finished its work and chosen
its exit status changes nothing: the status stays the command's, with no traceback and no death by the signal.
An unknown command is one line; a reader that closes stdout early gets no traceback.

(Before ``minipeft.cli.ignore_late_interrupts``, a second Ctrl-C 50 ms after the first, landing while Python
shut down, ended the process by SIGINT: status -2 to ``subprocess``, where the run had decided on 130.)
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_fixtures import save_tiny_run_inputs
from minipeft.training.signals import StopRequest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# the command "works" (returns 7), then the signal lands before the process has exited
LATE_SIGNAL = """
import os, signal, sys, time
from minipeft.cli import handle_signals_after_loading, run
handle_signals_after_loading()
status = run(lambda argv: 7, [], leaving={leaving})
os.kill(os.getpid(), signal.{name})
time.sleep(0.2)
sys.exit(status)
"""


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_after_the_work_is_done_leaves_the_status_alone(name):
    done = subprocess.run([sys.executable, "-c", LATE_SIGNAL.format(leaving=True, name=name)], env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (7, "")


def test_without_it_the_late_signal_would_win():
    """The control: without ``leaving`` the same late signal decides the ending (a KeyboardInterrupt traceback
    and 1), so the test above can fail."""
    done = subprocess.run([sys.executable, "-c", LATE_SIGNAL.format(leaving=False, name="SIGINT")], env=ENV,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 7


def test_two_ctrl_c_in_a_row_leave_a_resumable_run(tmp_path):
    """Ctrl-C, then Ctrl-C again 50 ms later, during training: exit 130, one "interrupted" line or the saved
    checkpoint's line and no traceback; ``--resume latest`` then finishes the run."""
    model_dir, records = save_tiny_run_inputs(tmp_path / "inputs", width=32)
    out_dir = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "train_llm.py"), "--model", str(model_dir), "--dataset_path", str(records),
            "--no_cache", "--output_dir", str(out_dir), "--batch_size", "4", "--log_every", "1",
            "--save_every", "1", "--eval_every", "100000"]
    process = subprocess.Popen([*argv, "--max_steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENV, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not list((out_dir / "checkpoints").glob("step-*")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and ("interrupted" in err or "interrupted at step" in out)
    stopped_at = max(int(path.name.split("-")[1]) for path in (out_dir / "checkpoints").glob("step-*"))
    resumed = subprocess.run([*argv, "--max_steps", str(stopped_at + 2), "--resume", "latest"],
                             capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out_dir / "adapter" / "adapter_model.safetensors").is_file()


# train_llm.py, with a Ctrl-C sent (by the process to itself, so at a known moment) as the checkpoint of step 2
# starts being written, and a second one as the stop's own checkpoint (step 3) starts being written
CTRL_C_DURING_WRITES = """
import os, signal, sys
from minipeft.cli import handle_signals_after_loading, run
from minipeft.cli.train import main
from minipeft.training import loop

write = loop.save_checkpoint

def save_checkpoint(directory, *args, **kwargs):
    if directory.name in ("step-2", "step-3"):
        os.kill(os.getpid(), signal.SIGINT)
    return write(directory, *args, **kwargs)

loop.save_checkpoint = save_checkpoint
handle_signals_after_loading()
sys.exit(run(main, sys.argv[1:], leaving=True))
"""


def test_a_second_ctrl_c_waits_for_the_first_ones_checkpoint(tmp_path):
    """The first Ctrl-C lands during step 2's checkpoint (it asks to stop after step 3), the second during the
    stop's own checkpoint: that write finishes (it used to die half-way, by KeyboardInterrupt, leaving step 2 as
    the last checkpoint), the run exits 130 saying where it stopped, and ``--resume latest`` continues from it."""
    model_dir, records = save_tiny_run_inputs(tmp_path / "inputs", width=32)
    out_dir = tmp_path / "run"
    argv = ["--model", str(model_dir), "--dataset_path", str(records), "--no_cache", "--output_dir", str(out_dir),
            "--batch_size", "4", "--save_every", "1", "--eval_every", "100000", "--max_steps", "6"]
    done = subprocess.run([sys.executable, "-c", CTRL_C_DURING_WRITES, *argv], capture_output=True, text=True,
                          env=ENV, cwd=tmp_path, timeout=300)
    assert done.returncode == 130, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "interrupted at step 3/6: checkpoint saved to" in done.stdout
    assert "SIGINT: waiting for the checkpoint being written to be complete" in done.stdout + done.stderr
    step_3 = out_dir / "checkpoints" / "step-3"
    assert (step_3 / "trainer_state.json").is_file() and not list((out_dir / "checkpoints").glob(".tmp-*"))
    resumed = subprocess.run([sys.executable, str(ROOT / "train_llm.py"), *argv, "--resume", "latest"],
                             capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out_dir / 'checkpoints' / 'step-3'}: step 3" in resumed.stdout
    assert (out_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_signals_wait_for_a_write_then_count_as_if_sent_at_its_end():
    """:meth:`StopRequest.deferred` directly: a Ctrl-C inside is held; at the end the first asks to stop, a
    second raises KeyboardInterrupt (stop at once), unless the write was the stop's own checkpoint."""
    stop = StopRequest()
    with stop.installed():
        with stop.deferred(stopping=False):
            signal.raise_signal(signal.SIGINT)
            assert not stop.requested  # held: the write goes on
        assert stop.requested and stop.signal_number == signal.SIGINT  # ... and counted once it ended
        with pytest.raises(KeyboardInterrupt):
            with stop.deferred(stopping=False):
                signal.raise_signal(signal.SIGINT)
                written = True  # the write ran to its end before the interrupt
        assert written
        with stop.deferred(stopping=True):  # the stop's own checkpoint: the run returns after it anyway
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)


def test_an_unknown_command_is_one_line_and_a_closed_pipe_is_quiet():
    bogus = subprocess.run([sys.executable, "-m", "minipeft", "bogus"], env=ENV, capture_output=True, text=True,
                           timeout=60, cwd=ROOT)
    assert bogus.returncode == 2 and bogus.stdout == ""
    assert bogus.stderr.splitlines() == [bogus.stderr.strip()] and "unknown command 'bogus'" in bogus.stderr
    # no command at all was the usage and exit 0 (round four): a usage error, its last line the error
    bare = subprocess.run([sys.executable, "-m", "minipeft"], env=ENV, capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert bare.returncode == 2 and bare.stdout == "" and "Traceback" not in bare.stderr
    assert bare.stderr.splitlines()[0].startswith("usage: ")
    assert bare.stderr.splitlines()[-1].startswith("error: no command given: one of modify, train, ")
    assert sum(line.startswith("error:") for line in bare.stderr.splitlines()) == 1
    # the usage into a reader that leaves after one line (``| head -1``): no traceback, 141 as for SIGPIPE
    process = subprocess.Popen([sys.executable, "-m", "minipeft", "--help"], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141 and err == ""


def test_a_run_started_under_nohup_keeps_ignoring_sighup():
    """``nohup`` sets SIGHUP to be ignored so the run outlives the terminal: the stop handler leaves it so."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StopRequest().installed():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert callable(signal.getsignal(signal.SIGTERM))  # (the stop handler, whatever it was before)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        stop = StopRequest()
        with stop.installed():
            signal.raise_signal(signal.SIGHUP)
        assert stop.requested and stop.signal_number == signal.SIGHUP
    finally:
        signal.signal(signal.SIGHUP, previous)
