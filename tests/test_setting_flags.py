"""The training and data flags are generated from the fields of TrainingConfig and DataConfig
(:func:`minipeft.core.options.setting`): each field is one flag, each flag one field, with the field's default."""

import argparse
import dataclasses

import pytest

from minipeft.cli.train import build_parser, parse_arguments, training_config_from_args
from minipeft.core.options import add_setting_flags, setting
from minipeft.data.config import DataConfig, data_config_from_args
from minipeft.methods import default_learning_rate
from minipeft.training.config import TrainingConfig


def group_actions(parser: argparse.ArgumentParser, title: str) -> dict:
    """``{dest: action}`` of one argument group of ``parser``."""
    (group,) = [group for group in parser._action_groups if group.title == title]
    return {action.dest: action for action in group._group_actions}


def test_every_field_is_a_flag_and_every_flag_a_field():
    parser = build_parser()
    training, data = group_actions(parser, "training"), group_actions(parser, "data")
    assert set(training) == {field.name for field in dataclasses.fields(TrainingConfig)} - {"seed"}
    assert set(data) == {field.name for field in dataclasses.fields(DataConfig)} | {"no_cache"}
    assert "seed" in data  # one --seed sets TrainingConfig.seed and DataConfig.seed
    for name, action in training.items():
        assert action.option_strings == [f"--{name}"] + ([f"--no-{name}"] if name == "tf32" else [])
    assert data["group_by_length"].option_strings == ["--no_group_by_length"]
    assert data["shuffle"].option_strings == ["--no_shuffle"]


def test_no_flags_build_the_default_configs():
    args = parse_arguments([])
    method_rate = default_learning_rate(args.modification_type)
    assert training_config_from_args(args) == TrainingConfig(learning_rate=method_rate)
    assert data_config_from_args(args) == DataConfig()
    assert data_config_from_args(parse_arguments(["--no_cache"])).cache_dir is None


def test_the_seed_command_sets_its_fields():
    args = parse_arguments(["--dataset_path", "alpaca_data.json", "--modification_type", "lora", "--lora_rank", "4",
                            "--lora_alpha", "8", "--epochs", "3", "--learning_rate", "1e-5",
                            "--output_dir", "./outputs"])
    config, data = training_config_from_args(args), data_config_from_args(args)
    assert (config.epochs, config.learning_rate, config.output_dir) == (3, 1e-5, "./outputs")
    assert data.dataset_path == "alpaca_data.json" and (args.lora_rank, args.lora_alpha) == (4, 8.0)


def test_a_new_setting_brings_its_flag():
    @dataclasses.dataclass
    class Settings:
        steps: int = setting(3, "steps (default: %(default)s)")
        rate: float | None = setting(None, "a rate")
        fast: bool = setting(False, "go fast")
        check: bool = setting(True, "skip the check", flag="--no_check")
        color: bool = setting(True, "colors")
        kind: str = setting("a", "a kind", choices=["a", "b"])
        plain: int = 0  # an ordinary field: no flag

    parser = argparse.ArgumentParser()
    add_setting_flags(parser, Settings)
    assert vars(parser.parse_args([])) == {"steps": 3, "rate": None, "fast": False, "check": True, "color": True,
                                           "kind": "a"}
    given = parser.parse_args(["--steps", "5", "--rate", "0.5", "--fast", "--no_check", "--no-color", "--kind", "b"])
    assert vars(given) == {"steps": 5, "rate": 0.5, "fast": True, "check": False, "color": False, "kind": "b"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--rate", "nan"])  # a float flag reads a finite float
