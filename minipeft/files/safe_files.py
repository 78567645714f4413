"""Writing outputs so that nothing a user had is ever lost: the one place every command writes through.

**Writing.** One primitive for a file, :func:`write_file_atomically`, and one for a directory,
:func:`write_directory_atomically`; :func:`write_text_atomically` and :func:`write_json_atomically` are one-line
wrappers over the file primitive. Everything is written into a temporary file or directory beside its final
place, ``fsync``-ed, and renamed into place (:mod:`minipeft.files.atomic`): a kill, a full disk or an error at
any moment leaves the previous version or the new one, never half of one. JSON is written with
``allow_nan=False``: NaN is not JSON.

**Replacing.** minipeft never replaces a file it did not write; what it wrote is recorded in the ``.minipeft``
marker of each directory it creates, or beside a single file (:mod:`minipeft.files.manifest`). Replacing or
deleting a directory (``merge --overwrite``, ``--overwrite_output_dir``, a new adapter over the old) follows
:func:`check_replaceable`: a file the user put into a minipeft folder stops the command with one line naming it;
it is neither deleted nor moved. (A running training's periodic saves instead carry such a file into the new
version: see :func:`write_directory_atomically`.) An output *file* the user names (``--output_file``,
``--report``) follows :func:`check_output_file`: a new name is written; an existing file is replaced only with
``--overwrite`` and only when minipeft wrote it and nobody changed it since. :func:`check_apart` refuses an
output that is (same device and inode), contains or lies inside an input. Nothing is written into a directory
another minipeft process is writing into (:mod:`minipeft.files.lock`).

Errors are :class:`~minipeft.core.errors.UserError` lines naming the path; the command line turns them into
``error: ...`` and exit status 2. Reading inputs: :mod:`minipeft.files.input_files`.
"""

import os
import shutil
import tempfile
from pathlib import Path

from minipeft.core.errors import UserError
from minipeft.files.atomic import (cannot_write, fsync_path, is_write_failure, json_text, make_directory,
                                   replace_file, usual_mode)
from minipeft.files.input_files import flag_and_path
from minipeft.files.lock import check_unlocked, holds_lock_above
from minipeft.files.manifest import (CHANGED, DIRECTORY, MARKER_NAME, NOT_RECORDED, SYMBOLIC_LINK, UNLISTED,
                                     file_identity, forget, foreign_files_and_why, is_older_marker, is_ours,
                                     is_sidecar_beside_its_file, manifest_text, marker_problem, read_manifest,
                                     record_as_ours, record_as_part,
                                     sha256_of, sidecar_of, written_as, wrote_file, wrote_output_file)


# -- writing ---------------------------------------------------------------------------------------------------
def write_file_atomically(path, write) -> Path:
    """Call ``write(temporary_path)`` and rename the file to ``path`` (:func:`~minipeft.files.atomic.replace_file`);
    in a directory minipeft owns, the file is then recorded as one of its own."""
    path = replace_file(path, write)
    if path.name != MARKER_NAME:
        record_as_ours(path)
    return path


