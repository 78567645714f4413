"""What minipeft owns: the ``.minipeft`` marker of a directory, the manifest in it, and the sidecar of a file.

minipeft never replaces a file it did not write. Every directory minipeft creates holds a marker,
:data:`MARKER_NAME`: a JSON manifest of the names minipeft wrote there and of what each file looked like then
(:func:`file_identity`), updated (atomically) with each write. Replacing or deleting a directory (``merge
--overwrite``, ``--overwrite_output_dir``, a new adapter over the old) needs the marker *and* every file inside
recorded in it and unchanged since (:func:`foreign_files`). A marker that is, or is reached through, a symbolic
link is not trusted (:func:`marker_problem` says why a directory has none). A file minipeft writes into a user's
folder (``--output_file``, ``--report``) is vouched for by a sidecar record ``.NAME.minipeft`` holding its
sha256 (:func:`sidecar_of`), or, for a Markdown page, by minipeft's header line (:func:`wrote_file`).

The rules that use these records (what may be replaced, and the one-line refusals) are in
:mod:`minipeft.files.safe_files`.
"""

import hashlib
import json
import os
import stat
from pathlib import Path

from minipeft.core.errors import UserError
from minipeft.files.atomic import json_text, replace_file
from minipeft.files.input_files import read_input_text
from minipeft.files.lock import LOCK_NAME, holds_lock_above

MARKER_NAME = ".minipeft"  # in every directory minipeft writes: "this one may be replaced by minipeft"
# A Markdown page minipeft writes starts with this comment (``compare --report``); it counts as minipeft's mark.
MARKDOWN_HEADER = "<!-- Written by `python -m minipeft"


# The marker is a manifest: ``{"written_by": "minipeft", "files": [...], "identity": {...}}``. ``files`` lists the
# names (paths relative to the directory, "/"-separated) minipeft wrote there; ``identity`` says, for each file,
# what it looked like when minipeft wrote it (:func:`file_identity`). Only a listed file that still looks so is
# ever replaced or deleted: a file a user put into a marked directory is not listed, a file a user edited no longer
# matches, and a command that would replace or delete either stops instead (it is never kept aside or moved: the
# user decides). A name without an identity (a manifest of an older minipeft, a file minipeft appends to, a
# directory) is vouched for by its name alone. An older marker still (plain text, :func:`is_older_marker`) vouches
# for no file: it says minipeft created the directory, not which files in it are minipeft's, so taking every file
# for minipeft's could delete one the user put there since; each stops the command (:data:`UNLISTED`).
# The identity of a file minipeft keeps appending to (metrics.jsonl): its name, and from the first record point on
# (record_appended) the size and sha256 of what it held then, which later appends keep as their start.
APPENDED = {"appended": True}
DIRECTORY = {"directory": True}  # the identity of a folder minipeft made: its content answers for itself
# Files up to this size are identified by their sha256 (about 10 ms each); larger ones by size and modification time.
HASHED_FILE_BYTES = 16 * 2**20


def file_identity(path) -> dict:
    """What says that the file ``path`` is still the one minipeft wrote.

    A small file (a config, a tokenizer, a small adapter, the built-in model: at most :data:`HASHED_FILE_BYTES`):
    its size and sha256, cheap to compute and true after any copy (``git clone`` and ``cp`` do not keep the time).
    A large one (a model's weights, an optimizer state: gigabytes, which would take seconds to minutes to hash at
    every save and every check): its size and modification time in nanoseconds. An edit, an ``echo >>`` or a file
    put in its place changes the modification time; a copy that keeps the bytes but not the time (``cp`` without
    ``-p``) is then taken for the user's, which is the safe side. (An edit that keeps the size within the clock tick
    of minipeft's own write, a few milliseconds, would pass unseen: no person edits that fast.)
    """
    info = os.stat(path)
    if info.st_size <= HASHED_FILE_BYTES:
        return {"size": info.st_size, "sha256": sha256_of(path)}
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _unchanged(path: Path, identity) -> bool:
    """True when ``path`` still matches the ``identity`` its manifest recorded (None or :data:`APPENDED`: a name
    alone, which the name answers for; :data:`DIRECTORY`: still a folder, whose content is checked apart)."""
    if not isinstance(identity, dict):
        return True
    if identity.get("appended") is True:
        return _appended_to(path, identity)
    if identity == DIRECTORY:
        return path.is_dir()
    try:
        info = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_size != identity.get("size"):
        return False  # (never opened: a FIFO put in a file's place would block a read)
    if "sha256" in identity:
        return sha256_of(path) == identity["sha256"]
    return info.st_mtime_ns == identity.get("mtime_ns")


