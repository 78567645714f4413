"""FSDP2 (``--sharding fsdp``) on CPU with gloo: one launch of 2 processes as 2 torchrun "nodes" × 1 process
(``--nnodes 2 --rdzv_backend c10d`` on 127.0.0.1), which trains the same tiny Llama + LoRA with FSDP2 and with
DDP, on a dense and on an NF4 base, measures what each rank holds, resumes, and runs ``train_llm.py --sharding
fsdp``; the workers write their results under one folder and the tests below assert on them. Then rank 1 is
SIGKILLed mid-run: both torchrun agents start their workers again (``--max_restarts 1``), which resume the run.

The worker is this file run as a script by torchrun (``__main__`` at the bottom).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_fixtures import ListLoader, make_batches, one_thread, read_records  # noqa: F401

from minipeft.core.errors import UserError
from minipeft.training import TrainingConfig, train

GLOBAL_ROWS = 4  # rows per global micro-batch: 4 on one process, 2 + 2 on two
TARGETS = "c_attn,c_proj,c_fc"  # every Conv1D of a GPT-2 block (attn.c_proj and mlp.c_proj both match c_proj)
SETTINGS = dict(epochs=2, gradient_accumulation_steps=2, learning_rate=1e-2, eval_every=3, log_every=100,
                device="cpu", lr_schedule="cosine", warmup_steps=1, precision="fp32")
CLIPPED = 0.05  # --max_grad_norm that bites (the norms are 0.4-0.7); the default 1.0 measures, then scales by 1
STEPS = 6  # 5 global batches, 2 per window: 3 windows per epoch, 2 epochs


def tiny_lora_model(quantize: bool = False):
    """A GPT-2 of width 64 and 2 blocks, LoRA on every linear layer of the blocks, the same on every process.

    GPT-2, not Llama: on Llama a run swaps in the memory-lean RMSNorm (:mod:`minipeft.fast.rms_norm`), whose
    hand-written backward rounds differently from transformers' norm (gradients within ~1e-6), and FSDP2 runs
    without module swaps; GPT-2's LayerNorm is the same module in both, so FSDP2 and DDP can agree bit for bit.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from training_fixtures import method_config
    from minipeft.model.peft_model import get_peft_model
    from minipeft.quantization.nf4 import quantize_model

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    if quantize:
        quantize_model(model, compute_dtype=torch.float32)
    torch.manual_seed(1)
    return get_peft_model(model, method_config(model, "lora", "--target_modules", TARGETS))


def global_batches() -> list:
    return make_batches(5, rows=GLOBAL_ROWS, length=12, seed=21)


def shard(batches: list, rank: int, world_size: int) -> list:
    rows = GLOBAL_ROWS // world_size
    return [{key: value[rank * rows:(rank + 1) * rows] for key, value in batch.items()} for batch in batches]


