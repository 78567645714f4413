"""Reading Alpaca-format instruction records from a JSON array, JSON Lines or CSV file.

An Alpaca record has three text fields (Taori et al., 2023, "Stanford Alpaca")::

    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat a balanced diet ..."}

``input`` is optional context and is often empty. The seed-task layout of Self-Instruct / Stanford Alpaca
(``seed_tasks.jsonl``) nests the input/output pairs under ``instances``; each instance becomes one record::

    {"instruction": "...", "instances": [{"input": "...", "output": "..."}, ...]}

Two kinds of problems, handled differently:

* the file as a whole is unusable (cannot be read, is not JSON, lacks the columns, holds no usable record):
  :class:`~minipeft.core.errors.UserError` naming the file and the problem;
* one record is unusable (a missing or non-text field, an empty output, bytes that are not UTF-8): it is
  skipped and counted, with where and why; the load fails only when more than ``max_invalid_fraction`` of
  the records are skipped.

Bytes that are not UTF-8 never crash the load: the file is decoded with ``surrogateescape``, which turns each
bad byte into a lone surrogate character (U+DC80 + byte); a record holding one is skipped and reported
with its byte.
"""

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from minipeft.core.errors import UserError
from minipeft.files.input_files import duplicate_keys, read_input_bytes, refuse_utf16
from minipeft.files.json_limits import loads_bounded

SHOWN_REASONS = 5  # how many skip reasons an error message or a report quotes

# Lone surrogates: what ``surrogateescape`` makes of non-UTF-8 bytes (U+DC80..U+DCFF), or an unpaired
# ``\ud800``-style escape in JSON. Neither can be encoded as UTF-8, so no tokenizer can read them.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Record:
    """One training example; ``source`` says where it came from (``"record 12"``, ``"line 7, instance 2"``)."""

    instruction: str
    input: str
    output: str
    source: str = ""


@dataclass
class LoadedRecords:
    """The usable records of a file, and what was skipped (``(where, why)`` for each skipped record)."""

    path: str
    file_format: str  # "json", "jsonl" or "csv"
    columns: list[str]  # field names found in the file
    records: list[Record]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.records) + len(self.skipped)


def load_records(path, instruction_column: str = "instruction", input_column: str = "input",
                 output_column: str = "output", max_invalid_fraction: float = 0.1) -> LoadedRecords:
    """Read the records of ``path`` (format from the suffix, else from the first character).

    Raises:
        UserError: the file cannot be read or parsed, lacks the instruction/output columns, has no usable
            record, or more than ``max_invalid_fraction`` of its records are unusable.
    """
    path = Path(path)
    columns = (instruction_column, input_column, output_column)
    raw = read_input_bytes(path)  # a regular file within the size limit: never /dev/zero or a FIFO
    refuse_utf16(raw, path)  # (else read as UTF-8 with a NUL by every letter: "no 'instruction' column")
    text = raw.decode("utf-8-sig", errors="surrogateescape")
    if not text.strip():
        raise UserError(f"{path}: holds no records (the file is empty); expected Alpaca records "
                        "(JSON array, JSON Lines or CSV)")

    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        file_format, (header, rows) = "csv", read_csv_rows(path, text, "\t" if suffix == ".tsv" else ",", columns)
    elif suffix in (".jsonl", ".ndjson") or (suffix != ".json" and text.lstrip().startswith("{")):
        file_format, rows = "jsonl", _read_json_lines(path, text)
    elif text.lstrip().startswith("[") or suffix == ".json":
        file_format, rows = _read_json(path, text)
    else:
        raise UserError(f"{path}: unknown format; expected a .json array, .jsonl (JSON Lines) or .csv file")

    if not rows:
        kind = "JSON array" if file_format == "json" else file_format.upper()
        raise UserError(f"{path}: holds no records (an empty {kind})")
    found = sorted(set(header) if file_format == "csv" else
                   {key for _, row in rows if isinstance(row, dict) for key in row})
    if file_format == "csv" or any(isinstance(row, dict) for _, row in rows):  # (else each row says what it is)
        _check_columns(path, found, columns)
    loaded = LoadedRecords(str(path), file_format, found, records=[])
    for where, row in rows:
        for item in _records_from_row(where, row, columns):
            if isinstance(item, Record):
                loaded.records.append(item)
            else:
                loaded.skipped.append(item)
    _check_skipped(loaded, max_invalid_fraction)
    return loaded