def changed_content(directory, names=None) -> list:
    """The files of ``directory`` (or only those of ``names``) whose bytes differ from what minipeft wrote, by the
    sha256 its marker records (files up to :data:`HASHED_FILE_BYTES`; larger ones are identified by time, which a
    copy changes, so they are left out): a file swapped in from elsewhere, e.g. another checkpoint's of the same
    shapes. A missing file is not counted (its reader names it)."""
    directory = Path(directory)
    manifest = read_manifest(directory) or {}
    return [directory / name for name, identity in sorted(manifest.items())
            if (names is None or name in names)
            and isinstance(identity, dict) and "sha256" in identity and (directory / name).exists()
            and not _unchanged(directory / name, identity)]


def _appended_to(path: Path, identity: dict) -> bool:
    """A log minipeft appends to is unchanged when it still starts with the bytes recorded at its last record point
    (their size and sha256) and what follows is more of its records: lines that each hold a JSON object with a
    ``kind`` and a whole ``step`` (what a run killed after its last checkpoint appended), the last one perhaps cut
    short by the kill. A line of the user's own after them is a change. Before a first record point its name
    answers for it."""
    if "size" not in identity:
        return True
    try:
        info = os.stat(path)
    except OSError:
        return False
    size = identity["size"]
    if not stat.S_ISREG(info.st_mode) or not isinstance(size, int) or info.st_size < size:
        return False
    digest, left = hashlib.sha256(), size
    with open(path, "rb") as file:
        while left > 0:  # the recorded start, a block at a time
            block = file.read(min(2**20, left))
            if not block:
                return False
            digest.update(block)
            left -= len(block)
        rest = file.read().split(b"\n")
    if digest.hexdigest() != identity.get("sha256"):
        return False
    for line in rest[:-1]:
        try:
            record = json.loads(line)
        except ValueError:
            return False
        if not (isinstance(record, dict) and isinstance(record.get("kind"), str) and type(record.get("step")) is int):
            return False
    return rest[-1] == b"" or rest[-1].startswith(b"{")  # (a line a kill cut short)


def marker_problem(directory):
    """Why ``directory`` holds no trusted marker, in words for a message (``no .minipeft marker``, ``its
    .minipeft marker is a symbolic link, ...``); None when it holds one."""
    directory = Path(directory)
    marker = directory / MARKER_NAME
    if directory.is_symlink():
        return f"it is a symbolic link, and minipeft trusts no {MARKER_NAME} marker reached through one"
    if marker.is_symlink():
        return f"its {MARKER_NAME} marker is a symbolic link, which minipeft does not trust (it never writes one)"
    if not marker.exists():
        return f"no {MARKER_NAME} marker"
    if not marker.is_file():
        return f"its {MARKER_NAME} marker is not a regular file, which minipeft does not trust"
    return None


def read_manifest(directory):
    """``{name: identity or None}``: what minipeft recorded in ``directory``'s marker; None when the directory
    is not ours (no trusted marker: neither the directory nor the marker is a symbolic link, which would let a
    marker elsewhere vouch for someone's folder, and the marker is a regular file)."""
    directory = Path(directory)
    if not directory.is_dir() or marker_problem(directory) is not None:
        return None
    try:
        manifest = json.loads(read_input_text(directory / MARKER_NAME))  # bounded: a marker is an input too
    except (UserError, ValueError):
        return {}  # an older plain-text marker: the directory is ours, no file in it is recorded
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        return {}
    identities = manifest.get("identity") if isinstance(manifest.get("identity"), dict) else {}
    return {name: identities.get(name) for name in manifest["files"] if isinstance(name, str)}


def is_older_marker(directory) -> bool:
    """True when ``directory``'s trusted marker is one a minipeft older than manifests wrote (plain text)."""
    if read_manifest(directory) != {}:
        return False
    try:
        manifest = json.loads(read_input_text(Path(directory) / MARKER_NAME))
    except (UserError, ValueError):
        return True
    return not (isinstance(manifest, dict) and isinstance(manifest.get("files"), list))


def is_ours(directory) -> bool:
    """True when ``directory`` holds minipeft's (trusted) marker: minipeft created it."""
    return read_manifest(directory) is not None


