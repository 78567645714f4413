"""DistributedDataParallel on CPU (gloo): 2 processes with half a batch each train exactly like 1 process with
the whole batch (same global batch, up to the rounding of the gradient all-reduce), and only rank 0 writes.

The workers are this file run as a script (``python test_training_ddp.py RANK WORLD PORT OUT``), which is
what ``torchrun`` does with train_llm.py: set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT and start copies.
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
from training_fixtures import ListLoader, make_batches, one_thread, read_records, tiny_peft_model  # noqa: F401

from minipeft.training import TrainingConfig, train

GLOBAL_ROWS = 4  # rows per global micro-batch: 4 on one process, 2 + 2 on two
SETTINGS = dict(epochs=2, gradient_accumulation_steps=2, learning_rate=1e-2, eval_every=3, log_every=100,
                device="cpu", lr_schedule="cosine", warmup_steps=1,
                precision="fp32")  # compared to 1e-5: auto would pick bf16 on a CPU with AMX or AVX512_BF16


def global_batches() -> list:
    return make_batches(5, rows=GLOBAL_ROWS, length=12, seed=21)  # uneven target tokens per row


def shard(batches: list, rank: int, world_size: int) -> list:
    """This rank's rows of every global batch (what a distributed sampler hands each process)."""
    rows = GLOBAL_ROWS // world_size
    return [{key: value[rank * rows:(rank + 1) * rows] for key, value in batch.items()} for batch in batches]


def run(rank: int, world_size: int, output_dir: str) -> None:
    from minipeft.training.distributed import init_distributed, shutdown_distributed

    context = init_distributed("cpu")
    assert (context.rank, context.world_size) == (rank, world_size)
    try:
        peft_model = tiny_peft_model("lora", "--lora_bias", "all")  # same seed: same init on every rank
        batches = shard(global_batches(), rank, world_size)
        val = shard(make_batches(2, rows=GLOBAL_ROWS, seed=22), rank, world_size)
        train(peft_model, ListLoader(batches, seed=3), val, TrainingConfig(output_dir=output_dir, **SETTINGS), context)
    finally:
        shutdown_distributed()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    single = tmp_path / "single"
    torch.manual_seed(0)
    train(tiny_peft_model("lora", "--lora_bias", "all"), ListLoader(global_batches(), seed=3),
          make_batches(2, rows=GLOBAL_ROWS, seed=22), TrainingConfig(output_dir=str(single), **SETTINGS))

    port = str(free_port())
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    outputs = [tmp_path / "ddp", tmp_path / "rank1-must-stay-empty"]
    workers = [subprocess.Popen([sys.executable, __file__, str(rank), str(outputs[rank])],
                                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [worker.communicate(timeout=240)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], logs

    assert not outputs[1].exists()  # only rank 0 writes
    ddp, one = read_records(outputs[0] / "metrics.jsonl"), read_records(single / "metrics.jsonl")
    assert len(ddp) == len(one) == 6 + 3  # 6 steps; evaluations before training, at step 3 and at the end
    for got, expected in zip(ddp, one):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, got, expected)
            else:  # names, phases, flags: pytest.approx compares numbers only
                assert got[key] == value, (key, got, expected)
    # The gradient norms above are the sharp check (Adam is blind to a gradient's scale). The weights agree to
    # well under 1% of one step (lr 1e-2): Adam divides by sqrt(v), so where a gradient is ~0 the rounding of
    # the all-reduce moves the update by up to ~lr * 1e-3.
    got = load_file(outputs[0] / "adapter" / "adapter_model.safetensors")
    expected = load_file(single / "adapter" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-4)
    state = json.loads((outputs[0] / "checkpoints" / "step-6" / "trainer_state.json").read_text())
    assert len(state["rng"]) == 2  # each process's random state, for an exact resume


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(int(sys.argv[1]), int(os.environ["WORLD_SIZE"]), sys.argv[2])
