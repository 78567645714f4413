"""``modify_llm.py`` / ``python -m minipeft modify``: apply a PEFT method and print exact parameter statistics.

    python modify_llm.py --modification_type lora --lora_rank 8 --target_modules c_attn
    python modify_llm.py --modification_type prefix --prefix_length 50
    python modify_llm.py --modification_type selective --freeze_layers "0,1,2,3"

The default model is GPT-2 small. Counting needs shapes, not weights, so when the real weights cannot be
had (offline) the architecture is built from its config with random weights, and a note says so. A local
model folder of over 1 GB in float32 is read tensor by tensor in bfloat16, or quantized to NF4 layer by layer
as it is read (``--quantize nf4``), so its memory is the final footprint, never a float32 copy.
"""

import argparse
from pathlib import Path

import torch

from minipeft.model.adapter_files import config_to_dict
from minipeft.cli import CommandLineParser
from minipeft.core.bounds import path_name
from minipeft.core.errors import UserError
from minipeft.cli.arguments import add_method_arguments, check_method_flags_early, config_from_args
from minipeft.loading.checkpoint_dir import checkpoint_tensors
from minipeft.loading.checks import check_model_directory
from minipeft.loading.models import load_model_for_counting, local_model_path
from minipeft.cli.arguments import add_quantize_arguments, check_quantize_arguments
from minipeft.loading.streaming import check_not_quantized_folder, load_base_model
from minipeft.quantization.nf4 import memory_stats, quantize_model
from minipeft.model.peft_model import get_peft_model
from minipeft.data import build_dataloaders
from minipeft.data.config import DataConfig
from minipeft.training.prepare import autocast_for, resolve_precision
from minipeft.training.quantization_cost import COMPUTE_DTYPES, measure_quantization_cost
from minipeft.files.safe_files import check_apart, is_empty_directory


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="python modify_llm.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=path_name, default="gpt2",
                        help="gpt2 (default), smollm2-135m, builtin, a Hugging Face id or a local directory")
    add_method_arguments(parser)
    parser.add_argument("--table", choices=["layers", "full", "none"], default="layers",
                        help="trainability table: one row per parameter kind with blocks grouped (default), "
                             "one row per parameter, or none")
    add_quantize_arguments(parser)
    parser.add_argument("--save_adapter", metavar="DIR", type=path_name,
                        help="also write the freshly initialised adapter to DIR (peft format)")
    return parser


# The records the loss change of quantizing is measured on: the built-in instruction data, held-out split.
COST_RECORDS = 400


def measure_cost_while_quantizing(model, tokenizer, quantize_lm_head: bool) -> str:
    """Quantize ``model`` to NF4 in place and return one line: its eval loss before and after, on the first
    validation batches of the built-in data, in the precision training would use on this machine (random
    weights, or shapes without weights, are quantized and not measured)."""
    device = torch.device("cpu")
    precision = resolve_precision("auto", device)
    if tokenizer is None or any(parameter.is_meta for parameter in model.parameters()):
        quantize_model(model, quantize_lm_head, compute_dtype=COMPUTE_DTYPES[precision])
        return "Loss change of quantizing the base to NF4: not measured (no real weights)"
    data = DataConfig(max_records=COST_RECORDS, batch_size=8, cache_dir=None)
    _, val_loader, _ = build_dataloaders(data, tokenizer, progress=False)
    cost = measure_quantization_cost(model, val_loader, autocast_for(precision, device), device, quantize_lm_head,
                                     COMPUTE_DTYPES[precision])
    return cost.line() + f" of the built-in data (batch 8, {precision})"


# A model folder up to this size in float32 is loaded whole, so --quantize nf4 can measure the loss change of
# quantizing (SmolLM2-135M: 0.54 GB); a larger one is read layer by layer in its final footprint.
MEASURED_UP_TO_BYTES = 1e9


def is_large_checkpoint_dir(name: str) -> bool:
    """A local model folder (``config.json`` and safetensors, what ``save_pretrained`` writes) whose float32
    weights would take more than :data:`MEASURED_UP_TO_BYTES` (from the files' headers; nothing read)."""
    if not (Path(name).is_dir() and (Path(name) / "config.json").is_file()):
        return False
    stored = checkpoint_tensors(Path(name))
    return stored is not None and 4 * sum(tensor.numel for tensor in stored.values()) > MEASURED_UP_TO_BYTES


