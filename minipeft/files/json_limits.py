"""JSON with bounds: how deep it nests and how long its numbers are (issue #26).

Python's parser takes a file of ten thousand ``[`` down its recursion limit (a ``RecursionError`` with a
traceback), turns ``1e400`` into infinity without a word, and spends quadratic time on an integer of 4,000
digits. Nothing minipeft reads (data records, prompts, adapter configs, checkpoint states) nests deeper than a
few levels or needs a number longer than a float's 17 significant digits, so :func:`loads_bounded` refuses

- nesting deeper than :data:`MAX_DEPTH` levels (a record is level 2 of its array: ``[{"output": ...}]``);
- a number literal longer than :data:`MAX_NUMBER_CHARS` characters, or one beyond a float's range (``1e400``).

Each refusal is a :class:`JSONLimitError`, a :class:`json.JSONDecodeError`, so every reader that already turns
a parse error into one line naming its file (``data.json: not valid JSON (line 3 column 9: ...)``) reports it
the same way. ``NaN`` and ``Infinity`` parse as Python does: the fields that hold them say whether they may.
"""

import json
import math
import re

from minipeft.files.input_files import _object_from_pairs

MAX_DEPTH = 64
MAX_NUMBER_CHARS = 64

# A string (skipped whole, escapes included) or one bracket: what the depth scan looks at.
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


class JSONLimitError(json.JSONDecodeError):
    """Valid JSON beyond the bounds of this module (its ``msg`` says which one)."""


class _NumberTooLarge(Exception):
    def __init__(self, literal: str, why: str):
        super().__init__(literal)
        self.literal, self.why = literal, why


def _parse_int(literal: str) -> int:
    if len(literal) > MAX_NUMBER_CHARS:
        raise _NumberTooLarge(literal, f"has more than {MAX_NUMBER_CHARS} digits")
    return int(literal)


def _parse_float(literal: str) -> float:
    if len(literal) > MAX_NUMBER_CHARS:
        raise _NumberTooLarge(literal, f"is longer than {MAX_NUMBER_CHARS} characters")
    value = float(literal)
    if math.isinf(value):
        raise _NumberTooLarge(literal, "is beyond a float's range (about 1.8e308)")
    return value


def _too_deep_at(text: str, limit: int) -> int | None:
    """The offset of the bracket that opens level ``limit + 1``, or None."""
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > limit:
                return match.start()
        elif token in "]}":
            depth -= 1
    return None


def _deepest(value, limit: int) -> bool:
    """True when ``value`` (parsed) nests deeper than ``limit`` containers; iterative, containers only."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def loads_bounded(text: str, max_depth: int = MAX_DEPTH):
    """:func:`minipeft.files.input_files.loads_json` (objects record their duplicate keys) within the bounds
    of the module docstring; raises :class:`JSONLimitError` (or ``json.JSONDecodeError`` for invalid JSON)."""
    try:
        value = json.loads(text, object_pairs_hook=_object_from_pairs, parse_int=_parse_int,
                           parse_float=_parse_float)
    except _NumberTooLarge as error:
        position = max(text.find(error.literal), 0)
        shown = error.literal if len(error.literal) <= 24 else error.literal[:20] + "..."
        raise JSONLimitError(f"the number {shown} {error.why}", text, position) from None
    except RecursionError:
        position = _too_deep_at(text, max_depth) or 0
        raise JSONLimitError(f"nested deeper than {max_depth} levels", text, position) from None
    if isinstance(value, (dict, list)) and _deepest(value, max_depth):
        position = _too_deep_at(text, max_depth) or 0
        raise JSONLimitError(f"nested deeper than {max_depth} levels", text, position)
    return value
