"""One source of truth per setting: every method flag is generated from its config field (core/options.py).

- every generated flag is in the ``--help`` of modify_llm.py, train_llm.py and ``compare``, with its help text;
- a flag not given leaves the config field's default, for every method (the API and the CLI agree);
- the seed's and README's command lines build the very configs they built before the flags were generated
  (``tests/seed_configs.json``, captured from ``config_from_args`` before the change);
- range errors name what the user wrote: the flag on the command line, the field and the file in
  ``adapter_config.json``;
- a new method's config brings its flags with it, with no edit to ``cli/``.
"""

import argparse
import dataclasses
import json
import re
import shlex
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from minipeft.cli.arguments import add_method_arguments, config_from_args, method_flags
from minipeft.core.errors import UserError
from minipeft.loading.models import build_from_known_config
from minipeft.core.method import Method
from minipeft.core.options import option, target_modules_option
from minipeft.methods import METHODS
from minipeft.methods.lora import LoRAConfig
from minipeft.model.adapter_files import read_adapter

SEED_CONFIGS = Path(__file__).with_name("seed_configs.json")

BUILT_IN_METHODS = ("lora", "dora", "ia3", "adapter", "prefix", "prompt", "selective", "bitfit")


class CharacterTokenizer:
    """Enough of a tokenizer for ``--prompt_init text``: one id per character."""
    name_or_path = "fake-tokenizer"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(character) % 97 for character in text]}


@pytest.fixture(scope="module")
def gpt2_small_meta():
    with torch.device("meta"):
        return build_from_known_config("gpt2")  # 12 blocks: layer specs resolve as in the README


