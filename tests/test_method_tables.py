"""Every list of the methods outside their own modules has a row for each registered method, or a test here fails
naming the file and the missing row: the README's (its opening list, methods table, default learning rates,
page links), docs/README.md's (the counts it computes and prints, the pages table, the reading
order), docs/peft_format.md's (the files it saves and prints, its table of tensor names) and the serving
fixtures' (an adapter with a visible effect on both tiny models).

These are the places docs/adding_a_method.md tells a new method to add itself to; the numbers in the rows are
checked elsewhere (tests/test_readme.py recomputes the README's counts, tests/test_docs.py runs docs/README.md).
"""

import re
from pathlib import Path

import pytest
import torch

from minipeft.methods import METHODS
from minipeft.model.peft_model import get_peft_model
from serving_fixtures import FACTORIES, method_config, perturb

ROOT = Path(__file__).resolve().parents[1]
CHECKED_FILES = ("README.md", "docs/README.md", "docs/peft_format.md")  # docs/adding_a_method.md's list names this
README, DOCS_README, PEFT_FORMAT = ((ROOT / path).read_text(encoding="utf-8") for path in CHECKED_FILES)  # test


def page(name: str) -> str:
    """The method's page under docs/methods/ (as tests/test_docs.py requires it: adapter's is adapters.md)."""
    return f"{'adapters' if name == 'adapter' else name}.md"


def module_file(name: str) -> str:
    return METHODS[name].module.split(".")[-1] + ".py"


def readme_opening() -> str:
    """The README's first paragraph, under its title: what minipeft is, with every method named."""
    return README.split("\n\n")[1].lower()


@pytest.mark.parametrize("name", list(METHODS))
def test_readme_has_a_row_for_the_method(name):
    missing = [where for where, present in [
        ("the opening list of methods", name in readme_opening()),
        ("a row of the methods table (| `NAME ...` | ... | COUNT (RATIO%) | ...)",
         re.search(rf"^\| `{name}\b[^`]*`.*\| [\d,]+ \([\d.]+%\) \|", README, flags=re.MULTILINE)),
        ("a row of the default learning rates table (| `NAME` | RATE | SOURCE |)",
         re.search(rf"^\| `{name}` \| [\d.e-]+ \| .+ \|$", README, flags=re.MULTILINE)),
        (f"a link to its page (docs/methods/{page(name)}) under Learn", f"(docs/methods/{page(name)})" in README),
    ] if not present]
    assert missing == [], f"README.md has no row for --modification_type {name}: add {'; '.join(missing)}"


@pytest.mark.parametrize("name", list(METHODS))
def test_docs_readme_has_a_row_for_the_method(name):
    missing = [where for where, present in [
        (f'its config in the checked block\'s configs ("{name}": ...)', f'    "{name}": ' in DOCS_README),
        ("its line in that block's printed table",
         re.search(rf"^{name} +[\d,]+ +[\d.]+% +(yes|no)$", DOCS_README, flags=re.MULTILINE)),
        (f"a row of the pages table (| [{page(name)}](methods/{page(name)}) | ...)",
         f"| [{page(name)}](methods/{page(name)}) |" in DOCS_README),
        (f"its module in the reading order (../minipeft/methods/{module_file(name)})",
         f"(../minipeft/methods/{module_file(name)})" in DOCS_README),
    ] if not present]
    assert missing == [], f"docs/README.md has no row for --modification_type {name}: add {'; '.join(missing)}"


@pytest.mark.parametrize("name", list(METHODS))
def test_the_format_page_has_a_row_for_the_method(name):
    peft_type = METHODS[name].peft_type
    missing = [where for where, present in [
        (f"its files in the printed output of the first checked block ({name}: ... peft_type {peft_type}; the "
         "block saves every registered method: run python docs/check_docs.py docs/peft_format.md --update)",
         re.search(rf"^{name}: adapter_config\.json \+ adapter_model\.safetensors, peft_type {peft_type}$", PEFT_FORMAT,
                   flags=re.MULTILINE)),
        (f"a row of the tensor names table (| NAME | `{peft_type}` ... | tensors | shapes |)",
         re.search(rf"^\| [^|]+ \| `{peft_type}`[^|]*\| .+ \| .+ \|$", PEFT_FORMAT, flags=re.MULTILINE)),
    ] if not present]
    assert missing == [], f"docs/peft_format.md has no row for --modification_type {name}: add {'; '.join(missing)}"


@pytest.mark.parametrize("family", list(FACTORIES))
@pytest.mark.parametrize("name", list(METHODS))
def test_serving_fixture_adapter_changes_the_output(name, family):
    """tests/serving_fixtures.py's ``method_config`` gives every method an adapter the generation and merge tests
    can see (its defaults, or settings listed there for the tiny models)."""
    model = FACTORIES[family]()
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        peft_model = perturb(get_peft_model(model, method_config(name, family)))
        after = peft_model(input_ids=ids).logits[:, -ids.shape[1]:]
    assert not torch.allclose(before, after, atol=1e-3), (
        f"tests/serving_fixtures.py: method_config({name!r}, {family!r}) gives an adapter with no visible effect "
        "on the tiny model; give it settings there")
