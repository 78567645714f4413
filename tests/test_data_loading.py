"""Loading Alpaca-format records: formats, column mapping, seed tasks, skipped records and file errors."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from data_fixtures import RECORDS, SHARED_DATA, tokenizer_dir, write_json, write_jsonl  # noqa: F401 (fixture)
from minipeft.cli import run
from minipeft.cli.data import main
from minipeft.data.loading import load_records
from minipeft.core.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def as_tuples(loaded):
    return [(record.instruction, record.input, record.output) for record in loaded.records]


EXPECTED = [(record["instruction"], record["input"], record["output"]) for record in RECORDS]


def test_json_array_jsonl_and_csv_give_the_same_records(tmp_path):
    import pandas as pd

    json_file = write_json(tmp_path / "a.json", RECORDS)
    jsonl_file = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    csv_file = tmp_path / "a.csv"
    pd.DataFrame(RECORDS).to_csv(csv_file, index=False)
    for path, file_format in ((json_file, "json"), (jsonl_file, "jsonl"), (csv_file, "csv")):
        loaded = load_records(path)
        assert loaded.file_format == file_format
        assert as_tuples(loaded) == EXPECTED, path
        assert loaded.skipped == [] and loaded.total == len(RECORDS)
    assert load_records(json_file).records[3].source == "record 3"
    assert load_records(jsonl_file).records[3].source == "line 4"
    assert load_records(csv_file).records[3].source == "row 4"


def test_json_lines_in_a_dot_json_file_and_a_utf8_bom(tmp_path):
    path = tmp_path / "lines.json"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in RECORDS).encode())
    loaded = load_records(path)
    assert loaded.file_format == "jsonl" and as_tuples(loaded) == EXPECTED


def test_columns_are_mapped_by_name_and_the_input_column_is_optional(tmp_path):
    renamed = [{"prompt": r["instruction"], "context": r["input"], "answer": r["output"]} for r in RECORDS]
    path = write_json(tmp_path / "renamed.json", renamed)
    loaded = load_records(path, instruction_column="prompt", input_column="context", output_column="answer")
    assert as_tuples(loaded) == EXPECTED
    no_input = write_json(tmp_path / "no_input.json", [{"instruction": "a", "output": "b"}])
    assert as_tuples(load_records(no_input)) == [("a", "", "b")]


def test_seed_task_instances_are_flattened(tmp_path):
    task = {"id": "seed_task_0", "instruction": "Antonym?", "is_classification": False,
            "instances": [{"input": "hot", "output": "cold"}, {"input": "up", "output": "down"}]}
    loaded = load_records(write_jsonl(tmp_path / "seed.jsonl", [task, {**task, "instruction": "Opposite?"}]))
    assert as_tuples(loaded) == [("Antonym?", "hot", "cold"), ("Antonym?", "up", "down"),
                                 ("Opposite?", "hot", "cold"), ("Opposite?", "up", "down")]
    assert loaded.records[1].source == "line 1, instance 2"


def test_bad_records_are_skipped_counted_and_explained(tmp_path):
    bad = [
        {"instruction": "x", "input": ""},  # no output
        {"instruction": "x", "input": "", "output": "   "},  # empty output
        {"instruction": 5, "input": "", "output": "y"},  # not text
        "just a string",
    ]
    path = write_json(tmp_path / "mixed.json", RECORDS + bad)
    loaded = load_records(path, max_invalid_fraction=0.5)
    assert len(loaded.records) == len(RECORDS) and loaded.total == len(RECORDS) + 4
    reasons = dict(loaded.skipped)
    assert reasons[f"record {len(RECORDS)}"] == "no 'output' field"
    assert reasons[f"record {len(RECORDS) + 1}"] == "empty 'output'"
    assert reasons[f"record {len(RECORDS) + 2}"] == "field 'instruction' is a JSON number, expected a string"
    assert reasons[f"record {len(RECORDS) + 3}"].startswith("is a JSON string")
    with pytest.raises(UserError, match=r"4 of 16 records \(25%\) are unusable, more than --max_invalid_fraction "
                                        r"0.1; first: record 12: no 'output' field"):
        load_records(path, max_invalid_fraction=0.1)


def test_non_utf8_bytes_are_reported_with_their_line_or_record(tmp_path):
    lines = [json.dumps(record).encode() for record in RECORDS]
    lines[2] = lines[2].replace(b"Paris", b"Par\xffis")
    jsonl = tmp_path / "bytes.jsonl"
    jsonl.write_bytes(b"\n".join(lines))
    loaded = load_records(jsonl, max_invalid_fraction=0.5)
    assert len(loaded.records) == len(RECORDS) - 1
    assert loaded.skipped == [("line 3", "field 'output' is not valid UTF-8 (byte 0xff at character 3)")]

    array = tmp_path / "bytes.json"
    array.write_bytes(b"[" + b",".join(lines) + b"]")
    assert load_records(array, max_invalid_fraction=0.5).skipped[0][0] == "record 2"

    csv = tmp_path / "bytes.csv"
    csv.write_bytes(b"instruction,input,output\nok,,fine\nbad \xfe,,text\n")
    assert load_records(csv, max_invalid_fraction=0.5).skipped == [
        ("row 2", "field 'instruction' is not valid UTF-8 (byte 0xfe at character 4)")]


BAD_FILES = [
    ("missing.json", None, "missing.json: cannot be read"),
    ("empty.json", b"  \n", "empty.json: holds no records (the file is empty)"),
    ("broken.json", b'[{"instruction": "a", "output": "b"},', "broken.json: not valid JSON (line 1 column 38"),
    ("object.json", b'{"data": [1, 2]}', "object.json: expected a JSON array of records"),
    ("number.json", b"42", "number.json: expected a JSON array of records, found a JSON number"),
    ("columns.json", b'[{"question": "a", "answer": "b"}]',
     "columns.json: no 'instruction' column (columns found: answer, question); name the right one with "
     "--instruction_column"),
    ("nothing.json", b'[{"instruction": "a", "output": ""}]', "nothing.json: no usable record (1 skipped: "
                                                               "record 0: empty 'output')"),
    ("columns.csv", b"a,b\n1,2\n", "columns.csv: no 'instruction' column"),
    ("unknown.txt", b"instruction: a", "unknown.txt: unknown format"),
    ("deep.json", b"[" * 100_000, "deep.json: "),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[name for name, _, _ in BAD_FILES])
def test_unusable_files_raise_one_user_error_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        load_records(path)
    assert str(caught.value).startswith(str(tmp_path / message.split(":")[0]) + ":")
    assert message.split(":", 1)[1] in str(caught.value)
    assert "\n" not in str(caught.value)


def test_cli_turns_a_bad_file_into_one_line_and_exit_code_2(tmp_path, tokenizer_dir, capsys):  # noqa: F811
    path = tmp_path / "broken.json"
    path.write_text("[{", encoding="utf-8")
    status = run(main, ["--dataset_path", str(path), "--model", str(tokenizer_dir), "--no_cache"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: not valid JSON")


def test_data_pipeline_script_exits_2_on_a_missing_file(tmp_path, tokenizer_dir, monkeypatch, capsys):  # noqa: F811
    missing = tmp_path / "nope.json"
    argv = ["data_pipeline.py", "--dataset_path", str(missing), "--model", str(tokenizer_dir)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "data_pipeline.py"), run_name="__main__")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {missing}: cannot be read (No such file or directory)\n"


@pytest.mark.parametrize("name, expected_count", [("gpteacher_roleplay.json", 3146), ("alpaca_seed_tasks.jsonl", 175)])
def test_the_shared_real_files_load(name, expected_count):
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    loaded = load_records(path)
    assert len(loaded.records) == expected_count and loaded.skipped == []
    assert all(record.output.strip() for record in loaded.records)
