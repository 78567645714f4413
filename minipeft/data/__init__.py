"""The instruction data pipeline: Alpaca-format files to masked, efficiently padded batches.

Read in this order, each module one step::

    config.py        DataConfig and its command-line flags (max_length cut to the model's positions)
    loading.py       JSON / JSON Lines / CSV -> Records (bad records skipped, counted, explained)
    templates.py     Record -> (prompt, response) text: alpaca, plain, or the tokenizer's chat template
    tokenization.py  -> token ids + prompt mask + EOS, truncated to max_length, cached on disk
    batching.py      seeded split, padding collator, length-grouped seeded sampler, model_inputs()
    packing.py       several records per sequence, no attention across them
    pipeline.py      build_dataloaders(): all of the above
    report.py        statistics, padding shares, samples with their mask
    cli.py           ``python data_pipeline.py`` / ``python -m minipeft data``

Labels leave this package aligned with input_ids (-100 where no loss is taken); the training loss shifts
them, once.
"""

from minipeft.data import templates
from minipeft.data.batching import (LengthGroupedBatchSampler, PaddingCollator, model_inputs,
                                    split_indices)
from minipeft.data.config import DataConfig, add_data_arguments, data_config_from_args, fit_max_length
from minipeft.data.loading import LoadedRecords, Record, load_records
from minipeft.data.pipeline import build_dataloaders, resolve_dataset_path
from minipeft.data.report import DataReport
from minipeft.data.templates import TEMPLATES, format_prompt, prompt_and_response
from minipeft.data.tokenization import (IGNORE_INDEX, TokenizedRecords, encode_prompt, pad_token_id,
                                        tokenize_records)

__all__ = [
    "DataConfig", "DataReport", "IGNORE_INDEX", "LengthGroupedBatchSampler", "LoadedRecords", "PaddingCollator",
    "Record", "TEMPLATES", "TokenizedRecords", "add_data_arguments", "build_dataloaders", "data_config_from_args",
    "encode_prompt", "fit_max_length", "format_prompt", "load_records", "model_inputs", "pad_token_id",
    "prompt_and_response", "resolve_dataset_path", "split_indices", "templates", "tokenize_records",
]
