"""Issue #26, first class: minipeft never replaces a file it did not write.

Every path a user names follows one rule (:mod:`minipeft.files.safe_files`): a new name is written; an existing
file is replaced only with ``--overwrite`` and only when minipeft wrote it (its folder's ``.minipeft`` record, a
``.NAME.minipeft`` sidecar holding its sha256, or minipeft's Markdown header); an output that is an input (same
inode, not the same text) or a folder holding one is refused; inside a minipeft folder only the files its record
lists are replaced or deleted, and a foreign file stops the command; a marker reached through a symbolic link is
not trusted; a folder a running process holds (its ``OutputLock``) is left alone. Each refusal: exit 2, one
``error:`` line naming the flag and the path, no traceback, and the sha256 of every user file unchanged.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from test_faults import (GENERATE, MERGE, ROOT, TINY_RUN, builtin_model_available, digests, in_process, one_error,
                         records, write_records)

from minipeft.cli import main as cli_main
from minipeft.cli.train import main as train_main
from minipeft.files.lock import OutputLock
from minipeft.files.manifest import MARKER_NAME, foreign_files, is_ours, mark_as_ours, sidecar_of
from minipeft.files.safe_files import check_apart, write_directory_atomically, write_output_file, write_text_atomically

pytestmark = pytest.mark.skipif(not builtin_model_available(), reason="the built-in model is not built")

COMPARE = lambda argv: cli_main(["compare", *argv])  # noqa: E731
PRETRAIN = lambda argv: cli_main(["pretrain", *argv])  # noqa: E731
BUILTIN_DATA = lambda argv: cli_main(["builtin-data", *argv])  # noqa: E731


def refused(main, *args, capsys, fragments=(), keep=()):
    """Run ``main`` in process; assert exit 2, one ``error:`` line holding ``fragments``, ``keep`` unchanged."""
    before = digests(*keep)
    try:
        code, _, err = in_process(main, *args, capsys=capsys)
    except SystemExit as exit_info:  # argparse's usage errors
        code, err = exit_info.code, capsys.readouterr().err
    line = one_error(code, err, *fragments)
    assert digests(*keep) == before
    return line


def minipeft_folder(path: Path, files: dict) -> Path:
    """A folder as minipeft writes one: ``files`` inside, every one recorded in its ``.minipeft`` manifest."""
    def write(directory):
        for name, text in files.items():
            (Path(directory) / name).write_text(text)

    return write_directory_atomically(path, write)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One finished two-step run of the built-in model, trained in this process."""
    run_dir = tmp_path_factory.mktemp("files") / "run"
    assert cli_main(["train", *TINY_RUN, "--output_dir", str(run_dir)]) == 0
    return run_dir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run", symlinks=True))


# -- the manifest and its trust ------------------------------------------------------------------------------------
def test_a_marker_lists_what_minipeft_wrote_and_a_symlinked_one_is_not_trusted(tmp_path):
    folder = minipeft_folder(tmp_path / "out", {"a.json": "{}"})
    assert json.loads((folder / MARKER_NAME).read_text())["files"] == ["a.json"]
    assert foreign_files(folder) == []
    (folder / "notes.txt").write_text("mine")
    assert foreign_files(folder) == [folder / "notes.txt"]
    link = tmp_path / "link"
    link.symlink_to(folder)
    assert is_ours(folder) and not is_ours(link)  # a folder reached through a link
    user = tmp_path / "user"
    user.mkdir()
    (user / MARKER_NAME).symlink_to(folder / MARKER_NAME)
    assert not is_ours(user)  # a marker that is a link


