"""``python train_llm.py`` / ``python -m minipeft train``: fine-tune a model with a PEFT method.

With no arguments it trains LoRA on the built-in tiny GPT-2 and its instruction data, offline, in about a
minute on two CPU cores. The seed's command works as written::

    python train_llm.py --dataset_path alpaca_data.json --modification_type lora --lora_rank 4 \\
        --lora_alpha 8 --epochs 3 --learning_rate 1e-5 --output_dir ./outputs

Several processes (CPU or GPUs): ``torchrun --nproc_per_node=2 train_llm.py ...`` (see
:mod:`minipeft.training.distributed`). What lands in ``--output_dir`` is listed in :mod:`minipeft.training.loop`.

The steps: parse flags -> open ``--output_dir`` (checked and locked before anything is loaded:
:func:`~minipeft.training.run_dir.open_run_dir`) -> load the model -> apply the method -> build the data loaders ->
:func:`train` -> write ``metrics.json`` and the loss curve, say where everything went
(:mod:`minipeft.training.report`).
"""

import argparse
import os
import signal
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from minipeft.cli import EXIT_INTERRUPTED, EXIT_TERMINATED, CommandLineParser
from minipeft.cli.arguments import (add_method_arguments, add_quantize_arguments, check_method_flags_early,
                                    check_packing, check_quantize_arguments, config_from_args)
from minipeft.core.bounds import path_name
from minipeft.core.errors import UserError
from minipeft.core.finite import nonfinite_to_none
from minipeft.data import build_dataloaders
from minipeft.data.config import (add_data_arguments, check_cache_dir, data_config_from_args, default_cache_dir,
                                   fit_max_length)
from minipeft.data.templates import resolve_template_name
from minipeft.files.input_files import check_input_file, loads_json, read_input_text
from minipeft.files.safe_files import check_not_a_part, write_json_atomically
from minipeft.loading.models import local_model_path
from minipeft.loading.streaming import load_base_model
from minipeft.methods import default_learning_rate
from minipeft.model.adapter_files import config_to_dict
from minipeft.model.peft_model import get_peft_model
from minipeft.training.config import TrainingConfig, add_training_arguments
from minipeft.training.distributed import init_distributed, shutdown_distributed
from minipeft.training.loop import train
from minipeft.training.metrics import plot_loss_curve
from minipeft.training.precision import load_dtype, trains_base_weights
from minipeft.training.prepare import resolve_precision
from minipeft.training.quantization_cost import COMPUTE_DTYPES
from minipeft.training.resume_checks import (DATA_FLAGS, RESUMABLE_CHANGES, changed_setting_message,
                                             refused_change)
from minipeft.training.report import plan_record, quantization_cost_line, run_summary, summary_lines
from minipeft.training.run_dir import RUN_OUTPUTS, open_run_dir
from minipeft.training.sharding import check_can_shard, check_offload_device, load_sharded

# What this command writes into --output_dir besides what the training loop writes.
CLI_OUTPUTS = ("metrics.json", "train_config.json", "loss_curve.png")


# Below this size a model's matmuls are too small to split across cores: one thread is about as fast, and on a
# busy machine two spinning OpenMP threads per process make training several times slower.
SMALL_MODEL_PARAMETERS = 20_000_000


def choose_cpu_threads(num_threads, total_parameters: int) -> int:
    """``--num_threads``, else 1 for a small model, else PyTorch's default (or ``OMP_NUM_THREADS``)."""
    if num_threads is not None:
        if num_threads < 1:
            raise UserError(f"--num_threads {num_threads}: must be a positive integer")
        return num_threads
    if "OMP_NUM_THREADS" in os.environ or total_parameters >= SMALL_MODEL_PARAMETERS:
        return torch.get_num_threads()
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="python train_llm.py",
        description="Fine-tune a causal language model with a parameter-efficient method. With no arguments: "
                    "LoRA on the built-in tiny GPT-2 and its instruction data, offline.")
    parser.add_argument("--model", type=path_name, default="builtin",
                        help="builtin, gpt2, smollm2-135m, a Hugging Face id or a local directory "
                             "(default: %(default)s)")
    add_method_arguments(parser)
    add_quantize_arguments(parser)
    add_training_arguments(parser)
    add_data_arguments(parser)  # includes --batch_size and --seed
    return parser


def training_config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The :class:`TrainingConfig` of the parsed flags; no ``--learning_rate``: the method's default rate."""
    if args.learning_rate is None:
        args.learning_rate = default_learning_rate(args.modification_type)
    return TrainingConfig(**{field.name: getattr(args, field.name) for field in fields(TrainingConfig)})


