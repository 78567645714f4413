"""Writing outputs so that nothing a user had is ever lost: the one place every command writes through.

**Writing.** One primitive for a file, :func:`write_file_atomically`, and one for a directory,
:func:`write_directory_atomically`; :func:`write_text_atomically` and :func:`write_json_atomically` are one-line
wrappers over the file primitive. Everything is written into a temporary file or directory beside its final
place, ``fsync``-ed, and renamed into place (``os.replace``, atomic on POSIX file systems): a kill, a full disk
or an error at any moment leaves the previous version or the new one, never half of one. JSON is written with
``allow_nan=False``: NaN is not JSON.

**Ownership.** Every directory minipeft writes holds a small marker file, :data:`MARKER_NAME`. minipeft replaces
or deletes a directory only when it holds the marker (or is empty): a user's own directory is never deleted,
whatever ``--overwrite`` says. :func:`check_apart` refuses an output that is, contains or lies inside an input.

**One writer.** :class:`OutputLock` puts a lock file (:data:`LOCK_NAME`, holding the process id) into an output
directory; a second process that wants to write there stops with one line. A lock whose process is gone (a
crashed or killed run) is taken over.

Errors are :class:`~minipeft.core.errors.UserError` lines naming the path; the command line turns them into
``error: ...`` and exit status 2. Reading inputs: :mod:`minipeft.files.input_files`.
"""

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from minipeft.core.errors import UserError
from minipeft.files.input_files import flag_and_path

MARKER_NAME = ".minipeft"  # in every directory minipeft writes: "this one may be replaced by minipeft"
MARKER_TEXT = "written by minipeft; minipeft may replace or delete this directory\n"
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


# -- directories minipeft owns -----------------------------------------------------------------------------------
def is_ours(directory) -> bool:
    """True when ``directory`` holds minipeft's marker file (minipeft wrote it and may replace it)."""
    return (Path(directory) / MARKER_NAME).is_file()


def mark_as_ours(directory) -> None:
    """Put the marker file into ``directory`` (a directory minipeft created or writes its run into)."""
    marker = Path(directory) / MARKER_NAME
    if not marker.is_file():
        write_text_atomically(marker, MARKER_TEXT)


def is_empty_directory(path) -> bool:
    path = Path(path)
    return path.is_dir() and not any(path.iterdir())


def check_replaceable(path, flag: str = "") -> None:
    """Refuse to replace ``path`` unless it is absent, an empty directory, or a directory minipeft wrote."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_dir():
        raise UserError(f"{flag_and_path(path, flag)}: is a file, not a directory minipeft wrote; "
                        "refusing to replace it")
    if not is_empty_directory(path) and not is_ours(path):
        raise UserError(f"{flag_and_path(path, flag)}: holds files minipeft did not write (no {MARKER_NAME} marker); "
                        "refusing to replace or delete it: choose another directory or empty this one yourself")


def remove_our_directory(path, flag: str = "") -> None:
    """Delete a directory minipeft wrote (refuses anything else, see :func:`check_replaceable`)."""
    path = Path(path)
    if not path.exists():
        return
    check_replaceable(path, flag)
    doomed = path.with_name(f".old-{path.name}-{os.getpid()}")
    os.rename(path, doomed)  # first out of sight (atomic), so a kill never leaves half of it
    shutil.rmtree(doomed, ignore_errors=True)


def write_directory_atomically(final, write, flag: str = "") -> Path:
    """Call ``write(temporary_dir)``, mark and fsync what it wrote, and rename the directory to ``final``.

    An existing ``final`` is replaced only when minipeft wrote it (:func:`check_replaceable`): it is moved aside
    first and deleted after the rename, so at every moment one complete version is in place.
    """
    final = Path(final)
    check_replaceable(final, flag)
    make_directory(final.parent)
    try:
        temporary = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
        os.chmod(temporary, _usual_mode(directory=True))
    except OSError as error:
        raise cannot_write(final, error) from None
    previous = None
    try:
        (temporary / MARKER_NAME).write_text(MARKER_TEXT)
        write(temporary)
        for path in sorted(temporary.rglob("*")):
            os.chmod(path, _usual_mode(directory=path.is_dir()))  # safetensors writes 0600 files
            _fsync(path)  # files: their bytes; subdirectories: their entries
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


def check_apart(output, output_flag: str, inputs: dict, may_contain: bool = False) -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (``{flag: path or None}``).

    ``may_contain``: an output *directory* that only adds its own named files may hold an input.
    """
    out = Path(os.path.realpath(output))
    for flag, path in inputs.items():
        if path is None:
            continue
        other = Path(os.path.realpath(path))
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
