"""``train_llm.py --sharding fsdp`` under torchrun (2 processes, CPU, gloo): process 0 loads the base, process 1
builds it on the meta device and never holds it whole; the adapters equal DDP's; plus FSDP2 against one process
with SGD, and bf16 mixed precision.

One launch of 2 processes (``torchrun --nproc_per_node 2``, a c10d rendezvous on 127.0.0.1). The worker (this
file run as a script, ``__main__`` at the bottom) runs the command line several times, in-process (``main(argv)``
is ``python train_llm.py argv``), each run in a process group of its own (``main`` ends its group), with a
recorder around :func:`~minipeft.loading.streaming.load_base_model` and
:func:`~minipeft.training.sharding.build_sharded`: the bytes every load materialised on each process, the bytes
each process holds once the model is sharded, and how much its peak RSS grew while loading. The tests below
assert on what the workers wrote.
"""

import json
import os
import resource
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_training_fsdp import adapter, free_port, max_difference, train_tiny
from training_fixtures import read_records

# the command line of every run: the built-in data, 2 steps of 2 records a process, fp32 unless a run says.
# No clipping (FSDP2 sums the squared norm over pieces: it rounds differently from DDP's, tests/test_training_fsdp.py)
# and no dropout (DDP's run on a CPU draws LoRA's dropout by gaps, minipeft/fast; FSDP2's the reference way).
COMMON = ["--device", "cpu", "--max_steps", "2", "--max_records", "24", "--val_size", "4", "--batch_size", "2",
          "--no_cache", "--learning_rate", "1e-2", "--seed", "7", "--max_grad_norm", "0", "--lora_dropout", "0"]
# name: (--model, extra flags); each is run under --sharding fsdp, then --sharding ddp. The Llama folder first:
# the growth of a process's peak memory while it loads is clean only in the first run.
RUNS = {"llama": ("LLAMA", ["--precision", "fp32", "--target_modules", "q_proj,v_proj,down_proj"]),
        "builtin": ("builtin", ["--precision", "fp32"]),
        "llama_nf4": ("LLAMA", ["--precision", "fp32", "--quantize", "nf4"]),
        "builtin_bf16": ("builtin", ["--precision", "bf16"])}
SGD_LEARNING_RATE = 1e-2


