"""The checkpoint door: a directory written by ``save_pretrained`` (what users have), end to end.

Three tiny models (hidden 64, 2 layers, the offline BPE tokenizer saved beside): GPT-2, a Llama with
grouped-query attention (4 query heads, 2 key/value heads) and tied embeddings, and the same Llama untied and
sharded into several safetensors files with an index. Each loads tensor by tensor equal to transformers'
``from_pretrained``, trains through ``train_llm.py --model DIR`` in fp32, bf16 and NF4, resumes, generates,
merges, and its adapter loads in peft. Bad directories are one ``error:`` line, exit 2, nothing written.
"""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from data_fixtures import RECORDS, make_tokenizer, write_json
from training_fixtures import one_thread  # noqa: F401

from minipeft.cli import run
from minipeft.cli.generate import main as generate_main
from minipeft.cli.merge import main as merge_main
from minipeft.cli.train import main as train_main
from minipeft.inference.merge import sample_batch
from minipeft.loading import checkpoint_dir
from minipeft.loading.checkpoint_dir import load_checkpoint_dir
from minipeft.model.peft_model import load_adapter
from minipeft.quantization.nf4 import Linear4bit, quantize_model


def llama_config(vocab: int, tied: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       tie_word_embeddings=tied, rope_theta=10000.0, eos_token_id=0, bos_token_id=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{name: directory}`` of three saved tiny models, plus ``"records"``: an Alpaca file."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    configs = {
        "gpt2": (GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=vocab, n_positions=256,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id), None),
        "llama-tied": (llama_config(vocab, tied=True), None),
        "llama-sharded": (llama_config(vocab, tied=False), "100KB"),  # ~450 KB of weights -> several shards
    }
    paths = {}
    for name, (config, shard_size) in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        kwargs = {"max_shard_size": shard_size} if shard_size else {}
        model.save_pretrained(root / name, **kwargs)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    paths["records"] = write_json(root / "records.json", RECORDS * 2)
    return paths


def test_the_sharded_checkpoint_has_an_index_and_several_files(checkpoints):
    files = sorted(path.name for path in checkpoints["llama-sharded"].glob("*.safetensors"))
    assert len(files) >= 2 and (checkpoints["llama-sharded"] / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("name", ["gpt2", "llama-tied", "llama-sharded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loads_tensor_by_tensor_equal_to_from_pretrained(checkpoints, name, dtype):
    """Same parameters, same rotary buffers (rebuilt, never in the files), same logits bit for bit."""
    lines = []
    model, tokenizer = load_checkpoint_dir(checkpoints[name], dtype=dtype, log=lines.append)
    reference = AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=dtype).eval()
    assert len(lines) == 1 and lines[0].startswith(f"Loaded {checkpoints[name]}: ") and " GB in memory" in lines[0]
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype == dtype and torch.equal(ours[key], theirs[key]), key
    for key, buffer in reference.named_buffers():  # rotary inv_freq and original_inv_freq (float32)
        assert torch.equal(model.get_buffer(key), buffer), key
    tied = model.config.tie_word_embeddings
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    batch = sample_batch(tokenizer, "plain")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)


@pytest.mark.parametrize("name", ["gpt2", "llama-sharded"])
def test_nf4_quantizes_each_weight_as_read_equal_to_quantizing_after(checkpoints, name):
    model, _ = load_checkpoint_dir(checkpoints[name], quantize="nf4", dtype=torch.bfloat16, log=lambda _: None)
    reference = AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32)
    names = quantize_model(reference)  # codes of the weights as stored (float32), not of a bf16 rounding
    assert names == [key for key, module in model.named_modules() if isinstance(module, Linear4bit)]
    for key in names:
        for buffer, value in reference.get_submodule(key).named_buffers():
            assert torch.equal(model.get_submodule(key).get_buffer(buffer), value), (key, buffer)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16  # embeddings in the compute dtype
    assert not isinstance(model.get_output_embeddings(), Linear4bit)


