"""``python -m minipeft generate`` end to end: for every method the CLI's greedy reply equals a step-by-step
reference (full forward per token, no cache); batching with left padding changes nothing; the adapter's
template is used; sampling is reproducible with --seed; streaming prints the reply; bad input is one line."""

import json

import pytest
import torch

from minipeft import load_adapter
from minipeft.cli import main as cli_main
from minipeft.data.tokenization import encode_prompt
from minipeft.inference.prompts import Prompt, read_prompts_file, resolve_model_name, resolve_template
from minipeft.cli.generate import main as generate_main
from minipeft.methods import METHODS
from minipeft.loading.models import load_model_and_tokenizer
from serving_fixtures import make_tokenizer, save_adapter_for, save_model_dir

PROMPTS = ["What is the capital of France?", "Name the opposite of hot.", "Give three tips."]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = make_tokenizer()
    return {family: save_model_dir(family, root / family, tokenizer) for family in ("gpt2", "llama")}


@torch.no_grad()
def greedy_reference(model, tokenizer, instruction: str, template: str, max_new_tokens: int = NEW_TOKENS) -> str:
    """The slow, obviously right loop: the whole sequence through the model for every new token."""
    ids = torch.tensor([encode_prompt(instruction, "", template, tokenizer)])
    reply = []
    for _ in range(max_new_tokens):
        token = model(input_ids=ids).logits[0, -1].argmax().item()
        if token == tokenizer.eos_token_id:
            break
        reply.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(reply, skip_special_tokens=True)


def run_cli(arguments, tmp_path, name="out.jsonl"):
    output = tmp_path / name
    assert generate_main(arguments + ["--output_file", str(output), "--max_new_tokens", str(NEW_TOKENS)]) == 0
    return [json.loads(line) for line in output.read_text().splitlines()]


@pytest.mark.parametrize("method", list(METHODS))
def test_cli_reply_equals_step_by_step_greedy_reference(model_dirs, method, tmp_path):
    family = "llama" if method in ("dora", "prefix") else "gpt2"  # both families, every method once
    adapter = save_adapter_for(model_dirs[family], method, family, tmp_path / "adapter", template="plain")
    rows = run_cli(["--adapter", str(adapter), "--prompts_file", str(write_prompts(tmp_path)), "--batch_size", "2"],
                   tmp_path)
    model, tokenizer = load_model_and_tokenizer(str(model_dirs[family]))
    peft_model = load_adapter(model, adapter).eval()
    expected = [greedy_reference(peft_model, tokenizer, prompt, "plain") for prompt in PROMPTS]
    assert [row["response"] for row in rows] == expected
    base_model, _ = load_model_and_tokenizer(str(model_dirs[family]))  # the adapter matters for the replies
    assert [greedy_reference(base_model.eval(), tokenizer, prompt, "plain") for prompt in PROMPTS] != expected


def write_prompts(tmp_path, prompts=PROMPTS, as_json=False):
    path = tmp_path / ("prompts.json" if as_json else "prompts.txt")
    path.write_text(json.dumps(prompts) if as_json else "\n".join(prompts) + "\n\n")
    return path


def test_batching_and_left_padding_change_nothing(model_dirs, tmp_path):
    adapter = save_adapter_for(model_dirs["llama"], "lora", "llama", tmp_path / "adapter")
    batched = run_cli(["--adapter", str(adapter), "--prompts_file", str(write_prompts(tmp_path, as_json=True)),
                       "--batch_size", "3"], tmp_path, "batched.jsonl")
    alone = [run_cli(["--adapter", str(adapter), "--prompt", prompt, "--no_stream"], tmp_path, f"{i}.jsonl")[0]
             for i, prompt in enumerate(PROMPTS)]
    assert batched == alone
    assert all(1 <= row["new_tokens"] <= NEW_TOKENS for row in batched)


