"""Command-line flags shared by several commands: every method's flags and ``--quantize``.

``modify_llm.py``, ``train_llm.py``, ``generate``, ``merge`` and ``compare`` build their parsers from these, so
a flag means the same thing everywhere. The method flags are not written here: they are generated from the
fields of each method's config dataclass (declared with :func:`minipeft.core.options.option`), so a setting's
flag, help and default live in one place, beside the setting, and a new method module brings its flags with
it. A flag of one method given with another method is an error, never silently ignored.
"""

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from minipeft.core.errors import UserError
from minipeft.core.finite import finite_float
from minipeft.core.layers import num_hidden_layers, parse_layer_spec
from minipeft.core.options import flag_names, module_names
from minipeft.loading.checkpoint_dir import build_on_meta
from minipeft.loading.models import local_model_path, local_tokenizer
from minipeft.methods import METHODS
from minipeft.model.adapter_files import read_adapter_config
from minipeft.quantization.nf4 import QUANTIZE_CHOICES


def add_quantize_arguments(parser, from_adapter: bool = False) -> None:
    """``--quantize`` and ``--quantize_lm_head``. With ``from_adapter`` (generate, merge) the default is what
    the adapter was trained on (recorded in its ``adapter_config.json``), else none."""
    default = "the adapter's, else none" if from_adapter else "none"
    parser.add_argument("--quantize", default=None if from_adapter else "none",
                        help=f"none or nf4: store the frozen base's linear layers in 4-bit NormalFloat (QLoRA); "
                             f"embeddings, norms and the LM head stay in full precision (default: {default})")
    parser.add_argument("--quantize_lm_head", action="store_true", default=None if from_adapter else False,
                        help="with --quantize nf4: quantize the output head too")


def resolve_quantize(args, adapter_dir=None, log=print) -> None:
    """Fill ``args.quantize``/``args.quantize_lm_head`` left unset from the adapter's record (generate, merge)."""
    recorded = {}
    if adapter_dir is not None:
        block = read_adapter_config(adapter_dir).get("minipeft")
        recorded = (block.get("quantization") if isinstance(block, dict) else None) or {}
        if args.quantize is None and (not isinstance(recorded, dict)
                                      or recorded.get("quantize", "none") not in QUANTIZE_CHOICES):
            # (checked here: check_quantize_arguments would blame --quantize, a flag the user did not give)
            raise UserError(f"{adapter_dir}/adapter_config.json: \"minipeft.quantization\" is {recorded!r:.80}, "
                            "not what minipeft writes (quantize none or nf4); pass --quantize")
        recorded = recorded if isinstance(recorded, dict) else {}
    if args.quantize is None:
        args.quantize = recorded.get("quantize", "none")
        if args.quantize != "none":
            log(f"--quantize {args.quantize}: the adapter was trained on a 4-bit ({args.quantize}) base "
                "(adapter_config.json); pass --quantize none for the full-precision base")
    if args.quantize_lm_head is None:
        args.quantize_lm_head = bool(recorded.get("quantize_lm_head", False)) and args.quantize == "nf4"


def check_quantize_arguments(args) -> bool:
    """Validate ``--quantize``/``--quantize_lm_head`` (and the method flags they rule out); True for nf4."""
    if args.quantize not in QUANTIZE_CHOICES:
        raise UserError(f"--quantize {args.quantize!r}: choose none or nf4")
    if args.quantize == "none":
        if getattr(args, "quantize_lm_head", False):
            raise UserError("--quantize_lm_head needs --quantize nf4")
        return False
    method = getattr(args, "modification_type", None)
    if method in METHODS and METHODS[method].why_not_on_4bit:
        working = ", ".join(name for name, record in METHODS.items() if not record.why_not_on_4bit)
        raise UserError(f"--quantize nf4 with --modification_type {method}: {METHODS[method].why_not_on_4bit}; "
                        f"use {working}, or --quantize none")
    for record in METHODS.values():  # a setting that would train the base's own tensors, whatever the method
        for flag, value, why in record.flag_values_not_on_4bit:
            if getattr(args, flag.lstrip("-"), None) == value:
                raise UserError(f"--quantize nf4 with {flag} {value}: {why}")
    return True


# --- every method's flags, generated from its config's fields (see minipeft/core/options.py) ----------------------

@dataclass
class MethodFlag:
    """One command-line flag of the methods, made from the config fields that declare it."""
    flag: str              # "--lora_rank"
    field: dataclasses.Field  # the first declaring field (every declaration of a shared flag must agree)
    fields: dict           # method name -> field name in that method's config (lora: r, dora: r)

    @property
    def dest(self) -> str:  # where argparse puts the value: args.lora_rank
        return self.flag.lstrip("-")

    @property
    def methods(self) -> list:
        return list(self.fields)

    def argparse_keywords(self) -> dict:
        """``add_argument``'s keywords: the type from the field's annotation, the help with the default."""
        kind = field_kind(self.field)
        help_text = f"[{', '.join(self.methods)}] {self.field.metadata['help']}"
        if kind is bool:  # a switch: given, it sets the opposite of the default
            return dict(action="store_true", default=None, help=help_text)
        default = self.field.default
        choices, parse = self.field.metadata["choices"], self.field.metadata["parse"]
        if choices and parse:  # show the default as the user would type it: "random", not "RANDOM"
            default = next((choice for choice in choices if parse(choice) == default), default)
        if default is not None and default is not dataclasses.MISSING:
            help_text += f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"
        keywords = dict(help=help_text.replace("%", "%%"))
        if choices:
            keywords["choices"] = list(choices)
        if kind in (int, float):
            keywords["type"] = int if kind is int else finite_float
        return keywords


