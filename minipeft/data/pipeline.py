"""The whole data path in one function: file -> records -> token ids -> train/validation DataLoaders.

    load_records        (loading.py)       JSON / JSON Lines / CSV -> Records; bad records skipped and counted
    tokenize_records    (tokenization.py)  template, EOS, truncation, prompt mask; cached on disk
    split_indices       (batching.py)      seeded train / validation split
    PackedDataset       (packing.py)       optional: several records per sequence
    LengthGroupedBatchSampler, PaddingCollator  (batching.py)  batches of similar length, padded together
"""

from dataclasses import replace
from pathlib import Path

from torch.utils.data import DataLoader

from minipeft.builtin import default_dataset_path
from minipeft.data.batching import (InstructionDataset, LengthGroupedBatchSampler, PaddingCollator,
                                    split_indices)
from minipeft.data.config import DataConfig
from minipeft.data.loading import load_records
from minipeft.data.packing import PackedDataset
from minipeft.data.report import DataReport, padding_share
from minipeft.data.templates import resolve_template_name
from minipeft.data.tokenization import pad_token_id, tokenize_records
from minipeft.core.errors import UserError


def resolve_dataset_path(dataset_path: str | None) -> Path:
    """``dataset_path``, or the built-in default data set when it is None."""
    if dataset_path is not None:
        return Path(dataset_path)
    path = Path(default_dataset_path())
    if not path.is_file():
        raise UserError("--dataset_path not given and the built-in data set is not available "
                        "(minipeft.builtin.default_dataset_path); pass --dataset_path FILE")
    return path


def build_dataloaders(config: DataConfig, tokenizer, rank: int = 0, world_size: int = 1,
                      progress: bool = True):
    """Load, tokenize, split and batch the data set described by ``config``.

    Returns:
        ``(train_loader, val_loader, report)``: ``val_loader`` is None when ``config.val_size`` holds out no
        record; ``report`` is a :class:`~minipeft.data.report.DataReport`. The train loader's batch sampler
        (``train_loader.batch_sampler``) has ``set_epoch(epoch)``; its order depends only on
        ``(config.seed, epoch)``, and with ``world_size > 1`` every rank gets the same number of batches.
        The tokenizer is not modified. ``config.template == "auto"`` is resolved here, with this tokenizer, and
        the report holds the resolved name.
    """
    config = replace(config, template=resolve_template_name(config.template, tokenizer))
    path = resolve_dataset_path(config.dataset_path)
    loaded = load_records(path, config.instruction_column, config.input_column, config.output_column,
                          config.max_invalid_fraction)
    if config.max_records is not None:  # --max_records: the first N usable records, in file order
        loaded.records = loaded.records[:config.max_records]
    tokenized = tokenize_records(loaded.records, tokenizer, config.template, config.max_length,
                                 cache_dir=config.cache_dir, progress=progress and rank == 0, source=str(path))
    train_indices, val_indices = split_indices(len(tokenized), config.val_size, config.seed)
    collator = PaddingCollator(pad_token_id(tokenizer), config.padding, config.max_length,
                               config.pad_to_multiple_of, config.padding_side)

    def loader(indices, batch_size, shuffle, even_batches):
        dataset = InstructionDataset(tokenized, indices, config.train_on_inputs, loaded.records)
        if config.packing:
            dataset = PackedDataset(dataset, config.max_length)
        sampler = LengthGroupedBatchSampler(dataset.lengths, batch_size, shuffle, config.group_by_length,
                                            config.seed, rank, world_size, even_batches)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=config.num_workers)

    train_loader = loader(train_indices, config.batch_size, config.shuffle, even_batches=True)
    val_loader = None
    if len(val_indices):  # validation: fixed order, each record once (ranks may get unequal counts)
        val_loader = loader(val_indices, config.eval_batch_size or config.batch_size, False, even_batches=False)

    train_sampler = train_loader.batch_sampler
    report = DataReport.from_parts(
        config, loaded, tokenized,
        train_records=len(train_indices), val_records=len(val_indices),
        train_sequences=len(train_loader.dataset), train_batches=len(train_loader),
        val_batches=len(val_loader) if val_loader is not None else 0,
        padding_share=padding_share(train_sampler.all_batches(0), train_sampler.lengths, collator),
    )
    return train_loader, val_loader, report