def write_llama_checkpoint(directory: Path, **shape) -> int:
    """A Llama of width 512 and 4 blocks (18M parameters, 73 MB in float32, untied head; ``shape`` changes it) with
    the built-in tokenizer, as ``save_pretrained`` writes it; returns its bytes in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from minipeft.builtin import load_builtin_tokenizer

    tokenizer = load_builtin_tokenizer()
    torch.manual_seed(0)
    shape = {**dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8), **shape}
    model = LlamaForCausalLM(LlamaConfig(
        **shape, num_key_value_heads=2, vocab_size=3072, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(parameter.numel() * 4 for parameter in model.parameters())


def sgd(model, learning_rate: float, weight_decay: float) -> torch.optim.SGD:
    """What the SGD runs put in place of :func:`~minipeft.training.optimizer.build_optimizer`: the update is
    lr × (the momentum's sum of) gradients, nothing divides by a gradient's own size as AdamW's √v does.
    (Momentum: the loop counts a step as taken when the optimizer holds state.)"""
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=learning_rate, momentum=0.9)


def tensor_layout(model) -> dict:
    """``{name: (module class, shape, dtype)}`` of every parameter and buffer, non-persistent ones included."""
    return {name: (type(model.get_submodule(name.rpartition(".")[0])).__name__, tuple(t.shape), str(t.dtype))
            for name, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("model, quantize, dtype", [("builtin", "none", torch.float32),
                                                    ("builtin", "nf4", torch.float32),
                                                    ("llama", "none", torch.bfloat16),
                                                    ("llama", "nf4", torch.float32)])
def test_the_meta_build_is_the_loaded_model_without_bytes(tmp_path, model, quantize, dtype):
    """What a process other than 0 builds (``load_base_model(..., on_meta=True)``) has the modules, shapes and
    dtypes of what process 0 loads, and the same tokenizer; FSDP2 then gives it process 0's values."""
    from minipeft.loading.streaming import load_base_model

    if model == "llama":
        write_llama_checkpoint(tmp_path, hidden_size=64, intermediate_size=128, num_attention_heads=4)
        model = str(tmp_path)
    loaded, tokenizer = load_base_model(model, quantize, dtype=dtype, log=lambda message: None,
                                        compute_dtype=torch.float32)
    built, meta_tokenizer = load_base_model(model, quantize, dtype=dtype, compute_dtype=torch.float32, on_meta=True)
    assert tensor_layout(built) == tensor_layout(loaded)
    assert all(t.is_meta for t in (*built.parameters(), *built.buffers())) and tensor_bytes(built) == 0
    assert meta_tokenizer("the capital of France") == tokenizer("the capital of France")


# -- the worker ------------------------------------------------------------------------------------------------
def tensor_bytes(model, on_meta_too: bool = False) -> int:
    """Bytes of the parameters and buffers of ``model`` (tied ones once); not those on the meta device unless
    ``on_meta_too``."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if on_meta_too or t.device.type != "meta"}
    return sum(t.numel() * t.element_size() for t in tensors.values())


RECORDS = []  # what the current run loaded (record_loads)


def record_loads(records: list) -> None:
    """Wrap ``load_base_model`` and ``build_sharded`` (module attributes, looked up at call time) so that each
    call appends what it gave to ``records``; once per process."""
    import minipeft.loading.streaming as streaming
    import minipeft.training.sharding as sharding
    from minipeft.training.sharding import local_bytes

    load_base_model, build_sharded = streaming.load_base_model, sharding.build_sharded

    def recorded_load(*args, **kwargs):
        model, tokenizer = load_base_model(*args, **kwargs)
        records.append({"call": "load_base_model", "on_meta": bool(kwargs.get("on_meta")),
                        "materialised": tensor_bytes(model), "whole": tensor_bytes(model, on_meta_too=True)})
        return model, tokenizer

    def recorded_build(*args, **kwargs):
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        model = build_sharded(*args, **kwargs)
        trainable = [p for p in model.parameters() if p.requires_grad]
        records.append({"call": "build_sharded",  # the growth of the process's peak RSS (kB) while loading:
                        "peak_growth": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) * 1024,
                        "base": local_bytes([*(p for p in model.parameters() if not p.requires_grad),
                                             *model.buffers()]),
                        "adapter": local_bytes(trainable), "adapter_dtypes": sorted({str(p.dtype) for p in trainable})})
        return model

    streaming.load_base_model, sharding.build_sharded = recorded_load, recorded_build


def cli_run(out: Path, name: str, sharding: str, llama: str, rank: int, world_size: int, store) -> dict:
    """``train_llm.py --sharding {sharding}`` of ``RUNS[name]`` in a process group of its own; what it loaded."""
    import torch.distributed as dist

    from minipeft.cli.train import main

    model, flags = RUNS[name]
    records = RECORDS
    records.clear()
    dist.init_process_group("gloo", store=dist.PrefixStore(f"{name}-{sharding}", store), rank=rank,
                            world_size=world_size)
    status = main(["--model", llama if model == "LLAMA" else model, "--sharding", sharding, *COMMON, *flags,
                   "--output_dir", str(out / f"{name}_{sharding}")])  # (ends the process group)
    return {"exit": status, "records": list(records)}


@contextmanager
def no_norm_swap(model, warn=None):
    yield 0


def worker(out: Path, llama: str) -> None:
    import torch.distributed as dist

    import minipeft.fast
    import minipeft.training.loop as loop
    from minipeft.training.distributed import init_distributed

    # DDP's runs would swap in the memory-lean RMSNorm (minipeft/fast), whose backward rounds differently from
    # transformers' norm; FSDP2 swaps no module. Without the swap both compute the same operations.
    minipeft.fast.use_memory_lean_rms_norm = no_norm_swap
    import transformers.models.llama.modeling_llama  # noqa: F401  (imported now: not in the first run's peak)

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    results = {}
    record_loads(RECORDS)
    try:
        for name in RUNS:  # the first run's peak memory is the cleanest: nothing loaded before it
            for sharding in ("fsdp", "ddp"):
                results[f"{name}_{sharding}"] = cli_run(out, name, sharding, llama, rank, world_size, store)
        # FSDP2 against one process with plain SGD (no moments dividing by tiny second moments)
        dist.init_process_group("gloo", store=dist.PrefixStore("sgd", store), rank=rank, world_size=world_size)
        loop.build_optimizer = sgd
        train_tiny(out / "sgd_fsdp", init_distributed("cpu", "fsdp"), learning_rate=SGD_LEARNING_RATE)
        dist.destroy_process_group()
    finally:
        (out / f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(launch folder, per-rank results, one-process folder, the Llama's float32 bytes)``."""
    import minipeft.training.loop as loop

    out, single = tmp_path_factory.mktemp("fsdp_cli"), tmp_path_factory.mktemp("single_sgd")
    llama_bytes = write_llama_checkpoint(out / "llama")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "minipeft-cli",
               __file__, str(out), str(out / "llama")]
    launch = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    torch.set_num_threads(1)
    build_optimizer = loop.build_optimizer
    try:
        loop.build_optimizer = sgd
        train_tiny(single / "sgd", None, learning_rate=SGD_LEARNING_RATE)  # the one-process reference
        loop.build_optimizer = build_optimizer
        log = launch.communicate(timeout=600)[0]
    finally:
        loop.build_optimizer = build_optimizer
        launch.kill()  # (a no-op once it has exited)
    assert launch.returncode == 0, log[-6000:]
    return out, [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)], single, llama_bytes


