"""``python -m minipeft compare`` on a tiny model: every column filled from the right source (counts equal the
applied method's, sizes equal the files, merged speed only for mergeable methods), the table and JSON agree,
the adapters it trained load, and flag mistakes are one line with exit 2."""

import json

import pytest

from minipeft import LoRAConfig, get_peft_model, load_adapter
from minipeft.cli import main as cli_main
from minipeft.cli.compare import main as compare_main, markdown_table, parse_learning_rates
from minipeft.methods import METHODS
from minipeft.methods.ia3 import IA3Config
from minipeft.loading.models import load_model_and_tokenizer
from minipeft.methods.prompt import PromptTuningConfig
from minipeft.training.metrics import directory_size
from serving_fixtures import save_model_dir


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model_dir = save_model_dir("gpt2", root / "model")
    records = [{"instruction": f"What is {i} plus {i}?", "input": "" if i % 2 else f"{i}", "output": f"{2 * i}."}
               for i in range(48)]
    (root / "data.json").write_text(json.dumps(records))
    return root, model_dir


@pytest.fixture(scope="module")
def comparison(workspace):
    root, model_dir = workspace
    out = root / "out"
    arguments = ["--model", str(model_dir), "--dataset_path", str(root / "data.json"), "--methods", "lora,prompt,ia3",
                 "--max_records", "40", "--val_size", "8", "--max_length", "100", "--max_steps", "4",
                 "--batch_size", "4",
                 "--learning_rate", "lora=5e-3", "--lora_rank", "2", "--speed_tokens", "4", "--device", "cpu",
                 "--generation_tokens", "4", "--template", "plain",
                 "--output_dir", str(out)]
    assert compare_main(arguments) == 0
    return out, json.loads((out / "comparison.json").read_text())


def test_rows_hold_what_each_method_really_is(comparison, workspace):
    out, result = comparison
    _, model_dir = workspace
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == ["lora", "prompt", "ia3"]
    for name, row in rows.items():
        model, _ = load_model_and_tokenizer(str(model_dir))
        config = {"lora": LoRAConfig(r=2, lora_alpha=16),  # --lora_rank 2, alpha: the CLI default
                  "prompt": PromptTuningConfig(num_virtual_tokens=20), "ia3": IA3Config()}[name]
        expected = get_peft_model(model, config).parameter_stats()
        assert (row["trainable_params"], row["total_params"]) == (expected.trainable, expected.total)
        assert row["trainable_percent"] == pytest.approx(100 * expected.trainable / expected.total)
        assert row["steps"] == 4 and row["train_seconds"] > 0
        assert row["eval_loss_before"] > 0 and row["eval_loss"] > 0 and row["train_loss"] > 0
        assert row["eval_perplexity"] == pytest.approx(2.718281828 ** row["eval_loss"], rel=1e-6)
        assert row["adapter_bytes"] == directory_size(out / name / "adapter") > 0
        assert row["tokens_per_s_unmerged"] > 0
        assert (row["tokens_per_s_merged"] is not None) == (name != "prompt")  # prompt tuning cannot merge
        assert not (out / name / "checkpoints").exists()
    assert rows["lora"]["learning_rate"] == 5e-3 and rows["ia3"]["learning_rate"] == METHODS["ia3"].learning_rate
    assert result["settings"]["train_records"] == 32 and result["settings"]["eval_records"] == 8
    assert len(json.loads((out / "records.json").read_text())) == 40


def test_markdown_table_matches_the_json(comparison):
    out, result = comparison
    lines = (out / "comparison.md").read_text().splitlines()
    assert lines[0].startswith("| method | trainable params | trainable % | train time (s) | peak memory (MB)")
    assert len(lines) == 2 + len(result["rows"])
    for line, row in zip(lines[2:], result["rows"]):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == row["method"] and cells[1] == f"{row['trainable_params']:,}"
        assert cells[6] == f"{row['eval_loss_before']:.3f} → {row['eval_loss']:.3f}"
        assert cells[10] == ("—" if row["tokens_per_s_merged"] is None else f"{row['tokens_per_s_merged']:.1f}")
    if pytest.importorskip("matplotlib"):
        assert (out / "comparison.png").stat().st_size > 0


def test_trained_adapters_load_and_record_their_template(comparison, workspace):
    out, _ = comparison
    _, model_dir = workspace
    config = json.loads((out / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["minipeft"]["template"] == "plain" and config["r"] == 2
    model, _ = load_model_and_tokenizer(str(model_dir))
    load_adapter(model, out / "lora" / "adapter")


@pytest.mark.parametrize("arguments, message", [
    (["--methods", "lora,nope"], "unknown method nope"),
    (["--methods", "prompt", "--lora_rank", "4"], "--lora_rank applies to lora or dora, none of which is in --methods"),
    (["--methods", "lora", "--learning_rate", "prompt=1e-2"], "'prompt' is not among --methods"),
    (["--methods", "lora", "--learning_rate", "fast"], "expected a number"),
    (["--methods", "lora", "--max_steps", "0"], "--max_steps 0: must be a positive integer"),
])
def test_flag_mistakes_are_one_line_and_exit_2(arguments, message, capsys):
    assert cli_main(["compare"] + arguments) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and len(error.splitlines()) == 1


def test_learning_rates_default_per_method_and_can_be_overridden():
    assert parse_learning_rates(None, ["lora", "prompt"]) == {"lora": 1e-3, "prompt": 3e-2}
    assert parse_learning_rates("2e-4", ["lora", "prompt"]) == {"lora": 2e-4, "prompt": 2e-4}
    assert parse_learning_rates("prompt=0.1", ["lora", "prompt"]) == {"lora": 1e-3, "prompt": 0.1}


def test_report_page_holds_the_command_the_table_and_the_generations(comparison):
    out, result = comparison
    report = (out / "report.md").read_text()
    assert result["settings"]["command"] in report and "--methods lora,prompt,ia3" in report
    assert markdown_table(result["rows"]) in report
    assert len(result["prompts"]) == 3  # held-out records: their instructions are not in the training split
    for index, prompt in enumerate(result["prompts"]):
        assert f"### {index + 1}. {prompt['instruction']}" in report
        assert f"| base model (before) | {prompt['base_reply'] or '(empty)'} |" in report
        for row in result["rows"]:
            assert f"| {row['method']} (after) | {row['generations'][index] or '(empty)'} |" in report
