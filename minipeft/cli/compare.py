"""``python -m minipeft compare``: train several PEFT methods on the same model, data and budget; tabulate.

::

    python -m minipeft compare                                   # built-in model and data, a few minutes
    python -m minipeft compare --model smollm2-135m --dataset_path ../shared/data/gpteacher_roleplay.json \\
        --methods lora,prompt,prefix,adapter,ia3 --max_records 80 --val_size 10 --eval_max_batches 2 \\
        --max_length 64 --batch_size 2 --max_steps 5 --speed_tokens 4 --generation_tokens 12 \\
        --report docs/comparison.md                              # docs/comparison.md, as committed

For each method, in this process, one after another, with the same seed
(:func:`~minipeft.cli.compare_method.compare_method`):

1. a fresh copy of the base model gets the method (its config's defaults, or the method flags given, e.g.
   ``--lora_rank``, the same flags as ``train_llm.py``'s; a flag that applies to none of the chosen methods is
   an error; selective fine-tuning, whose flag has no default, trains the last block here);
2. :func:`minipeft.training.train` trains it for ``--max_steps`` optimizer steps on the same batches (same
   split, same order), with the method's default learning rate (``Method.learning_rate`` in
   :mod:`minipeft.methods`, the same default as ``train_llm.py``), or ``--learning_rate``, and evaluates it
   before and after on the same held-out records;
3. generation speed is measured: greedy, KV-cached, batch 1, ``--speed_tokens`` new tokens, the median of three
   runs; unmerged (base + adapter, as trained) and, for methods that can merge, merged (a plain model);
4. the ``--generation_prompts`` shortest held-out instructions are answered (greedy, ``--generation_tokens``
   at most), by the base model once before any training and by each trained method.

The table, the plot and the page are written by :mod:`minipeft.cli.compare_report`. ``--output_dir`` is new,
empty, or an earlier comparison's folder (its ``.minipeft`` record); a rerun there, and a ``--report`` page that
exists, take ``--overwrite`` and replace only files minipeft recorded (:func:`check_outputs`); the run holds the
folder's lock.

The numbers are from one seed and a short budget: they show what each method costs and how fast it starts to
learn, not which one is best after a full training run. Learning rates matter more than anything else here.
"""

import argparse
import json
import random
import shlex
import signal
import sys
import time
from pathlib import Path

from minipeft.cli import EXIT_TERMINATED, CommandLineParser
from minipeft.cli.arguments import add_method_flags, unusable_flag
from minipeft.cli.compare_method import MethodInterrupted, answer, compare_method, method_config
from minipeft.cli.compare_report import describe_machine, markdown_report, markdown_table, plot_comparison
from minipeft.core.bounds import file_name, model_positions, path_name, positive_int, seed_number
from minipeft.core.errors import UserError
from minipeft.core.finite import nonfinite_to_none
from minipeft.data import build_dataloaders, DataConfig, load_records, resolve_dataset_path
from minipeft.data.tokenization import encode_prompt
from minipeft.files.atomic import make_directory
from minipeft.files.lock import check_unlocked, OutputLock
from minipeft.files.manifest import MARKER_NAME, is_ours, mark_as_ours, marker_problem
from minipeft.files.safe_files import (check_apart, check_folder_to_write_into, check_not_a_part, check_ours_to_replace,
                                       check_output_file, is_empty_directory, remove_our_directory,
                                       write_json_atomically, write_output_file, write_text_atomically)
from minipeft.inference.prompts import Prompt, resolve_template
from minipeft.loading.models import load_model_and_tokenizer, resolve_device
from minipeft.methods import METHODS

# compare's default run: the registered methods that say so (Method.in_compare_by_default); --methods all: every one
DEFAULT_METHODS = [name for name, method in METHODS.items() if method.in_compare_by_default]


# --- command line ---------------------------------------------------------------------------------------------------

def parse_methods(text: str) -> list:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(METHODS)
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise UserError(f"--methods {text}: unknown method {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(METHODS)} (or all)")
    if len(set(names)) < len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        print(f"note: --methods names {', '.join(twice)} more than once; each method runs once", file=sys.stderr)
    return list(dict.fromkeys(names))


