"""Issue #26, third round: what a ``.minipeft`` manifest vouches for, and how refusals name what is there.

A manifest records each file's identity (sha256 for a small file, size and modification time for a large one),
so a file of minipeft's that the user edited afterwards is the user's: ``--overwrite`` and
``--overwrite_output_dir`` stop on it, naming it. An older manifest (names only) still vouches by name.
"""

import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_faults import GENERATE, MERGE, TINY_RUN, builtin_model_available, in_process
from test_faults_files import finished_run, refused, run_copy  # noqa: F401 (fixtures)

from minipeft.cli.train import main as train_main
from minipeft.core.errors import UserError
from minipeft.files import manifest
from minipeft.files.manifest import (APPENDED, CHANGED, DIRECTORY, MARKER_NAME, UNLISTED, file_identity, foreign_files,
                                     foreign_files_and_why, is_older_marker, mark_as_ours, marker_problem,
                                     read_manifest, record_as_ours)
from minipeft.files.safe_files import (check_ours_to_replace, check_replaceable, write_directory_atomically,
                                       write_text_atomically)

needs_model = pytest.mark.skipif(not builtin_model_available(), reason="the built-in model is not built")


def minipeft_folder(path: Path, files: dict) -> Path:
    """A folder as minipeft writes one: ``files`` (name -> bytes) inside, each recorded in its manifest."""
    def write(directory):
        for name, data in files.items():
            (Path(directory) / name).write_bytes(data)

    return write_directory_atomically(path, write)


# -- 1. content identity --------------------------------------------------------------------------------------------
def test_a_small_file_is_identified_by_its_sha256_a_large_one_by_size_and_time(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "HASHED_FILE_BYTES", 16)  # "large": more than 16 bytes, here
    folder = minipeft_folder(tmp_path / "out", {"config.json": b"{}", "weights.bin": b"w" * 64})
    recorded = json.loads((folder / MARKER_NAME).read_text())
    assert recorded["files"] == ["config.json", "weights.bin"]
    assert set(recorded["identity"]["config.json"]) == {"size", "sha256"}
    assert recorded["identity"]["weights.bin"] == {"size": 64, "mtime_ns": (folder / "weights.bin").stat().st_mtime_ns}
    assert foreign_files(folder) == []
    check_replaceable(folder, "--out")  # unchanged: minipeft's to replace


def test_a_file_the_user_edited_in_a_minipeft_folder_is_the_users(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "HASHED_FILE_BYTES", 16)
    folder = minipeft_folder(tmp_path / "out", {"config.json": b'{"a": 1}', "weights.bin": b"w" * 64})
    (folder / "config.json").write_bytes(b'{"a": 2}')  # the same size, other bytes
    assert foreign_files_and_why(folder) == [(folder / "config.json", CHANGED)]
    with pytest.raises(UserError, match=f"--out {folder}: holds {folder / 'config.json'}, which was changed after"):
        check_replaceable(folder, "--out")
    with pytest.raises(UserError, match="config.json, which was changed after minipeft wrote it"):
        check_ours_to_replace(folder / "config.json", "--output_dir")
    (folder / "config.json").write_bytes(b'{"a": 1}')  # put back: minipeft's again
    weights = folder / "weights.bin"
    written = weights.stat().st_mtime_ns
    with open(weights, "r+b") as file:  # edited in place, the same size
        file.write(b"x")
    os.utime(weights, ns=(written + 10**9, written + 10**9))  # (the clock may not tick between two writes this fast)
    assert foreign_files(folder) == [weights]
    with pytest.raises(UserError, match="weights.bin, which was changed after minipeft wrote it"):
        check_replaceable(folder, "--out")


def test_minipeft_rewriting_its_own_file_records_the_new_identity(tmp_path):
    folder = minipeft_folder(tmp_path / "out", {"config.json": b"{}"})
    write_text_atomically(folder / "config.json", '{"longer": true}\n')
    assert foreign_files(folder) == []
    assert read_manifest(folder)["config.json"] == file_identity(folder / "config.json")


def test_an_older_manifest_of_names_vouches_by_name_and_is_upgraded_on_rewrite(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / MARKER_NAME).write_text(json.dumps({"written_by": "minipeft", "files": ["a.json", "sub"]}))
    (folder / "a.json").write_text("{}")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.json").write_text("{}")
    assert foreign_files(folder) == [folder / "sub" / "b.json"]  # nested names are listed relative to the folder
    (folder / "sub" / "b.json").unlink()
    assert foreign_files(folder) == []
    check_replaceable(folder, "--out")
    write_text_atomically(folder / "a.json", "[]")
    assert read_manifest(folder) == {"a.json": file_identity(folder / "a.json"), "sub": None}


