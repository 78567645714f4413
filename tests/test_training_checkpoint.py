"""Checkpoints: exact round trips without pickle, atomic writes that survive a kill at any moment, pruning."""

import json
import os
import random
import signal

import numpy as np
import pytest
import torch
from training_fixtures import adapter_tensors, make_batches, one_thread, tiny_peft_model  # noqa: F401

from minipeft.files import safe_files
from minipeft.core.errors import UserError
from minipeft.training import checkpoint
from minipeft.files.safe_files import remove_incomplete
from minipeft.training.checkpoint import (capture_rng_state, list_checkpoints, load_checkpoint, prune_checkpoints,
                                          resolve_resume, restore_rng_state, save_checkpoint)
from minipeft.training.loss import causal_lm_loss_sum
from minipeft.training.optimizer import build_optimizer


def trained_model_and_optimizer(steps: int = 2, seed: int = 0):
    """A LoRA model and its AdamW after ``steps`` real steps (so the optimizer has moments to save)."""
    peft_model = tiny_peft_model(seed=seed)
    optimizer = build_optimizer(peft_model, 1e-2, 0.01)
    for batch in make_batches(steps, seed=seed):
        nll_sum, count = causal_lm_loss_sum(peft_model, batch)
        (nll_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return peft_model, optimizer


def save(directory, peft_model, optimizer, step: int):
    return save_checkpoint(directory, peft_model, optimizer, None, {"step": step, "epoch": 0},
                           [capture_rng_state()], {"template": "alpaca"})


def test_round_trip_restores_adapter_optimizer_and_rng_exactly(tmp_path):
    peft_model, optimizer = trained_model_and_optimizer()
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    path = save(tmp_path / "step-2", peft_model, optimizer, 2)
    expected_draws = (torch.rand(3), random.random(), np.random.rand())

    assert sorted(p.name for p in path.iterdir()) == [".minipeft", "adapter", "optimizer.safetensors",
                                                      "rng_state.safetensors", "trainer_state.json"]
    assert not list(path.rglob("*.bin")) and not list(path.rglob("*.pt"))  # no pickle anywhere
    fresh = tiny_peft_model(seed=9)  # another random init, replaced by the checkpoint's
    fresh_optimizer = build_optimizer(fresh, 1e-2, 0.01)
    state = load_checkpoint(path, fresh, fresh_optimizer, None)
    assert state["step"] == 2 and state["epoch"] == 0
    saved, loaded = adapter_tensors(peft_model), adapter_tensors(fresh)
    assert saved.keys() == loaded.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    expected, got = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert expected["param_groups"] == got["param_groups"]
    for index, values in expected["state"].items():
        for key, tensor in values.items():
            assert torch.equal(got["state"][index][key], tensor)
    restore_rng_state(*state["rng"])
    draws = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]
    config = json.loads((path / "adapter" / "adapter_config.json").read_text())
    assert config["minipeft"]["template"] == "alpaca" and config["peft_type"] == "LORA"


def test_an_adapter_with_no_tensors_is_never_saved(tmp_path):
    peft_model, optimizer = trained_model_and_optimizer(steps=1)
    peft_model.adapter_parameter_names = []  # what a broken method would leave behind
    with pytest.raises(UserError, match="refusing to save an adapter with no tensors"):
        save(tmp_path / "step-1", peft_model, optimizer, 1)
    assert list(tmp_path.iterdir()) == []  # not even a temporary directory


def test_optimizer_state_for_other_parameters_is_refused(tmp_path):
    peft_model, optimizer = trained_model_and_optimizer(steps=1)
    path = save(tmp_path / "step-1", peft_model, optimizer, 1)
    other = tiny_peft_model("lora", "--lora_bias", "all")
    refusals = "saved for other trainable parameters|has no place|missing|the adapter was trained with"
    with pytest.raises(UserError, match=refusals):
        load_checkpoint(path, other, build_optimizer(other, 1e-2, 0.01), None)


