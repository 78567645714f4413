"""Files minipeft writes get the permissions any program's files get: 0666 (directories 0777) less the umask.

``tempfile.mkstemp`` and ``mkdtemp`` create private scratch space (0600 and 0700), and a temporary renamed into
place keeps its mode; so every atomic write (temporary + ``os.replace``) calls :func:`use_umask` on its
temporary before the rename. With the usual umask 022 that gives 0644 files and 0755 directories, the same
as ``open(path, "w")`` and ``mkdir`` give.
"""

import os


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(mask)
    return mask


def use_umask(path, directory: bool = False) -> None:
    """Give ``path`` the mode a new file (or directory) would get: ``0o666`` (``0o777``) & ~umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