def tiny_llama_lora_model():
    """A Llama of width 64 and 2 blocks (rotary: its ``inv_freq`` is a non-persistent buffer), LoRA on q and v."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from training_fixtures import method_config
    from minipeft.model.peft_model import get_peft_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                         max_position_embeddings=64, rope_theta=500000.0))
    torch.manual_seed(1)
    return get_peft_model(model, method_config(model, "lora", "--target_modules", "q_proj,v_proj"))


def built_from_rank0(build, context, materialised: list):
    """``build``'s model made by :func:`~minipeft.training.sharding.build_sharded` (meta on every rank, rank 0
    reads and broadcasts); ``materialised`` gets the bytes each ``build()`` call allocated (0 on the meta device)."""
    from minipeft.training.sharding import build_sharded

    def counted_build():
        model = build()
        materialised.append(sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
                                if t.device.type != "meta"))
        return model

    return build_sharded(counted_build, torch.device("cpu"), context.world_size, "fp32")


def train_tiny(output_dir, context, quantize=False, interrupt_at=None, model=None, kill_at=None, **settings):
    """Train the tiny model (or ``model``) on this process's rows; returns the (sharded or not) model.
    ``interrupt_at``: ``(epoch, batch)`` where a SIGINT arrives (the run checkpoints and stops); ``kill_at``:
    where this process is SIGKILLed (no checkpoint)."""
    model = tiny_lora_model(quantize) if model is None else model
    rank, world = (context.rank, context.world_size) if context else (0, 1)
    train(model, ListLoader(shard(global_batches(), rank, world), seed=3, interrupt_at=interrupt_at,
                            kill_at=kill_at),
          shard(make_batches(2, rows=GLOBAL_ROWS, seed=22), rank, world),
          TrainingConfig(output_dir=str(output_dir), **{**SETTINGS, **settings}), context)
    return model


# -- the worker (one per "node") ----------------------------------------------------------------------------
def worker(out: Path) -> None:
    from dataclasses import replace

    from minipeft.quantization.nf4 import Linear4bit
    from minipeft.training.distributed import init_distributed
    from minipeft.training.sharding import local_bytes, shard_model

    if all((out / f"killed.{number}").exists() for number in (0, 1)):  # torchrun restarted us after the SIGKILL
        return after_the_restart(out)
    fsdp = init_distributed("cpu", "fsdp")
    ddp = replace(fsdp, sharding="ddp")  # the same process group, DDP around the model
    rank, results = fsdp.rank, {}
    try:
        for name, context, quantize in (("fsdp", fsdp, False), ("ddp", ddp, False), ("nf4_fsdp", fsdp, True),
                                        ("nf4_ddp", ddp, True)):
            model = None
            if context.is_sharded:  # the FSDP2 runs: built on the meta device, loaded from rank 0
                results[f"{name}_materialised"] = materialised = []
                model = built_from_rank0(lambda: tiny_lora_model(quantize), context, materialised)
            model = train_tiny(out / name, context, quantize, model=model)
            optimizer_state = [t for p in model.parameters() if p.requires_grad for t in (p, p)]  # AdamW: 2 moments
            results[f"{name}_bytes"] = {  # the frozen base: parameters and buffers (NF4 scales, rotary inv_freq)
                "base": local_bytes([*(p for p in model.parameters() if not p.requires_grad), *model.buffers()]),
                "adapter": local_bytes([p for p in model.parameters() if p.requires_grad]),
                "adamw_moments": local_bytes(optimizer_state)}
        for name, context in (("clipped_fsdp", fsdp), ("clipped_ddp", ddp)):
            train_tiny(out / name, context, max_grad_norm=CLIPPED)
        # resume exactly: Ctrl-C in step 4 (a checkpoint at its end), then a new model resumes and does the rest
        train_tiny(out / "resumed", fsdp, interrupt_at=(1, 2))
        train_tiny(out / "resumed", fsdp, resume="latest")
        # NF4 under bf16 mixed precision: inside the forward the codes arrive whole, the scales still float32
        model = tiny_lora_model(quantize=True)
        layer = next(module for module in model.modules() if isinstance(module, Linear4bit))
        seen = {}
        layer.register_forward_pre_hook(lambda module, args: seen.update(
            packed=[str(module.packed.dtype), module.packed.numel(), type(module.packed.data).__name__],
            absmax_scales=str(module.absmax_scales.dtype), absmax_offset=str(module.absmax_offset.dtype)))
        whole_codes = layer.packed.detach().clone()
        shard_model(model, torch.device("cpu"), fsdp.world_size, "bf16")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=global_batches()[0]["input_ids"])
        results["nf4_bf16_forward"] = seen
        results["nf4_codes_equal"] = bool(torch.equal(layer.packed.full_tensor(), whole_codes))
        results["nf4_codes_local"] = layer.packed.to_local().numel()
        # rotary inv_freq (not in the state dict) rebuilt: the same logits as the model built whole
        ids = global_batches()[0]["input_ids"]
        with torch.no_grad():
            got = built_from_rank0(tiny_llama_lora_model, fsdp, [])(input_ids=ids).logits
            results["rotary_logits_equal"] = bool(torch.equal(got, tiny_llama_lora_model()(input_ids=ids).logits))
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(results))
    # a machine lost: rank 1 is SIGKILLed in step 5 (checkpoint: step 3); rank 0's next collective fails, both
    # torchrun agents start their worker again (--max_restarts 1), which resumes from the latest checkpoint
    (out / f"killed.{rank}").touch()
    train_tiny(out / "killed", fsdp, kill_at=(1, 3) if rank == 1 else None)
    raise AssertionError("rank 1 was to be killed in step 5")


# One validation batch (2 records): rank 1 has none, and its forwards must still join rank 0's all-gathers (a
# run with an odd number of validation batches hung in its first evaluation: round eleven).
CLI_FLAGS = ["--device", "cpu", "--max_steps", "2", "--max_records", "24", "--val_size", "2", "--batch_size", "2",
             "--no_cache", "--precision", "fp32"]


def after_the_restart(out: Path) -> None:
    """The workers torchrun started again: resume the killed run, then ``train_llm.py --sharding fsdp`` (last:
    the command line ends the process group). Ranks may be dealt anew by the new rendezvous.

    The process group's keys get a prefix of their own: the agent's store still holds the first workers'
    addresses under the default one, which gloo would read before the new workers overwrite them."""
    import torch.distributed as dist

    from minipeft.cli.train import main
    from minipeft.training.distributed import init_distributed

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore("after-the-kill", store),
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    fsdp = init_distributed("cpu", "fsdp")  # (the group above)
    saved = sorted(path.name for path in (out / "killed" / "checkpoints").glob("step-*"))
    (out / f"killed_checkpoints.{fsdp.rank}").write_text(" ".join(saved))  # what the kill left
    train_tiny(out / "killed", fsdp, resume="latest")
    exit_status = main(["--sharding", "fsdp", *CLI_FLAGS, "--output_dir", str(out / "cli")])
    (out / f"cli_exit.{fsdp.rank}").write_text(str(exit_status))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(launch folder, per-rank results, one-process folder)``. The launch is 2 nodes × 1 process: two torchrun
    agents meeting at a c10d rendezvous on 127.0.0.1, as on two machines; while it runs, this process trains the
    one-process references on the same global batches."""
    out, single = tmp_path_factory.mktemp("fsdp"), tmp_path_factory.mktemp("single")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--max_restarts", "1",  # the workers are started again once, after one of them is SIGKILLed
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "minipeft-test",
               __file__, str(out)]
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    torch.set_num_threads(1)
    for name, quantize, settings in (("dense", False, {}), ("nf4", True, {}),
                                     ("clipped", False, {"max_grad_norm": CLIPPED})):
        train_tiny(single / name, None, quantize, **settings)
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()  # (a no-op once it has exited)
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(logs)[-6000:]
    return out, [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)], single