def test_a_periodic_save_keeps_a_users_file_inside_the_folder_it_replaces(tmp_path):
    folder = minipeft_folder(tmp_path / "adapter", {"adapter_config.json": "{}"})
    (folder / ".DS_Store").write_text("Finder looked")
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("mine")
    before = {name: digest for name, digest in digests(folder).items() if MARKER_NAME not in name}
    minipeft_folder(folder, {"adapter_config.json": '{"r": 8}'})  # the next save of a running training
    assert (folder / "adapter_config.json").read_text() == '{"r": 8}'
    assert {name: digests(folder)[name] for name in before if "adapter_config" not in name} == \
        {name: digest for name, digest in before.items() if "adapter_config" not in name}
    assert foreign_files(folder) == [folder / ".DS_Store", folder / "notes"]  # still the user's, not recorded
    (folder / "clash.json").write_text("mine")
    kept = digests(folder)
    with pytest.raises(Exception, match="clash.json, which minipeft did not write"):
        minipeft_folder(folder, {"adapter_config.json": "{}", "clash.json": "{}"})
    assert digests(folder) == kept and not list(tmp_path.glob(".tmp-*"))


def test_identity_not_path_text_decides_what_is_an_input(tmp_path):
    data = write_records(tmp_path / "data.json", records(3))
    twin = tmp_path / "twin.json"
    os.link(data, twin)  # the same inode under another name
    with pytest.raises(Exception, match="is --dataset_path"):
        check_apart(twin, "--output_file", {"--dataset_path": data})


# -- pretrain ------------------------------------------------------------------------------------------------------
def test_pretrain_output_dir_replaces_only_a_folder_minipeft_wrote(tmp_path, capsys):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "paper.tex").write_text("my paper")
    refused(PRETRAIN, "--output_dir", user, capsys=capsys, fragments=[f"--output_dir {user}", "already exists"],
            keep=[user])
    refused(PRETRAIN, "--output_dir", user, "--overwrite", capsys=capsys,
            fragments=[f"--output_dir {user}", "minipeft did not write"], keep=[user])
    marked = minipeft_folder(tmp_path / "model", {"config.json": "{}"})
    (marked / "notes.txt").write_text("mine")
    refused(PRETRAIN, "--output_dir", marked, "--overwrite", capsys=capsys,
            fragments=[f"--output_dir {marked}", str(marked / "notes.txt"), "did not write"], keep=[marked])
    with OutputLock(tmp_path / "running"):
        refused(PRETRAIN, "--output_dir", tmp_path / "running" / "model", capsys=capsys,
                fragments=["--output_dir", "another minipeft process"])
    refused(PRETRAIN, "--output_dir", "", capsys=capsys, fragments=["argument --output_dir: an empty name"])


def test_pretrain_save_never_touches_a_users_dot_tmp_folder(tmp_path):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from minipeft.builtin import MODEL_DIR
    from minipeft.pretraining.pretrain import save

    staging = tmp_path / "model.tmp"  # the name the old save() deleted without a look
    staging.mkdir()
    (staging / "notes.txt").write_text("mine")
    before = digests(staging)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    save(model, AutoTokenizer.from_pretrained(MODEL_DIR), tmp_path / "model")
    assert digests(staging) == before and is_ours(tmp_path / "model")
    assert foreign_files(tmp_path / "model") == []
    save(model, AutoTokenizer.from_pretrained(MODEL_DIR), tmp_path / "model", overwrite=True)  # its own: replaced


def test_the_built_in_model_folder_is_recorded_as_minipeft_s():
    from minipeft.builtin import MODEL_DIR

    assert is_ours(MODEL_DIR) and foreign_files(MODEL_DIR) == []


