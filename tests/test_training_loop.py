"""The training loop: loss normalisation under accumulation, schedules, perplexity, weight decay, exact
resume, Ctrl-C, non-finite losses, gradient checkpointing and the gradient check."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from training_fixtures import (NAN_TOKEN, ListLoader, adapter_tensors, concatenate, make_batches,  # noqa: F401
                               one_thread, read_records, tiny_model, tiny_peft_model)

from minipeft.core.errors import UserError
from minipeft.methods import METHODS
from minipeft.training import TrainingConfig, TrainResult, open_run_dir, train
from minipeft.training.distributed import DistributedContext
from minipeft.training.loop import accumulate_gradients, enable_gradient_checkpointing, evaluate
from minipeft.training.loss import causal_lm_loss_sum, count_target_tokens, perplexity
from minipeft.training.optimizer import parameter_groups
from minipeft.training.schedule import get_lr, warmup_steps_for
from minipeft.core.transformers_api import is_activation_checkpointing

CPU = DistributedContext()
NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def gradients(model) -> dict:
    return {name: parameter.grad.clone() for name, parameter in model.named_parameters() if parameter.grad is not None}


def run_config(tmp_path, **overrides) -> TrainingConfig:
    values = dict(output_dir=str(tmp_path), epochs=1, learning_rate=1e-2, log_every=100, device="cpu",
                  precision="fp32")  # exact arithmetic (auto picks bf16 on a CPU with AMX or AVX512_BF16)
    return TrainingConfig(**{**values, **overrides})


# -- the loss ------------------------------------------------------------------------------------------------
def test_loss_sum_shifts_once_and_matches_transformers_own_mean():
    model = tiny_model()
    batch = make_batches(1, rows=3, length=10, seed=3)[0]
    nll_sum, n_targets = causal_lm_loss_sum(model, batch)
    # transformers shifts the labels itself and averages over the target tokens
    hf_mean = model(**batch).loss
    assert int(n_targets) == count_target_tokens(batch) == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(nll_sum / n_targets, hf_mean, rtol=1e-5, atol=1e-6)


def test_loss_of_prompt_tuning_ignores_the_virtual_token_positions():
    peft_model = tiny_peft_model("prompt", "--num_virtual_tokens", "5")
    batch = make_batches(1, rows=2, length=10, seed=4)[0]
    nll_sum, n_targets = causal_lm_loss_sum(peft_model, batch)
    logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[1] == 5 + 10  # the virtual tokens come first
    expected = F.cross_entropy(logits[:, 5:-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")
    torch.testing.assert_close(nll_sum, expected)
    assert int(n_targets) == count_target_tokens(batch)


def test_perplexity_is_exp_of_total_nll_over_total_tokens():
    assert perplexity(2.0 * 50, 50) == pytest.approx(math.exp(2.0))
    assert perplexity(1e6, 1) == float("inf")
    model = tiny_model()
    batches = make_batches(3, rows=2, length=12, seed=5)
    loss, ppl, n_targets = evaluate(model, batches, CPU, NO_AUTOCAST)
    # independently: the log-probability of every target token
    total_nll, total_tokens, batch_means = 0.0, 0, []
    with torch.no_grad():
        for batch in batches:
            log_probs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            token_nll = -log_probs[:, :-1].gather(-1, labels.clamp(min=0)[..., None])[..., 0][mask]
            total_nll += float(token_nll.sum())
            total_tokens += int(mask.sum())
            batch_means.append(float(token_nll.mean()))
    assert n_targets == total_tokens
    assert loss == pytest.approx(total_nll / total_tokens, rel=1e-6)
    assert ppl == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-6)
    assert loss != pytest.approx(sum(batch_means) / len(batch_means), rel=1e-6)  # the tokens are uneven


# -- gradient accumulation -----------------------------------------------------------------------------------
def test_accumulated_window_has_the_gradient_of_one_big_batch():
    micro_batches = make_batches(4, rows=2, length=12, seed=7)
    counts = [count_target_tokens(batch) for batch in micro_batches]
    assert len(set(counts)) > 1  # uneven token counts, or the test proves nothing

    accumulated = tiny_peft_model("lora", "--lora_bias", "all")
    nll, n_targets, _ = accumulate_gradients(accumulated, micro_batches, CPU, NO_AUTOCAST)
    big = tiny_peft_model("lora", "--lora_bias", "all")
    big_nll, big_targets, _ = accumulate_gradients(big, [concatenate(micro_batches)], CPU, NO_AUTOCAST)

    assert n_targets == big_targets == sum(counts)
    assert nll == pytest.approx(big_nll, rel=1e-5)
    expected = gradients(big)
    got = gradients(accumulated)
    assert got.keys() == expected.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7)

    # what the 2024 bug did: average per micro-batch, then over the window -> a different gradient
    per_batch_mean = tiny_peft_model("lora", "--lora_bias", "all")
    for batch in micro_batches:
        nll_sum, count = causal_lm_loss_sum(per_batch_mean, batch)
        (nll_sum / count / len(micro_batches)).backward()
    wrong = gradients(per_batch_mean)
    assert not all(torch.allclose(wrong[name], expected[name], rtol=1e-3) for name in expected)


def test_b_times_k_trains_like_one_batch_of_bk_including_a_short_last_window(tmp_path):
    micro_batches = make_batches(5, rows=2, length=12, seed=8)  # k=2: windows of 2, 2 and 1 micro-batches
    big_batches = [concatenate(micro_batches[0:2]), concatenate(micro_batches[2:4]), micro_batches[4]]
    settings = dict(epochs=2, max_grad_norm=0.0, lr_schedule="linear", warmup_steps=1)

    accumulated = tiny_peft_model()
    train(accumulated, ListLoader(micro_batches, shuffle=False), None,
          run_config(tmp_path / "accumulated", gradient_accumulation_steps=2, **settings))
    big = tiny_peft_model()
    train(big, ListLoader(big_batches, shuffle=False), None, run_config(tmp_path / "big", **settings))

    records = read_records(tmp_path / "accumulated" / "metrics.jsonl", "train")
    expected = read_records(tmp_path / "big" / "metrics.jsonl", "train")
    assert len(records) == len(expected) == 6  # 3 steps per epoch: the short window is a step of its own
    for got, want in zip(records, expected):
        assert got["target_tokens"] == want["target_tokens"] and got["lr"] == want["lr"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4)
    for name, tensor in adapter_tensors(big).items():
        torch.testing.assert_close(adapter_tensors(accumulated)[name], tensor, rtol=1e-4, atol=1e-6)


# -- schedules and the optimizer -----------------------------------------------------------------------------
def test_schedules_at_known_steps():
    def lr(schedule, step, **kw):
        return get_lr(step, schedule=schedule, learning_rate=1.0, total_steps=110, **kw)

    # warmup: (step + 1) / (warmup + 1), never 0
    assert [lr("cosine", s, warmup_steps=10) for s in (0, 4, 9)] == pytest.approx([1 / 11, 5 / 11, 10 / 11])
    assert lr("constant", 0) == lr("constant", 109) == 1.0
    assert lr("linear", 10, warmup_steps=10) == 1.0
    assert lr("linear", 60, warmup_steps=10) == pytest.approx(0.5)
    assert lr("linear", 60, warmup_steps=10, min_lr=0.2) == pytest.approx(0.6)
    assert lr("cosine", 10, warmup_steps=10) == 1.0
    assert lr("cosine", 60, warmup_steps=10, min_lr=0.1) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr("cosine", 35, warmup_steps=10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr("cosine", 110, min_lr=0.1) == pytest.approx(0.1)
    assert lr("cosine", 500, min_lr=0.1) == pytest.approx(0.1)  # past the end: stays at min_lr
    assert warmup_steps_for(110, warmup_ratio=0.1) == 11
    with pytest.raises(UserError, match="--warmup_steps and --warmup_ratio"):
        warmup_steps_for(110, warmup_steps=5, warmup_ratio=0.1)


def test_learning_rate_reaches_the_optimizer_every_step(tmp_path):
    peft_model = tiny_peft_model()
    config = run_config(tmp_path, epochs=2, warmup_steps=2, lr_schedule="cosine", min_lr=1e-3)
    train(peft_model, ListLoader(make_batches(4)), None, config)
    lrs = [record["lr"] for record in read_records(tmp_path / "metrics.jsonl", "train")]
    assert lrs == [get_lr(step, schedule="cosine", learning_rate=1e-2, total_steps=8, warmup_steps=2, min_lr=1e-3)
                   for step in range(8)]


@pytest.mark.parametrize("method, flags, decayed", [
    ("lora", ("--lora_bias", "all"), {"lora_A.weight", "lora_B.weight"}),
    ("adapter", (), {"down.weight", "up.weight"}),
    ("ia3", (), set()),
    ("prompt", (), set()),
    ("selective", (), set()),
    ("dora", (), {"lora_A.weight", "lora_B.weight"}),
])
def test_weight_decay_only_on_the_matrices_a_method_adds(method, flags, decayed):
    peft_model = tiny_peft_model(method, *flags)
    decay, no_decay = parameter_groups(peft_model, weight_decay=0.1)
    names = {id(parameter): name for name, parameter in peft_model.named_parameters()}
    assert {names[id(p)].rsplit(".", 2)[-2] + "." + names[id(p)].rsplit(".", 1)[-1] for p in decay["params"]} \
        == decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    trainable = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
    assert all(parameter.dim() >= 2 for parameter in decay["params"])


# -- resume, Ctrl-C ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interrupt_at", [(0, 1), (1, 0), (1, 2)])  # mid-epoch, epoch end, after a checkpoint
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one_bitwise(tmp_path, interrupt_at):
    # 7 micro-batches, k=2 -> 4 steps per epoch (the last window short), 8 steps; dropout on, so the RNG matters
    batches, val_batches = make_batches(7, seed=11), make_batches(2, seed=12)
    settings = dict(epochs=2, gradient_accumulation_steps=2, eval_every=3, lr_schedule="cosine", warmup_steps=2)

    def model():
        return tiny_peft_model("lora", "--lora_dropout", "0.1", dropout=0.1)

    whole = model()
    result = train(whole, ListLoader(batches), val_batches, run_config(tmp_path / "whole", **settings))
    assert result.outcome == "finished" and result.plan.total_steps == 8

    interrupted = model()
    loader = ListLoader(batches, interrupt_at=interrupt_at)  # Ctrl-C while fetching that batch
    result = train(interrupted, loader, val_batches, run_config(tmp_path / "split", **settings))
    stopped_at = interrupt_at[0] * 4 + interrupt_at[1] // 2 + 1
    assert result.outcome == "interrupted" and result.state.step == stopped_at
    assert (tmp_path / "split" / "checkpoints" / f"step-{stopped_at}" / "trainer_state.json").is_file()

    resumed = model()  # a new process would build the model afresh, with its own random adapter init
    result = train(resumed, ListLoader(batches), val_batches, run_config(tmp_path / "split", resume="latest",
                                                                          **settings))
    assert result.outcome == "finished" and result.state.step == 8

    assert read_records(tmp_path / "split" / "metrics.jsonl") == read_records(tmp_path / "whole" / "metrics.jsonl")
    whole_tensors, resumed_tensors = adapter_tensors(whole), adapter_tensors(resumed)
    assert all(torch.equal(resumed_tensors[name], tensor) for name, tensor in whole_tensors.items())


def test_a_prefix_mlp_run_resumes_bitwise_and_a_checkpoint_without_the_mlp_is_refused(tmp_path):
    """``--prefix_projection``: the adapter file holds the MLP's output only (peft's form), so the checkpoint keeps
    the MLP itself (``prompt_encoder.safetensors``); every checkpoint of such a run was refused (round seven)."""
    batches, val_batches = make_batches(5, seed=11), make_batches(2, seed=12)
    settings = dict(epochs=2, eval_every=3)

    def model():
        return tiny_peft_model("prefix", "--prefix_length", "3", "--prefix_projection")

    whole = model()
    train(whole, ListLoader(batches), val_batches, run_config(tmp_path / "whole", **settings))
    interrupted = model()
    result = train(interrupted, ListLoader(batches, interrupt_at=(1, 1)), val_batches,
                   run_config(tmp_path / "split", **settings))
    assert result.outcome == "interrupted"
    checkpoint = tmp_path / "split" / "checkpoints" / f"step-{result.state.step}"
    assert (checkpoint / "prompt_encoder.safetensors").is_file()
    resumed = model()
    result = train(resumed, ListLoader(batches), val_batches, run_config(tmp_path / "split", resume="latest",
                                                                          **settings))
    assert result.outcome == "finished" and result.state.step == 10
    for name, tensor in whole.prompt_encoder.state_dict().items():  # the MLP itself, not only its output
        assert torch.equal(resumed.prompt_encoder.state_dict()[name], tensor), name
    checkpoint = tmp_path / "split" / "checkpoints" / "step-10"
    (checkpoint / "prompt_encoder.safetensors").unlink()  # as a checkpoint of an earlier minipeft
    with pytest.raises(UserError, match="no prompt_encoder.safetensors .* cannot be continued"):
        train(model(), ListLoader(batches), val_batches, run_config(tmp_path / "split2", resume=str(checkpoint),
                                                                    **settings))


def test_a_checkpoint_saved_at_an_epochs_last_step_resumes_in_the_next_epoch(tmp_path):
    """A periodic checkpoint at the last step of an epoch (all its batches consumed; then the process is lost):
    the resumed run starts the next epoch and ends where the uninterrupted one does."""
    batches, val_batches = make_batches(7, seed=11), make_batches(2, seed=12)
    settings = dict(epochs=2, gradient_accumulation_steps=2, eval_every=4, lr_schedule="cosine", warmup_steps=2)
    whole = tiny_peft_model("lora")
    train(whole, ListLoader(batches), val_batches, run_config(tmp_path / "whole", **settings))
    checkpoint = tmp_path / "whole" / "checkpoints" / "step-4"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["trainer"]["batches_done"] == 7
    resumed = tiny_peft_model("lora")
    result = train(resumed, ListLoader(batches), val_batches, run_config(tmp_path / "resumed", resume=str(checkpoint),
                                                                          **settings))
    assert result.outcome == "finished" and result.state.step == 8
    whole_tensors, resumed_tensors = adapter_tensors(whole), adapter_tensors(resumed)
    assert all(torch.equal(resumed_tensors[name], tensor) for name, tensor in whole_tensors.items())


def test_resume_refuses_another_method_and_a_missing_checkpoint(tmp_path):
    train(tiny_peft_model(), ListLoader(make_batches(2)), None, run_config(tmp_path, max_steps=1))
    with pytest.raises(UserError, match="the checkpoint holds a LORA adapter .* this run builds IA3"):
        train(tiny_peft_model("ia3"), ListLoader(make_batches(2)), None, run_config(tmp_path, resume="latest"))
    with pytest.raises(UserError, match="--resume .*nowhere: no checkpoint"):  # (latest starts a run not begun)
        train(tiny_peft_model(), ListLoader(make_batches(2)), None,
              run_config(tmp_path / "empty", resume=str(tmp_path / "nowhere")))
    with pytest.raises(UserError, match="holds checkpoints of an earlier run"):
        train(tiny_peft_model(), ListLoader(make_batches(2)), None, run_config(tmp_path, max_steps=1))


def test_train_owns_the_output_dir_or_takes_it_opened(tmp_path):
    """open_run_dir checks, creates and locks --output_dir: train() opens it itself, or takes it opened (as
    train_llm.py does before loading the model); a run that fails before writing anything leaves no folder."""
    with pytest.raises(UserError, match="the training set is empty"):
        train(tiny_peft_model(), ListLoader([]), None, run_config(tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    with pytest.raises(UserError, match="--resume .*gone: no checkpoint"):
        with open_run_dir(run_config(tmp_path / "nothing", resume=str(tmp_path / "gone"))):
            pytest.fail("a missing checkpoint is an error before the body runs (before any loading)")
    assert not (tmp_path / "nothing").exists()
    config = run_config(tmp_path / "run", max_steps=1)
    with open_run_dir(config) as run_dir:
        assert (run_dir.path / ".minipeft.lock").is_file()  # one run at a time writes here
        result = train(tiny_peft_model(), ListLoader(make_batches(2)), None, config, run_dir=run_dir)
    assert not (run_dir.path / ".minipeft.lock").exists()
    assert isinstance(result, TrainResult) and result.outcome == "finished" and result.signal is None
    assert result.state.step == result.plan.total_steps == 1
    assert result.last_checkpoint == run_dir.path / "checkpoints" / "step-1" and result.last_checkpoint.is_dir()


# -- non-finite losses ---------------------------------------------------------------------------------------
def poisoned_model():
    """A LoRA model whose embedding of NAN_TOKEN is NaN: any batch holding it has a NaN loss."""
    peft_model = tiny_peft_model()
    base = peft_model.base_model
    base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach().clone(), requires_grad=False)  # untie
    with torch.no_grad():
        base.transformer.wte.weight[NAN_TOKEN] = float("nan")
    return peft_model


def poison(batch: dict) -> dict:
    batch = {key: value.clone() for key, value in batch.items()}
    batch["input_ids"][0, 3] = NAN_TOKEN
    return batch


def test_a_nan_loss_skips_the_step_with_a_warning_and_training_goes_on(tmp_path, capsys):
    batches = make_batches(4, seed=13)
    batches[1] = poison(batches[1])
    peft_model = poisoned_model()
    result = train(peft_model, ListLoader(batches, shuffle=False), None, run_config(tmp_path))
    assert result.outcome == "finished" and result.state.step == 4
    assert "warning: step 2: loss nan" in capsys.readouterr().err
    losses = [record["loss"] for record in read_records(tmp_path / "metrics.jsonl", "train")]
    assert losses[1] is None and all(math.isfinite(loss) for loss in losses[:1] + losses[2:])
    assert all(torch.isfinite(tensor).all() for tensor in adapter_tensors(peft_model).values())


def test_nan_losses_in_a_row_stop_the_run(tmp_path):
    peft_model = poisoned_model()
    before = adapter_tensors(peft_model)
    batches = [poison(batch) for batch in make_batches(6, seed=14)]
    with pytest.raises(UserError, match="training diverged: the loss was not finite for 3 steps in a row"):
        train(peft_model, ListLoader(batches), None, run_config(tmp_path, max_nonfinite_steps=3))
    assert all(torch.equal(adapter_tensors(peft_model)[name], tensor) for name, tensor in before.items())


# -- gradient checkpointing and the gradient check -----------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_gradient_checkpointing_gives_the_same_gradients(method):
    batch = make_batches(1, rows=2, length=12, seed=15)[0]
    flags = ("--lora_bias", "all") if method in ("lora", "dora") else ()
    plain, checkpointed = tiny_peft_model(method, *flags), tiny_peft_model(method, *flags)
    enable_gradient_checkpointing(checkpointed)
    for model in (plain, checkpointed):
        model.train()
    if method == "prefix":  # refuses with a reason: the checkpointed layers drop past_key_values
        with pytest.raises(UserError, match="gradient_checkpointing"):
            accumulate_gradients(checkpointed, [batch], CPU, NO_AUTOCAST)
        return
    accumulate_gradients(plain, [batch], CPU, NO_AUTOCAST)
    accumulate_gradients(checkpointed, [batch], CPU, NO_AUTOCAST)
    expected, got = gradients(plain), gradients(checkpointed)
    assert got.keys() == expected.keys() and any(tensor.abs().sum() > 0 for tensor in got.values())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7)


def test_training_with_gradient_checkpointing_passes_the_gradient_check(tmp_path):
    peft_model = tiny_peft_model()
    result = train(peft_model, ListLoader(make_batches(3)), None, run_config(tmp_path, gradient_checkpointing=True))
    assert result.state.gradient_check_done and is_activation_checkpointing(peft_model.base_model)
    assert any(tensor.abs().sum() > 0 for name, tensor in adapter_tensors(peft_model).items() if "lora_B" in name)


def test_a_trainable_parameter_without_gradient_is_reported(tmp_path):
    peft_model = tiny_peft_model()
    peft_model.base_model.transformer.unused_scale = torch.nn.Parameter(torch.ones(3))  # never used in forward
    with pytest.raises(UserError, match="received no gradient .*unused_scale.*never uses them"):
        train(peft_model, ListLoader(make_batches(3)), None, run_config(tmp_path))


def test_fp16_needs_cuda_and_bf16_autocast_runs_on_cpu(tmp_path):
    with pytest.raises(UserError, match="--precision fp16 needs a CUDA GPU"):
        train(tiny_peft_model(), ListLoader(make_batches(2)), None, run_config(tmp_path / "fp16", precision="fp16"))
    peft_model = tiny_peft_model()
    result = train(peft_model, ListLoader(make_batches(2)), make_batches(1),
                   run_config(tmp_path / "bf16", precision="bf16"))
    assert result.plan.precision == "bf16" and math.isfinite(result.state.eval_loss)
    assert all(tensor.dtype == torch.float32 for tensor in adapter_tensors(peft_model).values())  # weights stay fp32


def test_early_stopping_and_best_adapter(tmp_path):
    # an absurd learning rate makes the eval loss worse at every evaluation after the first
    peft_model = tiny_peft_model("lora", "--lora_alpha", "64")
    result = train(peft_model, ListLoader(make_batches(8)), make_batches(2, seed=3),
                   run_config(tmp_path, epochs=5, learning_rate=1.0, eval_every=1, early_stopping_patience=2,
                              max_grad_norm=0.0))
    assert result.outcome == "early_stopped"
    state = result.state
    assert state.evals_without_improvement == 2 and state.step == state.best_step + 2
    evals = read_records(tmp_path / "metrics.jsonl", "eval")
    assert min(record["eval_loss"] for record in evals[1:]) == state.best_eval_loss
    assert (tmp_path / "best" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / f"step-{state.best_step}").is_dir()  # the best checkpoint is kept



@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_run_files_get_the_users_umask_not_tempfiles_private_mode(tmp_path, umask):
    import os
    import stat

    from minipeft.files.safe_files import write_json_atomically
    from minipeft.training.metrics import plot_loss_curve

    previous = os.umask(umask)
    try:
        out = tmp_path / "run"
        train(tiny_peft_model("lora"), make_batches(2, rows=2, length=8, seed=1), make_batches(1, rows=2, seed=2),
              run_config(out, max_steps=2, eval_every=2))
        write_json_atomically(out / "metrics.json", {"a": 1})
        if plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png") is None:
            pass  # no matplotlib: the other files still count
    finally:
        os.umask(previous)
    paths = [out, *out.rglob("*")]
    assert any(path.name == "adapter_model.safetensors" for path in paths)
    for path in paths:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
