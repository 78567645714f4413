"""The docs say what the code does: every checked block prints today what the page shows, every number in
the prose is one the code printed, links and test names resolve, and every method has its page.

How checked blocks work, and how to regenerate them: ``docs/check_docs.py`` (``python docs/check_docs.py
--update``).
"""

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from minipeft.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def load_checker():
    spec = importlib.util.spec_from_file_location("check_docs", DOCS / "check_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_docs = load_checker()
PAGES = check_docs.pages()
CHECKED_PAGES = [page for page in PAGES if check_docs.parse_page(page)]
METHOD_PAGES = {name: DOCS / "methods" / f"{'adapters' if name == 'adapter' else name}.md" for name in METHODS}
METHOD_SECTIONS = ("## Diagram", "## Forward", "## Parameter count", "## Pitfalls")


def page_id(page: Path) -> str:
    return str(page.relative_to(DOCS))


@pytest.mark.parametrize("page", CHECKED_PAGES, ids=page_id)
def test_checked_blocks_print_what_the_page_shows(page):
    blocks = check_docs.run_page(page)
    stale = check_docs.stale_blocks(blocks)
    assert not stale, ("the docs no longer match the code (regenerate with `python docs/check_docs.py --update` "
                       "if the change is intended):\n" + "\n".join(check_docs.describe(block) for block in stale))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_numbers_in_the_prose_are_printed_by_a_checked_block(page):
    assert check_docs.unbacked_numbers(page) == []


LINK = re.compile(r"\]\(([^)\s]+)\)")
TEST_NAME = re.compile(r"`(test_\w+)`")


def defined_test_names() -> set:
    names = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        names.update(re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.MULTILINE))
    return names


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_and_named_tests_exist(page):
    text = page.read_text(encoding="utf-8")
    broken = [target for target in LINK.findall(text)
              if not target.startswith(("http://", "https://", "#", "mailto:"))
              and not (page.parent / target.split("#")[0]).exists()]
    assert broken == []
    assert sorted(set(TEST_NAME.findall(text)) - defined_test_names()) == []


@pytest.mark.parametrize("name", list(METHOD_PAGES))
def test_every_method_has_a_page_with_diagram_formula_count_paper_and_pitfalls(name):
    page = METHOD_PAGES[name]
    assert page.is_file(), f"--modification_type {name} has no page {page.relative_to(ROOT)}"
    text = page.read_text(encoding="utf-8")
    assert [section for section in METHOD_SECTIONS if section not in text] == []
    assert "arxiv.org/abs/" in text  # the paper
    assert f"minipeft/methods/{METHODS[name].module.split('.')[-1]}.py" in text  # the code
    assert any(block.kind == "command" and "modify" in block.source for block in check_docs.parse_page(page)), \
        "the page shows the CLI's count"


def test_docs_readme_links_every_page_and_example():
    readme = (DOCS / "README.md").read_text(encoding="utf-8")
    linked = {(DOCS / target.split("#")[0]).resolve() for target in LINK.findall(readme)
              if not target.startswith(("http", "#"))}
    assert [page_id(page) for page in PAGES if page.resolve() not in linked and page.name != "README.md"] == []
    examples = sorted((ROOT / "examples").glob("[0-9]*.py"))
    assert examples and [path.name for path in examples if path.resolve() not in linked] == []


def test_a_documented_command_prints_the_same_in_a_real_process():
    """The checker runs commands in-process on the meta device; a real run, exactly as typed, agrees."""
    page = DOCS / "methods" / "prefix.md"
    block = next(block for block in check_docs.parse_page(page) if block.kind == "command")
    argv = shlex.split(block.source)
    assert argv[:3] == ["python", "-m", "minipeft"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                                        os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert check_docs.normalise(result.stdout) == check_docs.normalise(block.expected)


SCRIPTS = {"train_llm.py": "minipeft.cli.train", "modify_llm.py": "minipeft.cli.modify",
           "data_pipeline.py": "minipeft.cli.data"}


def documented_commands(page: Path) -> list:
    """Every command line in the page's ```bash blocks (continuation lines joined, comments dropped)."""
    commands, inside = [], False
    for line in re.sub(r"\\\n\s*", " ", page.read_text(encoding="utf-8")).split("\n"):
        if line.startswith("```"):
            inside = line.strip() == "```bash"
        elif inside and line.strip():
            commands.append(shlex.split(line, comments=True))
    return commands


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_documented_command_lines_parse_with_todays_flags(page):
    """A renamed flag or script breaks the commands a reader copies; argparse exits on an unknown flag."""
    import importlib

    from minipeft.cli import COMMANDS

    for argv in documented_commands(page):
        if argv[0] == "torchrun":
            argv = ["python"] + [arg for arg in argv[1:] if not arg.startswith("--nproc")]
        assert argv[0] == "python", argv
        if argv[1] == "-m" and argv[2:3] == ["pytest"]:
            continue
        if argv[1] == "-m":
            assert argv[2] == "minipeft" and argv[3] in COMMANDS, argv
            module, arguments = COMMANDS[argv[3]][0], argv[4:]
        elif argv[1] in SCRIPTS:
            module, arguments = SCRIPTS[argv[1]], argv[2:]
            assert (ROOT / argv[1]).is_file()
        else:  # an example or the docs checker
            assert (ROOT / argv[1]).is_file(), argv
            continue
        importlib.import_module(module).build_parser().parse_args(arguments)


STALE_PAGE = """# A page

<!-- doc-check: python -->
```python
answer = 6 * 7
print(answer)
```

```text
41
```

<!-- doc-check: python -->
```python
print(f"{answer * 1000:,} and then some")
```
```text
42,000 and then some
```

The prose says 42,000 and 43,000.
"""


def test_update_rewrites_stale_outputs_and_the_prose_check_catches_unprinted_numbers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(STALE_PAGE, encoding="utf-8")
    blocks = check_docs.run_page(page)  # snippets share one namespace: the second one uses `answer`
    assert [block.actual for block in blocks] == ["42", "42,000 and then some"]
    assert [block.line for block in check_docs.stale_blocks(blocks)] == [2]
    assert check_docs.unbacked_numbers(page) == ["43,000"]
    assert check_docs.update_page(page, blocks)
    assert check_docs.stale_blocks(check_docs.run_page(page)) == []
    assert page.read_text(encoding="utf-8") == STALE_PAGE.replace("```text\n41\n```", "```text\n42\n```")


def test_a_marker_without_its_block_is_an_error(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- doc-check: python -->\nno code here\n", encoding="utf-8")
    with pytest.raises(ValueError, match="needs a fenced block"):
        check_docs.parse_page(page)
    page.write_text("<!-- doc-check: rm -rf / -->\n```text\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="must be 'python' or 'python -m minipeft"):
        check_docs.parse_page(page)


# A CPU with other vector units: ATen's kernels at their plainest level (no AVX), oneDNN and MKL held to SSE4.
# The figures the pages print are chosen to hold there too (bounds or rounding; see docs/check_docs.py).
OTHER_CPU = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


@pytest.mark.slow
def test_every_page_prints_the_same_with_another_cpus_kernels():
    """Sums in another order (other vector widths) change the last bits of every float: no page may print them."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", **OTHER_CPU,
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, str(DOCS / "check_docs.py")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