def parse(line: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    return parser.parse_args(shlex.split(line))


def test_lora_alpha_has_one_default_for_the_api_and_the_command_line(gpt2_small_meta):
    assert LoRAConfig().lora_alpha == 16
    assert config_from_args(parse("--modification_type lora"), gpt2_small_meta).lora_alpha == 16


@pytest.mark.parametrize("method", list(METHODS))
def test_a_flag_not_given_leaves_the_field_default(method, gpt2_small_meta):
    needed = {"selective": "--freeze_layers 0"}.get(method, "")  # the one flag the command line requires
    config = config_from_args(parse(f"--modification_type {method} {needed}"), gpt2_small_meta, CharacterTokenizer())
    flagged = [field for field in dataclasses.fields(config) if field.metadata.get("flag")]
    assert flagged, f"{method}: no field declares a flag"
    for field in flagged:
        if needed and field.metadata["flag"] in needed:
            continue
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        assert getattr(config, field.name) == default, (method, field.name)


def test_seed_and_readme_command_lines_build_the_configs_they_built_before(gpt2_small_meta):
    expected = json.loads(SEED_CONFIGS.read_text())
    assert len(expected) >= 30
    for line, before in expected.items():
        try:
            config = config_from_args(parse(line), gpt2_small_meta, CharacterTokenizer())
            now = {"class": type(config).__name__, "fields": dataclasses.asdict(config)}
        except UserError as error:  # "applies to --modification_type lora or dora" lists later methods too
            now = {"error": re.sub(r" or (\w+)", lambda m: m.group(0) if m.group(1) in BUILT_IN_METHODS else "",
                                   str(error))}
        assert now == before, line


@pytest.mark.parametrize("main_module", ["minipeft.cli.modify", "minipeft.cli.train", "minipeft.cli.compare"])
def test_every_generated_flag_is_in_help_with_its_text(main_module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(main_module).main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines; compare word by word
    flags = method_flags()
    assert {"--lora_rank", "--lora_alpha", "--lora_dropout", "--prefix_length", "--freeze_layers",
            "--adapter_size", "--target_modules", "--prompt_init", "--no_train_final_norm"} <= set(flags)
    for flag in flags.values():
        assert flag.flag in text, (main_module, flag.flag)
        assert " ".join(flag.argparse_keywords()["help"].replace("%%", "%").split()) in text, flag.flag
    assert "[lora, dora] LoRA rank r (default: 8)" in text
    assert "[lora, dora] LoRA scale numerator alpha; update x alpha/r (default: 16)" in text
    assert "[prompt] how the virtual tokens start: random, vocab or text (default: random)" in text


def built_in(methods: list) -> list:
    """The eight methods these tests were written for; a method added later may take shared flags too."""
    return [name for name in methods if name in BUILT_IN_METHODS]


def test_a_shared_flag_is_one_flag_naming_its_methods():
    flags = method_flags()
    assert built_in(flags["--target_modules"].methods) == ["lora", "dora", "ia3", "adapter", "bitfit"]
    assert built_in(flags["--modules_to_save"].methods) == ["lora", "dora", "ia3", "adapter"]
    assert flags["--lora_rank"].fields == {"lora": "r", "dora": "r"}


@pytest.mark.parametrize("line, message", [
    ("--modification_type lora --lora_dropout 1.5", "--lora_dropout must be in [0, 1), got 1.5"),
    ("--modification_type lora --lora_rank 0", "--lora_rank must be a positive integer, got 0"),
    ("--modification_type ia3 --target_modules c_attn --feedforward_modules mlp.c_fc",
     "--feedforward_modules: mlp.c_fc not among the target modules ['c_attn'] (--target_modules, or the method's "
     "default for the model); feed-forward modules must also be targets"),
    ("--modification_type adapter --adapter_size 0", "--adapter_size must be a positive integer, got 0"),
    ("--modification_type adapter --adapter_size 8 --adapter_reduction_factor 4",
     "--adapter_size and --adapter_reduction_factor: give exactly one of the two (got 8 and 4.0)"),
    ("--modification_type prefix --prefix_length 0", "--prefix_length must be a positive integer, got 0"),
    ("--modification_type prefix --prefix_hidden_size -3", "--prefix_hidden_size must be a positive integer, got -3"),
    ("--modification_type prompt --num_virtual_tokens 0", "--num_virtual_tokens must be a positive integer, got 0"),
    ("--modification_type prefix --lora_rank 4", "--lora_rank applies to --modification_type lora or dora, not prefix"),
])
def test_command_line_errors_name_the_flag(line, message, gpt2_small_meta):
    with pytest.raises(UserError) as error:
        config_from_args(parse(line), gpt2_small_meta, CharacterTokenizer())
    assert str(error.value) == message


@pytest.mark.parametrize("values, message", [
    (dict(peft_type="LORA", r=8, lora_alpha=16, lora_dropout=1.5), "lora_dropout must be in [0, 1), got 1.5"),
    (dict(peft_type="LORA", r=8, lora_alpha=-2), "lora_alpha must be positive, got -2"),
    (dict(peft_type="IA3", target_modules=["c_attn"], feedforward_modules=["mlp.c_fc"]),
     "feedforward_modules: mlp.c_fc not among the target modules ['c_attn'] (target_modules, or the method's "
     "default for the model); feed-forward modules must also be targets"),
    (dict(peft_type="BOTTLENECK_ADAPTER", bottleneck_size=8, reduction_factor=4),
     "bottleneck_size and reduction_factor: give exactly one of the two (got 8 and 4)"),
    (dict(peft_type="BOTTLENECK_ADAPTER", activation="swish"), "activation must be one of relu, gelu, silu, tanh, "
                                                               "got 'swish'"),
    (dict(peft_type="PROMPT_TUNING", num_virtual_tokens=4, prompt_tuning_init="WORDS"),
     "prompt_tuning_init must be one of RANDOM, TEXT, SAMPLE_VOCAB, got 'WORDS'"),
    (dict(peft_type="PREFIX_TUNING", num_virtual_tokens=4, num_transformer_submodules=2),
     "num_transformer_submodules must be 1 (decoder-only models), got 2"),
])
def test_adapter_config_errors_name_the_file_and_the_field(values, message, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(values))
    with pytest.raises(UserError) as error:
        read_adapter(tmp_path)
    assert str(error.value) == f"{tmp_path / 'adapter_config.json'}: {message}"
    assert "--" not in message  # never a flag the user did not pass


def test_a_new_methods_config_brings_its_flags_with_no_cli_edit(monkeypatch, gpt2_small_meta):
    @dataclass
    class ToyConfig:
        width: int = option(3, flag="--toy_width", help="how wide the toy is")
        scale: float = option(0.5, flag="--toy_scale", help="how much the toy scales")
        target_modules: object = target_modules_option()
        hidden: int = 7  # no flag

        def validate(self, name=str):
            if self.width < 1:
                raise UserError(f"{name('width')} must be a positive integer, got {self.width}")

    monkeypatch.setitem(METHODS, "toy", Method(name="toy", config_class=ToyConfig, apply=None, peft_type="TOY",
                                               mergeable=False, learning_rate=1e-3, learning_rate_source="a test"))
    assert method_flags()["--target_modules"].methods[-1] == "toy"
    config = config_from_args(parse("--modification_type toy --toy_scale 2 --target_modules a,b"), gpt2_small_meta)
    assert config == ToyConfig(width=3, scale=2.0, target_modules=["a", "b"])
    with pytest.raises(UserError, match=r"^--toy_width must be a positive integer, got 0$"):
        config_from_args(parse("--modification_type toy --toy_width 0"), gpt2_small_meta)
    with pytest.raises(UserError, match=r"^--toy_width applies to --modification_type toy, not lora$"):
        config_from_args(parse("--modification_type lora --toy_width 2"), gpt2_small_meta)


def test_a_flag_declared_two_ways_is_refused(monkeypatch):
    @dataclass
    class ClashingConfig:
        r: float = option(1.0, flag="--lora_rank", help="not an integer here")

    monkeypatch.setitem(METHODS, "clash", types.SimpleNamespace(config_class=ClashingConfig))
    with pytest.raises(AssertionError, match="--lora_rank is declared differently"):
        method_flags()


def test_both_sources_through_the_commands(tmp_path, capsys):
    """The same bad dropout: typed as a flag (modify_llm.py) or found in a file (generate --adapter)."""
    from minipeft.cli import run
    from minipeft.cli.generate import main as generate_main
    from minipeft.cli.modify import main as modify_main

    adapter = tmp_path / "adapter"
    assert run(modify_main, ["--model", "builtin", "--table", "none", "--save_adapter", str(adapter)]) == 0
    config_path = adapter / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "lora_dropout": 1.5}))
    capsys.readouterr()
    assert run(modify_main, ["--model", "builtin", "--table", "none", "--lora_dropout", "1.5"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: --lora_dropout must be in [0, 1), got 1.5"
    assert run(generate_main, ["--adapter", str(adapter), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {config_path}: lora_dropout must be in [0, 1), got 1.5")