def test_another_runs_optimizer_moments_of_other_shapes_are_refused_not_stepped(tmp_path):
    """Same parameter names, other shapes (another --lora_rank): the fused AdamW step read past its buffers and
    the process died of SIGSEGV. Each moment is checked against its parameter's shape before loading."""
    peft_model, optimizer = trained_model_and_optimizer(steps=1)
    path = save(tmp_path / "step-1", peft_model, optimizer, 1)
    narrower = tiny_peft_model("lora", "--lora_rank", "2")
    narrower_optimizer = build_optimizer(narrower, 1e-2, 0.01)
    for batch in make_batches(1):
        nll_sum, count = causal_lm_loss_sum(narrower, batch)
        nll_sum.backward()
    narrower_optimizer.step()
    other = save(tmp_path / "other" / "step-1", narrower, narrower_optimizer, 1)
    (path / "optimizer.safetensors").write_bytes((other / "optimizer.safetensors").read_bytes())
    fresh = tiny_peft_model(seed=9)
    with pytest.raises(UserError, match=r"optimizer state 'exp_avg' of .*lora_A.* has shape \[2, .*saved by another"):
        load_checkpoint(path, fresh, build_optimizer(fresh, 1e-2, 0.01), None)


def test_resume_finds_the_newest_complete_checkpoint(tmp_path):
    peft_model, optimizer = trained_model_and_optimizer(steps=1)
    for step in (3, 12, 7):
        save(tmp_path / "checkpoints" / f"step-{step}", peft_model, optimizer, step)
    (tmp_path / "checkpoints" / "step-20").mkdir()  # no trainer_state.json: not a checkpoint
    (tmp_path / "checkpoints" / ".tmp-step-30-abc").mkdir()
    assert resolve_resume("latest", tmp_path).name == "step-12"
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere").name == "step-12"
    assert resolve_resume(str(tmp_path / "checkpoints" / "step-3"), tmp_path).name == "step-3"
    assert resolve_resume(str(tmp_path / "checkpoints"), tmp_path).name == "step-12"  # the folder of them (round 7)
    with pytest.raises(UserError, match="--resume .*: no checkpoint"):
        resolve_resume(str(tmp_path / "nothing"), tmp_path)
    prune_checkpoints(tmp_path / "checkpoints", keep_last=1, keep_steps=[3])
    assert [path.name for path in list_checkpoints(tmp_path / "checkpoints")] == ["step-3", "step-12"]
    remove_incomplete(tmp_path / "checkpoints")
    assert not (tmp_path / "checkpoints" / ".tmp-step-30-abc").exists()


# Every place a kill can land while step-2 is written and step-1 pruned: before/after each fsync (files
# written, then each flushed, then the rename, then the parent directory), in the middle of a tensor file,
# and while the old checkpoint is being deleted.
KILL_POINTS = [("fsync", n) for n in range(8)] + [("mid_write", 0), ("mid_write", 1), ("rmtree", 0)]