def write_text_atomically(path, text: str) -> Path:
    """Write ``text`` (UTF-8) via :func:`write_file_atomically`."""
    return write_file_atomically(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def write_json_atomically(path, value, sort_keys: bool = False) -> Path:
    """Write ``value`` as indented JSON (``allow_nan=False``, see :func:`json_text`) via the file primitive."""
    return write_text_atomically(path, json_text(value, sort_keys=sort_keys))


# -- outputs the user names, and directories minipeft replaces ---------------------------------------------------
def write_output_file(path, text: str, flag: str) -> Path:
    """Write a file the user named (``--output_file``, ``--report``) and record that minipeft wrote it in a
    sidecar beside it (:func:`sidecar_of`) holding the file's sha256, so that an edited file is no longer taken
    for minipeft's (in a directory minipeft owns, its marker records both files as well), and the ``flag`` it
    was written as, so that one command's output never replaces another's (generate's answers a report)."""
    def text_of(content):
        return lambda temporary: Path(temporary).write_text(content, encoding="utf-8")

    path = replace_file(Path(path), text_of(text))
    sidecar = replace_file(sidecar_of(path), text_of(json_text({"written_by": "minipeft", "file": path.name,
                                                                 "sha256": sha256_of(path), "as": flag})))
    if holds_lock_above(path):  # part of the output this process writes (compare's report in its own folder);
        record_as_ours(path)  # else the user's file, even in a folder minipeft wrote: a later replacement of that
        record_as_ours(sidecar)  # folder keeps it or stops on it, never deletes it with the folder's own files
    return path


def check_output_file(path, flag: str, overwrite: bool, inputs: dict = None) -> Path:
    """The one rule for an output file the user names: refuse an input (:func:`check_apart`); a new name is
    written; an existing file is replaced only with ``overwrite`` and only when minipeft wrote it as such an
    output (:func:`wrote_output_file`: never a file of an output folder, an adapter's config or a run's
    metrics); a directory, a device or a symbolic link never is. Also refuses a directory that
    another minipeft process is writing into (:func:`check_unlocked`)."""
    path = Path(path)
    check_apart(path, flag, inputs or {})
    if path.is_dir() and not path.is_symlink():
        raise UserError(f"{flag_and_path(path, flag)}: is a directory, expected a file name")
    folder = next((parent for parent in path.parents if parent.exists()), None)  # (else found after the work)
    if folder is not None and not folder.is_dir():
        raise UserError(f"{flag_and_path(path, flag)}: {folder} is a file, not a folder to write into")
    if path.exists() or path.is_symlink():
        if path.is_symlink() or not path.is_file():
            raise UserError(f"{flag_and_path(path, flag)}: is a symbolic link or not a regular file; refusing to "
                            "replace it: choose a new name")
        if not wrote_output_file(path):
            part = wrote_file(path) or wrote_file(path.resolve())  # one file of a folder minipeft wrote (reached
            # through a link to it, too): replacing it would break the folder
            raise UserError(f"{flag_and_path(path, flag)}: already exists and "
                            + ("is part of a folder minipeft wrote (an adapter, a run, a model)" if part else
                               "minipeft did not write it (or it was changed since)")
                            + "; refusing to replace it, --overwrite or not: choose a new name")
        if path.name in (read_manifest(path.parent) or {}) and not holds_lock_above(path):
            raise UserError(f"{flag_and_path(path, flag)}: already exists and is part of {path.parent}, a folder "
                            "minipeft wrote (its .minipeft records it); refusing to replace it, --overwrite or not: "
                            "choose a new name")  # (compare's report.md in another comparison's folder)
        kind = written_as(path)
        if kind is not None and kind != flag:
            raise UserError(f"{flag_and_path(path, flag)}: already exists and minipeft wrote it as {kind}, another "
                            "command's output; refusing to replace it, --overwrite or not: choose a new name")
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
    every file minipeft recorded and nobody changed since (:func:`~minipeft.files.manifest.foreign_files`;
    ``foreign_files_stop=False``: the caller keeps them) and that no running minipeft process writes into."""
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
        raise UserError(f"{flag_and_path(path, flag)}: holds files minipeft did not write ({marker_problem(path)}); "
                        "refusing to replace or delete it: choose another directory or empty this one yourself")
    check_unlocked(path, flag)
    foreign = foreign_files_and_why(path) if foreign_files_stop else []
    if foreign:  # named by the file the user asked for, not by its sidecar record
        raise _not_ours(path, flag, *sorted(foreign, key=lambda item: is_sidecar_beside_its_file(item[0]))[0])


def _not_ours(directory: Path, flag: str, path: Path, why: str) -> UserError:
    """The refusal for a directory that holds ``path``, which is not minipeft's for the reason ``why``."""
    advice = (f"if nothing in {directory} is yours, delete it yourself, else choose another directory"
              if why == UNLISTED else "move it out first, or choose another directory")
    return UserError(f"{flag_and_path(directory, flag)}: holds {path}, which {why}; refusing to replace or delete "
                     f"it: {advice}")


def check_ours_to_replace(path, flag: str = "") -> None:
    """Refuse unless minipeft wrote ``path``: a file recorded as its own (:func:`wrote_file`), or a directory
    :func:`check_replaceable` accepts. For a name inside a directory that is about to be replaced or pruned."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        check_replaceable(path, flag)
    elif (path.exists() or path.is_symlink()) and not wrote_file(path):
        recorded = path.name in (read_manifest(path.parent) or {})
        unlisted = UNLISTED if is_older_marker(path.parent) else NOT_RECORDED
        why = SYMBOLIC_LINK if path.is_symlink() else CHANGED if recorded else unlisted
        raise _not_ours(path.parent, flag, path, why)


def check_not_a_part(path, flag: str) -> None:
    """Refuse an output folder the user named that is a part of another output minipeft wrote (its parent's
    marker records it: a run's ``adapter/`` or ``checkpoints/``, a method's run inside compare's folder), unless
    this process writes that output: the two would mix, and replacing the other output would take this one along."""
    path = Path(path)
    if path.name in (read_manifest(path.parent) or {}) and (path.is_dir() or not path.exists()) \
            and not holds_lock_above(path):
        raise UserError(f"{flag_and_path(path, flag)}: is part of {path.parent}, an output minipeft wrote (its "
                        f"{MARKER_NAME} records it); a new output there would mix with it: choose a folder outside it")


# minipeft's own package folder: no output of a run or cache goes into it (pretrain writes its model there alone)
PACKAGE_DIR = Path(os.path.realpath(__file__)).parents[1]


def check_run_folder_place(path, flag: str) -> None:
    """A run's folder (``--output_dir``) is not minipeft's own package, nor a model folder minipeft wrote (merge,
    pretrain: its marker records a ``config.json``): the run's files would mix with the model's, and a later
    ``merge --overwrite`` of the folder would find it "not a model folder"."""
    real = Path(os.path.realpath(path))
    if real == PACKAGE_DIR or PACKAGE_DIR in real.parents:
        raise UserError(f"{flag_and_path(path, flag)}: lies in minipeft's own package ({PACKAGE_DIR}); choose a "
                        "folder outside it")
    if "config.json" in (read_manifest(path) or {}):
        raise UserError(f"{flag_and_path(path, flag)}: is a model folder minipeft wrote (merge, pretrain); a run's "
                        "files would mix with the model's: choose another folder")


def check_folder_to_write_into(path, flag: str) -> None:
    """An output folder a command writes into (a run's, compare's) is absent or a folder, never a file nor a
    symbolic link: minipeft trusts no marker reached through a link, so a run written through one could never be
    resumed or replaced; the link's target is named instead."""
    path = Path(path)
    if path.is_symlink():
        if not path.exists():
            raise UserError(f"{flag_and_path(path, flag)}: is a symbolic link to {os.readlink(path)}, which does "
                            "not exist")
        raise UserError(f"{flag_and_path(path, flag)}: is a symbolic link (to {path.resolve()}); minipeft keeps the "
                        "record of its files only in a folder reached without one (a run written through it could "
                        f"not be resumed or replaced): give {flag} {path.resolve()}")
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag_and_path(path, flag)}: is a file, expected a directory")


def check_output_directory(path, flag: str, overwrite: bool) -> Path:
    """The rule for an output directory that is written whole (``merge --out``, ``pretrain --output_dir``): a
    new or empty one is written; an existing one is replaced only with ``overwrite`` and only when
    :func:`check_replaceable` accepts it; never inside a directory a running minipeft process holds."""
    path = Path(path)
    check_not_a_part(path, flag)
    if path.is_symlink() or (path.exists() and not path.is_dir()):  # --overwrite would not help: say so first
        what = "a symbolic link" if path.is_symlink() else "a file, not a directory"
        raise UserError(f"{flag_and_path(path, flag)}: is {what}; refusing to replace it, --overwrite or not: "
                        "choose a directory name")
    if (path.exists() or path.is_symlink()) and not is_empty_directory(path):
        if not overwrite:
            raise UserError(f"{flag_and_path(path, flag)}: already exists; choose another directory or pass "
                            "--overwrite")
        check_replaceable(path, flag)  # --overwrite replaces only what minipeft wrote
        check_model_folder(path, flag)  # ... and only of the same kind: a model folder
    check_unlocked(path.parent, flag, path)
    return path


# What a training run, its checkpoints or an adapter hold, and a model folder (merge's, pretrain's) never does.
NOT_IN_A_MODEL_FOLDER = ("adapter_config.json", "trainer_state.json", "train_config.json", "metrics.jsonl",
                         "checkpoints", "best", "comparison.md")


def check_model_folder(path: Path, flag: str) -> None:
    """A directory written whole (a model) replaces only a model folder: its ``config.json`` there, and nothing
    of a training run's or an adapter's (``merge --out RUN --overwrite`` replaced a run, checkpoints and all)."""
    found = [name for name in NOT_IN_A_MODEL_FOLDER if (path / name).exists()]
    if found or not (path / "config.json").is_file():
        what = f"it holds {found[0]}, a training run's or an adapter's" if found else "it holds no config.json"
        raise UserError(f"{flag_and_path(path, flag)}: is not a model folder ({what}); --overwrite replaces only a "
                        "model folder minipeft wrote: choose another directory")


def delete_marker_last(path) -> None:
    """Delete the directory ``path`` (minipeft's, out of sight as ``.old-*`` or ``.tmp-*``) with its ``.minipeft``
    marker last: a process killed part way through leaves a folder that still says it is minipeft's, which the
    next run deletes (:func:`remove_incomplete`), never one that looks like the user's. Errors are ignored, as
    ``shutil.rmtree(..., ignore_errors=True)`` does."""
    path = Path(path)
    try:
        entries = [entry for entry in path.iterdir() if entry.name != MARKER_NAME]
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()
        except OSError:
            pass
    try:
        (path / MARKER_NAME).unlink(missing_ok=True)  # last
        path.rmdir()
    except OSError:  # (something appeared meanwhile, or could not be deleted)
        shutil.rmtree(path, ignore_errors=True)


def remove_our_directory(path, flag: str = "") -> None:
    """Delete a directory minipeft wrote (refuses anything else, see :func:`check_replaceable`)."""
    path = Path(path)
    if not path.exists():
        return
    check_replaceable(path, flag)
    doomed = path.with_name(f".old-{path.name}-{os.getpid()}")
    os.rename(path, doomed)  # first out of sight (atomic), so a kill never leaves half of it
    delete_marker_last(doomed)
    forget(path)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link the files a user put into (or changed in) ``old`` (:func:`~minipeft.files.manifest.foreign_files`)
    into ``new``, at the same place: the new version keeps them (unrecorded, so still the user's), and deleting
    ``old`` loses nothing."""
    for path, why in foreign_files_and_why(old):
        target = new / path.relative_to(old)
        if target.exists() or target.is_symlink():
            raise UserError(f"{old}: holds {path}, which {why}, and the new version has a file of that name; "
                            "refusing to replace it: move it out first")
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
    save never deletes it nor stops on it (a ``.DS_Store``, a note); only a file of minipeft's that the user edited,
    which the new version would replace, stops it. The commands that replace a folder on the user's request check
    first and stop instead (:func:`check_replaceable`), so the user decides.
    """
    final = Path(final)
    check_replaceable(final, flag, foreign_files_stop=False)
    make_directory(final.parent)
    try:
        temporary = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
        os.chmod(temporary, usual_mode(directory=True))
    except OSError as error:
        raise cannot_write(final, error) from None
    previous = None
    try:
        (temporary / MARKER_NAME).write_text(manifest_text({}))  # from the start: a killed write's leftover is ours
        write(temporary)
        written = {path.relative_to(temporary).as_posix(): file_identity(path) if path.is_file() else DIRECTORY
                   for path in temporary.rglob("*") if path.name != MARKER_NAME}  # (chmod and rename keep mtime)
        (temporary / MARKER_NAME).write_text(manifest_text(written))
        for path in sorted(temporary.rglob("*")):
            os.chmod(path, usual_mode(directory=path.is_dir()))  # safetensors writes 0600 files
            fsync_path(path)  # files: their bytes; subdirectories: their entries
        if is_ours(final):  # (else it is absent or empty: check_replaceable refused anything more)
            _carry_over(final, temporary)  # a user's file in the old version stays (after the chmod: not ours)
        fsync_path(temporary)
        if final.exists():
            previous = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.rename(final, previous)
        os.rename(temporary, final)
        fsync_path(final.parent)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if previous is not None and not final.exists():
            os.rename(previous, final)  # put the old version back
        if is_write_failure(error):
            raise cannot_write(final, error) from None
        raise
    if previous is not None:
        delete_marker_last(previous)
    record_as_part(final)
    return final


def remove_incomplete(directory) -> None:
    """Delete the ``.tmp-*`` / ``.old-*`` directories that a killed minipeft process left in ``directory``
    (those holding the marker, or empty: a user's own ``.tmp-notes/`` stays), and the temporary file of a marker
    it was rewriting (``..minipeft.<random>.tmp``, :func:`~minipeft.files.atomic.replace_file`'s name)."""
    if Path(directory).is_dir():
        for path in Path(directory).iterdir():
            leftover = path.name.startswith((".tmp-", ".old-")) and path.is_dir()
            if leftover and (is_ours(path) or is_empty_directory(path)):
                delete_marker_last(path)
            elif path.name.startswith(f".{MARKER_NAME}.") and path.name.endswith(".tmp") and path.is_file() \
                    and not path.is_symlink():
                path.unlink(missing_ok=True)


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
