"""``python -m minipeft generate``: the command line of :mod:`minipeft.inference.prompts` (read that module's
docstring for what it does, in order).

::

    python -m minipeft generate --adapter outputs/adapter --prompt "Name the capital of Peru."
    python -m minipeft generate --model smollm2-135m --prompt "What is the capital of France?"
    python -m minipeft generate --adapter outputs/adapter --prompts_file prompts.txt --batch_size 8 \\
        --do_sample --temperature 0.7 --top_p 0.9 --seed 0 --output_file answers.jsonl
"""

import argparse
import json
import sys

import torch

from minipeft.cli import CommandLineParser
from minipeft.cli.arguments import add_quantize_arguments, check_quantize_arguments, resolve_quantize
from minipeft.core.bounds import file_name, path_name, seed_number
from minipeft.core.errors import UserError
from minipeft.core.generation import check_generation_settings
from minipeft.core.finite import finite_float
from minipeft.loading.models import local_model_path, resolve_device
from minipeft.files.safe_files import check_output_file, write_output_file
from minipeft.inference.prompts import (Prompt, base_model_flag, blaming_the_adapters_base, generate_texts,
                                        load_for_generation, read_prompts_file, resolve_model_name, resolve_template)


TEMPLATE_CHOICES = ["auto", "alpaca", "plain", "chat", "none"]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(prog="python -m minipeft generate",
                                     description="Generate text with a base model and (optionally) an adapter.")
    parser.add_argument("--model", type=path_name, default=None,
                        help="builtin | smollm2-135m | gpt2 | a HF id or directory (default: the adapter's base "
                             "model, else builtin)")
    parser.add_argument("--adapter", type=path_name, default=None, help="adapter directory (any method)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="an instruction (repeat for several)")
    source.add_argument("--prompts_file", type=path_name, help="prompts, one per line, or a JSON list (or JSON "
                                               "Lines) of strings or {\"instruction\", \"input\"} objects, or a "
                                               ".csv/.tsv of records (instruction, input columns)")
    parser.add_argument("--input", default="", help="the Alpaca \"input\" field for every --prompt")
    parser.add_argument("--template", choices=TEMPLATE_CHOICES, default="auto",
                        help="prompt template; auto: the adapter's, else the tokenizer's chat template when it "
                             "has one, else alpaca (default: auto); none = raw text")
    parser.add_argument("--max_new_tokens", type=int, default=64, help="at most this many new tokens (default 64)")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=finite_float, default=None, help="sampling temperature (default 1.0)")
    parser.add_argument("--top_k", type=int, default=None, help="sample from the k likeliest tokens (default off)")
    parser.add_argument("--top_p", type=finite_float, default=None, help="nucleus sampling threshold (default off)")
    parser.add_argument("--seed", type=seed_number, default=None, help="seed for sampling")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per batch (default 8)")
    parser.add_argument("--no_stream", action="store_true", help="do not stream a single prompt's reply")
    parser.add_argument("--output_file", type=file_name, default=None,
                        help="also write one JSON object per prompt (JSONL); an existing file only with --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output_file if minipeft wrote it (its .NAME.minipeft record) and it is unchanged")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default float32)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add_quantize_arguments(parser, from_adapter=True)
    return parser


def check_sampling_flags(args) -> None:
    """Sampling flags without ``--do_sample`` would be ignored: say so instead."""
    given = [f"--{name}" for name in ("temperature", "top_k", "top_p", "seed") if getattr(args, name) is not None]
    if given and not args.do_sample:
        raise UserError(f"{', '.join(given)} only appl{'y' if len(given) > 1 else 'ies'} when sampling; add "
                        "--do_sample (greedy decoding is the default)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top_k {args.top_k}: keeps no token to sample from; give k >= 1, or leave --top_k out")
    check_generation_settings(args.max_new_tokens, args.do_sample,  # what generation checks: before loading
                              1.0 if args.temperature is None else args.temperature, args.top_k or 0,
                              1.0 if args.top_p is None else args.top_p)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be a positive integer, got {args.batch_size!r}")


def main(argv=None) -> int:
    from transformers.utils import logging as transformers_logging

    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:  # before the model loads
        raise UserError(f"--max_new_tokens {args.max_new_tokens}: asks for no new token; give 1 or more")
    check_sampling_flags(args)
    if args.prompt and not all(text.strip() for text in args.prompt):
        raise UserError("--prompt: empty; give an instruction")
    if args.input and not args.prompt:
        raise UserError("--input goes with --prompt; in --prompts_file give {\"instruction\", \"input\"} objects")
    prompts = ([Prompt(text, args.input) for text in args.prompt] if args.prompt
               else read_prompts_file(args.prompts_file))
    model_name = resolve_model_name(args.model, args.adapter)
    if args.output_file:  # before minutes of generating, not after
        check_output_file(args.output_file, "--output_file", args.overwrite,
                          {"--prompts_file": args.prompts_file, "--adapter": args.adapter,
                           base_model_flag(args.model, args.adapter): local_model_path(model_name)})
    transformers_logging.disable_progress_bar()
    resolve_quantize(args, args.adapter, log=lambda message: print(message, file=sys.stderr))
    check_quantize_arguments(args)
    with blaming_the_adapters_base(args.model, args.adapter, model_name):
        model, tokenizer = load_for_generation(model_name, args.adapter, DTYPES[args.dtype],
                                               resolve_device(args.device), args.quantize, args.quantize_lm_head)
    template = resolve_template(args.template, args.adapter, model_name, tokenizer)
    stream = sys.stdout if len(prompts) == 1 and not args.no_stream else None
    print(f"model: {model_name}" + (f" + adapter {args.adapter}" if args.adapter else "") + f"; template: {template}; "
          + ("sampling" if args.do_sample else "greedy"), file=sys.stderr)
    result = generate_texts(model, tokenizer, prompts, template, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, do_sample=args.do_sample,
                            temperature=1.0 if args.temperature is None else args.temperature,
                            top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p,
                            seed=args.seed, stream=stream)
    if stream is not None:
        print()
    else:
        for index, (prompt, text) in enumerate(zip(prompts, result.texts), start=1):
            if len(prompts) > 1:
                print(f"### {index}: {prompt.instruction}")
            print(text)
    if args.output_file:
        rows = [{"instruction": prompt.instruction, "input": prompt.input, "response": text, "new_tokens": count}
                for prompt, text, count in zip(prompts, result.texts, result.new_tokens)]
        write_output_file(args.output_file, "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
                                                    for row in rows), "--output_file")  # JSON Lines
    print(f"generated {sum(result.new_tokens)} tokens for {len(prompts)} prompt(s) in {result.seconds:.2f} s "
          f"({result.tokens_per_second:.1f} tokens/s)", file=sys.stderr)
    return 0