def warn_about_changed_settings(output_dir: Path, current: dict, restarted: bool = False) -> None:
    """On --resume, before the model loads: refuse a setting that changes what a step computes or which batches
    it reads (the checkpoint could not continue the same run; what may change is decided in
    :mod:`minipeft.training.resume_checks`, which checks the checkpoint again, and the data file's hash, when it
    resumes), and name the other settings that differ. ``restarted``: the run had no checkpoint and starts over
    from step 0, so no schedule changes course."""
    before = saved_arguments(output_dir)
    refused = refused_change(before, current, new_data=bool(current.get("resume_new_data")))
    if refused is not None:
        raise UserError(changed_setting_message("--resume", refused, current[refused], before[refused],
                                                leave_out=True))
    differs = [key for key in sorted(current) if key in before and current[key] != before[key]]
    changed = [f"--{key} {current[key]} (was {before[key]})" for key in differs if key not in RESUMABLE_CHANGES]
    if changed:
        print("note: resuming with settings that differ from the original run's: " + ", ".join(changed))
    length = [f"--{key} {current[key]} (was {before[key]})" for key in ("max_steps", "epochs") if key in differs]
    if length and not restarted and (current.get("lr_schedule") != "constant"
                                     or current.get("warmup_ratio") is not None):
        print(f"note: resuming with {', '.join(length)}: the {current.get('lr_schedule')} learning-rate schedule "
              "is planned over the new length from the checkpoint on, so its later steps follow another curve "
              "than the steps before (a run of the new length from the start would differ)")
    if "eval_max_batches" in before and current.get("eval_max_batches") != before["eval_max_batches"]:
        print(f"warning: --eval_max_batches {current.get('eval_max_batches')} (was {before['eval_max_batches']}): "
              "from here on the eval loss is measured on another set of batches than the eval loss before "
              "training and the best so far; they no longer compare", file=sys.stderr)


def saved_arguments(output_dir: Path) -> dict:
    """The command-line settings an earlier run recorded in ``output_dir/train_config.json`` ({} if none)."""
    path = output_dir / "train_config.json"
    if not path.is_file():
        return {}
    try:
        arguments = loads_json(read_input_text(path)).get("arguments", {})
    except (ValueError, AttributeError, UserError):
        return {}
    return arguments if isinstance(arguments, dict) else {}


# What one command asks for, not what the run is: a resume never takes these from the run it continues (an
# earlier --resume_new_data inherited would let every later resume change the data and batch settings silently).
NOT_INHERITED = ("resume", "resume_new_data", "overwrite_output_dir", "output_dir")