def _read_json(path: Path, text: str):
    """A JSON array of records; a ``.json`` file that holds JSON Lines is read as such."""
    try:
        data = loads_bounded(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and text.lstrip().startswith("{"):
            return "jsonl", _read_json_lines(path, text)
        raise UserError(f"{path}: not valid JSON (line {error.lineno} column {error.colno}: {error.msg}"
                        f"{_bad_byte_hint(text, error.pos)})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to be a list of records") from None
    if isinstance(data, dict):
        keys = ", ".join(list(data)[:5])
        raise UserError(f"{path}: expected a JSON array of records (or one record per line, JSON Lines), "
                        f"found one object with keys: {keys}")
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of records, found a JSON {_json_type(data)}")
    return "json", [(f"record {index}", row) for index, row in enumerate(data)]


def _read_json_lines(path: Path, text: str):
    """One JSON object per line; a line that does not parse is a skipped record, not a failed file."""
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", loads_bounded(line)))
        except json.JSONDecodeError as error:
            rows.append((f"line {number}", Unparsable(f"not valid JSON (column {error.colno}: {error.msg}"
                                                       f"{_bad_byte_hint(line, error.pos)})")))
        except RecursionError:
            rows.append((f"line {number}", Unparsable("JSON nested too deeply")))
    return rows


def read_csv_rows(path: Path, text: str, separator: str, columns: tuple[str, ...]):
    """Every cell read as text; rows numbered from 1 after the header, blank lines skipped. A row of empty cells
    (what spreadsheets write at the end) is skipped but counted, so that every later row keeps its number; a row
    of cells holding only spaces is a record, which its reader refuses or skips by name.

    A row whose number of fields differs from the header's is a skipped record (its cells cannot be told
    apart: one comma too many would shift every later column into the wrong field), and a header that names
    one of ``columns`` twice is refused (which of the two is meant cannot be known)."""
    import csv

    limit = csv.field_size_limit(max(len(text), csv.field_size_limit()))  # a cell may be as long as the file
    try:
        lines = csv.reader(io.StringIO(text, newline=""), delimiter=separator, strict=True)
        header = next(lines, [])
        rows = [(number, row) for number, row in enumerate((row for row in lines if row), start=1) if any(row)]
    except csv.Error as error:  # strict: a quote never closed would take the rest of the file into one cell
        raise UserError(f"{path}: not a readable CSV file (line {lines.line_num}: {error})") from None
    finally:
        csv.field_size_limit(limit)
    for column in columns:
        places = [number for number, name in enumerate(header, start=1) if name == column]
        if len(places) > 1:
            raise UserError(f"{path}: the header names column {column!r} {len(places)} times (columns "
                            f"{', '.join(map(str, places))}); rename all but one")
    return header, [(f"row {number}", dict(zip(header, row)) if len(row) == len(header) else
             Unparsable(f"has {len(row)} field{'s' * (len(row) != 1)}, the header has {len(header)}"))
            for number, row in rows]


class Unparsable:
    """Stands in for a JSON Lines record that did not parse; carries the reason."""

    def __init__(self, reason: str):
        self.reason = reason


def _check_columns(path: Path, found: list[str], columns: tuple[str, str, str]) -> None:
    """The instruction and output columns must exist somewhere; the input column is optional under its
    default name ``input`` (many data sets have none), and must exist when named otherwise (a misspelt
    ``--input_column`` would train without the inputs the user meant)."""
    instruction_column, input_column, output_column = columns
    flags = {instruction_column: "--instruction_column", output_column: "--output_column"}
    if input_column != "input":
        flags[input_column] = "--input_column"
    has_instances = "instances" in found
    for column, flag in flags.items():
        if column not in found and not (column != instruction_column and has_instances):  # inside the instances
            shown = ", ".join(found[:10]) or "none"
            raise UserError(f"{path}: no {column!r} column (columns found: {shown}); "
                            f"name the right one with {flag}")


def _records_from_row(where: str, row, columns: tuple[str, str, str]):
    """Yield a :class:`Record`, or ``(where, why)`` for a row that cannot be one; seed tasks yield one per instance."""
    if isinstance(row, Unparsable):
        yield where, row.reason
        return
    if not isinstance(row, dict):
        yield where, f"is a JSON {_json_type(row)}, expected an object with {columns[0]!r} and {columns[2]!r}"
        return
    instruction_column, _, output_column = columns
    if "instances" in row and output_column not in row:
        instances = row["instances"]
        if not isinstance(instances, list) or not instances:
            yield where, "'instances' is not a non-empty list of {input, output} objects"
            return
        for number, instance in enumerate(instances, start=1):
            here = f"{where}, instance {number}"
            if not isinstance(instance, dict):
                yield here, f"is a JSON {_json_type(instance)}, expected an object"
                continue
            yield _make_record(here, {**instance, instruction_column: row.get(instruction_column)}, columns)
        return
    yield _make_record(where, row, columns)


def _make_record(where: str, row: dict, columns: tuple[str, str, str]):
    """A :class:`Record`, or ``(where, why)``. A missing or null input means no input, as in Alpaca."""
    instruction_column, input_column, output_column = columns
    twice = [key for key in duplicate_keys(row) if key in columns]
    if twice:  # which of the two values was meant is a guess: skip the record rather than pick one
        return where, f"the field {twice[0]!r} is given twice"
    values = {}
    for column in columns:
        value = row.get(column)
        if value is None and column == input_column:
            value = ""
        if value is None:
            return where, f"field {column!r} is null" if column in row else f"no {column!r} field"
        if not isinstance(value, str):
            return where, f"field {column!r} is a JSON {_json_type(value)}, expected a string"
        bad = _LONE_SURROGATE.search(value)
        if bad:
            return where, f"field {column!r} is not valid UTF-8 ({_describe_surrogate(bad.group())} " \
                          f"at character {bad.start()})"
        values[column] = value
    if not values[output_column].strip():
        return where, f"empty {output_column!r}"
    return Record(values[instruction_column], values[input_column], values[output_column], where)


def _json_type(value) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"), (list, "array"), (dict, "object"))
    return next((name for kind, name in names if isinstance(value, kind)), "null" if value is None else
                type(value).__name__)


def _describe_surrogate(character: str) -> str:
    code = ord(character)
    return f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"unpaired surrogate U+{code:04X}"


def _bad_byte_hint(text: str, position: int) -> str:
    """``"; byte 0xff is not UTF-8"`` when a JSON error sits on a non-UTF-8 byte, else ``""``."""
    if 0 <= position < len(text) and _LONE_SURROGATE.match(text[position]):
        return f"; {_describe_surrogate(text[position])} is not UTF-8"
    return ""


def describe_skipped(skipped: list[tuple[str, str]], limit: int = SHOWN_REASONS) -> str:
    """``"record 3: empty 'output'; line 9: ..."`` for the first ``limit`` skipped records."""
    shown = "; ".join(f"{where}: {why}" for where, why in skipped[:limit])
    return shown + (f"; ... and {len(skipped) - limit} more" if len(skipped) > limit else "")


def _check_skipped(loaded: LoadedRecords, max_invalid_fraction: float) -> None:
    if not loaded.records:
        detail = f" ({len(loaded.skipped)} skipped: {describe_skipped(loaded.skipped)})" if loaded.skipped else ""
        raise UserError(f"{loaded.path}: no usable record{detail}")
    share = len(loaded.skipped) / loaded.total
    if share > max_invalid_fraction:
        raise UserError(f"{loaded.path}: {len(loaded.skipped)} of {loaded.total} records ({share:.0%}) are unusable, "
                        f"more than --max_invalid_fraction {max_invalid_fraction}; first: "
                        f"{describe_skipped(loaded.skipped)}")
