"""Packing: several short records in one sequence of up to ``max_length`` tokens, without padding between them.

Three records of 5, 3 and 4 tokens packed into one row of 12::

    input_ids     [ a a a a a | b b b | c c c c ]
    position_ids  [ 0 1 2 3 4 | 0 1 2 | 0 1 2 3 ]      positions restart for every record
    labels        [ - . . . . | - . . | - . . . ]      "-": -100 on each record's first token

No record may attend to another, or its loss would depend on its neighbours. The attention mask that
says so is block-diagonal and causal::

    a: causal over a's 5 tokens     b: causal over b's 3    c: causal over c's 4     (zeros elsewhere)

transformers builds that mask itself from the restarts in ``position_ids`` when no 2-D ``attention_mask``
is given and no key/value cache is in use (``masking_utils.find_packed_sequence_indices``, used by GPT-2
and Llama with eager, SDPA and flash attention), which is why :func:`minipeft.data.batching.model_inputs`
drops the attention mask of a packed batch and passes ``use_cache=False``. The first label of each record
is -100 (it is never a target in an unpacked batch either), so a record's loss is the same packed or not;
the tests check that on GPT-2 and Llama.

Which records share a sequence is decided once, by best-fit decreasing bin packing (longest record first,
into the fullest sequence it still fits); the sampler then shuffles the packed sequences every epoch.
"""

import bisect

import numpy as np
from torch.utils.data import Dataset

from minipeft.data.batching import InstructionDataset


def pack_by_length(lengths, max_length: int) -> list[list[int]]:
    """Group example indices into bins whose lengths sum to at most ``max_length`` (best-fit decreasing).

    Every length must be <= ``max_length``. Open bins are bucketed by their free space, and the free sizes that
    occur are kept sorted, so the fullest bin that still fits an example is one binary search away (memory grows
    with the records, never with ``max_length``: a list per possible size took gigabytes at ``--max_length 1e8``).
    """
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > max_length:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit in max_length {max_length}")
    bins: list[list[int]] = []
    bins_with_free: dict[int, list[int]] = {}  # bins_with_free[f]: ids of open bins with f tokens free
    free_sizes: list[int] = []  # the keys of bins_with_free, ascending
    for index in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[index])
        at = bisect.bisect_left(free_sizes, length)  # the smallest free space that still fits
        if at == len(free_sizes):  # fits in no open bin: open a new one
            bin_id, free = len(bins), max_length
            bins.append([])
        else:
            free = free_sizes[at]
            bin_id = bins_with_free[free].pop()
            if not bins_with_free[free]:
                del bins_with_free[free], free_sizes[at]
        bins[bin_id].append(index)
        if free - length not in bins_with_free:
            bisect.insort(free_sizes, free - length)
        bins_with_free.setdefault(free - length, []).append(bin_id)
    return bins


class PackedDataset(Dataset):
    """Packed sequences of the examples of an :class:`InstructionDataset`; items carry ``position_ids``."""

    def __init__(self, examples: InstructionDataset, max_length: int):
        self.examples = examples
        self.bins = pack_by_length(examples.lengths, max_length)
        self._lengths = np.array([examples.lengths[bin_].sum() for bin_ in self.bins], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.bins)

    @property
    def lengths(self) -> np.ndarray:
        """(len(self),) tokens per packed sequence."""
        return self._lengths

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        packed = {"input_ids": [], "labels": [], "position_ids": []}
        for example_index in self.bins[index]:
            example = self.examples[example_index]
            packed["input_ids"] += example["input_ids"]
            packed["labels"] += example["labels"]
            packed["position_ids"] += range(len(example["input_ids"]))
        return packed
