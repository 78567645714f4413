"""The README's methods table states what the code computes: every count is recomputed here."""

import argparse
import copy
import re
import shlex
from pathlib import Path

import pytest
import torch

from minipeft import get_peft_model
from minipeft.cli.arguments import add_method_arguments, config_from_args
from minipeft.loading.models import build_from_known_config

README = Path(__file__).resolve().parents[1] / "README.md"


def methods_table_rows():
    """``(flags, trainable, ratio)`` for each row of the README's methods table."""
    rows = []
    for line in README.read_text().splitlines():
        match = re.match(r"\| `(?P<flags>[^`]+)`.*\| (?P<count>[\d,]+) \((?P<ratio>[\d.]+)%\) \|", line)
        if match:
            rows.append((match["flags"], int(match["count"].replace(",", "")), match["ratio"]))
    return rows


@pytest.fixture(scope="module")
def gpt2_small_meta():
    """GPT-2 small on the meta device: exact shapes, no memory, built instantly."""
    with torch.device("meta"):
        yield build_from_known_config("gpt2")


def test_the_table_has_a_row_per_method():
    flags = [row[0].split()[0] for row in methods_table_rows()]
    from minipeft.methods import METHODS

    assert set(flags) == set(METHODS)  # a method added later needs its row


@pytest.mark.parametrize("flags, trainable, ratio", methods_table_rows())
def test_count_and_ratio_are_what_the_code_computes(gpt2_small_meta, flags, trainable, ratio):
    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    args = parser.parse_args(["--modification_type"] + shlex.split(flags))
    with torch.device("meta"):
        model = copy.deepcopy(gpt2_small_meta)
        stats = get_peft_model(model, config_from_args(args, model, None)).parameter_stats()
    assert stats.trainable == trainable
    assert f"{stats.ratio:.4f}" == ratio


def test_default_learning_rates_table_is_the_method_registry():
    from minipeft.methods import METHODS

    rows = re.findall(r"^\| `(\w+)` \| ([\d.e-]+) \| (.+) \|$", README.read_text(), flags=re.MULTILINE)
    assert {name: (float(rate), source) for name, rate, source in rows} == {
        name: (method.learning_rate, method.learning_rate_source) for name, method in METHODS.items()}


def test_comparison_table_is_the_one_the_compare_command_wrote():
    """The README's real-model table is copied from docs/comparison.md, which `compare --report` wrote whole."""
    page = (README.parent / "docs" / "comparison.md").read_text()
    table_lines = [line for line in page.splitlines() if line.startswith("| ") and " → " in line]
    assert table_lines, "docs/comparison.md has no comparison table"
    readme = README.read_text().splitlines()
    assert all(line in readme for line in table_lines)
    assert [line for line in readme if line.startswith("| ") and " → " in line] == table_lines
