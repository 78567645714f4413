"""docs/adding_a_method.md lists the files a new method touches; this checks the list against every registered
method: each ``<name>`` file exists for each method, and each shared file's rows are checked by the test the
list names beside it. (That no generic module names a method is tests/test_method_rules.py's.)"""

import re
from pathlib import Path

import pytest

from minipeft.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "adding_a_method.md"
# The methods that came before the list keep their older file names (a new method uses the pattern).
OLDER_NAMES = {"docs/methods/adapter.md": "docs/methods/adapters.md",
               "tests/test_adapter.py": "tests/test_adapters.py",
               "tests/test_selective.py": "tests/test_freeze.py"}


def listed_files() -> list:
    """``(path, text of its item)`` for each item of the guide's list, in order."""
    text = GUIDE.read_text(encoding="utf-8")
    match = re.search(r"<!-- files a new method touches -->\n(.*?)<!-- end of the list -->", text, flags=re.DOTALL)
    assert match, f"{GUIDE.name}: the list of the files a new method touches is missing"
    items = re.split(r"^- ", match.group(1), flags=re.MULTILINE)[1:]
    return [(re.match(r"`([^`]+)`", item).group(1), " ".join(item.split())) for item in items]


PER_METHOD = [(path, item) for path, item in listed_files() if "<name>" in path]
SHARED = [(path, item) for path, item in listed_files() if "<name>" not in path]


def test_the_list_is_a_module_a_page_tests_and_three_tables():
    assert [path for path, _ in PER_METHOD] == ["minipeft/methods/<name>.py", "docs/methods/<name>.md",
                                                "tests/test_<name>.py", "tests/test_oracle_<name>.py"]
    assert [path for path, _ in SHARED] == ["README.md", "docs/README.md", "docs/peft_format.md"]


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("pattern, item", [(path, item) for path, item in PER_METHOD if "oracle" not in path],
                         ids=lambda value: value if "<name>" in value else "")
def test_each_method_has_the_files_the_list_names(pattern, item, name):
    path = pattern.replace("<name>", name)
    path = OLDER_NAMES.get(path, path)
    assert (ROOT / path).is_file(), f"--modification_type {name} has no {path} ({GUIDE.name}: {item})"
    if pattern == "minipeft/methods/<name>.py":
        assert METHODS[name].module == f"minipeft.methods.{name}"  # the record is the module's own


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_peft_has_has_an_oracle(name):
    """``tests/test_oracle_<name>.py`` where peft has the method (a file may hold two: test_oracle_ia3_dora.py)."""
    peft = pytest.importorskip("peft")
    if METHODS[name].peft_type not in {peft_type.value for peft_type in peft.PeftType}:
        pytest.skip(f"peft has no {METHODS[name].peft_type}")
    oracles = [path.stem.split("_")[2:] for path in (ROOT / "tests").glob("test_oracle_*.py")]
    assert any(name in words for words in oracles), f"peft has {name}, and no tests/test_oracle_{name}.py checks it"


@pytest.mark.parametrize("shared, item", SHARED, ids=[path for path, _ in SHARED])
def test_each_shared_file_has_a_test_that_checks_its_rows(shared, item):
    tests = re.findall(r"`(tests/test_\w+\.py)`", item)
    assert tests, f"{GUIDE.name}: the item for {shared} names no test that checks its rows"
    for test in tests:
        module = __import__(Path(test).stem)
        assert shared in getattr(module, "CHECKED_FILES", ()), f"{test} does not check {shared} (its CHECKED_FILES)"


def test_the_proof_touched_exactly_the_listed_files():
    """The guide's proof (VeRA removed, then added back as one commit) shows ``git show --stat`` of the re-add:
    its files are the list's, with ``<name>`` = vera."""
    proof = GUIDE.read_text(encoding="utf-8").split("## The proof", 1)[1].split("\n## ", 1)[0]
    stat = proof.split("```text\n", 1)[1].split("```", 1)[0]
    touched = sorted(line.split("|")[0].strip() for line in stat.splitlines() if "|" in line)
    assert touched == sorted(path.replace("<name>", "vera") for path, _ in listed_files())
