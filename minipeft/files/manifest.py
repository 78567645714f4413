"""What minipeft owns: the ``.minipeft`` marker of a directory, the manifest in it, and the sidecar of a file.

minipeft never replaces a file it did not write. Every directory minipeft creates holds a marker,
:data:`MARKER_NAME`: a JSON manifest of the names minipeft wrote there, updated (atomically) with each write.
Replacing or deleting a directory (``merge --overwrite``, ``--overwrite_output_dir``, a new adapter over the old)
needs the marker *and* every file inside recorded in it (:func:`foreign_files`). A marker that is, or is reached
through, a symbolic link is not trusted. A file minipeft writes into a user's folder (``--output_file``,
``--report``) is vouched for by a sidecar record ``.NAME.minipeft`` holding its sha256 (:func:`sidecar_of`), or,
for a Markdown page, by minipeft's header line (:func:`wrote_file`).

The rules that use these records (what may be replaced, and the one-line refusals) are in
:mod:`minipeft.files.safe_files`.
"""

import hashlib
import json
from pathlib import Path

from minipeft.core.errors import UserError
from minipeft.files.atomic import json_text, replace_file
from minipeft.files.input_files import read_input_text
from minipeft.files.lock import LOCK_NAME

MARKER_NAME = ".minipeft"  # in every directory minipeft writes: "this one may be replaced by minipeft"
# A Markdown page minipeft writes starts with this comment (``compare --report``); it counts as minipeft's mark.
MARKDOWN_HEADER = "<!-- Written by `python -m minipeft"


# The marker is a manifest: ``{"written_by": "minipeft", "files": [...]}``, the names (paths relative to the
# directory, "/"-separated) minipeft wrote there. Only those are ever replaced or deleted; a file a user put into
# a marked directory is not in it, and a command that would replace or delete it stops instead (it is never
# kept aside or moved: the user decides). An older marker (plain text) vouches for no file.
def _trusted_marker(directory) -> Path:
    """The marker of ``directory`` when it can be trusted: neither the directory nor the marker is a symbolic
    link (a link would let a marker elsewhere vouch for someone's folder), and the marker is a regular file."""
    directory = Path(directory)
    marker = directory / MARKER_NAME
    if directory.is_symlink() or not directory.is_dir() or marker.is_symlink() or not marker.is_file():
        return None
    return marker


def recorded_names(directory):
    """The set of names minipeft recorded in ``directory``'s marker; None when the directory is not ours."""
    marker = _trusted_marker(directory)
    if marker is None:
        return None
    try:
        manifest = json.loads(read_input_text(marker))  # bounded: a marker is an input like any other
    except (UserError, ValueError):
        return set()  # an older plain-text marker: the directory is ours, no file in it is recorded
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return {name for name in files if isinstance(name, str)} if isinstance(files, list) else set()


def is_ours(directory) -> bool:
    """True when ``directory`` holds minipeft's (trusted) marker: minipeft created it."""
    return recorded_names(directory) is not None


def _write_manifest(directory, names) -> None:
    text = json_text({"written_by": "minipeft", "files": sorted(names)})
    replace_file(Path(directory) / MARKER_NAME, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def mark_as_ours(directory) -> None:
    """Put the marker into ``directory`` (a directory minipeft created), and record the directory in its
    parent's marker when the parent is minipeft's too."""
    directory = Path(directory)
    if not is_ours(directory):
        _write_manifest(directory, ())
    record_as_ours(directory)


def record_as_ours(path) -> None:
    """Add ``path``'s name to its directory's marker (atomically), when that directory is minipeft's."""
    path = Path(path)
    names = recorded_names(path.parent)
    if names is not None and path.name not in names and path.name not in (MARKER_NAME, LOCK_NAME):
        _write_manifest(path.parent, names | {path.name})


def forget(path) -> None:
    """Drop ``path``'s name from its directory's marker (after minipeft deleted it)."""
    names = recorded_names(Path(path).parent)
    if names is not None and Path(path).name in names:
        _write_manifest(Path(path).parent, names - {Path(path).name})


def foreign_files(directory) -> list:
    """The files and folders under ``directory`` that minipeft did not record as its own (depth first).

    A subdirectory with a trusted marker of its own answers for its content; one without is checked against
    the enclosing marker's relative names. A symbolic link is never minipeft's.
    """
    directory = Path(directory)
    names = recorded_names(directory)
    return [directory] if names is None else _foreign(directory, names, "")


def _foreign(directory: Path, names: set, prefix: str) -> list:
    found = []
    for entry in sorted(directory.iterdir()):
        relative = prefix + entry.name
        if entry.name in (MARKER_NAME, LOCK_NAME):
            continue
        if entry.name.startswith((".tmp-", ".old-")) and is_ours(entry):
            continue  # what a killed write left: minipeft's, deleted by remove_incomplete
        if entry.is_symlink() or relative not in names:
            found.append(entry)
        elif entry.is_dir():
            own = recorded_names(entry)
            found += _foreign(entry, own, "") if own is not None else _foreign(entry, names, relative + "/")
    return found


def wrote_file(path) -> bool:
    """True when minipeft wrote the file ``path`` and nobody changed it since: its directory's marker records it,
    or its sidecar record (:func:`sidecar_of`) holds its current sha256, or (a Markdown page) it begins with
    minipeft's header line."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    if path.name in (recorded_names(path.parent) or ()):
        return True
    sidecar = sidecar_of(path)
    if sidecar.is_file() and not sidecar.is_symlink():
        try:
            record = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(record, dict) and record.get("sha256") == sha256_of(path)
    if path.suffix == ".md":
        with open(path, encoding="utf-8", errors="replace") as file:
            head = [file.readline() for _ in range(5)]
        return any(line.startswith(MARKDOWN_HEADER) for line in head)
    return False


def sidecar_of(path) -> Path:
    """``answers.jsonl`` -> ``.answers.jsonl.minipeft``: the record that minipeft wrote a file in a user's folder."""
    path = Path(path)
    return path.with_name(f".{path.name}{MARKER_NAME}")


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