def field_kind(field: dataclasses.Field):
    """``int``, ``float``, ``bool`` or ``str`` (anything else is read as text): ``int | None`` counts as ``int``."""
    kinds = set(typing.get_args(field.type)) - {type(None)} or {field.type}
    kind = kinds.pop() if len(kinds) == 1 else str
    return kind if kind in (int, float, bool) else str


def method_flags() -> dict:
    """``{flag: MethodFlag}`` for every config field with a flag, over every method in :data:`METHODS`."""
    flags = {}
    for name, method in METHODS.items():
        for field in dataclasses.fields(method.config_class):
            flag = field.metadata.get("flag")
            if flag is None:
                continue
            if flag not in flags:
                flags[flag] = MethodFlag(flag, field, {})
            known = flags[flag].field
            if (field_kind(field), field.metadata["choices"], field.metadata["parse"]) != (
                    field_kind(known), known.metadata["choices"], known.metadata["parse"]):
                raise AssertionError(f"{flag} is declared differently by {method.config_class.__name__} and "
                                     f"an earlier method's config; declare it the same way (core/options.py)")
            flags[flag].fields[name] = field.name
    return flags


def add_method_arguments(parser) -> None:
    """Add ``--modification_type`` and every method's flags to an argparse parser."""
    group = parser.add_argument_group("PEFT method")
    default = next(iter(METHODS))  # the first method by its record's order
    group.add_argument("--modification_type", default=default, choices=list(METHODS),
                       help=f"which PEFT method to apply (default {default})")
    add_method_flags(group)


def add_method_flags(group) -> None:
    """Every method's flags (generated from the config fields), each help naming the methods that take it."""
    for flag in method_flags().values():
        group.add_argument(flag.flag, **flag.argparse_keywords())


def unusable_flag(args, methods: list):
    """The first method flag given that none of ``methods`` takes (an error, never silently ignored), or None."""
    for flag in method_flags().values():
        if getattr(args, flag.dest, None) is not None and not set(flag.methods) & set(methods):
            return flag
    return None


def config_from_args(args, model=None, tokenizer=None):
    """The method config that the parsed flags describe, checked (errors name the flags).

    Each flag given becomes its field's value (through the field's ``parse``); a flag not given leaves the
    config's own default. ``model`` is needed to resolve layer specs such as ``-1``; ``tokenizer`` for
    ``--prompt_init text`` (both through the config's ``from_flags``).
    """
    name = args.modification_type
    flag = unusable_flag(args, [name])
    if flag is not None:
        raise UserError(f"{flag.flag} applies to --modification_type {' or '.join(flag.methods)}, not {name}")
    method = METHODS[name]
    config_class = method.config_class
    given = {}
    for flag in method_flags().values():
        value = getattr(args, flag.dest, None)
        if value is None or name not in flag.fields:
            continue
        field_name = flag.fields[name]
        field = {field.name: field for field in dataclasses.fields(config_class)}[field_name]
        if field_kind(field) is bool:
            given[field_name] = not field.default
        else:
            parse = field.metadata["parse"]
            given[field_name] = parse(value) if parse else value
            if parse is module_names and not given[field_name]:  # " , " or "re:": no name, not the method's default
                raise UserError(f"{flag.flag} {value!r}: names no module; give module names or leave the flag out")
        if field.metadata.get("layer_spec"):  # "0-5,-1" -> [0, 1, 2, 3, 4, 5, 29]: needs the model's block count
            given[field_name] = parse_layer_spec(given[field_name], num_hidden_layers(model), flag.flag)
    given.update(method.variant_settings)  # DoRA: LoRA's config with use_dora=True, as peft records it
    config = method.from_flags(given, model, tokenizer) if method.from_flags else config_class(**given)
    config.validate(flag_names(config_class))
    if model is not None and hasattr(config, "check_model"):  # sizes against the model, before allocating
        config.check_model(model, flag_names(config_class))
    return config


def check_packing(args) -> None:
    """``--packing`` puts several sequences in a row; prompt and prefix tuning put their virtual tokens once per
    row, before its first sequence only (the check in :mod:`minipeft.core.virtual_tokens` would stop the first
    batch, naming no flag)."""
    method = METHODS.get(getattr(args, "modification_type", None))
    if getattr(args, "packing", False) and method is not None and \
            "num_virtual_tokens" in {item.name for item in dataclasses.fields(method.config_class)}:
        raise UserError(f"--packing with --modification_type {method.name}: its virtual tokens come once per row, "
                        "before the row's first sequence only, and a packed row holds several: turn --packing off")


def check_method_flags_early(args) -> None:
    """:func:`config_from_args` on the model built on the meta device from its ``config.json`` alone
    (:func:`~minipeft.loading.checkpoint_dir.build_on_meta`: shapes, no weight read), so that a flag that cannot
    work (``--lora_alpha 0``, a layer the model lacks) ends the command at once, before minutes of loading and
    the loader's progress bar. Only for a model in a folder here (the built-in one, SmolLM2 once converted, a
    checkpoint directory): a hub id's config would be fetched twice. The full check runs again on the loaded
    model, and what cannot be checked on the meta device (an initialisation that reads weights) is left to it."""
    folder = local_model_path(args.model)
    if folder is None or not (Path(folder) / "config.json").is_file():
        return
    try:
        with torch.device("meta"):
            skeleton = build_on_meta(Path(folder), torch.float32)
        tokenizer = local_tokenizer(folder)
    except Exception:  # a model that does not build: the real load names what is wrong, in its own words
        return
    try:
        config_from_args(args, skeleton, tokenizer)
    except UserError:
        raise
    except Exception:  # a check that needs real weights: the check after loading makes it
        return