def manifest_text(manifest: dict) -> str:
    """The marker's JSON for ``{name: identity or None}`` (names sorted; names without identity listed only)."""
    identities = {name: identity for name, identity in sorted(manifest.items()) if identity is not None}
    return json_text({"written_by": "minipeft", "files": sorted(manifest), "identity": identities})


def _write_manifest(directory, manifest: dict) -> None:
    text = manifest_text(manifest)
    replace_file(Path(directory) / MARKER_NAME, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def mark_as_ours(directory) -> None:
    """Put the marker into ``directory`` (a directory minipeft created), and record the directory in its
    parent's marker when the parent is minipeft's too and the directory is part of it (:func:`record_as_part`)."""
    directory = Path(directory)
    if not is_ours(directory):
        _write_manifest(directory, {})
    record_as_part(directory)


def record_as_part(directory) -> None:
    """Record a directory minipeft wrote in its parent's marker only when it is a part of the output this process
    is writing there (:func:`~minipeft.files.lock.holds_lock_above`: a run's ``adapter/``, a checkpoint) or was
    recorded so before. An output the user named inside another one (``merge --out MODEL/inner``) stays unrecorded
    there: replacing the outer output later then stops on it, instead of deleting it with the rest."""
    directory = Path(directory)
    if holds_lock_above(directory) or directory.name in (read_manifest(directory.parent) or {}):
        record_as_ours(directory)


def record_as_ours(path, appended: bool = False) -> None:
    """Record ``path`` in its directory's marker (atomically), when that directory is minipeft's: a file with its
    :func:`file_identity`, a directory as one (:data:`DIRECTORY`). ``appended``: a file minipeft keeps appending to (the
    training's ``metrics.jsonl``, recorded before its first line), recorded by its name, as is every later write
    of it."""
    path = Path(path)
    manifest = read_manifest(path.parent)
    if manifest is None or path.name in (MARKER_NAME, LOCK_NAME):
        return
    recorded = manifest.get(path.name)
    if appended or isinstance(recorded, dict) and recorded.get("appended") is True:
        identity = APPENDED  # (rewritten whole: what it held at a record point is no longer its start)
    else:
        identity = (None if path.is_symlink() else file_identity(path) if path.is_file() else
                    DIRECTORY if path.is_dir() else None)
    if path.name not in manifest or manifest[path.name] != identity:
        _write_manifest(path.parent, {**manifest, path.name: identity})


def record_appended(path) -> None:
    """A record point of a file minipeft appends to (recorded as such, :data:`APPENDED`): what it holds now, by size
    and sha256, so that an edit of it is seen (:func:`_appended_to`) while later appends are not taken for one."""
    path = Path(path)
    manifest = read_manifest(path.parent)
    if manifest is None or not path.is_file() or path.is_symlink():
        return
    recorded = manifest.get(path.name)
    if isinstance(recorded, dict) and recorded.get("appended") is True:
        identity = {**APPENDED, "size": path.stat().st_size, "sha256": sha256_of(path)}
        _write_manifest(path.parent, {**manifest, path.name: identity})


def forget(path) -> None:
    """Drop ``path``'s name from its directory's marker (after minipeft deleted it)."""
    manifest = read_manifest(Path(path).parent)
    if manifest is not None and Path(path).name in manifest:
        _write_manifest(Path(path).parent, {name: identity for name, identity in manifest.items()
                                            if name != Path(path).name})


NOT_RECORDED = f"minipeft did not write (not in its {MARKER_NAME} record)"
CHANGED = f"was changed after minipeft wrote it (it no longer matches its {MARKER_NAME} record)"
SYMBOLIC_LINK = "is a symbolic link, which minipeft never writes"
UNLISTED = (f"minipeft may have written, but its {MARKER_NAME} marker is no record of its files (an older "
            "minipeft's plain text, or edited) and lists no file, so minipeft cannot tell its own files from yours")


def foreign_files_and_why(directory) -> list:
    """``[(path, why), ...]``: the files and folders under ``directory`` that are not minipeft's (depth first),
    each with the reason in words: :data:`NOT_RECORDED` (:data:`UNLISTED` under an older marker), :data:`CHANGED`
    or :data:`SYMBOLIC_LINK`.

    A subdirectory with a trusted marker of its own answers for its content; one without is checked against
    the enclosing marker's relative names.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    return [(directory, NOT_RECORDED)] if manifest is None else _foreign(directory, manifest, "", _unlisted(directory))


def foreign_files(directory) -> list:
    """The paths of :func:`foreign_files_and_why`."""
    return [path for path, _ in foreign_files_and_why(directory)]


def _unlisted(directory: Path) -> str:
    """Why a file its marker does not list is not minipeft's."""
    return UNLISTED if is_older_marker(directory) else NOT_RECORDED


def _foreign(directory: Path, manifest: dict, prefix: str, unlisted: str) -> list:
    found = []
    for entry in sorted(directory.iterdir()):
        relative = prefix + entry.name
        if entry.name in (MARKER_NAME, LOCK_NAME):
            continue
        if entry.name.startswith((".tmp-", ".old-")) and is_ours(entry):
            continue  # what a killed write left: minipeft's, deleted by remove_incomplete
        if entry.is_symlink():
            found.append((entry, SYMBOLIC_LINK))
        elif relative not in manifest and is_sidecar_beside_its_file(entry):
            found.append((entry, f"is minipeft's record of {entry.parent / entry.name[1:-len(MARKER_NAME)]}, an "
                                 "output the user named (it is not part of this folder)"))
        elif relative not in manifest and wrote_output_file(entry):
            found.append((entry, _other_output(entry)))
        elif relative not in manifest and entry.is_dir() and is_ours(entry):  # (merge --out FOLDER/inner)
            found.append((entry, f"is another output minipeft wrote (it has its own {MARKER_NAME} record), not part "
                                 "of this folder"))
        elif relative not in manifest:
            found.append((entry, unlisted))
        elif not _unchanged(entry, manifest[relative]):
            found.append((entry, CHANGED))
        elif entry.is_dir():
            own = read_manifest(entry)
            found += (_foreign(entry, own, "", _unlisted(entry)) if own is not None else
                      _foreign(entry, manifest, relative + "/", unlisted))
    return found


def is_sidecar_beside_its_file(path: Path) -> bool:
    """``.NAME.minipeft`` beside ``NAME``: the record of an output file the user named (:func:`sidecar_of`)."""
    name = path.name
    return name.startswith(".") and name.endswith(MARKER_NAME) and len(name) > len(MARKER_NAME) + 1 \
        and (path.parent / name[1:-len(MARKER_NAME)]).is_file()


def _other_output(path: Path) -> str:
    """Why an output file another command wrote inside a folder is not that folder's (a reason, as
    :data:`NOT_RECORDED`): it is the user's, named as an output of its own."""
    flag = written_as(path)
    return f"is an output minipeft wrote as {flag or 'its own file'} (the user named it: it is not part of this folder)"


def wrote_file(path) -> bool:
    """True when minipeft wrote the file ``path`` and nobody changed it since: its directory's marker records it as
    it is now (:func:`file_identity`), or it is an output file minipeft wrote (:func:`wrote_output_file`)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    manifest = read_manifest(path.parent) or {}
    if path.name in manifest:
        return _unchanged(path, manifest[path.name])
    return wrote_output_file(path)


def wrote_output_file(path) -> bool:
    """True when ``path`` is a file the user named as an output (``--output_file``, ``--report``) and minipeft
    wrote it, unchanged since: its sidecar record (:func:`sidecar_of`) holds its current sha256, or (a Markdown
    page) it begins with minipeft's header line. A file that is part of an output folder (an adapter's config,
    a run's metrics) is not one, so no single-file output ever replaces it."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    record = _sidecar_record(path)
    if record is not None:
        return record.get("sha256") == sha256_of(path)
    if sidecar_of(path).is_file() and not sidecar_of(path).is_symlink():  # a sidecar that does not read
        return False
    if path.suffix == ".md":
        with open(path, encoding="utf-8", errors="replace") as file:
            head = [file.readline() for _ in range(5)]
        return any(line.startswith(MARKDOWN_HEADER) for line in head)
    return False


def written_as(path) -> str | None:
    """The flag an output file minipeft wrote was written as (its sidecar's ``"as"``: ``--report``,
    ``--output_file``, ``builtin-data``), or None where no sidecar says (a Markdown page told by its header is
    compare's ``--report``; a sidecar older than the field names none)."""
    path = Path(path)
    if not sidecar_of(path).is_file() or sidecar_of(path).is_symlink():
        return "--report" if path.suffix == ".md" else None
    kind = (_sidecar_record(path) or {}).get("as")
    return kind if isinstance(kind, str) else None


def _sidecar_record(path: Path) -> dict | None:
    """The JSON object of ``path``'s sidecar (:func:`sidecar_of`), or None: none, a link, or not an object."""
    sidecar = sidecar_of(path)
    if not sidecar.is_file() or sidecar.is_symlink():
        return None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


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