def parse_learning_rates(text, methods: list) -> dict:
    """``None`` -> defaults; ``"3e-4"`` -> every method; ``"lora=1e-3,prompt=3e-2"`` -> those, others default."""
    rates = {name: METHODS[name].learning_rate for name in methods}
    if text is None:
        return rates
    try:
        if "=" not in text:
            return dict.fromkeys(methods, float(text))
        for item in text.split(","):
            name, _, value = item.partition("=")
            if name.strip() not in rates:
                raise UserError(f"--learning_rate {text}: {name.strip()!r} is not among --methods {','.join(methods)}")
            rates[name.strip()] = float(value)
    except ValueError:
        raise UserError(f"--learning_rate {text}: expected a number (3e-4) or method=number pairs "
                        "(lora=1e-3,prompt=3e-2)") from None
    if not all(rate > 0 for rate in rates.values()):
        raise UserError(f"--learning_rate {text}: learning rates must be positive")
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="python -m minipeft compare",
                                     description="Train several PEFT methods on the same model, data and budget "
                                                 "and write a comparison table (Markdown, JSON) and plot.")
    parser.add_argument("--model", type=path_name, default="builtin",
                        help="builtin | smollm2-135m | ... (default: builtin)")
    parser.add_argument("--dataset_path", default=None, help="Alpaca records (default: the built-in data set)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma list of methods, or all ({','.join(METHODS)}) "
                             f"(default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--max_records", type=int, default=None,
                        help="use a seeded random subset of this many records (default: all)")
    parser.add_argument("--val_size", type=positive_int, default=None,
                        help="held-out records for evaluation (default: 10%% of the records)")
    parser.add_argument("--max_length", type=int, default=256, help="tokens per record (default 256)")
    parser.add_argument("--template", choices=["auto", "alpaca", "plain", "chat"], default="auto",
                        help="prompt template; auto: the tokenizer's chat template when it has one, else alpaca "
                             "(default: auto)")
    parser.add_argument("--max_steps", type=int, default=100, help="optimizer steps per method (default 100)")
    parser.add_argument("--batch_size", type=int, default=8, help="records per step (default 8)")
    parser.add_argument("--learning_rate", default=None,
                        help="one rate for all methods, or method=rate pairs; default per method: "
                             + ", ".join(f"{name} {method.learning_rate:g}" for name, method in METHODS.items()))
    parser.add_argument("--eval_max_batches", type=int, default=None, help="evaluate on at most this many batches")
    parser.add_argument("--speed_tokens", type=int, default=32, help="new tokens per speed measurement (default 32)")
    parser.add_argument("--generation_prompts", type=int, default=3,
                        help="held-out instructions answered before and after training (default 3; 0: none)")
    parser.add_argument("--generation_tokens", type=int, default=48,
                        help="most new tokens per answer (default 48)")
    parser.add_argument("--report", type=file_name, default=None,
                        help="write the whole comparison as a Markdown page here (default: report.md in --output_dir)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier comparison's outputs (in --output_dir, and --report): only files "
                             "minipeft wrote and recorded")
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16", "fp16"],
                        help="training precision (default fp32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--seed", type=seed_number, default=42, help="seed for the subset, split, order and initialisation")
    parser.add_argument("--output_dir", type=path_name, default="compare_outputs", help="where adapters and tables go")
    add_method_flags(parser.add_argument_group("method settings (each applies to the methods it names)"))
    return parser


def check_method_flags(args, methods: list) -> None:
    flag = unusable_flag(args, methods)
    if flag is not None:
        raise UserError(f"{flag.flag} applies to {' or '.join(flag.methods)}, none of which is in --methods "
                        f"{','.join(methods)}")


def virtual_tokens(args, methods: list, model, tokenizer) -> int:
    """The most virtual tokens a method's config puts in front of every record (prompt and prefix tuning's
    ``num_virtual_tokens``, from its flag or its config's default; 0 for the other methods)."""
    return max(getattr(method_config(name, args, model, tokenizer), "num_virtual_tokens", 0) for name in methods)


def check_positions(args, methods: list, model, tokenizer) -> None:
    """``--max_length`` plus the virtual tokens of prompt/prefix tuning must fit the model's positions."""
    positions, virtual = model_positions(model), virtual_tokens(args, methods, model, tokenizer)
    if positions is not None and args.max_length + virtual > positions:
        raise UserError(f"--max_length {args.max_length}" + (f" + {virtual} virtual tokens" if virtual else "")
                        + f" exceeds the model's {positions} positions; lower --max_length")


# What compare writes into --output_dir, besides a folder per method and the report.
COMPARE_OUTPUTS = ("comparison.md", "comparison.json", "comparison.png", "records.json")