@pytest.mark.parametrize("where, count", KILL_POINTS)
def test_a_kill_while_writing_leaves_a_loadable_checkpoint(tmp_path, where, count):
    checkpoints = tmp_path / "checkpoints"
    first_model, first_optimizer = trained_model_and_optimizer(steps=1, seed=0)
    save(checkpoints / "step-1", first_model, first_optimizer, 1)
    second_model, second_optimizer = trained_model_and_optimizer(steps=2, seed=1)

    pid = os.fork()
    if pid == 0:  # the child writes step-2 and dies (SIGKILL: no cleanup of any kind) at the chosen point
        try:
            calls = {"n": 0}

            def die_at(name, original):
                def wrapper(*args, **kwargs):
                    if name == where and calls["n"] == count:
                        if name == "mid_write":  # half of the file reaches the disk
                            original(*args, **kwargs)
                            os.truncate(args[1], os.path.getsize(args[1]) // 2)
                        os.kill(os.getpid(), signal.SIGKILL)
                    calls["n"] += name == where
                    return original(*args, **kwargs)
                return wrapper

            safe_files.fsync_path = die_at("fsync", safe_files.fsync_path)
            checkpoint.save_file = die_at("mid_write", checkpoint.save_file)
            safe_files.shutil.rmtree = die_at("rmtree", safe_files.shutil.rmtree)  # (pruning: delete_marker_last)
            save(checkpoints / "step-2", second_model, second_optimizer, 2)
            prune_checkpoints(checkpoints, keep_last=1)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL  # it really died mid-way

    latest = resolve_resume("latest", tmp_path)
    expected_model = {"step-1": first_model, "step-2": second_model}[latest.name]
    fresh = tiny_peft_model(seed=5)
    state = load_checkpoint(latest, fresh, build_optimizer(fresh, 1e-2, 0.01), None)
    assert state["step"] == int(latest.name.split("-")[1])
    assert all(torch.equal(adapter_tensors(fresh)[name], tensor)
               for name, tensor in adapter_tensors(expected_model).items())
    remove_incomplete(checkpoints)
    assert all(not path.name.startswith(".tmp-") and not path.name.startswith(".old-") for path in checkpoints.iterdir())


def test_new_data_is_refused_unless_asked_for_and_then_starts_at_its_first_batch(tmp_path):
    peft_model, optimizer = trained_model_and_optimizer(steps=1)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    metadata = {"template": "alpaca", "training": {"dataset_path": str(data), "batch_size": 4}}
    state = {"step": 3, "epoch": 0, "batches_done": 2, "epoch_nll": 1.5, "epoch_target_tokens": 7}
    path = save_checkpoint(tmp_path / "step-3", peft_model, optimizer, None, state, [capture_rng_state()], metadata)
    fresh = tiny_peft_model(seed=9)
    assert load_checkpoint(path, fresh, build_optimizer(fresh, 1e-2, 0.01), None, current=metadata)["batches_done"] == 2
    data.write_text(json.dumps([{"instruction": "c", "input": "", "output": "d"}]))  # the same name, other data
    for current in (None, metadata):  # with the run's fingerprint, and without (the file the checkpoint names)
        with pytest.raises(UserError, match="changed since the run started.*--resume_new_data"):
            load_checkpoint(path, fresh, build_optimizer(fresh, 1e-2, 0.01), None, current=current)
    resumed = load_checkpoint(path, fresh, build_optimizer(fresh, 1e-2, 0.01), None, current=metadata, new_data=True)
    assert [resumed[key] for key in ("step", "batches_done", "epoch_nll", "epoch_target_tokens")] == [3, 0, 0, 0]


def test_what_may_change_on_resume_is_decided_in_one_place():
    """:func:`refused_change` is the rule both the command line and the checkpoint's checks apply: a setting of
    the math never changes, the data's only with ``--resume_new_data``, the rest freely."""
    from minipeft.training.resume_checks import changed_setting_message, refused_change

    saved = {"learning_rate": 1e-3, "batch_size": 8, "dataset_path": "a.json", "max_steps": 10, "log_every": 1}
    assert refused_change(saved, {**saved, "max_steps": 20, "log_every": 5}) is None
    assert refused_change(saved, {**saved, "learning_rate": 2e-3}, new_data=True) == "learning_rate"
    assert refused_change(saved, {**saved, "batch_size": 4}) == "batch_size"
    assert refused_change(saved, {**saved, "batch_size": 4, "dataset_path": "b.json"}, new_data=True) is None
    assert refused_change(saved, {"learning_rate": 2e-3}) == "learning_rate"  # only flags both runs set compare
    assert refused_change(saved, {"weight_decay": 0.1}) is None
    assert changed_setting_message("--resume", "batch_size", 4, 8, leave_out=True) == (
        "--resume: --batch_size 4 changes what the run computes (it started with 8); resume with the run's own "
        "--batch_size (leave it out) or pass --resume_new_data to continue on the new data, or start a new run")