def adapter(path) -> dict:
    return load_file(Path(path) / "adapter" / "adapter_model.safetensors")


def max_difference(got: dict, expected: dict) -> float:
    assert got.keys() == expected.keys()
    return max(float((got[name] - expected[name]).abs().max()) for name in expected)


# One process sums each gradient in another order than two halves and an all-reduce do (its matmul kernels
# block the batch by the CPU's vector width): the grad norm differed by 1.6e-5 relative on an Intel CPU with AMX.
ONE_PROCESS_REL = 1e-4


def assert_same_steps(run_dir, reference_dir, rel: float) -> list:
    got, expected = (read_records(Path(path) / "metrics.jsonl", "train") for path in (run_dir, reference_dir))
    assert len(got) == len(expected) == STEPS
    for step, want in zip(got, expected):
        assert step["loss"] == pytest.approx(want["loss"], rel=rel)
        assert step["grad_norm"] == pytest.approx(want["grad_norm"], rel=rel)  # the full norm, not one rank's
    return got


@pytest.mark.parametrize("base", ["", "nf4_"])
def test_fsdp_is_bitwise_ddp_and_close_to_one_process(runs, base):
    out, _, single = runs
    fsdp, ddp = adapter(out / f"{base}fsdp"), adapter(out / f"{base}ddp")
    assert fsdp.keys() == ddp.keys() and len(fsdp) == 2 * 4 * 2  # A and B, 4 layers, 2 blocks
    for name in fsdp:  # full shapes: the gathered tensors, not rank 0's half (accelerate PR #4206)
        assert fsdp[name].shape == ddp[name].shape and torch.equal(fsdp[name], ddp[name]), name
    reference = single / ("nf4" if base else "dense")
    assert max_difference(fsdp, adapter(reference)) <= 2e-4
    assert_same_steps(out / f"{base}fsdp", reference, rel=ONE_PROCESS_REL)
    assert_same_steps(out / f"{base}fsdp", out / f"{base}ddp", rel=1e-6)


