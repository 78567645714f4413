"""Reading inputs: only regular files, never more than the input limit, JSON with duplicate keys flagged.

Only regular files are read: a directory, a FIFO (which blocks until a writer comes), a device (``/dev/zero``
never ends) or a socket is refused with one line naming the file. A file larger than the input limit is refused
too (the limit is :data:`DEFAULT_MAX_INPUT_MB` megabytes; the environment variable ``MINIPEFT_MAX_INPUT_MB``
changes it), and the read itself stops one byte past the limit, so a file that grows while it is read (or a
``/proc`` file, whose size says 0) cannot exhaust the memory. JSON objects with a key given twice are flagged: a
config file with one is refused, a data record with one is skipped (which of the two values would win is a
guess).

Errors are :class:`~minipeft.core.errors.UserError` lines naming the path (and the flag that gave it); the
command line turns them into ``error: ...`` and exit status 2. Writing outputs: :mod:`minipeft.files.safe_files`.
"""

import json
import os
import stat
from pathlib import Path

from minipeft.core.errors import UserError

DEFAULT_MAX_INPUT_MB = 2048
MAX_INPUT_ENVIRONMENT = "MINIPEFT_MAX_INPUT_MB"


def flag_and_path(path, flag: str) -> str:
    """``"--dataset_path data.json"`` or just ``"data.json"``: how messages name an input."""
    return f"{flag} {path}" if flag else str(path)


def max_input_bytes() -> int:
    """The input size limit in bytes: ``MINIPEFT_MAX_INPUT_MB`` megabytes, else :data:`DEFAULT_MAX_INPUT_MB`."""
    text = os.environ.get(MAX_INPUT_ENVIRONMENT)
    if text is None:
        return DEFAULT_MAX_INPUT_MB * 2**20
    try:
        megabytes = float(text)
    except ValueError:
        megabytes = float("nan")
    if not megabytes > 0 or megabytes == float("inf"):
        raise UserError(f"{MAX_INPUT_ENVIRONMENT}={text}: must be a positive number of megabytes")
    return int(megabytes * 2**20)


def check_input_file(path, flag: str = "") -> Path:
    """``path`` as a :class:`Path` when it is a regular file within the size limit; else a :class:`UserError`."""
    path = Path(path)
    try:
        info = os.stat(path)  # stat never blocks, even on a FIFO
    except FileNotFoundError:
        raise UserError(f"{flag_and_path(path, flag)}: cannot be read (No such file or directory)") from None
    except OSError as error:
        raise UserError(f"{flag_and_path(path, flag)}: cannot be read ({error.strerror or error})") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{flag_and_path(path, flag)}: is a directory, expected a file")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{flag_and_path(path, flag)}: is {_kind(info.st_mode)}; minipeft reads only regular files "
                        "(save the stream to a file first)")
    _check_size(path, flag, info.st_size)
    return path


def _kind(mode: int) -> str:
    """What a file that is not a regular one is, in words."""
    return ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def check_regular_files(directory, flag: str = "") -> None:
    """Refuse a FIFO, a device or a socket among the files of ``directory`` (a model folder): a loader that opens
    one by name (``model.safetensors``, ``tokenizer.json``) would wait forever for a writer, or read forever.
    Only ``stat`` is called; subfolders and their content are not looked at. No size limit: weights are large."""
    for entry in sorted(Path(directory).iterdir()):
        try:
            mode = os.stat(entry).st_mode
        except OSError:  # a dangling link: as good as absent
            continue
        if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
            raise UserError(f"{flag_and_path(entry, flag)}: is {_kind(mode)}, not a regular file; minipeft reads a "
                            "model only from regular files (copy the file in its place)")


def _check_size(path, flag: str, size: int) -> None:
    limit = max_input_bytes()
    if size > limit:
        raise UserError(f"{flag_and_path(path, flag)}: is larger than the input limit of {limit / 2**20:,.0f} MB "
                        f"(set {MAX_INPUT_ENVIRONMENT} to raise it)")


def read_input_bytes(path, flag: str = "") -> bytes:
    """The bytes of a regular file, at most the input limit (see the module docstring)."""
    path = check_input_file(path, flag)
    limit = max_input_bytes()
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)  # bounded even when the size on disk lied (/proc) or grew meanwhile
    except OSError as error:
        raise UserError(f"{flag_and_path(path, flag)}: cannot be read ({error.strerror or error})") from None
    _check_size(path, flag, len(data))
    return data


def refuse_utf16(data: bytes, path, flag: str = "") -> None:
    """Refuse UTF-16 (or UTF-32) where UTF-8 text is read: by its byte-order mark, or, without one, by the NUL
    bytes it puts beside every ASCII letter (no text minipeft reads holds a NUL; JSON cannot)."""
    for name, marks in (("UTF-32", (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")), ("UTF-16", (b"\xff\xfe", b"\xfe\xff"))):
        if data.startswith(marks):  # (UTF-32 first: its little-endian mark begins with UTF-16's)
            raise UserError(f"{flag_and_path(path, flag)}: is {name} text (it starts with {name}'s byte-order "
                            "mark); save it as UTF-8")
    if (offset := data.find(b"\x00")) >= 0:
        raise UserError(f"{flag_and_path(path, flag)}: holds NUL bytes (the first at offset {offset:,}), which no "
                        "text has: a UTF-16 file? save it as UTF-8")


def read_input_text(path, flag: str = "", encoding: str = "utf-8") -> str:
    """The text of a regular file (see :func:`read_input_bytes`); bytes that are not ``encoding`` are an error.
    A UTF-8 file's leading byte-order mark (what Notepad and Excel write) is not part of its text; UTF-16 is
    refused as such (:func:`refuse_utf16`)."""
    data = read_input_bytes(path, flag)
    if encoding == "utf-8":
        refuse_utf16(data, path, flag)
    try:
        return data.decode("utf-8-sig" if encoding == "utf-8" else encoding)
    except UnicodeDecodeError as error:
        raise UserError(f"{flag_and_path(path, flag)}: not {encoding} text (byte 0x{data[error.start]:02x} at offset "
                        f"{error.start})") from None


class JSONObject(dict):
    """A parsed JSON object; ``duplicate_keys`` lists the keys the text gave more than once (the last won)."""

    duplicate_keys: tuple = ()


def _object_from_pairs(pairs: list) -> dict:
    value = JSONObject(pairs)
    if len(value) != len(pairs):
        seen, duplicates = set(), []
        for key, _ in pairs:
            if key in seen and key not in duplicates:
                duplicates.append(key)
            seen.add(key)
        value.duplicate_keys = tuple(duplicates)
    return value


def loads_json(text: str):
    """``json.loads`` whose objects are :class:`JSONObject` (with their ``duplicate_keys``)."""
    return json.loads(text, object_pairs_hook=_object_from_pairs)


def duplicate_keys(value) -> tuple:
    """The keys given twice in a JSON object parsed by :func:`loads_json` (empty for anything else)."""
    return getattr(value, "duplicate_keys", ())