def cli_adapter(out: Path, run: str) -> dict:
    return load_file(out / run / "adapter" / "adapter_model.safetensors")


def loads_before_sharding(records: list) -> list:
    """The ``load_base_model`` calls of a run up to its ``build_sharded``."""
    calls = [record["call"] for record in records]
    return [record for record in records[:calls.index("build_sharded")] if record["call"] == "load_base_model"]


@pytest.mark.parametrize("name", ["builtin", "llama", "llama_nf4"])
def test_rank_1_never_materialises_the_base(runs, name):
    """Process 0 loads the base once for real and builds it once on meta; process 1 only on meta (0 bytes).
    Sharded, each holds about half of the base; under DDP each holds all of it."""
    _, results, _, _ = runs
    loads = [loads_before_sharding(result[f"{name}_fsdp"]["records"]) for result in results]
    whole = loads[0][0]["whole"]
    assert [(r["on_meta"], r["materialised"]) for r in loads[0]] == [(False, whole), (True, 0)]
    assert [(r["on_meta"], r["materialised"]) for r in loads[1]] == [(True, 0)]
    assert loads[1][0]["whole"] == whole  # the same model, on meta
    for result in results:  # (after training, --quantize nf4 loads the float base on rank 0: its loss cost)
        assert result[f"{name}_ddp"]["records"][0]["materialised"] == whole  # DDP: every process loads it all
    pieces = [next(r for r in result[f"{name}_fsdp"]["records"] if r["call"] == "build_sharded")["base"]
              for result in results]
    assert sum(pieces) >= whole * 0.99 and max(pieces) <= 0.55 * whole, (pieces, whole)


