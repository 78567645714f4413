"""The run's output directory, and its one owner: :func:`open_run_dir`.

A run writes into ``--output_dir`` (the layout is in :mod:`minipeft.training.loop`). Whether that directory is
usable, and whether ``--resume`` finds a checkpoint there, must be known *before* minutes of loading a model,
so the checks, the lock and the clean-up sit in one context manager that the API and the command line share::

    with open_run_dir(config) as run_dir:      # checks, creates and locks: a mistake fails here, at once
        model, loaders = ...                   # minutes
        result = train(model, *loaders, config, run_dir=run_dir)

:func:`~minipeft.training.loop.train` called without ``run_dir`` opens it itself (its model is loaded already).
On rank 0, :func:`open_run_dir`:

1. refuses a path that is a file, and an output that is or holds an input (``inputs``: the data, a model folder);
2. creates the directory and marks it as minipeft's (:func:`prepare_output_dir`);
3. takes its lock (:class:`~minipeft.files.lock.OutputLock`): one run at a time writes here;
4. refuses to replace an earlier run's outputs, or files minipeft did not write (:func:`check_output_dir`);
5. resolves ``--resume`` to a checkpoint (an error now if there is none, unless the run stopped before its
   first checkpoint: then ``--resume latest`` starts it over, :func:`resume_point`).

On leaving it releases the lock, and a directory it created that holds nothing (the run failed before writing
anything) is removed. The other processes of a distributed run write nothing: they only resolve ``--resume``.
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from minipeft.core.errors import UserError
from minipeft.files.atomic import make_directory
from minipeft.files.lock import LOCK_NAME, OutputLock, check_unlocked
from minipeft.files.manifest import (CHANGED, MARKER_NAME, foreign_files_and_why, is_older_marker, is_ours,
                                     mark_as_ours, marker_problem, read_manifest, record_as_ours)
from minipeft.files.safe_files import (check_apart, check_folder_to_write_into, check_ours_to_replace,
                                       check_run_folder_place, is_empty_directory, remove_our_directory)
from minipeft.training.checkpoint import ADAPTER_DIR, list_checkpoints, resolve_resume
from minipeft.training.config import TrainingConfig

# What :func:`train` writes into --output_dir (a new run there would replace these); train_llm.py adds its own.
RUN_OUTPUTS = (ADAPTER_DIR, "best", "checkpoints", "metrics.jsonl")


@dataclass
class RunDir:
    """An opened output directory: where the run writes, and the checkpoint ``--resume`` named (or None)."""

    path: Path
    resume_from: Path | None = None
    restarted: bool = False  # --resume latest of a run stopped before its first checkpoint: it starts over


@contextmanager
def open_run_dir(config: TrainingConfig, is_main: bool = True, outputs: tuple = RUN_OUTPUTS, inputs: dict = None):
    """Check, create and lock ``config.output_dir`` and resolve ``config.resume`` (see the module docstring);
    yields a :class:`RunDir`. ``outputs``: the names a new run there would replace; ``inputs``: ``{flag: path}``
    of the files the run reads, which the directory may hold but not be."""
    output_dir = Path(config.output_dir)
    check_folder_to_write_into(output_dir, "--output_dir")
    if inputs:  # a data file in the run's folder is fine: a run writes only its own names
        check_apart(output_dir, "--output_dir", inputs, may_contain=True)
    check_run_folder_place(output_dir, "--output_dir")
    if not is_main:  # (only rank 0 writes; the others would race with its first files)
        yield resume_point(config, output_dir)
        return
    # a new folder inside another running run's own (as merge, generate and compare refuse it too)
    check_unlocked(output_dir.parent, "--output_dir", output_dir, own_lock_ok=True)
    created = not output_dir.exists()
    prepare_output_dir(output_dir)
    try:
        with OutputLock(output_dir, "--output_dir"):  # one run at a time writes into output_dir
            check_output_dir(config, outputs)
            mark_users_folder(output_dir)
            yield resume_point(config, output_dir)
    except BaseException:
        if created and {path.name for path in output_dir.iterdir()} <= {MARKER_NAME}:
            remove_our_directory(output_dir)  # a run that failed before writing anything leaves no empty folder
        raise


def resume_point(config: TrainingConfig, output_dir: Path) -> RunDir:
    """The opened directory with the checkpoint ``--resume`` names (an error if there is none), except that
    ``--resume latest`` in a run of minipeft's that stopped before its first checkpoint (killed while loading or
    in its first steps: a record, no checkpoint, no final adapter), or before it made its folder (killed while
    Python imported), starts that run over: step 0 is where it is. Every process decides alike, whether or not
    rank 0 has made the folder yet (then holding only its marker and lock)."""
    if not config.resume:
        return RunDir(output_dir)
    started = any((output_dir / name).is_file() for name in ("metrics.jsonl", "train_config.json"))
    unmade = not output_dir.is_dir() or {path.name for path in output_dir.iterdir()} <= {MARKER_NAME, LOCK_NAME}
    if (config.resume == "latest" and (unmade or started and is_ours(output_dir))
            and not (output_dir / ADAPTER_DIR).exists() and not list_checkpoints(output_dir / "checkpoints")):
        return RunDir(output_dir, restarted=True)
    checkpoint = resolve_resume(config.resume, output_dir)
    owner = checkpoint.parent.parent  # <run>/checkpoints/step-N
    # (started: output_dir exists, so samefile can compare; its flags are another run's record otherwise, and each
    # would be compared with the wrong one)
    if started and not (owner.is_dir() and os.path.samefile(owner, output_dir)):
        raise UserError(f"--resume {config.resume}: continues the run in {owner}, but --output_dir {output_dir} "
                        "holds another run; continue it in its own folder (--output_dir "
                        f"{owner}), or into a new one")
    return RunDir(output_dir, checkpoint)


def check_output_dir(config: TrainingConfig, outputs: tuple = RUN_OUTPUTS) -> None:
    """A new run does not silently replace an earlier run's ``outputs``, and never files minipeft did not write."""
    output_dir = Path(config.output_dir)
    found = [name for name in outputs if (output_dir / name).exists() or (output_dir / name).is_symlink()]
    links = [name for name in found if (output_dir / name).is_symlink()]
    if links:  # a run writes through none: its checkpoints/ linked to another run's would write into that one
        raise UserError(f"--output_dir {output_dir}: its {links[0]} is a symbolic link (to "
                        f"{os.path.realpath(output_dir / links[0])}), which minipeft never writes; refusing to write "
                        "or delete through it: remove the link, or choose another --output_dir")
    if config.resume:  # the run's files it rewrites must still be as it wrote them (its log is cut to the step;
        for name in found:  # its folders are saved keeping a user's files, stopping on a file of its own edited)
            if name != "metrics.jsonl" and (output_dir / name).is_file():
                check_ours_to_replace(output_dir / name, "--resume")
            elif name in (ADAPTER_DIR, "best") and (output_dir / name).is_dir():
                check_no_edited_file(output_dir / name)
        return
    if not found:
        return
    recorded = read_manifest(output_dir) or {}
    foreign = [] if is_older_marker(output_dir) else [name for name in found if name not in recorded]
    if foreign:  # a file of a run's name that minipeft never wrote here is no earlier run's: the user's own
        problem = marker_problem(output_dir)
        raise UserError(f"--output_dir {output_dir}: holds {', '.join(foreign)}, which minipeft did not write"
                        + (f" ({problem})" if problem else "") + "; a run writes files of these names: choose "
                        "another --output_dir")
    if not config.overwrite_output_dir:
        if list_checkpoints(output_dir / "checkpoints"):
            raise UserError(f"--output_dir {output_dir}: holds checkpoints of an earlier run; pass --resume latest "
                            "to continue it, --overwrite_output_dir to start over, or another --output_dir")
        raise UserError(f"--output_dir {output_dir}: holds an earlier run's outputs ({', '.join(found)}) and no "
                        "checkpoint to resume; pass --overwrite_output_dir to replace them, or another --output_dir")
    for name in found:  # the marker says minipeft made the folder, not that it wrote every file in it
        check_ours_to_replace(output_dir / name, "--output_dir")


