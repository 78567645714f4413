"""Check (or regenerate) every number and sample output printed in the docs.

A page marks a generated block with an HTML comment, which GitHub does not render::

    <!-- doc-check: python -m minipeft modify --modification_type prompt --table none -->
    ```text
    ...what that command prints...
    ```

    <!-- doc-check: python -->
    ```python
    print(2 + 2)
    ```
    ```text
    4
    ```

- ``doc-check: python -m minipeft <command> ...``: the fenced block after the comment is the command's
  standard output. The command runs in this process through :func:`minipeft.cli.main` (importing torch
  once, not once per command), offline (``HF_HUB_OFFLINE=1``). ``modify`` runs with torch's default device
  set to ``meta``: parameters get their shapes but no memory and no initialisation, so GPT-2 small is built
  in a fraction of a second and the counts are identical (``tests/test_docs.py`` runs one such command as a
  real subprocess, exactly as typed, and compares).
- ``doc-check: python``: the ``python`` block after the comment is run, and the ``text`` block after it is
  what it prints. The snippets of one page run in order in one namespace, like a notebook, so a page can
  build a model once and use it below; every page starts with ``torch.manual_seed(0)`` and one torch thread.

Only what must differ between machines is normalised: lines starting with ``note:`` (whether GPT-2's real
weights happen to be cached) are dropped, this checkout's absolute path is written as a relative one, and
trailing spaces are ignored. Checked blocks hold no timings.

The prose is held to the same standard: a number written with thousands separators (``294,912``) or a
percentage with decimals (``0.74%``) outside fenced blocks (inline code included: worked sums such as
``8 · (768 + 2304) = 24,576``) must appear in a checked output of the same page (a percentage: rounded
to the decimals the prose uses). So a worked example by hand comes with a snippet that prints its steps.

Figures that hold on every CPU: a page prints what another CPU prints too. Kernels with other vector widths
(AVX2, AVX-512, AMX, or none) sum in other orders, so a float's last digits move: a page prints a bound
(``< 1e-4``) or rounds to where no kernel reaches, and says which figures depend on the machine (timings
are never checked). ``tests/test_docs.py`` re-runs every page with ATen, oneDNN and MKL held to their
plainest kernels, as below.

Usage::

    python docs/check_docs.py                 # check every page; print what differs; exit status 1 if stale
    python docs/check_docs.py --update        # rewrite the outputs from what the code prints today
    python docs/check_docs.py docs/methods/lora.md [--update]   # one page
    ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 python docs/check_docs.py
                                              # as another CPU would print them
"""

import argparse
import contextlib
import difflib
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

DOCS_DIR = Path(__file__).resolve().parent
ROOT = DOCS_DIR.parent
MARKER = re.compile(r"^<!-- doc-check: (?P<spec>.+?) -->\s*$")
FENCE = re.compile(r"^```(?P<info>[\w-]*)\s*$")
CLI_PREFIX = ["python", "-m", "minipeft"]


@dataclass
class Block:
    """One checked block of a page: what to run, and where its expected output sits (0-based lines)."""

    page: Path
    line: int  # the marker's line
    kind: str  # "command" or "python"
    source: str  # the command line, or the Python code
    output_start: int  # first line of the output fence's content
    output_end: int  # the output fence's closing line
    expected: str
    actual: str | None = field(default=None)

    @property
    def where(self) -> str:
        return f"{shown(self.page)}:{self.line + 1}"


def shown(path: Path) -> str:
    """``path`` relative to the checkout when it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# Measured, machine-dependent figures (speed, memory) live in docs/benchmarks.md, written by the benchmarks in
# bench/, and docs/comparison.md, written whole by `python -m minipeft compare --report docs/comparison.md`;
# this checker neither regenerates nor checks those pages.
NOT_CHECKED = {"benchmarks.md", "comparison.md"}


def pages() -> list:
    """Every Markdown page under docs/ (except :data:`NOT_CHECKED`), in a stable order."""
    return sorted(path for path in DOCS_DIR.rglob("*.md") if path.name not in NOT_CHECKED)


def read_fence(lines: list, start: int, page: Path):
    """``(info, first content line, closing line)`` of the fence opening at or after blank lines from ``start``."""
    index = start
    while index < len(lines) and not lines[index].strip():
        index += 1
    if index >= len(lines) or not FENCE.match(lines[index]):
        raise ValueError(f"{shown(page)}:{start}: a doc-check block needs a fenced block here")
    info = FENCE.match(lines[index]).group("info")
    end = index + 1
    while end < len(lines) and lines[end].rstrip() != "```":
        end += 1
    if end >= len(lines):
        raise ValueError(f"{shown(page)}:{index + 1}: fenced block is never closed")
    return info, index + 1, end


def fenced_lines(lines: list) -> set:
    """Indices of the lines inside fenced blocks, fence lines included (```` fences may hold ``` ones)."""
    inside, opening = set(), None
    for number, line in enumerate(lines):
        run = re.match(r"^(`{3,})", line)
        if opening is None and run:
            opening = run.group(1)
        elif opening is not None:
            if line.rstrip() == opening:
                opening = None
        else:
            continue
        inside.add(number)
    return inside


