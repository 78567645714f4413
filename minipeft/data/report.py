"""Seeing the data: what was loaded, how long the records are, what is trained on, and how much is padding.

Three views:

* :class:`DataReport`: the summary that :func:`~minipeft.data.pipeline.build_dataloaders` returns (records
  loaded and skipped, tokens, truncation, cache, split, batches, padding share);
* :func:`padding_by_mode`: the share of tokens that are padding under each way of batching the same records;
* :func:`describe_sample`: one record as text, token ids, decoded text, and which tokens carry a loss.
"""

import textwrap
from dataclasses import dataclass

import numpy as np

from minipeft.data.batching import LengthGroupedBatchSampler, PaddingCollator
from minipeft.data.loading import describe_skipped
from minipeft.data.packing import pack_by_length

PERCENTILES = (50, 90, 99)


# Warn when more than this share of the records lose part of their response to --max_length.
RESPONSE_CUT_WARNING = 0.1


@dataclass
class DataReport:
    """Figures about one run of the pipeline; ``summary_lines()`` prints them."""

    dataset_path: str
    file_format: str
    columns: list[str]
    records_total: int
    records_loaded: int
    skipped: list[tuple[str, str]]
    template: str
    max_length: int
    train_on_inputs: bool
    tokens_total: int
    length_percentiles: dict[str, int]
    truncated: int
    response_cut: int
    cache_path: str | None
    from_cache: bool
    seed: int
    train_records: int
    val_records: int
    train_sequences: int  # records, or packed sequences with packing
    train_batches: int
    val_batches: int
    padding_share: float  # share of the train tokens (epoch 0) that are padding
    batching: str = ""

    @classmethod
    def from_parts(cls, config, loaded, tokenized, **figures) -> "DataReport":
        lengths = tokenized.lengths
        percentiles = {f"p{q}": int(np.percentile(lengths, q)) for q in PERCENTILES}
        percentiles.update(min=int(lengths.min()), max=int(lengths.max()), mean=round(float(lengths.mean()), 1))
        return cls(
            dataset_path=loaded.path, file_format=loaded.file_format, columns=loaded.columns,
            records_total=loaded.total, records_loaded=len(loaded.records), skipped=loaded.skipped,
            template=config.template, max_length=config.max_length, train_on_inputs=config.train_on_inputs,
            tokens_total=int(lengths.sum()), length_percentiles=percentiles,
            truncated=int(tokenized.truncated.sum()), response_cut=int(tokenized.response_cut.sum()),
            cache_path=tokenized.cache_path, from_cache=tokenized.from_cache, seed=config.seed,
            batching=describe_batching(config), **figures,
        )

    def summary_lines(self) -> list[str]:
        p = self.length_percentiles
        lines = [f"Loaded {self.records_loaded:,} records from {self.dataset_path} "
                 f"({self.file_format}; columns: {', '.join(self.columns)})"]
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped):,} of {self.records_total:,} records: "
                         f"{describe_skipped(self.skipped)}")
        trained_on = "prompt + response + EOS" if self.train_on_inputs else "response + EOS (prompt labels -100)"
        lines += [
            f"Template {self.template}; max_length {self.max_length}; loss on the {trained_on}",
            f"Tokenized shape: {self.records_loaded:,} records x {p['min']}..{p['max']} tokens (unpadded; "
            f"{self.tokens_total:,} tokens); per record p50 {p['p50']}, p90 {p['p90']}, p99 {p['p99']}, "
            f"mean {p['mean']}",
            f"Truncated {self.truncated:,} records to {self.max_length} tokens "
            f"({self.response_cut:,} of them lost response tokens and their EOS)",
        ]
        if self.response_cut > RESPONSE_CUT_WARNING * self.records_loaded:
            lines.append(f"warning: --max_length {self.max_length} cuts the response (and its EOS) of "
                         f"{self.response_cut:,} of {self.records_loaded:,} records "
                         f"({self.response_cut / self.records_loaded:.0%}): the model is not taught how they end; "
                         f"training anyway. Records are {p['p50']} tokens at p50, {p['p99']} at p99")
        if self.cache_path is None:
            lines.append("Tokenization cache: off")
        else:
            lines.append(f"Tokenization cache: {'loaded from' if self.from_cache else 'written to'} {self.cache_path}")
        lines += [
            f"Split (seed {self.seed}): {self.train_records:,} train / {self.val_records:,} validation records",
            f"Train: {self.train_batches:,} batches ({self.batching}); validation: {self.val_batches:,} batches",
            f"Padding: {self.padding_share:.1%} of the train batch tokens (epoch 0)",
        ]
        if self.train_sequences != self.train_records:
            lines.append(f"Packing: {self.train_records:,} train records in {self.train_sequences:,} sequences")
        return lines


