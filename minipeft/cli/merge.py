"""``python -m minipeft merge``: the command line of :mod:`minipeft.inference.merge` (read that module's
docstring for what a merge does and how it is checked).

::

    python -m minipeft merge --adapter outputs/adapter --out merged/
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from minipeft.cli import CommandLineParser
from minipeft.cli.arguments import add_quantize_arguments, check_quantize_arguments, resolve_quantize
from minipeft.core.bounds import path_name
from minipeft.core.errors import UserError
from minipeft.core.finite import finite_float
from minipeft.files.safe_files import check_apart
from minipeft.inference.merge import SAVE_DTYPES, check_not_merged_already, check_out_dir, export_merged_model
from minipeft.inference.prompts import (base_model_flag, blaming_the_adapters_base, resolve_model_name,
                                        resolve_template)
from minipeft.loading.models import local_model_path
from minipeft.loading.streaming import load_base_model
from minipeft.methods import adapter_kind, method_for_config
from minipeft.model.adapter_files import CONFIG_NAME, adapter_fingerprint, config_from_dict, read_adapter_config
from minipeft.model.peft_model import load_adapter
from minipeft.quantization.nf4 import dequantize_model


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="python -m minipeft merge",
                                     description="Merge an adapter (LoRA, DoRA, IA3) into its base model and write "
                                                 "a standard Hugging Face model directory.")
    parser.add_argument("--model", type=path_name, default=None,
                        help="base model (default: the adapter's base_model_name_or_path, else builtin)")
    parser.add_argument("--adapter", type=path_name, required=True, help="adapter directory")
    parser.add_argument("--out", required=True, type=path_name, help="output directory (written atomically)")
    parser.add_argument("--save_dtype", choices=list(SAVE_DTYPES), default="float32",
                        help="dtype of the saved weights; the merge itself is always float32 (default float32)")
    parser.add_argument("--template", choices=["alpaca", "plain", "chat", "none"], default=None,
                        help="template of the check prompts and the one recorded (default: the adapter's)")
    parser.add_argument("--tolerance", type=finite_float, default=1e-5,
                        help="largest accepted |logit difference| between merged and unmerged, as a fraction of "
                             "the largest |logit| (default 1e-5)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists and minipeft wrote it (and every file in it)")
    add_quantize_arguments(parser, from_adapter=True)
    parser.add_argument("--requantize", action="store_true",
                        help="quantize the merged linear layers to NF4 again, print the logit change, and write "
                             "the float32 values of the 4-bit weights")
    return parser


def check_mergeable(adapter_dir) -> None:
    """A method that is no change of a weight (adapter, prefix, prompt, ...) is refused naming the file that
    says which method it is: merge has no --modification_type, the adapter's config decides."""
    source = f"--adapter {Path(adapter_dir) / CONFIG_NAME}"
    method = method_for_config(config_from_dict(read_adapter_config(adapter_dir), source))
    if not method.mergeable:
        raise UserError(f"{source}: {adapter_kind(method.name)} cannot be merged into the weights "
                        f"({method.why_not_mergeable}); generate with it unmerged instead")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.tolerance > 0:
        raise UserError(f"--tolerance must be positive, got {args.tolerance}")
    transformers_logging.disable_progress_bar()
    model_name = resolve_model_name(args.model, args.adapter)
    base = base_model_flag(args.model, args.adapter)  # the user may not have named it
    check_apart(args.out, "--out", {"--adapter": args.adapter, base: local_model_path(model_name)})
    check_out_dir(args.out, args.overwrite)  # before minutes of loading and merging, not after
    check_not_merged_already(model_name, args.adapter)
    check_mergeable(args.adapter)  # before loading the model
    resolve_quantize(args, args.adapter)
    check_quantize_arguments(args)
    if args.requantize and args.quantize != "nf4":
        raise UserError("--requantize quantizes the merged weights of an NF4 base again, and this base is not "
                        "quantized (no --quantize nf4, and the adapter records none): merge without --requantize")
    with blaming_the_adapters_base(args.model, args.adapter, model_name):
        model, tokenizer = load_base_model(model_name, args.quantize, args.quantize_lm_head, dtype=torch.float32)
    if tokenizer is None:  # the merged folder is written with it, and the merge is checked on a tokenized batch
        raise UserError(f"--model {model_name}: has no tokenizer; merging needs one (tokenizer.save_pretrained)")
    peft_model = load_adapter(model, args.adapter)
    method = method_for_config(peft_model.peft_config)
    template = resolve_template(args.template, args.adapter, model_name, tokenizer)
    if args.quantize == "nf4":
        # The adapter learned against the 4-bit weights, so the merge starts from exactly those values.
        count = dequantize_model(peft_model.base_model, torch.float32)
        print(f"the base is NF4: its {count} 4-bit linear layers are dequantized to float32 (the values the adapter "
              "was trained on) and ΔW is added in float32; the merged model is full precision"
              + ("" if args.requantize else " (--requantize to quantize it again)"))
    print(f"merging the {method.name} adapter in {args.adapter} into {model_name} (float32, on a copy)")
    report = export_merged_model(peft_model, tokenizer, args.out, template=template,
                                 save_dtype=SAVE_DTYPES[args.save_dtype], overwrite=args.overwrite,
                                 tolerance=args.tolerance, requantize=args.requantize,
                                 extra_info={"base_model": model_name, "adapter": str(args.adapter),
                                             "adapter_sha256": adapter_fingerprint(args.adapter),
                                             "method": method.name, "quantize": args.quantize})
    size = sum(path.stat().st_size for path in report.out_dir.iterdir()) / 1e6
    print(f"wrote {report.out_dir} ({size:.1f} MB): {', '.join(report.files)}")
    print(f"load it with: AutoModelForCausalLM.from_pretrained({str(report.out_dir)!r})", file=sys.stdout)
    return 0