def test_pytorch_bin_weights_fall_back_to_from_pretrained_and_say_so(checkpoints, tmp_path):
    directory = tmp_path / "bin"
    shutil.copytree(checkpoints["llama-tied"], directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    lines = []
    loaded, _ = load_checkpoint_dir(directory, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith(f"note: {directory} has PyTorch .bin weights")
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def train_args(checkpoints, name, output, *extra):
    return ["--model", str(checkpoints[name]), "--dataset_path", str(checkpoints["records"]), "--no_cache",
            "--output_dir", str(output), "--batch_size", "4", "--max_length", "48", "--eval_max_batches", "1",
            "--lr_schedule", "constant", *extra]


def peft_logits(directory, adapter, batch):
    from peft import PeftModel as OraclePeftModel

    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        return OraclePeftModel.from_pretrained(base, adapter).eval()(**batch).logits


# (checkpoint, flags): fp32 on GPT-2 (Conv1D), bf16 on the tied GQA Llama, NF4 on the sharded untied Llama.
RUNS = [("gpt2", ["--precision", "fp32"]), ("llama-tied", ["--precision", "bf16"]),
        ("llama-sharded", ["--precision", "bf16", "--quantize", "nf4"])]


@pytest.mark.parametrize("name, flags", RUNS, ids=["gpt2-fp32", "llama-tied-bf16", "llama-sharded-nf4"])
def test_train_resume_generate_merge_and_peft_round_trip(checkpoints, name, flags, tmp_path, capsys):
    out = tmp_path / "run"
    # 1) train 2 steps, then resume to 3: the run continues from its checkpoint
    assert run(train_main, train_args(checkpoints, name, out, "--max_steps", "2", *flags)) == 0
    printed = capsys.readouterr().out
    nf4 = "--quantize" in flags  # loaded in the run's own precision: bf16 runs never hold a float32 base
    loaded = f"in memory ({'NF4 linear layers, ' if nf4 else ''}{'float32' if 'fp32' in flags else 'bfloat16'}"
    assert f"Loaded {checkpoints[name]}: " in printed and loaded in printed, printed
    assert run(train_main, train_args(checkpoints, name, out, "--max_steps", "3", "--resume", "latest",
                                      *flags)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    adapter = out / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["precision"] == flags[1] and summary["steps"] == 3

    # 2) generate from the directory with the trained adapter (the base rebuilt as it was trained: NF4 too)
    replies = tmp_path / "replies.jsonl"
    assert generate_main(["--model", str(checkpoints[name]), "--adapter", str(adapter), "--prompt", "Name a color.",
                          "--max_new_tokens", "4", "--output_file", str(replies), "--no_stream"]) == 0
    assert len(replies.read_text().splitlines()) == 1
    assert ("Quantized 14 linear layers to NF4" in capsys.readouterr().err) == nf4

    # 3) merge into a plain model directory that transformers loads
    merged = tmp_path / "merged"
    assert merge_main(["--adapter", str(adapter), "--out", str(merged)]) == 0
    assert AutoModelForCausalLM.from_pretrained(merged).config.model_type == json.loads(
        (checkpoints[name] / "config.json").read_text())["model_type"]

    # 4) peft reads the adapter onto the float base: the same logits as minipeft's
    tokenizer = make_tokenizer()
    batch = sample_batch(tokenizer, "plain")
    base = AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32)
    ours = load_adapter(base, adapter).eval()
    with torch.no_grad():
        adapted = ours(**batch).logits
        assert torch.allclose(adapted, peft_logits(checkpoints[name], adapter, batch), atol=1e-5)
        with ours.disable_adapters():
            assert not torch.equal(ours(**batch).logits, adapted)  # the trained adapter is not a no-op


def test_a_method_that_trains_base_weights_loads_them_again_in_float32(checkpoints, tmp_path, capsys):
    """BitFit trains the base's biases: their optimizer masters must be float32, so a bf16 run's bf16 load is
    replaced by a float32 one (and the run says so), as the frozen-weight cast would have refused too."""
    out = tmp_path / "run"
    assert run(train_main, train_args(checkpoints, "gpt2", out, "--max_steps", "1", "--precision", "bf16",
                                      "--modification_type", "bitfit")) == 0
    printed = capsys.readouterr().out
    assert "note: --modification_type bitfit trains base weights, which need float32" in printed
    assert printed.index("in memory (bfloat16)") < printed.index("in memory (float32)")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# --- bad input: one line, exit 2, nothing written -------------------------------------------------------------


def break_checkpoint(source, target, how: str):
    shutil.copytree(source, target)
    if how == "no weights":
        for path in target.glob("*.safetensors*"):
            path.unlink()
        return target
    if how == "unsupported architecture":
        config = json.loads((target / "config.json").read_text())
        config.update(model_type="vit", architectures=["ViTModel"])
        (target / "config.json").write_text(json.dumps(config))
        return target
    if how == "shard missing":
        shard = sorted(target.glob("model-*.safetensors"))[1]
        shard.unlink()
        return shard
    raise ValueError(how)


@pytest.mark.parametrize("how, message", [
    ("no weights", "no weights: neither model.safetensors"),
    ("unsupported architecture", "is not a causal language model"),
    ("shard missing", "shard missing"),
])
def test_a_bad_checkpoint_directory_is_one_line_and_exit_2(checkpoints, tmp_path, capsys, how, message):
    broken = tmp_path / "broken"
    named = break_checkpoint(checkpoints["llama-sharded"], broken, how)
    out = tmp_path / "run"
    assert run(train_main, train_args({**checkpoints, "broken": broken}, "broken", out, "--max_steps", "1")) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: --model ") and message in error[0], error
    assert str(named) in error[0] or str(broken / "config.json") in error[0]
    assert not out.exists()


def test_a_model_larger_than_memory_is_refused_before_loading(checkpoints, tmp_path, capsys, monkeypatch):
    """The estimate comes from the safetensors headers: nothing is read when it does not fit."""
    monkeypatch.setattr(checkpoint_dir, "available_memory_bytes", lambda: 100_000)  # less than the model
    monkeypatch.setattr(checkpoint_dir, "read_tensor", lambda *_: pytest.fail("a weight was read"))
    out = tmp_path / "run"
    assert run(train_main, train_args(checkpoints, "llama-sharded", out, "--max_steps", "1")) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"error: --model {checkpoints['llama-sharded']}: loading needs")
    assert "GB is available" in error[0]
    assert not out.exists()
