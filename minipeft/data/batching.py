"""From tokenized records to padded batches: the split, the dataset, the collate function and the sampler.

A batch is a dict of LongTensors, all of shape (B, T)::

    input_ids       token ids; padding uses the pad id (the EOS id when the tokenizer has no pad token)
    attention_mask  1 for real tokens, 0 for padding
    labels          input_ids with -100 wherever no loss is taken (prompt, padding); NOT shifted
    position_ids    only in packed batches: positions restart at 0 for every record (see packing.py)

Where the shift happens: nowhere in this package. Labels stay aligned with input_ids (the Hugging Face
convention), and the training loss shifts them exactly once: ``logits[:, :-1]`` against ``labels[:, 1:]``.

Padding is decided per batch (``padding="longest"``): a batch is as wide as its longest record, rounded
up to ``pad_to_multiple_of``. :class:`LengthGroupedBatchSampler` puts records of similar length in the same
batch so that little padding is needed, while keeping the order random and reproducible.
"""

import math

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from minipeft.core.errors import UserError

MEGABATCH_BATCHES = 50  # length grouping sorts within windows of this many batches (as Hugging Face's Trainer)


def split_indices(num_records: int, val_size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split: ``(train_indices, val_indices)``, each in file order.

    ``val_size`` is a count (int) or a fraction (float in [0, 1)); a non-zero fraction holds out at least
    one record when there are two or more.
    """
    if isinstance(val_size, float):
        count = round(num_records * val_size)
        if val_size > 0 and count == 0 and num_records >= 2:
            count = 1
    else:
        count = val_size
    if count >= num_records:
        raise UserError(f"--val_size {val_size}: holds out {count} of {num_records} records, leaving none to "
                        "train on; use a smaller count or fraction")
    order = np.random.default_rng(seed).permutation(num_records)
    return np.sort(order[count:]), np.sort(order[:count])


class InstructionDataset(Dataset):
    """The records ``indices`` of a :class:`~minipeft.data.tokenization.TokenizedRecords`, one example each.

    ``records`` (optional) are the loaded :class:`~minipeft.data.loading.Record` objects, in the same order as
    the tokenized ones, kept so that a report can show the text an example came from (:meth:`record`).
    """

    def __init__(self, tokenized, indices, train_on_inputs: bool = False, records=None):
        self.tokenized = tokenized
        self.indices = np.asarray(indices, dtype=np.int64)
        self.train_on_inputs = train_on_inputs
        self.records = records

    def record(self, index: int):
        """The source record of example ``index`` (needs ``records``)."""
        return self.records[int(self.indices[index])]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def lengths(self) -> np.ndarray:
        """(len(self),) tokens per example, for length grouping."""
        return self.tokenized.lengths[self.indices]

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        input_ids, labels = self.tokenized.example(int(self.indices[index]), self.train_on_inputs)
        return {"input_ids": input_ids, "labels": labels}


class PaddingCollator:
    """Pads ``input_ids``, ``attention_mask``, ``labels`` (and ``position_ids``) of a list of examples together.

    Args:
        pad_token_id: id written into padded positions of ``input_ids`` (never trained on: labels are -100).
        padding: ``"longest"`` (width = longest example) or ``"max_length"`` (width = ``max_length``).
        max_length: the width for ``padding="max_length"``.
        pad_to_multiple_of: round the width up to a multiple of this (never past ``max_length``).
        padding_side: ``"right"`` or ``"left"``.
    """

    def __init__(self, pad_token_id: int, padding: str = "longest", max_length: int | None = None,
                 pad_to_multiple_of: int | None = None, padding_side: str = "right"):
        self.pad_token_id = pad_token_id
        self.padding = padding
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    def width(self, longest: int) -> int:
        """The padded length T of a batch whose longest example has ``longest`` tokens."""
        width = self.max_length if self.padding == "max_length" else longest
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
            if self.max_length is not None:  # never past max_length: the model may have no positions beyond it
                width = min(width, self.max_length)
        return width

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = self.width(max(len(example["input_ids"]) for example in examples))
        shape = (len(examples), width)  # (B, T)
        batch = {
            "input_ids": np.full(shape, self.pad_token_id, dtype=np.int64),
            "attention_mask": np.zeros(shape, dtype=np.int64),
            "labels": np.full(shape, -100, dtype=np.int64),
        }
        packed = "position_ids" in examples[0]
        if packed:
            batch["position_ids"] = np.zeros(shape, dtype=np.int64)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            real = slice(0, length) if self.padding_side == "right" else slice(width - length, width)
            padding = slice(length, width) if self.padding_side == "right" else slice(0, width - length)
            batch["input_ids"][row, real] = example["input_ids"]
            batch["attention_mask"][row, real] = 1
            batch["labels"][row, real] = example["labels"]
            if packed:  # padding forms its own "record" (positions from 0), so it is attended by no real token
                batch["position_ids"][row, real] = example["position_ids"]
                batch["position_ids"][row, padding] = np.arange(width - length)
        return {name: torch.from_numpy(array) for name, array in batch.items()}


def left_pad(token_lists: list, pad_token_id: int, device=None):
    """``(input_ids (B, T), attention_mask (B, T))`` with each row's padding on the left, for generation: every
    row's next token then follows its last real token (training batches are :class:`PaddingCollator`'s)."""
    width = max(len(tokens) for tokens in token_lists)
    input_ids = torch.full((len(token_lists), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        if tokens:
            input_ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
            attention_mask[row, width - len(tokens):] = 1
    return input_ids.to(device), attention_mask.to(device)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The keyword arguments for ``model(**model_inputs(batch))``: everything the model needs, no labels.

    * Right-padded batches: ``input_ids`` and ``attention_mask``, nothing more (the model's default
      positions 0, 1, 2, ... are already right).
    * Left-padded batches (some row starts with padding): also ``position_ids`` counted over real tokens
      only (``cumsum(attention_mask) - 1``), so a record sits at the same positions, and has the same
      loss, as when right-padded; GPT-2 would otherwise number positions from the first column.
    * Packed batches: ``position_ids`` that restart at 0 for each record, and no ``attention_mask``:
      transformers (``masking_utils.find_packed_sequence_indices``) then reads the restarts and builds a
      block-diagonal causal mask, so no record attends to another. ``use_cache=False``: with a key/value
      cache transformers skips that detection, and the records would silently attend to each other.
    """
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if (batch["attention_mask"][:, 0] == 0).any():
        inputs["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return inputs


class LengthGroupedBatchSampler(Sampler):
    """Yields lists of example indices (batches); the order depends only on ``(seed, epoch)``.

    For each epoch: shuffle all examples (``shuffle``), then, with ``group_by_length``, sort each window of
    ``MEGABATCH_BATCHES * batch_size`` examples by length and cut it into batches, shuffle the batches, and
    move the batch holding the longest example to the front (an out-of-memory error shows at step 1, not
    hours in). With several processes (DistributedDataParallel), process ``rank`` takes every
    ``world_size``-th batch; with ``even_batches`` the batch list is first extended by repeating its start, so
    that every process runs the same number of steps.

    Resuming mid-epoch: ``set_epoch(e)`` and skip the first k batches; the order is the same as before.
    """

    def __init__(self, lengths, batch_size: int, shuffle: bool = True, group_by_length: bool = True,
                 seed: int = 42, rank: int = 0, world_size: int = 1, even_batches: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.even_batches = even_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def all_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch``, before sharding across processes."""
        rng = np.random.default_rng([self.seed, epoch])
        count = len(self.lengths)
        order = rng.permutation(count) if self.shuffle else np.arange(count)
        if self.group_by_length:
            window = MEGABATCH_BATCHES * self.batch_size
            order = np.concatenate([
                megabatch[np.argsort(-self.lengths[megabatch], kind="stable")]
                for megabatch in np.array_split(order, range(window, count, window))
            ])
        batches = [order[start:start + self.batch_size].tolist() for start in range(0, count, self.batch_size)]
        if self.group_by_length and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.group_by_length and batches:
            longest = max(range(len(batches)), key=lambda i: self.lengths[batches[i]].max())
            batches.insert(0, batches.pop(longest))
        return batches

    def __iter__(self):
        batches = self.all_batches(self.epoch)
        if self.world_size > 1 and self.even_batches:
            missing = -len(batches) % self.world_size
            batches = batches + (batches * math.ceil(missing / max(len(batches), 1)))[:missing]
        yield from batches[self.rank::self.world_size]

    def __len__(self) -> int:
        total = math.ceil(len(self.lengths) / self.batch_size)
        if self.even_batches:
            return math.ceil(total / self.world_size)
        return len(range(self.rank, total, self.world_size))
