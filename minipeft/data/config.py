"""The data pipeline's settings: one dataclass, its command-line flags, and the checks on their values.

Every flag maps to one field of :class:`DataConfig` with the same name (``--no_cache`` turns ``cache_dir`` off),
declared once on the field with :func:`~minipeft.core.options.setting`, so ``train_llm.py`` and
``data_pipeline.py`` share them through :func:`add_data_arguments` and :func:`data_config_from_args`.
"""

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

from minipeft.data.templates import TEMPLATE_CHOICES
from minipeft.core.bounds import seed_number
from minipeft.core.errors import UserError
from minipeft.core.finite import finite_float, require_finite
from minipeft.core.options import add_setting_flags, setting
from minipeft.files.manifest import is_ours
from minipeft.files.safe_files import PACKAGE_DIR


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/minipeft/data`` (``~/.cache/minipeft/data``): outside the checkout, so never committed."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return str(Path(cache_home) / "minipeft" / "data")


def parse_val_size(text: str) -> int | float:
    """``"200"`` -> 200 records; ``"0.1"`` -> 10 % of the records."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return finite_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count (200) nor a fraction (0.1)") from None


@dataclass
class DataConfig:
    """How instruction records become batches.

    Args:
        dataset_path: JSON array, JSON Lines or CSV file of Alpaca records; None means the built-in data set.
        max_records: use only the file's first N usable records (None: all), before the train/validation split.
        template: ``"auto"`` (the tokenizer's chat template when it has one, else Alpaca; resolved by
            :func:`~minipeft.data.pipeline.build_dataloaders`), ``"alpaca"``, ``"plain"`` or ``"chat"``, see
            :mod:`minipeft.data.templates`.
        max_length: most tokens per record (and per packed sequence); longer records are truncated.
        train_on_inputs: keep the prompt tokens in the loss (default: only the response and its EOS).
        padding: ``"longest"`` pads each batch to its longest record; ``"max_length"`` pads every batch to
            ``max_length`` (the seed's behaviour, kept for comparison).
        pad_to_multiple_of: round the padded length up to a multiple of this (8 suits tensor cores).
        padding_side: ``"right"`` for training, ``"left"`` as used for batched generation.
        group_by_length: batch records of similar length together (less padding), in a seeded random order.
        shuffle: reshuffle the training batches every epoch (seeded by ``seed`` and the epoch).
        packing: concatenate several records into one sequence of up to ``max_length`` tokens, each record
            still attending only to itself.
        val_size: records held out for validation: an int is a count, a float in [0, 1) a fraction.
        batch_size: records (or packed sequences) per training batch, per process.
        eval_batch_size: per validation batch; None means ``batch_size``.
        seed: seeds the split, the shuffling and the length grouping.
        instruction_column, input_column, output_column: the field names in the file.
        max_invalid_fraction: the run fails if more than this share of records is unusable.
        cache_dir: where tokenized data sets are cached; None turns the cache off.
        num_workers: DataLoader worker processes (0: load in the main process).
    """

    dataset_path: str | None = setting(None, "JSON array, JSON Lines (.jsonl) or CSV file of instruction/input/output "
                                       "records (default: the built-in data set)")
    max_records: int | None = setting(None, "use only the first N usable records of the file (default: all), before "
                                      "the validation split")
    template: str = setting("auto", "prompt template: chat is the tokenizer's own chat template; auto: chat when the "
                            "tokenizer has one (instruct models), else alpaca (default: %(default)s)",
                            choices=TEMPLATE_CHOICES)
    max_length: int = setting(256, "most tokens per record; longer records are truncated, keeping the response "
                              "(default: %(default)s)")
    train_on_inputs: bool = setting(False, "also train on the prompt tokens (default: response only)")
    padding: str = setting("longest", "pad each batch to its longest record, or every batch to --max_length as the "
                           "seed did (default: %(default)s)", choices=["longest", "max_length"])
    pad_to_multiple_of: int | None = setting(None, "round padded lengths up to a multiple of this (e.g. 8), "
                                                   "never past --max_length")
    padding_side: str = setting("right", "where padding goes (default: %(default)s)", choices=["right", "left"])
    group_by_length: bool = setting(True, "do not batch records of similar length together",
                                    flag="--no_group_by_length")
    shuffle: bool = setting(True, "keep the training batches in a fixed order", flag="--no_shuffle")
    packing: bool = setting(False, "pack several records into each sequence of --max_length tokens (no attention "
                            "across records)")
    val_size: int | float = setting(0.1, "validation records: a count (200) or a fraction (0.1) (default: "
                                    "%(default)s)", type=parse_val_size)
    batch_size: int = setting(8, "training batch size (default: %(default)s)")
    eval_batch_size: int | None = setting(None, "validation batch size (default: --batch_size)")
    seed: int = setting(42, "seed for the split and shuffling (default: %(default)s)", type=seed_number)
    instruction_column: str = setting("instruction", "field holding the instruction")
    input_column: str = setting("input", "field holding the optional input")
    output_column: str = setting("output", "field holding the response")
    max_invalid_fraction: float = setting(0.1, "fail when more than this share of records is unusable (default: "
                                          "%(default)s)")
    cache_dir: str | None = setting(default_factory=default_cache_dir, help="cache for tokenized data (default: "
                                    "%(default)s)", off_flag="--no_cache",
                                    off_help="do not read or write the tokenization cache")
    num_workers: int = setting(0, "DataLoader worker processes (default: 0)")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UserError` naming the flag when a value cannot work."""
        if self.dataset_path is not None and not str(self.dataset_path).strip():  # Path("") is "."
            raise UserError(f"--dataset_path {str(self.dataset_path)!r}: an empty name; give a data file, or leave "
                            "the flag out for the built-in data")
        roles = {"--instruction_column": self.instruction_column, "--input_column": self.input_column,
                 "--output_column": self.output_column}
        for flag, column in roles.items():
            if not str(column).strip():
                raise UserError(f"{flag} {column!r}: an empty column name")
            others = [other for other, name in roles.items() if other != flag and name == column]
            if others:  # one field read as two: the model would be trained to repeat its prompt
                raise UserError(f"{flag} {column}: the same column as {others[0]}; each role needs its own column")
        if self.max_records is not None and (not isinstance(self.max_records, int) or self.max_records < 1):
            raise UserError(f"--max_records {self.max_records}: must be a positive integer")
        if self.template not in TEMPLATE_CHOICES:
            raise UserError(f"--template {self.template}: unknown template; choose one of {', '.join(TEMPLATE_CHOICES)}")
        choices = {"padding": ("longest", "max_length"), "padding_side": ("right", "left")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} {getattr(self, name)}: choose one of {', '.join(allowed)}")
        if self.max_length < 2:
            raise UserError(f"--max_length {self.max_length}: must be at least 2 (a prompt token and a response token)")
        for name in ("batch_size", "eval_batch_size", "pad_to_multiple_of"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} {value}: must be a positive integer")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of > self.max_length:
            raise UserError(f"--pad_to_multiple_of {self.pad_to_multiple_of}: larger than --max_length "
                            f"{self.max_length} (every batch would be padded past the longest sequence allowed)")
        if self.num_workers < 0:
            raise UserError(f"--num_workers {self.num_workers}: must be 0 or more")
        cpus = os.cpu_count() or 1
        if self.num_workers > cpus:  # each worker is a process holding a copy of the data: more cannot load faster
            raise UserError(f"--num_workers {self.num_workers}: more worker processes than this machine's {cpus} CPUs; "
                            f"use at most {cpus}")
        for name in ("max_invalid_fraction", "val_size"):
            require_finite(f"--{name}", getattr(self, name))
        if not 0.0 <= self.max_invalid_fraction <= 1.0:
            raise UserError(f"--max_invalid_fraction {self.max_invalid_fraction}: must be between 0 and 1")
        if isinstance(self.val_size, float) and not 0.0 <= self.val_size < 1.0:
            raise UserError(f"--val_size {self.val_size}: a fraction must be in [0, 1); use an integer for a count")
        if isinstance(self.val_size, int) and self.val_size < 0:
            raise UserError(f"--val_size {self.val_size}: a count must be 0 or more")


def fit_max_length(config: DataConfig, model_config, virtual_tokens: int = 0) -> str | None:
    """Cut ``config.max_length`` to the positions the model has (its config's ``n_positions`` or
    ``max_position_embeddings``: GPT-2's learned 1,024, the built-in model's 512), less the ``virtual_tokens`` a
    prompt or prefix puts before every record, in place: a record longer than that would end in an index error
    inside the model's forward.

    Returns the note that says so, or None where ``max_length`` fits (or the config names no positions).
    """
    for field in ("n_positions", "max_position_embeddings"):
        positions = getattr(model_config, field, None)
        if isinstance(positions, int):
            break
    else:
        return None
    room = positions - virtual_tokens
    if config.max_length <= room:
        return None
    note = (f"note: --max_length {config.max_length} is more than the model's {positions:,} positions (its config's "
            f"{field})" + (f" less the method's {virtual_tokens} virtual tokens" if virtual_tokens else "")
            + f"; records are cut at {room}")
    config.max_length = room
    return note


def add_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the data flags (one per :class:`DataConfig` field, and ``--no_cache``) to ``parser`` and return it."""
    add_setting_flags(parser.add_argument_group("data"), DataConfig)
    return parser


def data_config_from_args(args: argparse.Namespace, model_folder=None) -> DataConfig:
    """The :class:`DataConfig` described by the parsed flags of :func:`add_data_arguments`; ``model_folder``: the
    folder ``--model`` reads, if any (see :func:`check_cache_dir`)."""
    values = {item.name: getattr(args, item.name) for item in fields(DataConfig)}
    if getattr(args, "no_cache", False):
        values["cache_dir"] = None
    cache = values["cache_dir"]
    if cache is not None and (not str(cache).strip() or (Path(cache).exists() and not Path(cache).is_dir())):
        raise UserError(f"--cache_dir {cache!r}: not a folder; give a folder name, or --no_cache")
    if cache is not None:
        check_cache_dir(cache, model_folder)
    return DataConfig(**values)


def check_cache_dir(cache, model_folder=None, output_dir=None, default_cache: bool = False) -> None:
    """The tokenization cache writes files that no folder records, so it never goes into (or below) a folder
    minipeft wrote (a model, an adapter, a run: its ``.minipeft`` record would list a file it did not write, or
    a replacement of the folder would delete the cache), the ``--model`` folder, minipeft's own package, or the
    training run's ``output_dir`` (whose files are the run's own). ``default_cache``: the user gave no
    ``--cache_dir``, so it is ``--output_dir`` to change (``--output_dir /`` holds every folder)."""
    real = Path(os.path.realpath(cache))
    if output_dir is not None:
        out = Path(os.path.realpath(output_dir))
        if (real == out or out in real.parents) and default_cache:
            raise UserError(f"--output_dir {output_dir}: holds minipeft's tokenization cache ({cache}), and a run's "
                            "folder holds only the run's own files: choose another --output_dir")
        if real == out or out in real.parents:
            raise UserError(f"--cache_dir {cache}: lies inside --output_dir {output_dir}, whose files are the run's "
                            "own; keep the cache outside it (or --no_cache)")
    places = {PACKAGE_DIR: "minipeft's own package"}
    if model_folder is not None:
        places[Path(os.path.realpath(model_folder))] = "the folder --model reads"
    for folder in (real, *real.parents):
        why = places.get(folder) or ("a folder minipeft wrote" if is_ours(folder) else None)
        if why is not None:
            where = "is" if folder == real else f"lies inside {folder},"
            raise UserError(f"--cache_dir {cache}: {where} {why}; keep the cache outside it (or --no_cache)")
