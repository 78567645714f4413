"""Fuzzing the loader: whatever the bytes or JSON, it returns usable records or raises UserError, nothing else."""

import json

import pytest

from minipeft.data.loading import load_records
from minipeft.core.errors import UserError


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FIELDS = st.sampled_from(["instruction", "input", "output", "instances", "other"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(FIELDS, children, max_size=5),
    max_leaves=20,
)


def load_or_user_error(path):
    try:
        loaded = load_records(path, max_invalid_fraction=1.0)
    except UserError as error:
        assert "\n" not in str(error) and str(path) in str(error)
        return None
    assert loaded.records and all(isinstance(r.output, str) and r.output.strip() for r in loaded.records)
    return loaded


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200), suffix=st.sampled_from([".json", ".jsonl", ".csv", ".txt"]))
def test_fuzz_random_bytes(tmp_path, content, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(content)
    load_or_user_error(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=JSON_VALUES, as_lines=st.booleans())
def test_fuzz_json_structures(tmp_path, value, as_lines):
    if as_lines and isinstance(value, list):
        path = tmp_path / "fuzz.jsonl"
        path.write_text("\n".join(json.dumps(item) for item in value), encoding="utf-8")
    else:
        path = tmp_path / "fuzz.json"
        path.write_text(json.dumps(value), encoding="utf-8")
    load_or_user_error(path)
