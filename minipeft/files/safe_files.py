"""Writing outputs so that nothing a user had is ever lost: the one place every command writes through.

**Writing.** One primitive for a file, :func:`write_file_atomically`, and one for a directory,
:func:`write_directory_atomically`; :func:`write_text_atomically` and :func:`write_json_atomically` are one-line
wrappers over the file primitive. Everything is written into a temporary file or directory beside its final
place, ``fsync``-ed, and renamed into place (``os.replace``, atomic on POSIX file systems): a kill, a full disk
or an error at any moment leaves the previous version or the new one, never half of one. JSON is written with
``allow_nan=False``: NaN is not JSON.

**Ownership.** minipeft never replaces a file it did not write. Every directory minipeft creates holds a marker,
:data:`MARKER_NAME`: a JSON manifest of the names minipeft wrote there, updated (atomically) with each write.
Replacing or deleting a directory (``merge --overwrite``, ``--overwrite_output_dir``, a new adapter over the old)
needs the marker *and* every file inside recorded in it (:func:`foreign_files`): a file the user put into a
minipeft folder stops the command with one line naming it; it is neither deleted nor moved. (A running
training's periodic saves instead carry such a file into the new version: see :func:`write_directory_atomically`.) A marker that is, or
is reached through, a symbolic link is not trusted. An output *file* the user names (``--output_file``,
``--report``) follows :func:`check_output_file`: a new name is written; an existing file is replaced only with
``--overwrite`` and only when minipeft wrote it and nobody changed it since (its directory's manifest, or a
sidecar record ``.NAME.minipeft`` holding its sha256, or minipeft's header line on a Markdown page).
:func:`check_apart` refuses an output that is (same device and inode), contains or lies inside an input.

**One writer.** :class:`OutputLock` puts a lock file (:data:`LOCK_NAME`, holding the process id) into an output
directory; a second process that wants to write there stops with one line. A lock whose process is gone (a
crashed or killed run) is taken over.

Errors are :class:`~minipeft.core.errors.UserError` lines naming the path; the command line turns them into
``error: ...`` and exit status 2. Reading inputs: :mod:`minipeft.files.input_files`.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from minipeft.core.errors import UserError
from minipeft.files.input_files import flag_and_path, read_input_text

MARKER_NAME = ".minipeft"  # in every directory minipeft writes: "this one may be replaced by minipeft"
# A Markdown page minipeft writes starts with this comment (``compare --report``); it counts as minipeft's mark.
MARKDOWN_HEADER = "<!-- Written by `python -m minipeft"
LOCK_NAME = ".minipeft.lock"


# -- writing ---------------------------------------------------------------------------------------------------
def _fsync(path) -> None:
    """Flush a file's bytes (or a directory's entries) to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(umask)
    return umask


def _usual_mode(directory: bool) -> int:
    """The permissions ``open``/``mkdir`` would give (mkstemp and mkdtemp make private 0600/0700 ones)."""
    return (0o777 if directory else 0o666) & ~_current_umask()


def is_write_failure(error: BaseException) -> bool:
    """An ``OSError``, or a library's wrapping of one (safetensors reports "I/O error: ... (os error 28)")."""
    return isinstance(error, OSError) or (isinstance(error, SafetensorError) and "I/O error" in str(error))


def cannot_write(path, error: Exception) -> UserError:
    """The one line for a write the environment refused: a read-only or full disk, a file in the way."""
    number = getattr(error, "errno", None)
    if number is None:  # safetensors says "I/O error: No space left on device (os error 28)"
        match = re.search(r"os error (\d+)", str(error))
        number = int(match.group(1)) if match else None
    reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.ENOTDIR: "a part of the path is a file, not a directory", errno.EISDIR: "it is a directory",
              errno.EDQUOT: "the disk quota is exceeded",
              errno.EFBIG: "the file is larger than the file system or a size limit allows"}.get(number)
    return UserError(f"{path}: cannot be written ({reason or getattr(error, 'strerror', None) or error}); "
                     "nothing there was changed")