def check_outputs(args, methods: list, report_path: Path) -> None:
    """Before minutes of training: ``--output_dir`` and ``--report`` replace nothing minipeft did not write.

    ``--output_dir`` is new, empty, or a folder an earlier compare made (its ``.minipeft`` record); the names
    this run writes there that exist already are replaced only with ``--overwrite`` and only when recorded as
    minipeft's. Neither output may be, hold or lie inside ``--dataset_path`` or a local ``--model``; a
    ``--report`` elsewhere follows :func:`~minipeft.files.safe_files.check_output_file`.
    """
    output_dir = Path(args.output_dir)
    inputs = {"--dataset_path": args.dataset_path, "--model": args.model if Path(args.model).exists() else None}
    check_folder_to_write_into(output_dir, "--output_dir")
    check_apart(output_dir, "--output_dir", inputs)  # records.json or a method's folder could replace an input
    if output_dir.is_dir():
        check_unlocked(output_dir, "--output_dir")
    check_unlocked(output_dir.parent, "--output_dir", output_dir)  # a new folder inside a running run's
    check_not_a_part(output_dir, "--output_dir")  # a run's checkpoints/, another comparison's method
    if output_dir.is_dir() and not is_empty_directory(output_dir) and not is_ours(output_dir):
        raise UserError(f"--output_dir {output_dir}: holds files minipeft did not write "
                        f"({marker_problem(output_dir)}); refusing to write into it: choose another --output_dir")
    other = [name for name in ("train_config.json", "adapter_config.json", "config.json", "trainer_state.json")
             if (output_dir / name).exists()]
    if other:  # minipeft's, but another kind of output: a comparison would mix with it
        raise UserError(f"--output_dir {output_dir}: holds {other[0]}, a training run's, an adapter's or a model's "
                        "folder, not a comparison's: choose another --output_dir")
    inside = report_path.parent.resolve() == output_dir.resolve()
    names = [*COMPARE_OUTPUTS, *methods, *([report_path.name] if inside else [])]
    found = [name for name in names if (output_dir / name).exists() or (output_dir / name).is_symlink()]
    if found and not args.overwrite:
        raise UserError(f"--output_dir {output_dir}: holds an earlier comparison's outputs ({', '.join(found)}); "
                        "pass --overwrite to replace them, or choose another --output_dir")
    for name in found:
        check_ours_to_replace(output_dir / name, "--output_dir")
    if not inside:
        check_output_file(report_path, "--report", args.overwrite, inputs)


def write_subset(dataset_path, max_records: int, seed: int, output_dir: Path) -> Path:
    """A seeded random subset of the data set, written as a JSON array into ``output_dir``."""
    loaded = load_records(resolve_dataset_path(dataset_path))
    records = loaded.records
    if max_records < len(records):
        records = random.Random(seed).sample(records, max_records)
    path = output_dir / "records.json"
    write_text_atomically(path, json.dumps([{"instruction": r.instruction, "input": r.input, "output": r.output}
                                            for r in records], ensure_ascii=False, indent=1))
    return path


def main(argv=None) -> int:

    args = build_parser().parse_args(argv)
    methods = parse_methods(args.methods)
    check_method_flags(args, methods)
    learning_rates = parse_learning_rates(args.learning_rate, methods)
    started = time.perf_counter()
    for flag in ("max_steps", "batch_size", "max_records", "speed_tokens", "eval_max_batches", "generation_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} {value}: must be a positive integer")
    if args.generation_prompts < 0:
        raise UserError(f"--generation_prompts {args.generation_prompts}: must be 0 or more")
    device = resolve_device(args.device)
    output_dir = Path(args.output_dir)
    report_path = Path(args.report) if args.report else output_dir / "report.md"
    check_outputs(args, methods, report_path)
    created = not output_dir.exists()
    new = created or is_empty_directory(output_dir)
    make_directory(output_dir)
    if new:
        mark_as_ours(output_dir)
    try:
        with OutputLock(output_dir, "--output_dir"):  # one minipeft process at a time writes into output_dir
            return compare(args, methods, learning_rates, device, output_dir, report_path, started, argv)
    except BaseException:  # refused (or stopped) before any method ran: no folder left to block the rerun
        if created and {path.name for path in output_dir.iterdir()} <= {MARKER_NAME, "records.json"}:
            remove_our_directory(output_dir)
        raise


