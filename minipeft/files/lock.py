"""One writer per output directory: :class:`OutputLock` and :func:`check_unlocked`.

A lock is a file, :data:`LOCK_NAME`, holding ``pid host``; a second process that wants to write into the same
directory stops with one line naming the holder. A lock whose process is gone (a crashed or killed run) is taken
over.
"""

import os
import socket
from pathlib import Path

from minipeft.core.errors import UserError
from minipeft.files.atomic import cannot_write, make_directory
from minipeft.files.input_files import flag_and_path

LOCK_NAME = ".minipeft.lock"


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
                self._check_plain_file()
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

    def _check_plain_file(self) -> None:
        """A lock is a regular file minipeft made: a directory, a symbolic link or a FIFO of that name is not one
        (reading a FIFO would block, deleting a directory fails with a traceback)."""
        if self.path.is_symlink() or not self.path.is_file():
            raise UserError(f"{flag_and_path(self.directory, self.flag)}: {self.path} is not a lock file minipeft "
                            "wrote (a directory, a link or a special file); move it away, or use another directory")

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
        if self.path.exists() or self.path.is_symlink():
            self._check_plain_file()
            if not self._stale():
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


def check_unlocked(directory, flag: str = "", named=None, own_lock_ok: bool = False) -> None:
    """Refuse to write into or replace ``directory`` while another minipeft process (a training run) holds its
    :class:`OutputLock`; ``named``: the path the user gave, for the message (default ``directory``).
    ``own_lock_ok``: a lock this very process holds is no obstacle (``compare`` trains each method into a
    folder of the ``--output_dir`` it holds)."""
    lock = OutputLock(directory, flag)
    if own_lock_ok and lock.path.is_file() and not lock.path.is_symlink() \
            and lock._owner() == (os.getpid(), socket.gethostname()):
        return
    try:
        lock.check_free()
    except UserError:
        if named is None or Path(named) == Path(directory):
            raise
        pid, host = lock._owner()
        raise UserError(f"{flag_and_path(named, flag)}: lies in {directory}, which another minipeft process (pid "
                        f"{pid} on {host}) is writing into; wait for it to finish, or choose another place (if no "
                        f"such process runs, delete {lock.path})") from None


def holds_lock_above(path) -> bool:
    """True when this process holds the :class:`OutputLock` of a folder that ``path`` lies in: ``path`` is then
    part of the output this process is writing (a run's ``adapter/`` or ``checkpoints/step-N``, a method's run
    inside compare's folder), not an output of its own that the user named inside another one."""
    me = (os.getpid(), socket.gethostname())
    for folder in Path(os.path.abspath(path)).parents:
        lock = OutputLock(folder)
        if lock.path.is_file() and not lock.path.is_symlink() and lock._owner() == me:
            return True
    return False