def describe_batching(config) -> str:
    """E.g. ``"8 per batch, packed, padded to the longest, grouped by length, shuffled"``."""
    parts = [f"{config.batch_size} per batch"]
    if config.packing:
        parts.append(f"packed into sequences of up to {config.max_length}")
    parts.append("padded to the longest" if config.padding == "longest" else f"padded to {config.max_length}")
    if config.pad_to_multiple_of and config.padding == "max_length" and config.max_length % config.pad_to_multiple_of:
        parts.append(f"not rounded to a multiple of {config.pad_to_multiple_of} (never past --max_length)")
    elif config.pad_to_multiple_of:
        parts.append(f"rounded up to a multiple of {config.pad_to_multiple_of}"
                     + (" (never past --max_length)" if config.max_length % config.pad_to_multiple_of else ""))
    parts.append(f"{config.padding_side} padding")
    if config.group_by_length:
        parts.append("grouped by length")
    parts.append("shuffled" if config.shuffle else "not shuffled")
    return ", ".join(parts)


def padding_share(batches: list[list[int]], lengths, collator) -> float:
    """Padding tokens / all tokens of ``batches`` (lists of indices into ``lengths``) padded by ``collator``."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[batch].sum()) for batch in batches)
    total = sum(len(batch) * collator.width(int(lengths[batch].max())) for batch in batches)
    return 1.0 - real / total if total else 0.0


def padding_by_mode(lengths, config) -> list[tuple[str, float, int]]:
    """``(mode, padding share, batches)`` for the same records batched four ways (epoch 0 of ``config.seed``)."""
    lengths = np.asarray(lengths)
    packed_lengths = np.array([lengths[bin_].sum() for bin_ in pack_by_length(lengths, config.max_length)])
    modes = [  # (name, lengths of the sequences, padding, group_by_length)
        (f"pad every batch to max_length {config.max_length} (the seed's way)", lengths, "max_length", False),
        ("pad to the longest in the batch, random batches", lengths, "longest", False),
        ("pad to the longest in the batch, grouped by length", lengths, "longest", True),
        (f"packing into {config.max_length}-token sequences, grouped by length", packed_lengths, "longest", True),
    ]
    rows = []
    for name, sequence_lengths, padding, grouped in modes:
        collator = PaddingCollator(0, padding, config.max_length, config.pad_to_multiple_of)
        sampler = LengthGroupedBatchSampler(sequence_lengths, config.batch_size, shuffle=True,
                                            group_by_length=grouped, seed=config.seed)
        batches = sampler.all_batches(0)
        rows.append((name, padding_share(batches, sequence_lengths, collator), len(batches)))
    return rows


def describe_sample(title: str, record, input_ids: list[int], labels: list[int], tokenizer,
                    width: int = 100) -> list[str]:
    """One example as a reader wants to check it: the record, its ids, the decoded text, and the mask."""
    trained = [token for token, label in zip(input_ids, labels) if label != -100]
    lines = [f"--- {title}: {record.source}, {len(input_ids)} tokens, {len(trained)} trained on ---"]
    for name in ("instruction", "input", "output"):
        lines.append(f"{name}: {textwrap.shorten(getattr(record, name), 300) or '(empty)'}")
    lines.append(f"input_ids ({len(input_ids)}): {_shorten_ids(input_ids)}")
    lines.append("decoded input_ids:")
    lines += _indented(tokenizer.decode(input_ids), width)
    lines.append("trained on (labels != -100):")
    lines += _indented(tokenizer.decode(trained), width)
    lines.append("tokens around the start of the loss and at the end (x = trained on, . = masked):")
    lines += _token_table(input_ids, labels, tokenizer)
    return lines


def _shorten_ids(ids: list[int], head: int = 24, tail: int = 8) -> str:
    if len(ids) <= head + tail:
        return str(ids)
    return f"[{', '.join(map(str, ids[:head]))}, ..., {', '.join(map(str, ids[-tail:]))}]"


def _indented(text: str, width: int) -> list[str]:
    return ["    " + line for line in text.split("\n")] if len(text) < 4000 else ["    " + text[:4000] + " ..."]


def _token_table(input_ids: list[int], labels: list[int], tokenizer) -> list[str]:
    """Rows ``position  id  token  label  x/.`` for the tokens around the first target, and the last three."""
    first_target = next((i for i, label in enumerate(labels) if label != -100), len(labels))
    shown = sorted({*range(max(0, first_target - 3), min(len(labels), first_target + 3)),
                    *range(max(0, len(labels) - 3), len(labels))})
    rows = [f"    {'pos':>5} {'id':>7}  {'token':<20} {'label':>7}"]
    previous = None
    for position in shown:
        if previous is not None and position != previous + 1:
            rows.append("    ...")
        token = repr(tokenizer.decode([input_ids[position]]))
        mark = "." if labels[position] == -100 else "x"
        rows.append(f"    {position:>5} {input_ids[position]:>7}  {token:<20} {labels[position]:>7} {mark}")
        previous = position
    return rows