def test_clipping_uses_the_full_norm_of_the_sharded_gradients(runs):
    """Clipping that bites: the norm is summed over both ranks' pieces (its rounding differs from DDP's in the
    last bits, so the adapters agree to the one-process tolerance, not bit for bit)."""
    out, _, single = runs
    steps = assert_same_steps(out / "clipped_fsdp", out / "clipped_ddp", rel=1e-6)
    assert all(step["grad_norm"] > 5 * CLIPPED for step in steps)
    assert_same_steps(out / "clipped_fsdp", single / "clipped", rel=ONE_PROCESS_REL)
    assert max_difference(adapter(out / "clipped_fsdp"), adapter(out / "clipped_ddp")) <= 2e-4
    assert max_difference(adapter(out / "clipped_fsdp"), adapter(single / "clipped")) <= 2e-4


def test_the_saved_adapter_loads_in_peft(runs):
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel

    out, _, single = runs
    base = tiny_lora_model().base_model  # the frozen tiny Llama (LoRA layers are replaced by peft's)
    config = base.config
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(GPT2LMHeadModel(config), out / "fsdp" / "adapter")
    loaded = {name.replace(".default", ""): tensor for name, tensor in theirs.state_dict().items() if "lora_" in name}
    assert max_difference(loaded, adapter(single / "dense")) <= 2e-4


def test_each_rank_holds_half_of_the_base_and_of_the_adapter_state(runs):
    _, results, _ = runs
    for base in ("", "nf4_"):
        for key in ("base", "adapter", "adamw_moments"):
            whole = results[0][f"{base}ddp_bytes"][key]
            pieces = [result[f"{base}fsdp_bytes"][key] for result in results]
            assert sum(pieces) >= whole and max(pieces) <= 0.55 * whole, (base, key, pieces, whole)


def test_only_rank_0_materialises_the_model_when_built_on_the_meta_device(runs):
    """Every rank builds on the meta device (0 bytes), rank 0 alone builds the whole model for real and
    broadcasts it; the trained adapters above are those of a model loaded on every rank (bitwise DDP's)."""
    _, results, _ = runs
    for base in ("", "nf4_"):
        whole = sum(results[0][f"{base}ddp_bytes"][key] for key in ("base", "adapter"))
        assert results[0][f"{base}fsdp_materialised"] == [whole, 0]  # the real build, then the meta one
        assert results[1][f"{base}fsdp_materialised"] == [0]  # the meta build only: never the whole model
    assert all(result["rotary_logits_equal"] for result in results)


def test_nf4_codes_shard_and_scales_stay_float32_under_bf16(runs):
    _, results, _ = runs
    seen = results[0]["nf4_bf16_forward"]
    assert seen["packed"][0] == "torch.uint8" and seen["packed"][2] == "Tensor"  # gathered whole for the forward
    assert seen["absmax_scales"] == seen["absmax_offset"] == "torch.float32"  # never cast by mixed precision
    assert all(result["nf4_codes_equal"] for result in results)  # the same codes bit for bit
    assert results[0]["nf4_codes_local"] * 2 == seen["packed"][1]  # each rank keeps half of them