# -- builtin-data --------------------------------------------------------------------------------------------------
def test_builtin_data_replaces_only_its_own_unchanged_file(tmp_path, capsys):
    users = tmp_path / "data.json"
    users.write_text('[{"instruction": "mine", "input": "", "output": "mine"}]')
    for extra in ((), ("--overwrite",)):
        refused(BUILTIN_DATA, users, *extra, capsys=capsys, fragments=[str(users), "minipeft did not write"],
                keep=[users])
    ours = tmp_path / "built.json"
    assert in_process(BUILTIN_DATA, ours, capsys=capsys)[0] == 0 and sidecar_of(ours).is_file()
    code, out, _ = in_process(BUILTIN_DATA, ours, capsys=capsys)  # the same bytes: nothing to replace
    assert code == 0 and "nothing written" in out
    with open(ours, "a") as file:
        file.write(" ")  # edited since: no longer only minipeft's
    refused(BUILTIN_DATA, ours, "--overwrite", capsys=capsys, fragments=[str(ours), "changed since"], keep=[ours])
    refused(BUILTIN_DATA, "", capsys=capsys, fragments=["an empty name"])


def test_builtin_data_leaves_the_package_s_file_alone_when_it_is_current(capsys):
    from minipeft.builtin import default_dataset_path

    before = digests(default_dataset_path())
    code, out, _ = in_process(BUILTIN_DATA, capsys=capsys)
    assert code == 0 and "nothing written" in out and digests(default_dataset_path()) == before


def test_a_single_file_output_never_replaces_one_file_of_a_folder_minipeft_wrote(tmp_path, capsys):
    """A file recorded in an adapter's or a run's manifest is minipeft's, but as part of that folder:
    ``builtin-data RUN/adapter/adapter_config.json --overwrite`` replaced the adapter's config with a data set."""
    adapter = minipeft_folder(tmp_path / "adapter", {"adapter_config.json": '{"peft_type": "LORA"}'})
    config = adapter / "adapter_config.json"
    line = refused(BUILTIN_DATA, config, "--overwrite", capsys=capsys, keep=[config],
                   fragments=[str(config), "part of a folder minipeft wrote"])
    assert "--overwrite or not" in line
    data = adapter / "answers.json"  # a file the user named, written into the same folder: it is replaced
    write_output_file(data, "[]", "builtin-data")  # ... and stays the user's in the folder (round six: a later
    assert sidecar_of(data).is_file() and set(foreign_files(adapter)) == {data, sidecar_of(data)}  # save lost it)
    assert in_process(BUILTIN_DATA, data, "--overwrite", capsys=capsys)[0] == 0 and data.read_text() != "[]"


