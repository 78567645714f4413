"""Sizes a user gives, checked against the model and the machine before anything is allocated (issue #26).

A rank of 1,000,000,000 would otherwise ask the allocator for 640 GB and die in a traceback; a seed of -1 or
2**64 reaches numpy's parser; 100,000 threads reach OpenMP. Each check here raises
:class:`~minipeft.core.errors.UserError` naming the setting as the caller spells it (``name``: the flag on the
command line, the field for the API, which an adapter file's loader prefixes with the file).
"""

import argparse
import os

from minipeft.core.errors import UserError

SEED_LIMIT = 2 ** 32  # numpy's generators take seeds in [0, 2**32); torch's would take more, the split would not


def check_rank(r: int, layers: dict, name: str) -> None:
    """``r ≤ min(in, out)`` of every target layer (``{name: layer}``): a higher rank adds parameters, not rank."""
    # why: core.layers loads transformers, and the command line's argparse types come from this module
    from minipeft.core.layers import LINEAR_LAYERS, layer_features

    shapes = {layer_name: layer_features(layer)[:2] for layer_name, layer in layers.items()
              if isinstance(layer, LINEAR_LAYERS)}
    if not shapes:
        return
    layer_name, (d_in, d_out) = min(shapes.items(), key=lambda item: min(item[1]))
    if r > min(d_in, d_out):
        raise UserError(f"{name} {r} is larger than the target layers allow: a rank is at most min(in, out) = "
                        f"{min(d_in, d_out)} ({layer_name}: {d_in} -> {d_out})")


def memory_bytes() -> int:
    """This machine's physical memory, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_allocation(nbytes: int, name: str, what: str) -> None:
    """Refuse a setting that would allocate more than this machine's memory, with the estimate."""
    if nbytes > memory_bytes():
        raise UserError(f"{name}: {what} needs {nbytes / 1e9:,.1f} GB, more than this machine's "
                        f"{memory_bytes() / 1e9:,.1f} GB of memory")


def model_positions(model) -> int | None:
    """How many positions the model can attend over (``max_position_embeddings``; GPT-2: ``n_positions``)."""
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def check_virtual_tokens(count: int, model, name: str) -> None:
    """Virtual tokens take positions of the sequence: fewer than the model has, leaving one for a real token."""
    positions = model_positions(model)
    if positions is not None and count >= positions:
        raise UserError(f"{name} {count} leaves no room for text: the model has {positions} positions, "
                        f"so at most {positions - 1} virtual tokens")


def seed_number(text: str) -> int:
    """argparse ``type=`` for ``--seed``: an integer in [0, 2**32)."""
    seed = whole_number(text)
    if not 0 <= seed < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"{text} is not a seed: give an integer from 0 to {SEED_LIMIT - 1}")
    return seed


def thread_count(text: str) -> int:
    """argparse ``type=`` for ``--num_threads``: from 1 to this machine's CPU cores."""
    threads, cores = whole_number(text), os.cpu_count() or 1
    if not 1 <= threads <= cores:
        raise argparse.ArgumentTypeError(f"{text} threads: give 1 to this machine's {cores} CPU cores")
    return threads


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    """argparse ``type=`` for counts that mean nothing at 0 (``--max_new_tokens``, ``compare --val_size``)."""
    value = whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} asks for nothing: give a positive integer")
    return value


def path_name(text: str) -> str:
    """argparse ``type=`` for a file or folder to read or write: an empty name would be ``.``, the current
    folder (written into, or read as a directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty name: give a file or folder name")
    return text


def file_name(text: str) -> str:
    """argparse ``type=`` for a file to write: :func:`path_name`, and no trailing ``/`` (``out/`` names a
    folder, but ``Path("out/")`` is ``out``: the file would be written under the folder's name)."""
    text = path_name(text)
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text!r} ends in '/', a folder; give a file name (such as "
                                         f"{text.rstrip('/' + os.sep) or '.'}/name.ext)")
    return text