def parse_page(page: Path) -> list:
    """The checked blocks of ``page``, in order (a marker inside a fenced block is an example, not a block)."""
    lines = page.read_text(encoding="utf-8").split("\n")
    in_fence = fenced_lines(lines)
    blocks = []
    for number, line in enumerate(lines):
        match = MARKER.match(line)
        if not match or number in in_fence:
            continue
        spec = match.group("spec").strip()
        if spec == "python":
            info, code_start, code_end = read_fence(lines, number + 1, page)
            if info != "python":
                raise ValueError(f"{shown(page)}:{number + 1}: doc-check: python needs a ```python block")
            source = "\n".join(lines[code_start:code_end])
            _, output_start, output_end = read_fence(lines, code_end + 1, page)
            kind = "python"
        elif shlex.split(spec)[:3] == CLI_PREFIX:
            _, output_start, output_end = read_fence(lines, number + 1, page)
            source, kind = spec, "command"
        else:
            raise ValueError(f"{shown(page)}:{number + 1}: doc-check must be 'python' or "
                             f"'python -m minipeft ...', got {spec!r}")
        blocks.append(Block(page, number, kind, source, output_start, output_end,
                            "\n".join(lines[output_start:output_end])))
    return blocks


def normalise(text: str) -> str:
    """Drop ``note:`` lines and trailing spaces; this checkout's path becomes relative."""
    text = text.replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".")
    lines = [line.rstrip() for line in text.split("\n") if not line.startswith("note: ")]
    return "\n".join(lines).strip("\n")


@contextlib.contextmanager
def offline_environment():
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def run_command(command: str) -> str:
    """Standard output of ``python -m minipeft <command> ...``, run in this process."""
    import torch

    from minipeft.cli import main

    argv = shlex.split(command)[len(CLI_PREFIX):]
    device = torch.device("meta") if argv[:1] == ["modify"] else contextlib.nullcontext()
    stdout, stderr = io.StringIO(), io.StringIO()
    with offline_environment(), device, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main(argv)
    if status:
        raise RuntimeError(f"`{command}` exited with status {status}: {stderr.getvalue().strip()}")
    return stdout.getvalue()


def run_page(page: Path) -> list:
    """Run every checked block of ``page``; fills in ``block.actual``."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    namespace = {"__name__": "__docs__"}
    blocks = parse_page(page)
    for block in blocks:
        if block.kind == "command":
            output = run_command(block.source)
        else:
            stdout = io.StringIO()
            code = compile(block.source, block.where, "exec")
            with offline_environment(), contextlib.redirect_stdout(stdout):
                exec(code, namespace)  # noqa: S102 - the docs' own snippets
            output = stdout.getvalue()
        block.actual = normalise(output)
    return blocks


def stale_blocks(blocks: list) -> list:
    return [block for block in blocks if normalise(block.expected) != block.actual]


def describe(block: Block) -> str:
    """A unified diff of one stale block (expected = the page, actual = the code today)."""
    diff = difflib.unified_diff(normalise(block.expected).split("\n"), block.actual.split("\n"),
                                f"{block.where} (in the docs)", f"{block.where} (printed today)", lineterm="")
    return "\n".join(diff)


def update_page(page: Path, blocks: list) -> bool:
    """Write every block's actual output into ``page``; True when the file changed."""
    lines = page.read_text(encoding="utf-8").split("\n")
    for block in sorted(blocks, key=lambda block: block.output_start, reverse=True):
        lines[block.output_start:block.output_end] = block.actual.split("\n")
    text = "\n".join(lines)
    if text == page.read_text(encoding="utf-8"):
        return False
    temporary = page.with_name(f".{page.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, page)
    return True


# -- the prose: its numbers must be ones the code printed ------------------------------------------------
GROUPED_NUMBER = re.compile(r"(?<![\w.,])\d{1,3}(?:,\d{3})+(?![\d,]*\d)")
PERCENTAGE = re.compile(r"(?<![\w.])(\d+\.\d+)\s?%")


def prose_and_outputs(page: Path):
    """``(prose text, checked output text)`` of a page; the prose is everything outside fenced blocks."""
    lines = page.read_text(encoding="utf-8").split("\n")
    blocks = parse_page(page)
    outputs = "\n".join(block.expected for block in blocks)
    in_fence = fenced_lines(lines)
    prose = [line for number, line in enumerate(lines) if number not in in_fence and not MARKER.match(line)]
    return "\n".join(prose), outputs


def unbacked_numbers(page: Path) -> list:
    """Numbers in the prose of ``page`` that no checked output of the page prints."""
    prose, outputs = prose_and_outputs(page)
    printed_numbers = set(GROUPED_NUMBER.findall(outputs))
    printed_percentages = [float(value) for value in PERCENTAGE.findall(outputs)]
    missing = [number for number in GROUPED_NUMBER.findall(prose) if number not in printed_numbers]
    for value in PERCENTAGE.findall(prose):
        decimals = len(value.split(".")[1])
        if not any(round(printed, decimals) == float(value) for printed in printed_percentages):
            missing.append(value + "%")
    return missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python docs/check_docs.py", description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", type=Path, help="pages to check (default: every page under docs/)")
    parser.add_argument("--update", action="store_true", help="rewrite the outputs from what the code prints")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    failed = False
    for page in [path.resolve() for path in args.pages] or pages():
        blocks = run_page(page)
        stale = stale_blocks(blocks)
        if args.update:
            if update_page(page, blocks):
                print(f"updated {shown(page)} ({len(stale)} of {len(blocks)} blocks changed)")
        else:
            for block in stale:
                print(describe(block))
            failed |= bool(stale)
        for number in unbacked_numbers(page):
            print(f"{shown(page)}: the prose says {number}, which no checked output prints")
            failed = True
        print(f"{shown(page)}: {len(blocks)} checked blocks, {len(stale)} stale"
              + (" (updated)" if args.update and stale else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
