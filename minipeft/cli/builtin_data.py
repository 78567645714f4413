"""``python -m minipeft builtin-data``: write the built-in instruction data (:mod:`minipeft.builtin.tasks`).

The default path is the package's own ``default_data.json``; rebuilding it after a change to the tasks takes
``--overwrite``. Any other existing file is replaced only with ``--overwrite`` and only when minipeft wrote it
(:func:`~minipeft.files.safe_files.check_output_file`); a file that already holds exactly these records is left
as it is.
"""

import os
from pathlib import Path

from minipeft.builtin import default_dataset_path
from minipeft.builtin.tasks import NUM_RECORDS, default_data_text
from minipeft.cli import CommandLineParser
from minipeft.core.bounds import file_name
from minipeft.core.errors import UserError
from minipeft.files.safe_files import check_output_file, write_output_file, write_text_atomically


def is_package_data(path: Path) -> bool:
    """True when ``path`` is the package's own ``default_data.json`` (by identity, not by its name)."""
    try:
        return os.path.samefile(path, default_dataset_path())
    except OSError:
        return False


def write_default_data(path: Path, overwrite: bool = False) -> bool:
    """Write :func:`default_data_text` to ``path`` atomically; False when ``path`` already holds exactly it."""
    text = default_data_text()
    if path.is_file() and not path.is_symlink() and path.read_bytes() == text.encode("utf-8"):
        return False  # nothing to replace: the same bytes
    if is_package_data(path) and path.is_file() and not path.is_symlink():
        if not overwrite:
            raise UserError(f"builtin-data {path}: already exists (the package's own data, built from an older "
                            "minipeft/builtin/tasks.py); pass --overwrite to rebuild it, or give another path")
        write_text_atomically(path, text)  # minipeft's own file, rebuilt from minipeft/builtin/tasks.py
        return True
    check_output_file(path, "builtin-data", overwrite)
    write_output_file(path, text, "builtin-data")
    return True


def main(argv=None) -> int:
    parser = CommandLineParser(prog="python -m minipeft builtin-data",
                               description="Write the built-in instruction data set (default_data.json).")
    parser.add_argument("path", nargs="?", type=file_name, default=str(default_dataset_path()),
                        help="where to write it (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing file minipeft wrote (the package's default_data.json included)")
    args = parser.parse_args(argv)
    path = Path(args.path)
    if write_default_data(path, args.overwrite):
        print(f"wrote {NUM_RECORDS} records to {path}")
    else:
        print(f"{path} already holds the {NUM_RECORDS} records; nothing written")
    return 0
