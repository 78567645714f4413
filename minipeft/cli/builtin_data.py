"""``python -m minipeft builtin-data``: write the built-in instruction data (:mod:`minipeft.builtin.tasks`)."""

from pathlib import Path

from minipeft.builtin import default_dataset_path
from minipeft.builtin.tasks import NUM_RECORDS, default_data_text
from minipeft.cli import CommandLineParser
from minipeft.files.safe_files import write_text_atomically
def write_default_data(path: Path) -> None:
    """Write :func:`default_data_text` to ``path`` atomically (temporary file, then ``os.replace``)."""
    write_text_atomically(path, default_data_text())


def main(argv=None) -> int:
    parser = CommandLineParser(prog="python -m minipeft builtin-data",
                               description="Write the built-in instruction data set (default_data.json).")
    parser.add_argument("path", nargs="?", type=Path, default=default_dataset_path(),
                        help="where to write it (default: %(default)s)")
    path = parser.parse_args(argv).path
    write_default_data(path)
    print(f"wrote {NUM_RECORDS} records to {path}")
    return 0