# -- generate --output_file ----------------------------------------------------------------------------------------
def test_generate_output_file_never_replaces_data_a_document_or_a_prompts_file(tmp_path, capsys):
    data = write_records(tmp_path / "data.json", records(3))
    readme = Path(shutil.copy(ROOT / "README.md", tmp_path / "README.md"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Name a color.\n")
    twin = tmp_path / "twin.txt"
    os.link(prompts, twin)
    keep = [data, readme, prompts]
    for target in (data, readme):
        for extra in ((), ("--overwrite",)):
            refused(GENERATE, "--model", "builtin", "--prompt", "Hi", "--output_file", target, *extra, capsys=capsys,
                    fragments=[f"--output_file {target}", "minipeft did not write"], keep=keep)
    refused(GENERATE, "--model", "builtin", "--prompts_file", prompts, "--output_file", twin, capsys=capsys,
            fragments=[f"--output_file {twin}", "is --prompts_file"], keep=keep)
    answers = tmp_path / "answers.jsonl"
    generate = ["--model", "builtin", "--prompt", "Hi", "--max_new_tokens", "2", "--no_stream", "--output_file", answers]
    assert in_process(GENERATE, *generate, capsys=capsys)[0] == 0
    refused(GENERATE, *generate, capsys=capsys, fragments=[f"--output_file {answers}", "pass --overwrite"],
            keep=[answers])
    assert in_process(GENERATE, *generate, "--overwrite", capsys=capsys)[0] == 0  # its own file, unchanged
    assert len(answers.read_text().splitlines()) == 1
    with OutputLock(tmp_path / "running"):
        refused(GENERATE, *generate[:-1], tmp_path / "running" / "answers.jsonl", capsys=capsys,
                fragments=["--output_file", "another minipeft process"])


# -- compare --------------------------------------------------------------------------------------------------------
def test_compare_report_and_output_dir_replace_nothing_of_the_users(tmp_path, capsys):
    data = write_records(tmp_path / "data.json", records(20))
    readme = Path(shutil.copy(ROOT / "README.md", tmp_path / "README.md"))
    base = ["--dataset_path", data, "--methods", "lora", "--max_steps", "1"]
    keep = [data, readme]
    for extra in ((), ("--overwrite",)):
        refused(COMPARE, *base, "--output_dir", tmp_path / "out", "--report", readme, *extra, capsys=capsys,
                fragments=[f"--report {readme}", "minipeft did not write"], keep=keep)
    refused(COMPARE, *base, "--output_dir", tmp_path / "out", "--report", data, capsys=capsys,
            fragments=[f"--report {data}", "is --dataset_path"], keep=keep)
    refused(COMPARE, *base, "--output_dir", tmp_path, capsys=capsys,
            fragments=[f"--output_dir {tmp_path}", "contains --dataset_path"], keep=keep)
    users = tmp_path / "mine"
    users.mkdir()
    (users / "comparison.md").write_text("my notes")
    (users / "report.md").write_text("my report")
    for extra in ((), ("--overwrite",)):
        refused(COMPARE, *base, "--output_dir", users, *extra, capsys=capsys,
                fragments=[f"--output_dir {users}", "minipeft did not write"], keep=[users, *keep])
    marked = tmp_path / "marked"
    marked.mkdir()
    mark_as_ours(marked)
    (marked / "comparison.md").write_text("my notes, put into a minipeft folder")
    refused(COMPARE, *base, "--output_dir", marked, capsys=capsys,
            fragments=[f"--output_dir {marked}", "pass --overwrite"], keep=[marked, *keep])
    refused(COMPARE, *base, "--output_dir", marked, "--overwrite", capsys=capsys,
            fragments=[str(marked / "comparison.md"), "minipeft did not write"], keep=[marked, *keep])
    with OutputLock(tmp_path / "running"):
        refused(COMPARE, *base, "--output_dir", tmp_path / "running", capsys=capsys,
                fragments=[f"--output_dir {tmp_path / 'running'}", "another minipeft process"])
    refused(COMPARE, *base, "--report", "", capsys=capsys, fragments=["argument --report: an empty name"])
    assert not (tmp_path / "out").exists()


def test_a_report_minipeft_wrote_is_replaced_only_with_overwrite(tmp_path):
    from minipeft.cli.compare_report import markdown_report  # noqa: F401 (the header it writes is the mark)
    from minipeft.files.safe_files import check_output_file

    page = tmp_path / "comparison.md"
    page.write_text("# PEFT methods compared\n\n<!-- Written by `python -m minipeft compare --report`; ... -->\n")
    with pytest.raises(Exception, match="pass --overwrite"):
        check_output_file(page, "--report", overwrite=False)
    check_output_file(page, "--report", overwrite=True)
    other = write_output_file(tmp_path / "notes.md", "plain text\n", "--report")  # no header: its sidecar says so
    check_output_file(other, "--report", overwrite=True)
    write_text_atomically(other, "edited\n")
    with pytest.raises(Exception, match="changed since"):
        check_output_file(other, "--report", overwrite=True)


# -- merge --out and train --overwrite_output_dir on a minipeft folder ----------------------------------------------
def test_merge_overwrite_refuses_a_foreign_file_a_live_run_and_a_linked_marker(run_copy, tmp_path, capsys):
    adapter = run_copy / "adapter"
    merged = minipeft_folder(tmp_path / "merged", {"config.json": "{}"})
    (merged / "notes.txt").write_text("mine")
    refused(MERGE, "--adapter", adapter, "--out", merged, "--overwrite", capsys=capsys,
            fragments=[f"--out {merged}", str(merged / "notes.txt"), "did not write"], keep=[merged, run_copy])
    live = minipeft_folder(tmp_path / "live", {"metrics.jsonl": "{}\n"})
    with OutputLock(live):  # a training run writing there
        refused(MERGE, "--adapter", adapter, "--out", live, "--overwrite", capsys=capsys,
                fragments=[f"--out {live}", "another minipeft process"], keep=[live, run_copy])
        refused(MERGE, "--adapter", adapter, "--out", live / "merged", capsys=capsys,
                fragments=[f"--out {live / 'merged'}", "another minipeft process"], keep=[live, run_copy])
    users = tmp_path / "users"
    users.mkdir()
    (users / "paper.tex").write_text("my paper")
    (users / MARKER_NAME).symlink_to(live / MARKER_NAME)
    refused(MERGE, "--adapter", adapter, "--out", users, "--overwrite", capsys=capsys,
            fragments=[f"--out {users}", "minipeft did not write"], keep=[users, run_copy])
    link = tmp_path / "link"
    link.symlink_to(live)
    refused(MERGE, "--adapter", adapter, "--out", link, "--overwrite", capsys=capsys,
            fragments=[f"--out {link}", "refusing to replace it"], keep=[live, run_copy])
    refused(MERGE, "--adapter", adapter, "--out", "", capsys=capsys, fragments=["argument --out: an empty name"])


def test_merge_overwrite_replaces_its_own_output(run_copy, tmp_path, capsys):
    out = tmp_path / "merged"
    assert in_process(MERGE, "--adapter", run_copy / "adapter", "--out", out, capsys=capsys)[0] == 0
    assert foreign_files(out) == []
    code, _, err = in_process(MERGE, "--adapter", run_copy / "adapter", "--out", out, "--overwrite", capsys=capsys)
    assert code == 0, err


@pytest.mark.parametrize("where", ["best", "checkpoints", "checkpoints/{checkpoint}"])
def test_overwrite_output_dir_refuses_a_users_file_inside_the_run(where, run_copy, capsys):
    checkpoint = sorted((run_copy / "checkpoints").glob("step-*"))[-1].name
    notes = run_copy / where.format(checkpoint=checkpoint) / "notes.txt"
    notes.write_text("mine")
    refused(train_main, *TINY_RUN, "--output_dir", run_copy, "--overwrite_output_dir", capsys=capsys, fragments=["--output_dir", str(notes), "did not write"],
            keep=[run_copy])


def test_overwrite_output_dir_replaces_a_run_minipeft_wrote_whole(run_copy, capsys):
    assert foreign_files(run_copy) == []  # every file the run wrote is in a record
    code, _, err = in_process(train_main, *TINY_RUN, "--output_dir", run_copy, "--overwrite_output_dir", capsys=capsys)
    assert code == 0, err
    assert foreign_files(run_copy) == []


def test_compare_reruns_over_its_own_outputs_only_with_overwrite(tmp_path, capsys):
    data = write_records(tmp_path / "data.json", records(24))
    out, page = tmp_path / "out", tmp_path / "page.md"
    argv = ["--dataset_path", data, "--methods", "lora", "--max_steps", "1", "--max_records", "20", "--val_size", "4",
            "--max_length", "64", "--batch_size", "2", "--speed_tokens", "2", "--generation_tokens", "2",
            "--generation_prompts", "1", "--eval_max_batches", "1", "--device", "cpu", "--output_dir", out,
            "--report", page]
    code, _, err = in_process(COMPARE, *argv, capsys=capsys)
    assert code == 0, err
    assert foreign_files(out) == [] and sidecar_of(page).is_file()  # everything it wrote is in a record
    refused(COMPARE, *argv, capsys=capsys, fragments=[f"--output_dir {out}", "pass --overwrite"], keep=[out, page])
    code, _, err = in_process(COMPARE, *argv, "--overwrite", capsys=capsys)
    assert code == 0, err
    assert foreign_files(out) == []
    (out / "lora" / "adapter" / "notes.txt").write_text("mine")
    refused(COMPARE, *argv, "--overwrite", capsys=capsys,
            fragments=[str(out / "lora" / "adapter" / "notes.txt"), "did not write"], keep=[out, page, data])


def test_pruning_old_checkpoints_keeps_one_that_holds_a_users_file(tmp_path, capsys):
    """--save_total_limit deletes old checkpoints minipeft wrote, and keeps (and says so, once) one where the
    user put a file of their own."""
    out = tmp_path / "run"
    common = [*TINY_RUN, "--save_every", "1", "--save_total_limit", "1", "--output_dir", out]
    code, _, err = in_process(train_main, *common, capsys=capsys)
    assert code == 0, err
    assert [path.name for path in (out / "checkpoints").glob("step-*")] == ["step-2"]  # step-1 pruned
    note = out / "checkpoints" / "step-2" / "my_notes.txt"
    note.write_text("mine")
    code, _, err = in_process(train_main, "--output_dir", out, "--max_steps", "4", "--resume", "latest",
                              capsys=capsys)
    assert code == 0, err
    assert sorted(path.name for path in (out / "checkpoints").glob("step-*")) == ["step-2", "step-4"]
    assert note.read_text() == "mine" and err.count("holds files minipeft did not write; kept") == 1


def test_no_command_writes_into_the_built_in_models_folder(tmp_path, capsys):
    """``--model builtin`` reads minipeft/builtin/model: training into it or merging over it is refused like
    any other output that is an input (it was replaced with exit 0)."""
    from minipeft.builtin import MODEL_DIR

    before = digests(MODEL_DIR)
    code, _, err = in_process(train_main, *TINY_RUN, "--output_dir", MODEL_DIR, "--overwrite_output_dir",
                              capsys=capsys)
    one_error(code, err, "--output_dir", "--model")
    run_dir = tmp_path / "run"
    assert in_process(train_main, *TINY_RUN, "--output_dir", run_dir, capsys=capsys)[0] == 0
    code, _, err = in_process(MERGE, "--adapter", run_dir / "adapter", "--out", MODEL_DIR, "--overwrite",
                              capsys=capsys)
    one_error(code, err, "--out", "is the adapter's base model")
    assert digests(MODEL_DIR) == before


def test_a_run_into_a_marked_folder_it_did_not_create_records_its_metrics(tmp_path, capsys):
    """A copied adapter folder (its .minipeft came along) used as --output_dir: the run's metrics.jsonl is
    recorded, so a later --overwrite_output_dir does not blame minipeft's own file on the user."""
    run_dir = tmp_path / "run"
    assert in_process(train_main, *TINY_RUN, "--output_dir", run_dir, capsys=capsys)[0] == 0
    copied = Path(shutil.copytree(run_dir / "adapter", tmp_path / "myadapter"))
    assert is_ours(copied)
    code, _, err = in_process(train_main, *TINY_RUN, "--output_dir", copied, capsys=capsys)
    assert code == 0, err
    code, _, err = in_process(train_main, *TINY_RUN, "--output_dir", copied, "--overwrite_output_dir",
                              capsys=capsys)
    assert code == 0, err


def test_an_output_onto_the_adapters_base_names_it_as_such_when_no_model_flag_was_given(tmp_path, capsys):
    from data_fixtures import save_tiny_run_inputs

    model_dir, records_path = save_tiny_run_inputs(tmp_path / "inputs", width=32)
    run_dir = tmp_path / "run"
    assert in_process(train_main, *TINY_RUN, "--model", model_dir, "--dataset_path", records_path,
                      "--output_dir", run_dir, capsys=capsys)[0] == 0
    before = digests(model_dir)
    code, _, err = in_process(MERGE, "--adapter", run_dir / "adapter", "--out", model_dir, "--overwrite",
                              capsys=capsys)
    one_error(code, err, "--out", "is the adapter's base model")
    assert "--model" not in err and digests(model_dir) == before