def check_save_adapter(directory) -> None:
    """``--save_adapter`` writes a fresh adapter only into a new or empty directory: refuse anything else,
    saying what is there (a file, an adapter, a model, other files), before a model is loaded."""
    directory = Path(directory)
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        what = "a symbolic link" if directory.is_symlink() else "a file"
        raise UserError(f"--save_adapter {directory}: is {what}, expected a new directory for the adapter; "
                        "choose a new directory")
    if not directory.exists() or is_empty_directory(directory):
        return
    names = sorted(path.name for path in directory.iterdir())
    if "adapter_config.json" in names:
        what = "an adapter (adapter_config.json), which this fresh, untrained one would replace"
    elif "config.json" in names:
        what = "a model (config.json), not an adapter"
    else:
        what = f"files ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
    raise UserError(f"--save_adapter {directory}: already holds {what}; the adapter is written only into a new or "
                    "empty directory: choose a new one")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quantize = check_quantize_arguments(args)
    check_not_quantized_folder(args.model)
    check_method_flags_early(args)  # a flag that cannot work ends the command before loading and its progress bar
    if args.save_adapter:
        check_save_adapter(args.save_adapter)
        # a folder inside the model's own (even through a link to it) is never written
        check_apart(args.save_adapter, "--save_adapter", {"--model": local_model_path(args.model)})
    cost_line = None
    if is_large_checkpoint_dir(args.model):  # read tensor by tensor, in its final footprint (no float32 copy)
        model, tokenizer = load_base_model(args.model, "nf4" if quantize else "none", args.quantize_lm_head,
                                           dtype=torch.bfloat16, compute_dtype=COMPUTE_DTYPES[resolve_precision(
                                               "auto", torch.device("cpu"))])
        if quantize:
            cost_line = ("Loss change of quantizing the base to NF4: not measured for a model this size (each layer "
                         "was quantized as it was read, no float copy held); train_llm.py --quantize nf4 measures "
                         "it after a run where a float copy fits in memory")
    else:
        if Path(args.model).is_dir() and (Path(args.model) / "config.json").is_file():
            # config, size, headers, tokenizer: a config of 10**6 x 1000 layers was built for real (the OOM killer)
            check_model_directory(args.model, "nf4" if quantize else "none", torch.float32)
        model, tokenizer = load_model_for_counting(args.model)
        if quantize:
            cost_line = measure_cost_while_quantizing(model, tokenizer, args.quantize_lm_head)
    base_stats_total = sum(p.numel() for p in model.parameters())
    if quantize:
        base_memory = memory_stats(model)  # the base alone, before the method adds its parameters
    config = config_from_args(args, model, tokenizer)
    peft_model = get_peft_model(model, config)

    applied = {key: value for key, value in config_to_dict(peft_model.peft_config).items()
               if value not in (None, [], {}, False) and key not in ("inference_mode", "task_type")}
    print(f"Model: {args.model} ({type(model).__name__}), {base_stats_total:,} parameters before the method")
    print(f"Method: {args.modification_type}  " + ", ".join(f"{k}={v}" for k, v in sorted(applied.items())))
    if args.table != "none":
        print()
        print(peft_model.parameter_table(group_layers=args.table == "layers"))
    print()
    print(peft_model.parameter_stats())
    if quantize:
        print("(with --quantize nf4 the totals count each packed byte of a 4-bit weight as 2 parameters, as peft does)")
        print()
        print("\n".join(base_memory.lines()))
        print(cost_line)
    if args.save_adapter:
        metadata = {"base_model_name_or_path": args.model}
        if quantize:  # as a trained adapter records it: generate and merge rebuild the 4-bit base it was made on
            metadata["quantization"] = {"quantize": "nf4", "quantize_lm_head": args.quantize_lm_head}
        peft_model.save_adapter(args.save_adapter, **metadata)
        print(f"Adapter written to {args.save_adapter}")
    return 0


