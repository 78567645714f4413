"""Collation, padding sides, packing, the length-grouped sampler and the split.

The losses here are computed the way the training loss does it: labels are shifted once, here, so that the
logits at position t are scored against the label at t + 1.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_fixtures import RECORDS, tiny_gpt2, tiny_llama, tiny_tokenizer  # noqa: F401 (fixture)
from minipeft.data.batching import (InstructionDataset, LengthGroupedBatchSampler, PaddingCollator, model_inputs,
                                    split_indices)
from minipeft.data.loading import Record
from minipeft.data.packing import PackedDataset, pack_by_length
from minipeft.data.report import padding_share
from minipeft.data.tokenization import pad_token_id, tokenize_records
from minipeft.core.errors import UserError

MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(scope="module")
def tokenized(tiny_tokenizer):  # noqa: F811
    records = [Record(r["instruction"], r["input"], r["output"], str(i)) for i, r in enumerate(RECORDS)]
    return tokenize_records(records, tiny_tokenizer, "alpaca", max_length=128)


def collate(tokenized, indices, train_on_inputs=False, **options):
    dataset = InstructionDataset(tokenized, indices, train_on_inputs)
    collator = PaddingCollator(pad_token_id=0, max_length=128, **options)  # 0 is the EOS id: pad = eos, as GPT-2
    return collator([dataset[i] for i in range(len(dataset))])


def token_losses(model, batch):
    """(B, T-1) cross-entropy of every target token; 0 where the label is -100."""
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits.float()  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], reduction="none")


@pytest.mark.parametrize("options", [
    {"padding_side": "right"}, {"padding_side": "left"}, {"pad_to_multiple_of": 8}, {"padding": "max_length"}])
def test_collated_tensors_share_one_shape_and_padding_is_never_a_target(tokenized, options):
    indices = list(range(len(tokenized)))
    batch = collate(tokenized, indices, **options)
    lengths = tokenized.lengths
    shapes = {tuple(batch[name].shape) for name in ("input_ids", "attention_mask", "labels")}
    assert len(shapes) == 1
    width = shapes.pop()[1]
    expected = {"padding": 128} if options.get("padding") else {}
    if "pad_to_multiple_of" in options:
        expected = {"padding": math.ceil(lengths.max() / 8) * 8}
    assert width == expected.get("padding", lengths.max())
    assert batch["attention_mask"].sum(1).tolist() == lengths.tolist()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    # labels are aligned (unshifted): every target is the input token at the same position
    targets = batch["labels"] != -100
    assert torch.equal(batch["labels"][targets], batch["input_ids"][targets])
    # the real EOS stays a target although the pad id is the EOS id
    assert ((batch["labels"] == 0).sum(1) == 1).sum() == (~tokenized.response_cut).sum()


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_left_and_right_padding_give_the_same_loss(tokenized, architecture):
    model = MODELS[architecture](vocab_size=400, attention="sdpa")
    indices = list(range(len(tokenized)))
    right, left = (collate(tokenized, indices, padding_side=side) for side in ("right", "left"))
    right_loss, left_loss = token_losses(model, right).sum(1), token_losses(model, left).sum(1)
    torch.testing.assert_close(left_loss, right_loss, rtol=1e-5, atol=1e-4)
    if architecture == "llama":  # rotary positions are relative: shifting every position changes nothing
        return
    # why model_inputs passes position_ids: without them GPT-2's left-padded records sit at shifted
    # absolute positions and their loss changes
    with torch.no_grad():
        logits = model(input_ids=left["input_ids"], attention_mask=left["attention_mask"]).logits
    naive = F.cross_entropy(logits[:, :-1].transpose(1, 2), left["labels"][:, 1:], reduction="none").sum(1)
    assert (naive - right_loss).abs().max() > 1e-3


def test_model_inputs_pass_positions_only_where_the_defaults_are_wrong(tokenized):
    indices = list(range(len(tokenized)))
    right, left = (model_inputs(collate(tokenized, indices, padding_side=side)) for side in ("right", "left"))
    assert set(right) == {"input_ids", "attention_mask"}
    assert set(left) == {"input_ids", "attention_mask", "position_ids"}
    first_real = left["attention_mask"].argmax(1)
    assert (left["position_ids"].gather(1, first_real[:, None]) == 0).all()
    examples = InstructionDataset(tokenized, indices)
    packed = PackedDataset(examples, max_length=256)
    packed_inputs = model_inputs(PaddingCollator(0)([packed[i] for i in range(len(packed))]))
    assert set(packed_inputs) == {"input_ids", "position_ids", "use_cache"} and packed_inputs["use_cache"] is False


def per_record_losses_packed(model, packed_dataset, batch):
    """{example index: summed loss} from a packed batch, splitting each row at the restarts of position_ids."""
    losses = token_losses(model, batch)  # (B, T-1)
    starts = (batch["position_ids"] == 0) & (batch["attention_mask"] == 1)
    segment = starts.cumsum(1) - 1  # (B, T) which record of the row a position belongs to
    result = {}
    for row, bin_ in enumerate(packed_dataset.bins):
        for k, example_index in enumerate(bin_):
            result[example_index] = losses[row][segment[row, 1:] == k].sum().item()
    return result


@pytest.mark.parametrize("architecture, attention",
                         [("gpt2", "eager"), ("gpt2", "sdpa"), ("llama", "eager"), ("llama", "sdpa")])
def test_packing_gives_the_same_per_record_loss_as_unpacked_batches(tokenized, architecture, attention):
    model = MODELS[architecture](vocab_size=400, attention=attention)
    examples = InstructionDataset(tokenized, range(len(tokenized)), train_on_inputs=True)
    packed = PackedDataset(examples, max_length=256)
    assert len(packed) < len(examples)  # several records do share a sequence
    collator = PaddingCollator(pad_token_id=0)
    packed_batch = collator([packed[i] for i in range(len(packed))])
    packed_losses = per_record_losses_packed(model, packed, packed_batch)
    unpacked_losses = token_losses(model, collator([examples[i] for i in range(len(examples))])).sum(1)
    for index in range(len(examples)):
        assert packed_losses[index] == pytest.approx(unpacked_losses[index].item(), rel=1e-4, abs=1e-4)
    # control: the same packed rows with a plain attention mask let records see each other, and it shows
    leaky = dict(packed_batch, attention_mask=torch.ones_like(packed_batch["input_ids"]))
    with torch.no_grad():
        logits = model(input_ids=leaky["input_ids"], attention_mask=leaky["attention_mask"],
                       position_ids=leaky["position_ids"]).logits
    leaky_total = F.cross_entropy(logits[:, :-1].transpose(1, 2), leaky["labels"][:, 1:], reduction="sum")
    assert abs(leaky_total.item() - unpacked_losses.sum().item()) > 1e-2


def test_packed_batches_have_restarting_positions_and_masked_record_starts(tokenized):
    examples = InstructionDataset(tokenized, range(len(tokenized)), train_on_inputs=True)
    packed = PackedDataset(examples, max_length=256)
    for index in range(len(packed)):
        item = packed[index]
        starts = [position for position, value in enumerate(item["position_ids"]) if value == 0]
        assert len(starts) == len(packed.bins[index])
        assert all(item["labels"][start] == -100 for start in starts)
        assert len(item["input_ids"]) == len(item["labels"]) == packed.lengths[index] <= 256


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_packing_fills_bins_without_overflow(seed):
    lengths = np.random.default_rng(seed).integers(1, 101, size=300)
    bins = pack_by_length(lengths, 100)
    assert sorted(i for bin_ in bins for i in bin_) == list(range(300))
    assert max(lengths[bin_].sum() for bin_ in bins) <= 100
    assert len(bins) >= math.ceil(lengths.sum() / 100)
    # at least as good as filling sequences in order
    sequential, free = 0, 0
    for length in lengths:
        if length > free:
            sequential, free = sequential + 1, 100
        free -= length
    assert len(bins) <= sequential


def best_fit_with_a_list_per_size(lengths, max_length: int) -> list:
    """The packing as first written (one list of bins per possible free size): the oracle of the bisect form."""
    bins, bins_with_free = [], [[] for _ in range(max_length + 1)]
    for index in np.argsort(-np.asarray(lengths), kind="stable").tolist():
        length = int(lengths[index])
        free = next((f for f in range(length, max_length + 1) if bins_with_free[f]), None)
        if free is None:
            bin_id, free = len(bins), max_length
            bins.append([])
        else:
            bin_id = bins_with_free[free].pop()
        bins[bin_id].append(index)
        bins_with_free[free - length].append(bin_id)
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_packing_equals_the_list_per_size_form_and_its_memory_does_not_grow_with_max_length(seed):
    """``data --max_length 100000000`` took gigabytes (and a MemoryError traceback under a limit) for 20 short
    records: one list per possible free size. Now the free sizes that occur, kept sorted: the same bins."""
    import tracemalloc

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 101, size=300)
    assert pack_by_length(lengths, 100) == best_fit_with_a_list_per_size(lengths, 100)
    assert pack_by_length(lengths, 173) == best_fit_with_a_list_per_size(lengths, 173)
    tracemalloc.start()
    try:
        bins = pack_by_length(lengths, 10 ** 9)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bins == [list(np.argsort(-lengths, kind="stable"))] and peak < 2 ** 20


LENGTHS = np.random.default_rng(0).integers(5, 250, size=203)


def test_every_example_once_per_epoch_and_order_depends_only_on_seed_and_epoch():
    sampler = LengthGroupedBatchSampler(LENGTHS, batch_size=8, seed=3)
    epochs = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == math.ceil(203 / 8)
        assert sorted(i for batch in batches for i in batch) == list(range(203))
        epochs.append(batches)
    assert epochs[0] == epochs[2] != epochs[1]
    fresh = LengthGroupedBatchSampler(LENGTHS, batch_size=8, seed=3)
    fresh.set_epoch(1)
    assert list(fresh)[5:] == epochs[1][5:]  # resuming mid-epoch: skip k batches, the rest is the same
    other_seed = LengthGroupedBatchSampler(LENGTHS, batch_size=8, seed=4)
    assert list(other_seed) != epochs[0]


def test_unshuffled_ungrouped_order_is_the_file_order():
    sampler = LengthGroupedBatchSampler(LENGTHS, batch_size=10, shuffle=False, group_by_length=False)
    assert [i for batch in sampler for i in batch] == list(range(203))


def test_length_grouping_cuts_padding_and_puts_the_longest_batch_first():
    collator = PaddingCollator(0)
    grouped = LengthGroupedBatchSampler(LENGTHS, batch_size=8).all_batches(0)
    random = LengthGroupedBatchSampler(LENGTHS, batch_size=8, group_by_length=False).all_batches(0)
    assert padding_share(grouped, LENGTHS, collator) < padding_share(random, LENGTHS, collator) / 4
    assert LENGTHS.argmax() in grouped[0]


@pytest.mark.parametrize("even_batches", [True, False])
def test_sharding_across_processes(even_batches):
    world_size = 3
    samplers = [LengthGroupedBatchSampler(LENGTHS, batch_size=8, seed=1, rank=rank, world_size=world_size,
                                          even_batches=even_batches) for rank in range(world_size)]
    shards = [list(sampler) for sampler in samplers]
    assert [len(shard) for shard in shards] == [len(sampler) for sampler in samplers]
    seen = [i for shard in shards for batch in shard for i in batch]
    assert set(seen) == set(range(203))
    if even_batches:  # 26 batches -> 9 per rank, 1 batch repeated
        assert {len(shard) for shard in shards} == {9}
    else:  # each example exactly once
        assert sorted(seen) == list(range(203))
    assert not set(shards[0][0]) & set(shards[1][0])  # ranks see different data at the same step


def test_split_by_count_or_fraction_is_seeded_and_disjoint():
    train, val = split_indices(100, 0.2, seed=7)
    assert len(val) == 20 and len(train) == 80
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    assert np.array_equal(split_indices(100, 0.2, seed=7)[1], val)
    assert not np.array_equal(split_indices(100, 0.2, seed=8)[1], val)
    assert len(split_indices(100, 13, seed=7)[1]) == 13
    assert len(split_indices(5, 0.1, seed=7)[1]) == 1  # a non-zero fraction holds out at least one record
    assert len(split_indices(5, 0, seed=7)[1]) == 0
    with pytest.raises(UserError, match="--val_size 100: holds out 100 of 100 records"):
        split_indices(100, 100, seed=7)