def make_directory(directory) -> Path:
    """``mkdir -p``, with a file in the way or a read-only disk reported as one line naming the directory."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory}: is a file, expected a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{directory}: a part of the path is a file, not a directory") from None
    except OSError as error:
        raise cannot_write(directory, error) from None
    return directory


def write_file_atomically(path, write) -> Path:
    """Call ``write(temporary_path)``, fsync the file, and rename it to ``path`` (replacing an older file)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, expected a file name")
    if path.exists() and not path.is_file():  # /dev/full, a FIFO: renaming over it would replace the device node
        raise UserError(f"{path}: is not a regular file (a device or a FIFO); refusing to replace it")
    make_directory(path.parent)
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        os.chmod(temporary, _usual_mode(directory=False))
    except OSError as error:
        raise cannot_write(path, error) from None
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
        _fsync(path.parent)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if is_write_failure(error):
            raise cannot_write(path, error) from None
        raise
    if path.name != MARKER_NAME:
        record_as_ours(path)  # in a directory minipeft owns, the file is now one of its own
    return path


def write_text_atomically(path, text: str) -> Path:
    """Write ``text`` (UTF-8) via :func:`write_file_atomically`."""
    return write_file_atomically(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def json_text(value, indent=2, sort_keys: bool = False) -> str:
    """JSON for ``value``; a NaN or infinity in it is a bug upstream (JSON has neither), so it raises."""
    try:
        return json.dumps(value, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"
    except ValueError as error:
        raise ValueError(f"refusing to write a non-finite number as JSON ({error})") from None


def write_json_atomically(path, value, sort_keys: bool = False) -> Path:
    """Write ``value`` as indented JSON (``allow_nan=False``, see :func:`json_text`) via the file primitive."""
    return write_text_atomically(path, json_text(value, sort_keys=sort_keys))


# -- what minipeft owns -----------------------------------------------------------------------------------------
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
    write_text_atomically(Path(directory) / MARKER_NAME,
                          json_text({"written_by": "minipeft", "files": sorted(names)}))


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


def _forget(path) -> None:
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
        return isinstance(record, dict) and record.get("sha256") == _sha256(path)
    if path.suffix == ".md":
        with open(path, encoding="utf-8", errors="replace") as file:
            head = [file.readline() for _ in range(5)]
        return any(line.startswith(MARKDOWN_HEADER) for line in head)
    return False


def sidecar_of(path) -> Path:
    """``answers.jsonl`` -> ``.answers.jsonl.minipeft``: the record that minipeft wrote a file in a user's folder."""
    path = Path(path)
    return path.with_name(f".{path.name}{MARKER_NAME}")


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_output_file(path, text: str) -> Path:
    """Write a file the user named (``--output_file``, ``--report``) and record that minipeft wrote it: in its
    directory's marker when the directory is minipeft's, else in a sidecar beside it (:func:`sidecar_of`)
    holding the file's sha256, so that an edited file is no longer taken for minipeft's."""
    path = write_text_atomically(path, text)
    if not is_ours(path.parent):
        write_text_atomically(sidecar_of(path), json_text({"written_by": "minipeft", "file": path.name,
                                                            "sha256": _sha256(path)}))
    return path


def check_output_file(path, flag: str, overwrite: bool, inputs: dict = None) -> Path:
    """The one rule for an output file the user names: refuse an input (:func:`check_apart`); a new name is
    written; an existing file is replaced only with ``overwrite`` and only when minipeft wrote it
    (:func:`wrote_file`); a directory, a device or a symbolic link never is. Also refuses a directory that
    another minipeft process is writing into (:func:`check_unlocked`)."""
    path = Path(path)
    check_apart(path, flag, inputs or {})
    if path.is_dir() and not path.is_symlink():
        raise UserError(f"{flag_and_path(path, flag)}: is a directory, expected a file name")
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_file():
            raise UserError(f"{flag_and_path(path, flag)}: is a symbolic link or not a regular file; refusing to "
                            "replace it: choose a new name")
        if not wrote_file(path):
            raise UserError(f"{flag_and_path(path, flag)}: already exists and minipeft did not write it (or it was "
                            "changed since); refusing to replace it, --overwrite or not: choose a new name")
        if not overwrite:
            raise UserError(f"{flag_and_path(path, flag)}: already exists (minipeft wrote it); pass --overwrite to "
                            "replace it, or choose a new name")
    check_unlocked(path.parent, flag, path)
    return path


def is_empty_directory(path) -> bool:
    path = Path(path)
    return path.is_dir() and not any(path.iterdir())


def check_replaceable(path, flag: str = "", foreign_files_stop: bool = True) -> None:
    """Refuse to replace ``path`` unless it is absent, an empty directory, or a directory minipeft wrote whose
    every file minipeft recorded (:func:`foreign_files`; ``foreign_files_stop=False``: the caller keeps them)
    and that no running minipeft process writes into."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        what = "a symbolic link" if path.is_symlink() else "a file"
        raise UserError(f"{flag_and_path(path, flag)}: is {what}, not a directory minipeft wrote; "
                        "refusing to replace it")
    if is_empty_directory(path):
        return
    if not is_ours(path):
        raise UserError(f"{flag_and_path(path, flag)}: holds files minipeft did not write (no trusted {MARKER_NAME} "
                        "marker); refusing to replace or delete it: choose another directory or empty this one "
                        "yourself")
    check_unlocked(path, flag)
    foreign = foreign_files(path) if foreign_files_stop else []
    if foreign:
        raise UserError(f"{flag_and_path(path, flag)}: holds {foreign[0]}, which minipeft did not write (not in its "
                        f"{MARKER_NAME} record); refusing to replace or delete it: move it out first, or choose "
                        "another directory")


def check_ours_to_replace(path, flag: str = "") -> None:
    """Refuse unless minipeft wrote ``path``: a file recorded as its own (:func:`wrote_file`), or a directory
    :func:`check_replaceable` accepts. For a name inside a directory that is about to be replaced or pruned."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        check_replaceable(path, flag)
    elif (path.exists() or path.is_symlink()) and not wrote_file(path):
        raise UserError(f"{flag_and_path(path.parent, flag)}: holds {path}, which minipeft did not write (not in its "
                        f"{MARKER_NAME} record); refusing to replace or delete it: move it out first, or choose "
                        "another directory")


def check_output_directory(path, flag: str, overwrite: bool) -> Path:
    """The rule for an output directory that is written whole (``merge --out``, ``pretrain --output_dir``): a
    new or empty one is written; an existing one is replaced only with ``overwrite`` and only when
    :func:`check_replaceable` accepts it; never inside a directory a running minipeft process holds."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not is_empty_directory(path):
        if not overwrite:
            raise UserError(f"{flag_and_path(path, flag)}: already exists; choose another directory or pass "
                            "--overwrite")
        check_replaceable(path, flag)  # --overwrite replaces only what minipeft wrote
    check_unlocked(path.parent, flag, path)
    return path


def remove_our_directory(path, flag: str = "") -> None:
    """Delete a directory minipeft wrote (refuses anything else, see :func:`check_replaceable`)."""
    path = Path(path)
    if not path.exists():
        return
    check_replaceable(path, flag)
    doomed = path.with_name(f".old-{path.name}-{os.getpid()}")
    os.rename(path, doomed)  # first out of sight (atomic), so a kill never leaves half of it
    shutil.rmtree(doomed, ignore_errors=True)
    _forget(path)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link the files a user put into ``old`` (:func:`foreign_files`) into ``new``, at the same place: the
    new version keeps them (still unrecorded, so still the user's), and deleting ``old`` loses nothing."""
    for path in foreign_files(old):
        target = new / path.relative_to(old)
        if target.exists() or target.is_symlink():
            raise UserError(f"{path}: minipeft did not write it, and the new version of {old} has a file of that "
                            "name; refusing to replace it: move it out first")
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            os.symlink(os.readlink(path), target)
        elif path.is_dir():
            shutil.copytree(path, target, symlinks=True, copy_function=os.link)
        else:
            os.link(path, target)


def write_directory_atomically(final, write, flag: str = "") -> Path:
    """Call ``write(temporary_dir)``, mark and fsync what it wrote, and rename the directory to ``final``.

    An existing ``final`` is replaced only when minipeft wrote it (:func:`check_replaceable`): it is moved aside
    first and deleted after the rename, so at every moment one complete version is in place. A file a user put
    into it is carried into the new version (a hard link, :func:`_carry_over`), so a running training's periodic
    save never deletes it nor stops on it (a ``.DS_Store``, a note); the commands that replace a folder on the
    user's request check first and stop instead (:func:`check_replaceable`), so the user decides.
    """
    final = Path(final)
    check_replaceable(final, flag, foreign_files_stop=False)
    make_directory(final.parent)
    try:
        temporary = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
        os.chmod(temporary, _usual_mode(directory=True))
    except OSError as error:
        raise cannot_write(final, error) from None
    previous = None
    try:
        (temporary / MARKER_NAME).write_text(json_text({"written_by": "minipeft", "files": []}))  # a leftover is ours
        write(temporary)
        written = [path.relative_to(temporary).as_posix() for path in temporary.rglob("*")
                   if path.name != MARKER_NAME]
        (temporary / MARKER_NAME).write_text(json_text({"written_by": "minipeft", "files": sorted(written)}))
        for path in sorted(temporary.rglob("*")):
            os.chmod(path, _usual_mode(directory=path.is_dir()))  # safetensors writes 0600 files
            _fsync(path)  # files: their bytes; subdirectories: their entries
        if is_ours(final):  # (else it is absent or empty: check_replaceable refused anything more)
            _carry_over(final, temporary)  # a user's file in the old version stays (after the chmod: not ours)
        _fsync(temporary)
        if final.exists():
            previous = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.rename(final, previous)
        os.rename(temporary, final)
        _fsync(final.parent)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if previous is not None and not final.exists():
            os.rename(previous, final)  # put the old version back
        if is_write_failure(error):
            raise cannot_write(final, error) from None
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    record_as_ours(final)
    return final


def remove_incomplete(directory) -> None:
    """Delete the ``.tmp-*`` / ``.old-*`` directories that a killed minipeft process left in ``directory``
    (those holding the marker, or empty: a user's own ``.tmp-notes/`` stays)."""
    if Path(directory).is_dir():
        for path in Path(directory).iterdir():
            leftover = path.name.startswith((".tmp-", ".old-")) and path.is_dir()
            if leftover and (is_ours(path) or is_empty_directory(path)):
                shutil.rmtree(path, ignore_errors=True)


# -- outputs apart from inputs --------------------------------------------------------------------------------------
def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_apart(output, output_flag: str, inputs: dict, may_contain: bool = False) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (``{flag: path or None}``).

    ``may_contain``: an output *directory* that only adds its own named files may hold an input.
    """
    out = Path(os.path.realpath(output))
    for flag, path in inputs.items():
        if path is None:
            continue
        other = Path(os.path.realpath(path))
        if _same_file(out, other):  # a hard link, or the same file by another mount: identity, not path text
            other = out
        if _overlap(out, other) and not (may_contain and out in other.parents):
            relation = "is" if out == other else "contains" if out in other.parents else "lies inside"
            raise UserError(f"{output_flag} {output}: {relation} {flag} {path}; writing there could destroy an "
                            f"input: choose an {output_flag} apart from it")


# -- one writer per output directory --------------------------------------------------------------------------------
def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to someone else
        return True
    return True


class OutputLock:
    """``with OutputLock(directory, "--output_dir"):`` -- only one minipeft process writes into ``directory``.

    The lock is a file holding ``pid host``, created with ``O_EXCL`` (so of two processes exactly one creates
    it). A lock left by a process of this host that no longer runs is stale and is taken over.
    """

    def __init__(self, directory, flag: str = ""):
        self.directory, self.flag = Path(directory), flag
        self.path = self.directory / LOCK_NAME
        self.held = False

    def acquire(self) -> "OutputLock":
        make_directory(self.directory)
        me = f"{os.getpid()} {socket.gethostname()}\n"
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._busy() from None
            except OSError as error:
                raise cannot_write(self.path, error) from None
            with os.fdopen(descriptor, "w") as file:
                file.write(me)
            self.held = True
            return self
        raise self._busy()

    def _owner(self):
        try:
            pid, host = self.path.read_text().split()
            return int(pid), host
        except (OSError, ValueError):
            return None, None

    def _stale(self) -> bool:
        pid, host = self._owner()
        if pid is None:  # empty or unreadable: its writer died between creating and writing it
            return True
        return host == socket.gethostname() and pid != os.getpid() and not _process_alive(pid)

    def check_free(self) -> None:
        """Raise the one-line error when another live process holds this lock (a stale one is no obstacle)."""
        if (self.path.exists() or self.path.is_symlink()) and not self._stale():
            raise self._busy()

    def _busy(self) -> UserError:
        pid, host = self._owner()
        return UserError(f"{flag_and_path(self.directory, self.flag)}: another minipeft process (pid {pid} on "
                         f"{host}) is writing into it; wait for it to finish, or use another directory (if no such "
                         f"process runs, delete {self.path})")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def check_unlocked(directory, flag: str = "", named=None) -> None:
    """Refuse to write into or replace ``directory`` while another minipeft process (a training run) holds its
    :class:`OutputLock`; ``named``: the path the user gave, for the message (default ``directory``)."""
    lock = OutputLock(directory, flag)
    try:
        lock.check_free()
    except UserError:
        if named is None or Path(named) == Path(directory):
            raise
        pid, host = lock._owner()
        raise UserError(f"{flag_and_path(named, flag)}: lies in {directory}, which another minipeft process (pid "
                        f"{pid} on {host}) is writing into; wait for it to finish, or choose another place (if no "
                        f"such process runs, delete {lock.path})") from None