def test_resuming_a_sharded_run_ends_where_an_uninterrupted_one_does(runs):
    out, _, single = runs
    assert max_difference(adapter(out / "resumed"), adapter(out / "fsdp")) == 0.0
    resumed, uninterrupted = (read_records(out / run / "metrics.jsonl", "train") for run in ("resumed", "fsdp"))
    assert resumed == uninterrupted


def test_a_run_that_lost_a_rank_to_sigkill_resumes_to_the_uninterrupted_end(runs):
    """SIGKILL of rank 1 in step 5, torchrun starts both workers again, ``--resume latest`` (step 3): bitwise."""
    out, _, _ = runs
    assert sorted(path.name for path in (out / "killed" / "checkpoints").glob("step-*")) == ["step-3", "step-6"]
    assert max_difference(adapter(out / "killed"), adapter(out / "fsdp")) == 0.0
    assert [(out / f"killed_checkpoints.{rank}").read_text() for rank in (0, 1)] == ["step-3"] * 2  # at the restart
    # (the resumed run rewrites metrics.jsonl from the checkpoint's step on: step 4 is in it once)
    assert read_records(out / "killed" / "metrics.jsonl") == read_records(out / "fsdp" / "metrics.jsonl")


def test_a_sharded_checkpoint_resumes_on_one_process(runs, tmp_path):
    import shutil

    out, _, single = runs
    shutil.copytree(out / "resumed", tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-6")
    shutil.rmtree(tmp_path / "run" / "adapter")
    train_tiny(tmp_path / "run", None, resume=str(tmp_path / "run" / "checkpoints" / "step-5"))  # the interrupted one
    assert max_difference(adapter(tmp_path / "run"), adapter(out / "fsdp")) <= 2e-4


def test_train_llm_runs_sharded_and_only_rank_0_writes(runs, tmp_path):
    out, results, _ = runs
    assert [(out / f"cli_exit.{rank}").read_text() for rank in (0, 1)] == ["0", "0"]
    summary = json.loads((out / "cli" / "metrics.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2
    assert (out / "cli" / "adapter" / "adapter_model.safetensors").is_file()
    from minipeft.cli import run
    from minipeft.cli.train import main

    assert run(main, [*CLI_FLAGS, "--output_dir", str(tmp_path / "one")]) == 0  # the same run in one process
    sharded, alone = (read_records(folder / "metrics.jsonl", "eval")[0] for folder in (out / "cli", tmp_path / "one"))
    assert sharded["step"] == alone["step"] == 0 and sharded["eval_tokens"] == alone["eval_tokens"]
    assert sharded["eval_loss"] == pytest.approx(alone["eval_loss"], rel=1e-6)  # rank 1's idle forwards add nothing


# -- bad input: one error line, exit 2 (in-process, no launch) ----------------------------------------------
@pytest.mark.parametrize("flags, message", [
    ([], "--sharding fsdp: start the run with torchrun"),
    (["--modification_type", "prefix"], "--sharding fsdp with --modification_type prefix: its adapter file is"),
    (["--modification_type", "prompt"], "--sharding fsdp with --modification_type prompt"),
    (["--compile"], "--sharding fsdp with --compile"),
])
def test_what_fsdp_cannot_run_is_one_error_line(tmp_path, capsys, monkeypatch, flags, message):
    from minipeft.cli import run
    from minipeft.cli.train import main

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert run(main, ["--sharding", "fsdp", "--output_dir", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()


def test_cpu_offload_without_fsdp_is_refused():
    with pytest.raises(UserError, match="--fsdp_cpu_offload needs --sharding fsdp"):
        TrainingConfig(fsdp_cpu_offload=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]))
