"""Writing one file so that a kill, a full disk or an error at any moment leaves the old version or the new one.

:func:`replace_file` writes into a temporary file beside the final place, ``fsync``-s it, renames it into place
(``os.replace``, atomic on POSIX file systems) and ``fsync``-s the directory. It knows nothing of who owns what:
the writers every command uses are in :mod:`minipeft.files.safe_files`, which add the ownership record
(:mod:`minipeft.files.manifest`). The helpers here (:func:`cannot_write`, :func:`make_directory`) turn what the
environment refuses (a read-only or full disk, a file in the way) into one line naming the path.
"""

import errno
import json
import os
import re
import tempfile
from pathlib import Path

from safetensors import SafetensorError

from minipeft.core.errors import UserError


def fsync_path(path) -> None:
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


def usual_mode(directory: bool) -> int:
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


def replace_file(path, write) -> Path:
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
        os.chmod(temporary, usual_mode(directory=False))
    except OSError as error:
        raise cannot_write(path, error) from None
    try:
        write(temporary)
        fsync_path(temporary)
        os.replace(temporary, path)
        fsync_path(path.parent)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if is_write_failure(error):
            raise cannot_write(path, error) from None
        raise
    return path


def json_text(value, indent=2, sort_keys: bool = False) -> str:
    """JSON for ``value``; a NaN or infinity in it is a bug upstream (JSON has neither), so it raises."""
    try:
        return json.dumps(value, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"
    except ValueError as error:
        raise ValueError(f"refusing to write a non-finite number as JSON ({error})") from None