def parse_arguments(argv=None) -> argparse.Namespace:
    """The command line; with ``--resume``, every flag not given again takes the interrupted run's value.

    ``python train_llm.py --output_dir run --resume latest`` therefore continues the run as it was started
    (its method, rank, data, learning rate, ...), and a flag given again overrides it (and is named in a note
    when that changes what the run computes). The flags of :data:`NOT_INHERITED` are the command's own.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        known = set(vars(args))
        saved = {key: value for key, value in saved_arguments(Path(args.output_dir)).items()
                 if key in known and key not in NOT_INHERITED}
        parser.set_defaults(**saved)
        args = parser.parse_args(argv)
    return args


def main(argv=None) -> int:
    """Parse; check the inputs and open ``--output_dir`` (before any loading); train and report. The exit status."""
    args = parse_arguments(argv)
    config = training_config_from_args(args)
    data_config = data_config_from_args(args, local_model_path(args.model))
    if config.sharding == "fsdp":
        check_sharded_resume(args, argv)
        check_can_shard(args.modification_type)  # before starting processes talking
    context = init_distributed(config.device, config.sharding)
    try:
        check_offload_device(config.fsdp_cpu_offload, context.device)  # before the folder and minutes of loading
        check_quantize_arguments(args)
        if data_config.dataset_path is not None:  # a FIFO or /dev/zero: refused before anything
            check_input_file(data_config.dataset_path, "--dataset_path")
        inputs = {"--dataset_path": data_config.dataset_path,
                  "--model": local_model_path(args.model)}
        check_not_a_part(config.output_dir, "--output_dir")  # a run's adapter/ or checkpoints/, a model's folder
        default_cache = data_config.cache_dir == default_cache_dir()
        if data_config.cache_dir is not None:  # (the other places it must not go: checked with the data flags)
            check_cache_dir(data_config.cache_dir, output_dir=config.output_dir, default_cache=default_cache)
        if data_config.val_size == 0:  # (a split that leaves no record for validation is found after it)
            check_needs_validation(config, data_config, "--val_size 0")
        check_method_flags_early(args)  # before the output folder and minutes of loading
        check_packing(args)
        # checked, created, locked and --resume resolved now, before minutes of loading (training/run_dir.py)
        with open_run_dir(config, context.is_main, RUN_OUTPUTS + CLI_OUTPUTS, inputs) as run_dir:
            return train_and_report(args, config, data_config, context, run_dir)
    finally:
        shutdown_distributed()


def check_sharded_resume(args, argv) -> None:
    """A resume of a sharded run outside torchrun, with no ``--sharding`` given: the flag is the run's (from its
    ``train_config.json``), so the refusal says so and how to go on, rather than blaming a flag nobody typed."""
    if not args.resume or {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):
        return
    if build_parser().parse_args(argv).sharding != "fsdp":  # inherited, not given
        raise UserError(f"--resume: the run in {args.output_dir} was started sharded (--sharding fsdp, from its "
                        "train_config.json); continue it under torchrun as it was started, or on one process with "
                        "--sharding ddp --resume_new_data (its checkpoints are a one-process run's, but a step of "
                        "several processes is not one process's: it goes on from the first batch; docs/sharding.md)")


def check_needs_validation(config: TrainingConfig, data_config, why: str) -> None:
    """A flag that acts on the validation set, in a run without one (``why``), would silently do nothing."""
    given = {flag: getattr(config, flag) for flag in ("early_stopping_patience", "eval_every", "eval_max_batches")}
    given["eval_batch_size"] = data_config.eval_batch_size
    for flag, value in given.items():
        if value:
            raise UserError(f"--{flag} needs a validation set, and this run has none ({why})")


def train_and_report(args, config: TrainingConfig, data_config, context, run_dir) -> int:
    """Load the model, apply the method, build the data, :func:`train` in the opened ``run_dir``, report."""
    def say(message: str = "") -> None:
        if context.is_main:
            print(message, flush=True)

    output_dir = run_dir.path
    arguments = {key: value for key, value in vars(args).items()}
    if config.resume:  # rank 0 compares with the run's record; every process stops on its refusal, not only rank 0
        refusal = None  # (the others would go on alone into a collective and die in a traceback)
        if context.is_main:
            try:
                warn_about_changed_settings(output_dir, arguments, run_dir.restarted)
            except UserError as error:
                refusal = str(error)
        refusal = context.all_gather_objects(refusal)[0]
        if refusal is not None:
            raise UserError(refusal)
    started = time.perf_counter()

    def base_and_method(dtype: torch.dtype, on_meta: bool = None):
        if on_meta is None and context.is_sharded:  # rank 0 loads, every rank builds on meta (docs/sharding.md)
            return load_sharded(lambda meta: base_and_method(dtype, meta), context, precision, config.fsdp_cpu_offload)
        torch.manual_seed(config.seed)  # the seed makes the adapter's initialisation identical on every process
        model, tokenizer = load_base_model(args.model, args.quantize, args.quantize_lm_head, dtype=dtype, log=say,
                                           compute_dtype=COMPUTE_DTYPES[precision],  # 4-bit layers compute in it
                                           on_meta=bool(on_meta))
        if tokenizer is None:
            raise UserError(f"--model {args.model}: has no tokenizer (tokenizer.json, tokenizer_config.json); "
                            "training needs one: save it beside the model with tokenizer.save_pretrained")
        return get_peft_model(model, config_from_args(args, model, tokenizer)), model, tokenizer

    # 1) model + method. A bf16 run loads its base in bf16 (no float32 copy ever exists); a method that trains
    # base weights needs them in float32 (the optimizer's masters), so its base is loaded again in float32.
    precision = resolve_precision(config.precision, context.device)
    dtype = load_dtype(precision)
    peft_model, model, tokenizer = base_and_method(dtype)
    if dtype != torch.float32 and trains_base_weights(peft_model):
        say(f"note: --modification_type {args.modification_type} trains base weights, which need float32; "
            "loading the base again in float32")
        del peft_model, model
        peft_model, model, tokenizer = base_and_method(torch.float32)
    data_config.template = resolve_template_name(data_config.template, tokenizer)  # auto -> chat or alpaca
    stats = peft_model.parameter_stats()
    if context.device.type == "cpu" or config.num_threads is not None:
        torch.set_num_threads(choose_cpu_threads(config.num_threads, stats.total))
    say(f"Model: {args.model} ({type(model).__name__}) | method: {args.modification_type} | "
        f"trainable params: {stats.trainable:,} of {stats.total:,} ({stats.ratio:.4f}%)"
        + (f" | {torch.get_num_threads()} CPU thread(s)" if context.device.type == "cpu" else ""))

    # 2) data: each process reads its own shard of every batch
    virtual_tokens = getattr(peft_model.peft_config, "num_virtual_tokens", 0)  # prompt and prefix tuning
    cut = fit_max_length(data_config, model.config, virtual_tokens)  # past the positions: an index error
    if cut is not None:
        say(cut)
    train_loader, val_loader, report = build_dataloaders(data_config, tokenizer, context.rank, context.world_size,
                                                         progress=context.is_main)
    say("\n".join(report.summary_lines()))
    if val_loader is None:
        count = report.records_loaded
        check_needs_validation(config, data_config,
                               f"--val_size {data_config.val_size} of {count:,} record{'s' * (count != 1)}")
    torch.manual_seed(config.seed + context.rank)  # dropout: its own random stream on each process

    # 3) the settings, before training (a crashed run still says what it was)
    method_config = config_to_dict(peft_model.peft_config)
    run_config = {"model": args.model, "modification_type": args.modification_type, "method": method_config,
                  "training": asdict(config), "data": asdict(data_config), "world_size": context.world_size,
                  "device": str(context.device), "arguments": arguments}
    if context.is_main and not config.resume:  # a resume keeps the run's own until it has trained
        write_json_atomically(output_dir / "train_config.json", run_config)
    adapter_metadata = {"base_model_name_or_path": args.model, "template": data_config.template,
                        "training": {key: value for key, value in arguments.items()
                                     if key in {field.name for field in fields(TrainingConfig)}
                                     or key in DATA_FLAGS},
                        "processes": context.world_size}  # with the data settings, what cuts a step's batches
    if args.quantize != "none":  # generate and merge read it back, to rebuild the base the adapter was trained on
        adapter_metadata["quantization"] = {"quantize": args.quantize, "quantize_lm_head": args.quantize_lm_head}

    # 4) train
    result = train(peft_model, train_loader, val_loader, config, context, adapter_metadata, run_dir)
    if not context.is_main:
        return 0
    if result.outcome == "interrupted":
        print(f"interrupted at step {result.state.step}/{result.plan.total_steps}: checkpoint saved to "
              f"{result.last_checkpoint}; continue with --resume latest --output_dir {output_dir}")
        return 128 + (result.signal or signal.SIGINT)  # 130 after Ctrl-C, 143 after SIGTERM

    # 5) the summary: metrics.json, train_config.json with the resolved plan, the loss curve, what went where
    try:  # (the adapter is saved: an interrupt now loses only the summary, which a resume writes)
        inference_batch = next(iter(val_loader if val_loader is not None else train_loader))
        summary = run_summary(result, peft_model, stats, args.model, args.modification_type, inference_batch, context,
                              output_dir, started)
        cost_line = None
        if args.quantize == "nf4":  # after the peak memory was read: the float copy is not the run's
            del peft_model, model
            cost_line, cost_fields = quantization_cost_line(args.model, args.quantize_lm_head, precision, val_loader,
                                                            context.device, stats.total)
            summary.update(cost_fields)
        write_json_atomically(output_dir / "metrics.json", nonfinite_to_none(summary))
        run_config["plan"] = plan_record(result.plan)
        write_json_atomically(output_dir / "train_config.json", nonfinite_to_none(run_config))
        curve = plot_loss_curve(output_dir / "metrics.jsonl", output_dir / "loss_curve.png",
                                title=f"{args.modification_type} on {args.model}, lr {config.learning_rate:g}")
        for line in summary_lines(summary, result, args.modification_type, config.learning_rate, output_dir,
                                  cost_line, curve):
            say(line)
    except KeyboardInterrupt:
        return summary_interrupted(output_dir, EXIT_INTERRUPTED)
    except SystemExit as leaving:  # SIGTERM (handle_signals_after_loading)
        if leaving.code != EXIT_TERMINATED:
            raise
        return summary_interrupted(output_dir, EXIT_TERMINATED)
    return 0


def summary_interrupted(output_dir: Path, status: int) -> int:
    """Ctrl-C or SIGTERM after the last step, while the summary is written: say what is missing, and the way on."""
    print(f"interrupted after the last step: the adapter is saved in {output_dir / 'adapter'}; the summary "
          "(metrics.json, train_config.json's plan, loss_curve.png) may be missing: write it with --resume latest "
          f"--output_dir {output_dir}", file=sys.stderr)
    return status