def test_template_comes_from_the_adapter_and_the_flag_overrides_it(model_dirs, tmp_path):
    adapter = save_adapter_for(model_dirs["gpt2"], "lora", "gpt2", tmp_path / "adapter", template="plain")
    _, tokenizer = load_model_and_tokenizer(str(model_dirs["gpt2"]))
    assert resolve_model_name(None, adapter) == str(model_dirs["gpt2"])
    assert resolve_template(None, adapter, "builtin", tokenizer) == "plain"
    assert resolve_template("alpaca", adapter, "builtin", tokenizer) == "alpaca"
    assert resolve_template(None, None, "builtin", tokenizer) == "alpaca"
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_template(None, None, "smollm2-135m", tokenizer) == "chat"
    assert resolve_template("auto", None, "any-model", tokenizer) == "chat"  # auto: the tokenizer decides
    assert resolve_template("auto", adapter, "any-model", tokenizer) == "plain"  # ... unless the adapter recorded one
    model, tokenizer = load_model_and_tokenizer(str(model_dirs["gpt2"]))
    peft_model = load_adapter(model, adapter).eval()
    [row] = run_cli(["--adapter", str(adapter), "--prompt", PROMPTS[0], "--template", "alpaca", "--no_stream"],
                    tmp_path)
    assert row["response"] == greedy_reference(peft_model, tokenizer, PROMPTS[0], "alpaca")


def test_sampling_is_reproducible_with_a_seed(model_dirs, tmp_path):
    adapter = save_adapter_for(model_dirs["gpt2"], "lora", "gpt2", tmp_path / "adapter")
    sampling = ["--adapter", str(adapter), "--prompts_file", str(write_prompts(tmp_path)), "--do_sample",
                "--temperature", "1.5", "--top_k", "50", "--top_p", "0.95", "--seed", "3"]
    first = run_cli(sampling, tmp_path, "a.jsonl")
    assert run_cli(sampling, tmp_path, "b.jsonl") == first
    other_seed = run_cli(sampling[:-1] + ["4"], tmp_path, "c.jsonl")
    greedy = run_cli(sampling[:4], tmp_path, "d.jsonl")
    assert other_seed != first or greedy != first


def test_single_prompt_is_streamed_and_speed_reported(model_dirs, tmp_path, capsys):
    adapter = save_adapter_for(model_dirs["gpt2"], "ia3", "gpt2", tmp_path / "adapter")
    [row] = run_cli(["--adapter", str(adapter), "--prompt", PROMPTS[1]], tmp_path)
    captured = capsys.readouterr()
    assert captured.out == row["response"] + "\n"
    assert "tokens/s" in captured.err and f"generated {row['new_tokens']} tokens for 1 prompt(s)" in captured.err


def test_without_adapter_a_model_directory_runs_with_the_default_template(model_dirs, tmp_path):
    [row] = run_cli(["--model", str(model_dirs["llama"]), "--prompt", PROMPTS[2], "--no_stream"], tmp_path)
    model, tokenizer = load_model_and_tokenizer(str(model_dirs["llama"]))
    assert row["response"] == greedy_reference(model.eval(), tokenizer, PROMPTS[2], "alpaca")


@pytest.mark.parametrize("arguments, message", [
    (["--prompt", "hi", "--temperature", "0.7"], "--temperature only applies when sampling; add --do_sample"),
    (["--prompt", "hi", "--do_sample", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--prompt", "hi", "--max_new_tokens", "-1"], "--max_new_tokens -1: asks for no new token"),
    (["--prompt", "hi", "--batch_size", "0"], "--batch_size must be a positive integer"),
    (["--prompts_file", "{missing}"], "cannot be read"),
    (["--prompts_file", "{empty}"], "holds no prompt"),
    (["--prompts_file", "{bad_json}"], "not valid JSON"),
    (["--prompt", "hi", "--adapter", "{missing}"], "no such adapter directory"),
])
def test_bad_input_is_one_line_and_exit_2(model_dirs, tmp_path, capsys, arguments, message):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bad.json").write_text("[1, 2")
    paths = {"missing": str(tmp_path / "nope"), "empty": str(tmp_path / "empty.txt"),
             "bad_json": str(tmp_path / "bad.json")}
    arguments = [argument.format(**paths) for argument in arguments]
    assert cli_main(["generate", "--model", str(model_dirs["gpt2"])] + arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and message in error


def test_prompts_file_formats(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["a", {"instruction": "b", "input": "c"}]))
    assert read_prompts_file(path) == [Prompt("a"), Prompt("b", "c")]
    path.write_text(json.dumps([{"input": "x"}]))
    with pytest.raises(Exception, match="item 0 is neither a string nor an object"):
        read_prompts_file(path)