def compare(args, methods: list, learning_rates: dict, device, output_dir: Path, report_path: Path, started: float,
            argv) -> int:
    """Load the model and data once, then train, time and tabulate each method (the module docstring's steps)."""
    from transformers.utils import logging as transformers_logging


    transformers_logging.disable_progress_bar()

    base_model, tokenizer = load_model_and_tokenizer(args.model)
    if tokenizer is None:
        raise UserError(f"--model {args.model}: has no tokenizer; training needs one (tokenizer.save_pretrained)")
    base_model.to(device)
    check_positions(args, methods, base_model, tokenizer)
    template = resolve_template(args.template, None, args.model, tokenizer)
    dataset_path = args.dataset_path
    if args.max_records is not None:
        dataset_path = str(write_subset(args.dataset_path, args.max_records, args.seed, output_dir))
    data_config = DataConfig(dataset_path=dataset_path, template=template, max_length=args.max_length,
                             batch_size=args.batch_size, seed=args.seed, val_size=args.val_size or 0.1)
    train_loader, val_loader, report = build_dataloaders(data_config, tokenizer)
    if val_loader is None and report.records_loaded < 2:
        raise UserError(f"{'--max_records' if args.max_records is not None else '--dataset_path'}: "
                        f"{report.records_loaded} usable record(s); compare needs at least 2 (one to train on, one "
                        "held out to evaluate)")
    if val_loader is None:
        raise UserError(f"--val_size {args.val_size or 0.1}: holds out no record of {report.records_loaded}; give "
                        "--val_size N with N >= 1")
    print("\n".join(report.summary_lines()))
    speed_prompt = next(iter(val_loader))["input_ids"][:1, :16].to(device)
    # the shortest held-out prompts (quick to answer on a CPU) that fit the model's positions with the answer
    room = ((model_positions(base_model) or 10**9) - virtual_tokens(args, methods, base_model, tokenizer)
            - args.generation_tokens)
    records = [val_loader.dataset.record(index) for index in range(len(val_loader.dataset))]
    lengths = [len(encode_prompt(record.instruction, record.input, template, tokenizer)) for record in records]
    held_out = [record for length, _, record in sorted(zip(lengths, range(len(records)), records))
                if length <= room][:args.generation_prompts]
    prompts = [Prompt(record.instruction, record.input) for record in held_out]
    base_model.eval()
    base_replies = answer(base_model, tokenizer, prompts, template, args.generation_tokens)
    print(f"comparing {', '.join(methods)} on {args.model}: {args.max_steps} steps of {args.batch_size} records, "
          f"template {template}, {report.train_records} train / {report.val_records} eval records")

    rows = []
    for name in methods:
        print(f"\n=== {name} (learning rate {learning_rates[name]:g}) ===", flush=True)
        try:
            row = compare_method(name, base_model, tokenizer, (train_loader, val_loader), args, template,
                                 learning_rates[name], device, speed_prompt, prompts)
        except (MethodInterrupted, KeyboardInterrupt, SystemExit) as stop:  # a signal in training, or around it
            if isinstance(stop, SystemExit) and stop.code != EXIT_TERMINATED:
                raise
            number = getattr(stop, "signal_number", signal.SIGINT if isinstance(stop, KeyboardInterrupt) else
                             signal.SIGTERM)
            done = ", ".join(row["method"] for row in rows) if rows else "none"  # their table, page and adapters
            print(f"interrupted while training {name} (left out of the table); the table and adapters in "
                  f"{output_dir} hold the methods finished before it: {done}", file=sys.stderr)
            return 128 + number  # 130 after Ctrl-C, 143 after SIGTERM, as train_llm.py
        rows.append(row)
        table = markdown_table(rows)  # rewritten after every method: a long run shows progress on disk
        write_text_atomically(output_dir / "comparison.md", table + "\n")
        settings = {"model": args.model, "dataset_path": args.dataset_path, "max_records": args.max_records,
                    "max_length": args.max_length, "max_steps": args.max_steps, "batch_size": args.batch_size,
                    "eval_max_batches": args.eval_max_batches,
                    "template": template, "train_records": report.train_records, "eval_records": report.val_records,
                    "device": str(device), "precision": args.precision, "seed": args.seed,
                    "generation_tokens": args.generation_tokens, "machine": describe_machine(device),
                    "wall_minutes": (time.perf_counter() - started) / 60,
                    "command": "python -m minipeft compare " + shlex.join(sys.argv[2:] if argv is None else argv)}
        result = {"settings": settings, "rows": rows,
                  "prompts": [{"instruction": record.instruction, "input": record.input, "reference": record.output,
                               "base_reply": reply} for record, reply in zip(held_out, base_replies)]}
        write_json_atomically(output_dir / "comparison.json", nonfinite_to_none(result))
        write_output_file(report_path, markdown_report(result), "--report")  # minipeft's (see check_outputs)
    plot = plot_comparison(rows, output_dir / "comparison.png")
    print("\n" + table)
    print(f"\nwrote {output_dir / 'comparison.md'}, {output_dir / 'comparison.json'}, {report_path}"
          + (f", {plot}" if plot else ""))
    return 0