def test_a_file_minipeft_appends_to_is_recorded_by_its_name(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    mark_as_ours(folder)
    record_as_ours(folder / "metrics.jsonl", appended=True)  # before its first line, as a run does
    with open(folder / "metrics.jsonl", "a") as file:
        file.write('{"step": 1}\n')
    write_text_atomically(folder / "metrics.jsonl", '{"step": 1}\n{"step": 2}\n')  # a resumed run rewrites it
    with open(folder / "metrics.jsonl", "a") as file:
        file.write('{"step": 3}\n')
    assert read_manifest(folder)["metrics.jsonl"] == APPENDED
    assert foreign_files(folder) == []


@needs_model
def test_merge_overwrite_refuses_a_merged_folder_whose_config_the_user_edited(run_copy, tmp_path, capsys):
    out = tmp_path / "merged"
    assert in_process(MERGE, "--adapter", run_copy / "adapter", "--out", out, capsys=capsys)[0] == 0
    config = json.loads((out / "config.json").read_text())
    config["my_note"] = "tuned by hand"
    (out / "config.json").write_text(json.dumps(config))
    refused(MERGE, "--adapter", run_copy / "adapter", "--out", out, "--overwrite", capsys=capsys,
            fragments=[f"--out {out}", str(out / "config.json"), "changed after minipeft wrote it"],
            keep=[out, run_copy])


@needs_model
@pytest.mark.parametrize("edited", ["adapter/adapter_config.json", "train_config.json", "best/adapter_config.json"])
def test_overwrite_output_dir_refuses_a_run_file_the_user_edited(edited, run_copy, capsys):
    path = run_copy / edited
    path.write_text(path.read_text().replace("{", '{"edited": true, ', 1))
    refused(train_main, *TINY_RUN, "--output_dir", run_copy, "--overwrite_output_dir", capsys=capsys,
            fragments=["--output_dir", str(path), "changed after minipeft wrote it"], keep=[run_copy])


# -- 2. a symbolic link where the marker should be -----------------------------------------------------------------
def test_the_refusal_says_a_symlinked_marker_is_not_trusted(tmp_path):
    ours = minipeft_folder(tmp_path / "ours", {"a.json": b"{}"})
    users = tmp_path / "users"
    users.mkdir()
    (users / "paper.tex").write_text("my paper")
    assert marker_problem(users) == f"no {MARKER_NAME} marker"
    (users / MARKER_NAME).symlink_to(ours / MARKER_NAME)
    assert "is a symbolic link, which minipeft does not trust" in marker_problem(users)
    with pytest.raises(UserError, match=f"--out {users}: .*its {MARKER_NAME} marker is a symbolic link, which "
                                        "minipeft does not trust"):
        check_replaceable(users, "--out")
    link = tmp_path / "link"
    link.symlink_to(ours)
    assert "reached through one" in marker_problem(link)


@needs_model
def test_merge_and_train_say_a_symlinked_marker_is_not_trusted(run_copy, tmp_path, capsys):
    users = tmp_path / "users"
    users.mkdir()
    (users / "paper.tex").write_text("my paper")
    (users / MARKER_NAME).symlink_to(run_copy / MARKER_NAME)
    refused(MERGE, "--adapter", run_copy / "adapter", "--out", users, "--overwrite", capsys=capsys,
            fragments=[f"--out {users}", "marker is a symbolic link, which minipeft does not trust"],
            keep=[users, run_copy])
    (users / "adapter").mkdir()  # an earlier run's output, as far as the names go
    (users / "adapter" / "notes.txt").write_text("mine")
    refused(train_main, *TINY_RUN, "--output_dir", users, "--overwrite_output_dir", capsys=capsys,
            fragments=[f"--output_dir {users}", "marker is a symbolic link, which minipeft does not trust"],
            keep=[users, run_copy])


# -- 3. modify --save_adapter onto something that is there -----------------------------------------------------------
@needs_model
@pytest.mark.parametrize("what, expected", [
    ("dataset folder", "already holds files (data.json)"),
    ("model folder", "already holds a model (config.json), not an adapter"),
    ("adapter folder", "already holds an adapter (adapter_config.json), which this fresh, untrained one would replace"),
    ("file", "is a file, expected a new directory"),
    ("link", "is a symbolic link, expected a new directory"),
])
def test_modify_save_adapter_says_what_is_already_there(what, expected, tmp_path, capsys):
    from minipeft.builtin import MODEL_DIR
    from minipeft.cli.modify import main as modify_main

    data = tmp_path / "data"
    data.mkdir()
    (data / "data.json").write_text('[{"instruction": "a", "output": "b"}]')
    model = Path(shutil.copytree(MODEL_DIR, tmp_path / "model"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    (tmp_path / "empty").mkdir()
    target = {"dataset folder": data, "model folder": model, "adapter folder": adapter,
              "file": data / "data.json", "link": tmp_path / "link"}[what]
    refused(modify_main, "--model", "builtin", "--save_adapter", target, capsys=capsys,
            fragments=[f"--save_adapter {target}: {expected}"], keep=[tmp_path])
    assert sorted(path.name for path in (tmp_path / "empty").iterdir()) == []


# -- 4. a FIFO where a file should be: one line, never a read that waits forever -------------------------------------
@contextmanager
def within(seconds: int):
    """Fail, instead of hanging the suite, when the body blocks (a FIFO opened for reading waits for a writer)."""
    def give_up(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s: something opened a FIFO")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@needs_model
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "generation_config.json"])
def test_a_fifo_in_a_model_folder_is_named_as_not_a_regular_file(name, tmp_path, capsys):
    from minipeft.builtin import MODEL_DIR
    from minipeft.cli.modify import main as modify_main
    from minipeft.loading.checkpoint_dir import checkpoint_tensors

    model = Path(shutil.copytree(MODEL_DIR, tmp_path / "model"))
    (model / name).unlink()
    os.mkfifo(model / name)
    expected = [f"--model {model / name}: is a FIFO (named pipe), not a regular file"]
    with within(60):
        with pytest.raises(UserError, match="is a FIFO"):
            checkpoint_tensors(model)
        refused(modify_main, "--model", model, "--table", "none", capsys=capsys, fragments=expected)
        refused(GENERATE, "--model", model, "--prompt", "hi", "--max_new_tokens", "2", capsys=capsys,
                fragments=expected)
        refused(train_main, *TINY_RUN, "--model", model, "--output_dir", tmp_path / "out", capsys=capsys,
                fragments=expected)
    assert not (tmp_path / "out" / "adapter").exists()


@needs_model
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_fifo_in_an_adapter_folder_is_one_line(name, finished_run, tmp_path, capsys):
    adapter = Path(shutil.copytree(finished_run / "adapter", tmp_path / "adapter"))
    (adapter / name).unlink()
    os.mkfifo(adapter / name)
    with within(60):
        refused(GENERATE, "--adapter", adapter, "--prompt", "hi", "--max_new_tokens", "2", capsys=capsys,
                fragments=[str(adapter / name), "is a FIFO (named pipe)"])
        refused(MERGE, "--adapter", adapter, "--out", tmp_path / "merged", capsys=capsys,
                fragments=[str(adapter / name), "is a FIFO (named pipe)"])
    assert not (tmp_path / "merged").exists()


@needs_model
def test_a_fifo_as_the_dataset_is_one_line(tmp_path, capsys):
    fifo = tmp_path / "data.json"
    os.mkfifo(fifo)
    with within(60):
        refused(train_main, *TINY_RUN, "--dataset_path", fifo, "--output_dir", tmp_path / "out", capsys=capsys,
                fragments=[f"--dataset_path {fifo}: is a FIFO (named pipe)"])


# -- 5. an older plain-text marker -----------------------------------------------------------------------------------
OLDER_MARKER_TEXT = "written by minipeft; minipeft may replace or delete this directory\n"  # what minipeft wrote then


def test_an_older_plain_text_marker_vouches_for_no_file_and_says_how_to_proceed(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / MARKER_NAME).write_text(OLDER_MARKER_TEXT)
    (folder / "config.json").write_text("{}")
    assert is_older_marker(folder) and read_manifest(folder) == {}
    assert foreign_files_and_why(folder) == [(folder / "config.json", UNLISTED)]
    with pytest.raises(UserError, match=f"--out {folder}: holds {folder / 'config.json'}, which minipeft may have "
                                        "written, but its .minipeft marker is no record of its files .*if nothing in "
                                        f"{folder} is yours, delete it yourself, else choose another directory"):
        check_replaceable(folder, "--out")
    assert not is_older_marker(minipeft_folder(tmp_path / "new", {"a.json": b"{}"}))


@needs_model
def test_overwrite_output_dir_over_a_run_with_older_markers_says_how_to_proceed(run_copy, capsys):
    for marker in run_copy.rglob(MARKER_NAME):
        marker.write_text(OLDER_MARKER_TEXT)
    refused(train_main, *TINY_RUN, "--output_dir", run_copy, "--overwrite_output_dir", capsys=capsys,
            fragments=["--output_dir", "is no record of its files (an older minipeft's plain text, or edited)",
                       "delete it yourself"], keep=[run_copy])


def test_a_file_put_where_minipeft_wrote_a_folder_is_the_users(tmp_path):
    def write(directory):
        (Path(directory) / "adapter").mkdir()
        (Path(directory) / "adapter" / "weights.bin").write_bytes(b"w")

    folder = write_directory_atomically(tmp_path / "run", write)
    assert read_manifest(folder)["adapter"] == DIRECTORY
    shutil.rmtree(folder / "adapter")
    (folder / "adapter").write_text("my notes, under the folder's name")
    assert foreign_files_and_why(folder) == [(folder / "adapter", CHANGED)]
