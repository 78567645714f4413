"""``python data_pipeline.py`` / ``python -m minipeft data``: run the data pipeline and show what it made.

Prints the summary (records, columns, tokens, truncation, cache, split), the shapes of one DataLoader
batch, the share of padding under each way of batching, and a few samples with their loss mask.
"""

import argparse
from pathlib import Path

from minipeft.builtin import load_builtin_tokenizer
from minipeft.loading.checks import check_tokenizer
from minipeft.cli import CommandLineParser
from minipeft.data.config import add_data_arguments, data_config_from_args
from minipeft.data.pipeline import build_dataloaders
from minipeft.data.report import describe_sample, padding_by_mode
from minipeft.core.bounds import path_name
from minipeft.core.errors import UserError
from minipeft.loading.checkpoint_dir import available_memory_bytes
from minipeft.loading.models import (SMOLLM2_NAME, TOKENIZER_FILES, check_hub_id_shape, local_model_path,
                                     smollm2_gguf_path, tokenizer_files)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="python data_pipeline.py",
        description="Load, template, tokenize and batch instruction data; show samples, their loss mask, "
                    "and how much of each batch is padding.")
    parser.add_argument("--model", type=path_name, default="builtin",
                        help="whose tokenizer to use: builtin, smollm2-135m, a local directory, or a Hugging Face "
                             "id in the local cache (default: %(default)s)")
    parser.add_argument("--num_samples", type=int, default=3, help="training samples to show (default: 3)")
    add_data_arguments(parser)
    return parser


def load_tokenizer(name: str):
    """The tokenizer of model ``name`` (the model itself is not loaded)."""
    from transformers import AutoTokenizer

    if name == "builtin":
        try:
            return load_builtin_tokenizer()
        except (ImportError, OSError) as error:
            raise UserError(f"--model builtin: the built-in tokenizer is not available ({str(error).splitlines()[0]}); "
                            "pass --model with a tokenizer directory or smollm2-135m") from None
    if name == SMOLLM2_NAME:
        path = smollm2_gguf_path()
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if Path(name).is_dir():
        if not tokenizer_files(name):  # transformers would build an empty one from config.json
            raise UserError(f"--model {name}: has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}); save it beside "
                            "the model with tokenizer.save_pretrained")
        check_tokenizer(Path(name))  # a damaged tokenizer.json is named as such (a KeyError traceback otherwise)
    else:
        check_hub_id_shape(name)  # (a missing folder was reported in the hub's words about repo ids)
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=not Path(name).exists())
    except (OSError, ValueError) as error:
        raise UserError(f"--model {name}: no tokenizer found locally ({str(error).splitlines()[0]})") from None


def check_padded_batches_fit(config) -> None:
    """``--padding max_length`` pads every batch to ``--max_length``, which ``data`` (no model, so no positions to
    cap it at) takes as given: a batch's three int64 arrays of ``batch × max_length`` are refused when they would
    take more than half the memory available (``--max_length 1000000000`` asked for 15 GB, then the kernel's
    out-of-memory killer or a numpy traceback)."""
    if config.padding != "max_length":
        return
    rows = max(config.batch_size, config.eval_batch_size or 0)
    needed = 3 * 8 * rows * config.max_length  # input_ids, attention_mask, labels
    if needed > available_memory_bytes() / 2:
        raise UserError(f"--max_length {config.max_length:,} with --padding max_length: every batch is padded to it, "
                        f"{rows} × {config.max_length:,} tokens take {needed / 1e9:,.1f} GB, more than half the "
                        f"{available_memory_bytes() / 1e9:,.1f} GB of memory available; lower --max_length, or "
                        "pad each batch to its longest record (--padding longest)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_samples < 0:
        raise UserError(f"--num_samples {args.num_samples}: must be 0 or more")
    config = data_config_from_args(args, local_model_path(args.model))
    check_padded_batches_fit(config)
    tokenizer = load_tokenizer(args.model)
    train_loader, _, report = build_dataloaders(config, tokenizer)
    print("\n".join(report.summary_lines()))

    batch = next(iter(train_loader))
    print("DataLoader batch: " + ", ".join(f"{name} {tuple(tensor.shape)}" for name, tensor in batch.items()))

    train_examples = getattr(train_loader.dataset, "examples", train_loader.dataset)  # unpacked view
    print(f"\nPadding share of the {len(train_examples):,} train records, batch size {config.batch_size}:")
    for mode, share, batches in padding_by_mode(train_examples.lengths, config):
        print(f"  {share:6.1%}  {mode} ({batches:,} batches)")

    for number in range(min(args.num_samples, len(train_examples))):
        example = train_examples[number]
        record_index = train_examples.indices[number]
        title = f"sample {number + 1} of {args.num_samples} (train)"
        if train_examples.tokenized.response_cut[record_index]:
            title += f", truncated to {config.max_length} inside the response (no EOS)"
        elif train_examples.tokenized.truncated[record_index]:
            title += f", prompt truncated to fit {config.max_length}"
        print()
        print("\n".join(describe_sample(title, train_examples.record(number), example["input_ids"],
                                        example["labels"], tokenizer)))
    return 0