def test_while_loading_the_peak_memory_of_rank_1_grows_by_its_half_only(runs):
    """The process's peak RSS while the Llama (the first run: nothing larger was held before) is loaded and
    sharded: rank 0 held the whole base (read) and its half (the pieces); rank 1 its half, never the whole."""
    _, results, _, llama_bytes = runs
    first = loads_before_sharding(results[0]["llama_fsdp"]["records"])[0]
    assert llama_bytes <= first["whole"] <= llama_bytes + 1024  # float32 as written, and rotary inv_freq
    growth = [next(r for r in result["llama_fsdp"]["records"] if r["call"] == "build_sharded")["peak_growth"]
              for result in results]
    assert growth[1] < llama_bytes <= growth[0], (growth, llama_bytes)


@pytest.mark.parametrize("name", ["builtin", "llama", "llama_nf4"])
def test_cli_fsdp_adapters_equal_ddp_and_are_saved_once_in_peft_format(runs, name):
    """Bit for bit (AdamW), the adapter gathered to rank 0 and written once, in peft's format."""
    out, results, _, _ = runs
    assert all(result[f"{name}_{sharding}"]["exit"] == 0 for result in results for sharding in ("fsdp", "ddp"))
    fsdp, ddp = cli_adapter(out, f"{name}_fsdp"), cli_adapter(out, f"{name}_ddp")
    assert fsdp.keys() == ddp.keys() and fsdp
    assert all(fsdp[key].shape == ddp[key].shape and fsdp[key].dtype == torch.float32 for key in fsdp)
    assert max_difference(fsdp, ddp) == 0.0
    files = {path.name for path in (out / f"{name}_fsdp" / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    config = json.loads((out / f"{name}_fsdp" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and all(key.startswith("base_model.model.") for key in fsdp)
    assert read_records(out / f"{name}_fsdp" / "metrics.jsonl", "train")  # one file, written by rank 0 alone
    summary = json.loads((out / f"{name}_fsdp" / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2


def test_bf16_under_fsdp_runs_with_float32_adapters_close_to_ddp(runs):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32) on CPU with gloo: the blocks are gathered
    in bf16 (gloo all-gathers, and would reduce, bf16 as well), gradients reduced in float32; the adapter stays
    float32. DDP's run stores the frozen base in bf16 and autocasts the adapter's matmuls: the same operations,
    so the adapters agree bit for bit (measured; the bound allows for nothing more)."""
    out, results, _, _ = runs
    assert all(result["builtin_bf16_fsdp"]["exit"] == 0 for result in results)
    sharded = [r for r in results[0]["builtin_bf16_fsdp"]["records"] if r["call"] == "build_sharded"][0]
    assert sharded["adapter_dtypes"] == ["torch.float32"]
    steps = read_records(out / "builtin_bf16_fsdp" / "metrics.jsonl", "train")
    reference = read_records(out / "builtin_bf16_ddp" / "metrics.jsonl", "train")
    assert len(steps) == len(reference) == 2
    for step, want in zip(steps, reference):
        assert torch.isfinite(torch.tensor(step["loss"])) and step["loss"] == want["loss"]
    fsdp, ddp = cli_adapter(out, "builtin_bf16_fsdp"), cli_adapter(out, "builtin_bf16_ddp")
    assert all(tensor.dtype == torch.float32 for tensor in fsdp.values())
    assert max_difference(fsdp, ddp) == 0.0


def test_fsdp_with_sgd_equals_one_process_to_float_rounding(runs):
    """AdamW divides by √v, which makes the last bits of a gradient count (FSDP2 vs one process: ≤ 2e-4,
    tests/test_training_fsdp.py); with SGD the update is lr × gradient: the adapters agree to 1e-8 (measured:
    3.5e-10 after 6 steps)."""
    out, _, single, _ = runs
    assert max_difference(adapter(out / "sgd_fsdp"), adapter(single / "sgd")) <= 1e-8
    got, expected = (read_records(Path(path) / "metrics.jsonl", "train") for path in (out / "sgd_fsdp", single / "sgd"))
    assert [step["loss"] for step in got] == pytest.approx([step["loss"] for step in expected], rel=1e-6)


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(Path(sys.argv[1]), sys.argv[2])
