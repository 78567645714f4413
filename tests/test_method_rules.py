"""Every method-specific rule lives in the method's record (:class:`minipeft.core.method.Method`): generic code
names no method, and what the commands do for a method comes from its record, so a new method is in them by
being registered."""

import argparse
import ast
from pathlib import Path

import pytest

from minipeft.cli.arguments import check_quantize_arguments, config_from_args
from minipeft.cli.compare import DEFAULT_METHODS, build_parser, method_config, parse_methods
from minipeft.core.errors import UserError
from minipeft.core.method import Method
from minipeft.methods import METHODS, method_for_config
from minipeft.methods.lora import LoRAConfig
from minipeft.model.adapter_files import config_from_dict, config_to_dict
from minipeft.training.sharding import check_can_shard

ROOT = Path(__file__).resolve().parents[1]
# Strings in generic code that are a method's name by chance, each with what it means there.
NOT_A_METHOD = {("minipeft/cli/merge.py", "adapter"): "the model card's key for the --adapter directory"}


def method_names_in(path: Path) -> list:
    """``(line, name)`` for each registered method's name used as a value in ``path``'s code: compared with,
    listed in a list/tuple/set, a dict key, a subscript or a keyword's value (docstrings and comments are prose
    and may name methods)."""
    def is_name(node):
        return isinstance(node, ast.Constant) and node.value in METHODS

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                found += [side] if is_name(side) else [item for item in getattr(side, "elts", []) if is_name(item)]
        elif isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            found += [item for item in node.elts if is_name(item)]
        elif isinstance(node, ast.Dict):
            found += [key for key in node.keys if key is not None and is_name(key)]
        elif isinstance(node, ast.Subscript) and is_name(node.slice):
            found.append(node.slice)
        elif isinstance(node, ast.keyword) and is_name(node.value):
            found.append(node.value)
    return sorted({(node.lineno, node.value) for node in found})


GENERIC_MODULES = sorted(path for path in (ROOT / "minipeft").rglob("*.py") if "methods" not in path.parts)


@pytest.mark.parametrize("path", GENERIC_MODULES, ids=lambda path: str(path.relative_to(ROOT / "minipeft")))
def test_generic_code_names_no_method(path):
    relative = str(path.relative_to(ROOT))
    named = [(line, name) for line, name in method_names_in(path) if (relative, name) not in NOT_A_METHOD]
    assert named == [], (f"{relative} names a method {named}: put the rule in the method's record "
                         "(minipeft/core/method.py) and ask the record")


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The scan itself: each way generic code used to name a method is caught."""
    source = tmp_path / "generic.py"
    source.write_text('"""lora in a docstring is prose."""\n'
                      'if name == "dora": pass\n'
                      'UNSHARDABLE = ("prompt", "prefix")\n'
                      'if key in ("lora_alpha",): pass\n'
                      'x = METHODS["selective"]\n')
    assert method_names_in(source) == [(2, "dora"), (3, "prefix"), (3, "prompt"), (5, "selective")]


def test_compare_all_runs_every_registered_method(monkeypatch):
    assert parse_methods("all") == list(METHODS)  # VeRA included: the list is the registry
    assert DEFAULT_METHODS == [name for name, method in METHODS.items() if method.in_compare_by_default]
    assert build_parser().parse_args([]).methods == ",".join(DEFAULT_METHODS)
    toy = Method(name="toy", config_class=LoRAConfig, apply=None, peft_type="TOY", mergeable=False,
                 learning_rate=1e-3, learning_rate_source="a test")
    monkeypatch.setitem(METHODS, "toy", toy)
    assert parse_methods("all")[-1] == "toy"  # a method registered later is in `all` with no edit of compare


def test_compare_gives_selective_the_last_block_from_its_record(gpt2_tiny):
    """selective's ``--freeze_layers`` has no default; its record's ``compare_settings`` trains the last block."""
    args = build_parser().parse_args(["--methods", "selective"])
    assert method_config("selective", args, gpt2_tiny, None).freeze_layers == [0]  # 2 blocks: train block 1
    args = build_parser().parse_args(["--methods", "selective", "--freeze_layers", "1"])
    assert method_config("selective", args, gpt2_tiny, None).freeze_layers == [1]  # a flag given wins


@pytest.mark.parametrize("name", list(METHODS))
def test_a_variant_is_told_apart_by_its_settings(name):
    """``method_for_config`` finds each method from its own default config plus its variant settings, and a
    config of a shared class without them is the base method's (LoRAConfig() is LoRA's, use_dora=True DoRA's)."""
    method = METHODS[name]
    config = method.config_class(**method.variant_settings)
    assert method_for_config(config) is method
    if method.variant_of:
        base = METHODS[method.variant_of]
        assert base.config_class is method.config_class and base.peft_type == method.peft_type
        assert method_for_config(base.config_class()) is base
        namespace = argparse.Namespace(modification_type=name)
        assert all(getattr(config_from_args(namespace), key) == value
                   for key, value in method.variant_settings.items())  # the command line sets them


def test_a_file_is_read_and_written_as_the_record_says():
    """LoRA's record: a file without ``lora_alpha`` means peft's 8; a whole alpha is written as an integer."""
    written = config_to_dict(LoRAConfig(lora_alpha=16.0))
    assert written["lora_alpha"] == 16 and type(written["lora_alpha"]) is int
    assert config_to_dict(LoRAConfig(lora_alpha=16.5))["lora_alpha"] == 16.5
    assert config_from_dict({"peft_type": "LORA", "r": 4}).lora_alpha == 8


@pytest.mark.parametrize("name", list(METHODS))
def test_fsdp_refuses_exactly_the_methods_whose_record_says_why(name):
    why = METHODS[name].why_not_sharded
    if not why:
        check_can_shard(name)
        return
    with pytest.raises(UserError, match=rf"^--sharding fsdp with --modification_type {name}: "):
        check_can_shard(name)


@pytest.mark.parametrize("flag, value, why",
                         sorted({rule for method in METHODS.values() for rule in method.flag_values_not_on_4bit}))
def test_a_setting_a_record_refuses_on_4bit_is_refused(flag, value, why):
    args = argparse.Namespace(quantize="nf4", quantize_lm_head=False, modification_type=next(iter(METHODS)),
                              **{flag.lstrip("-"): value})
    with pytest.raises(UserError, match=rf"^--quantize nf4 with {flag} {value}: "):
        check_quantize_arguments(args)