def check_no_edited_file(folder: Path) -> None:
    """Before a resume trains: ``folder`` (the run's ``adapter/``, ``best/``), which its saves write again, holds no
    file of the run's own that was edited since (a save keeps a user's files, but would have to replace that one:
    it stopped there, after all the training)."""
    for path, why in foreign_files_and_why(folder):
        if why == CHANGED:
            raise UserError(f"--resume: {folder}: holds {path}, which {why}; the run saves {folder.name}/ again, "
                            "replacing it: move it out (or copy it elsewhere) first")


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir``; mark it as minipeft's when it is new or empty (:func:`mark_users_folder` marks a
    user's folder once the checks have passed)."""
    output_dir = Path(output_dir)
    new = not output_dir.exists() or is_empty_directory(output_dir)
    make_directory(output_dir)
    if new:
        mark_as_ours(output_dir)
        record_as_ours(output_dir / "metrics.jsonl", appended=True)  # appended to: recorded beforehand, by name


def mark_users_folder(output_dir: Path) -> None:
    """Mark a user's folder that already held files before the run writes into it, recording none of them: they
    stay the user's (nothing replaces or deletes them, :func:`~minipeft.files.safe_files.check_replaceable`),
    while a later ``--overwrite_output_dir`` can replace the run's own outputs there (it refused: no marker)."""
    if not is_ours(output_dir):
        mark_as_ours(output_dir)
        if not (output_dir / "metrics.jsonl").exists():
            record_as_ours(output_dir / "metrics.jsonl", appended=True)
