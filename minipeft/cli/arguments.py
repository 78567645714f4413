"""Command-line flags shared by several commands: every method's flags and ``--quantize``.

``modify_llm.py``, ``train_llm.py``, ``generate``, ``merge`` and ``compare`` build their parsers from these, so
a flag means the same thing everywhere. A flag of one method given with another method is an error, never
silently ignored.
"""

from minipeft.core.errors import UserError
from minipeft.core.finite import finite_float
from minipeft.core.nf4 import QUANTIZE_CHOICES
from minipeft.methods import METHODS


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
        from minipeft.model.adapter_files import read_adapter_config

        recorded = (read_adapter_config(adapter_dir).get("minipeft") or {}).get("quantization") or {}
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
    if method in ("selective", "bitfit"):
        what = "base weights" if method == "selective" else "the biases of the base's linear layers"
        raise UserError(f"--quantize nf4 with --modification_type {method}: {method} trains {what}, and a 4-bit "
                        "base is frozen; use lora, dora, ia3, adapter, prefix or prompt, or --quantize none")
    if getattr(args, "lora_bias", None) == "all":
        raise UserError("--quantize nf4 with --lora_bias all: that trains every bias of the 4-bit base; "
                        "use --lora_bias none or lora_only")
    return True


METHOD_FLAGS = {
    # flag: (methods it applies to, argparse keyword arguments)
    "--lora_rank": (("lora", "dora"), dict(type=int, help="LoRA rank r (default 8)")),
    "--lora_alpha": (("lora", "dora"), dict(type=finite_float,
                                            help="LoRA scale numerator alpha; update x alpha/r (default 16)")),
    "--lora_dropout": (("lora", "dora"), dict(type=finite_float, help="dropout on the LoRA branch input (default 0)")),
    "--lora_bias": (("lora", "dora"), dict(choices=["none", "all", "lora_only"], help="which biases train (default none)")),
    "--use_rslora": (("lora", "dora"), dict(action="store_true", default=None, help="scale by alpha/sqrt(r)")),
    "--layers_to_transform": (("lora", "dora"), dict(help='only these blocks, e.g. "0-5,-1"')),
    "--adapter_type": (("adapter",), dict(choices=["houlsby", "pfeiffer"], help="placement (default houlsby)")),
    "--adapter_size": (("adapter",), dict(type=int, help="bottleneck size m (default 64)")),
    "--adapter_reduction_factor": (("adapter",), dict(type=finite_float, help="bottleneck m = hidden / factor")),
    "--adapter_activation": (("adapter",), dict(choices=["relu", "gelu", "silu", "tanh"], help="default relu")),
    "--adapter_train_layernorms": (("adapter",), dict(action="store_true", default=None, help="also train block norms")),
    "--prefix_length": (("prefix",), dict(type=int, help="number of prefix key/value vectors per layer (default 20)")),
    "--prefix_projection": (("prefix",), dict(action="store_true", default=None, help="MLP reparameterisation")),
    "--prefix_hidden_size": (("prefix",), dict(type=int, help="hidden size of the prefix MLP (default: model width)")),
    "--num_virtual_tokens": (("prompt",), dict(type=int, help="number of virtual tokens (default 20)")),
    "--prompt_init": (("prompt",), dict(choices=["random", "vocab", "text"], help="default random")),
    "--prompt_init_text": (("prompt",), dict(help="text whose token embeddings start the prompt (--prompt_init text)")),
    "--freeze_layers": (("selective",), dict(help='blocks to freeze, e.g. "0,1,2,3", "0-5", "-1"')),
    "--train_embeddings": (("selective",), dict(action="store_true", default=None, help="also train the embeddings")),
    "--no_train_final_norm": (("selective",), dict(action="store_true", default=None, help="freeze the final norm")),
    "--train_lm_head": (("selective",), dict(action="store_true", default=None, help="also train the LM head")),
    "--feedforward_modules": (("ia3",), dict(help="IA3 targets that scale their input (comma list)")),
    "--target_modules": (("lora", "dora", "ia3", "adapter", "bitfit"),
                         dict(help='comma list of module names or suffixes, or "re:<regex>" (default: per model)')),
    "--modules_to_save": (("lora", "dora", "ia3", "adapter"), dict(help='modules trained in full, e.g. "lm_head"')),
}


def add_method_arguments(parser) -> None:
    """Add ``--modification_type`` and every method's flags to an argparse parser."""
    group = parser.add_argument_group("PEFT method")
    group.add_argument("--modification_type", default="lora", choices=list(METHODS),
                       help="which PEFT method to apply (default lora)")
    for flag, (methods, kwargs) in METHOD_FLAGS.items():
        group.add_argument(flag, **{**kwargs, "help": f"[{', '.join(methods)}] {kwargs.get('help', '')}"})


def _names(value):
    """``"c_attn,c_proj"`` -> ``["c_attn", "c_proj"]``; ``"re:.*attn.*"`` -> the regex string."""
    if value is None:
        return None
    if value.startswith("re:"):
        return value[3:]
    return [name.strip() for name in value.split(",") if name.strip()]


def config_from_args(args, model=None, tokenizer=None):
    """The method config that the parsed flags describe.

    ``model`` is needed to resolve layer specs such as ``-1``; ``tokenizer`` for ``--prompt_init text``.
    """
    name = args.modification_type
    for flag, (methods, _) in METHOD_FLAGS.items():
        if name not in methods and getattr(args, flag.lstrip("-")) is not None:
            raise UserError(f"{flag} applies to --modification_type {' or '.join(methods)}, not {name}")
    config_class = METHODS[name].config_class

    def given(value, default):
        return default if value is None else value

    if name in ("lora", "dora"):
        layers = None
        if args.layers_to_transform is not None:
            from minipeft.core.layers import num_hidden_layers, parse_layer_spec

            layers = parse_layer_spec(args.layers_to_transform, num_hidden_layers(model), "--layers_to_transform")
        return config_class(r=given(args.lora_rank, 8), lora_alpha=given(args.lora_alpha, 16.0),
                            lora_dropout=given(args.lora_dropout, 0.0), target_modules=_names(args.target_modules),
                            layers_to_transform=layers, bias=given(args.lora_bias, "none"),
                            use_rslora=bool(args.use_rslora), modules_to_save=_names(args.modules_to_save),
                            use_dora=name == "dora")
    if name == "adapter":
        size = args.adapter_size
        if size is None and args.adapter_reduction_factor is None:
            size = 64
        return config_class(adapter_type=given(args.adapter_type, "houlsby"), bottleneck_size=size,
                            reduction_factor=args.adapter_reduction_factor,
                            activation=given(args.adapter_activation, "relu"),
                            target_modules=_names(args.target_modules),
                            train_layernorms=bool(args.adapter_train_layernorms),
                            modules_to_save=_names(args.modules_to_save))
    if name == "prefix":
        return config_class(num_virtual_tokens=given(args.prefix_length, 20),
                            prefix_projection=bool(args.prefix_projection), encoder_hidden_size=args.prefix_hidden_size)
    if name == "prompt":
        init = given(args.prompt_init, "text" if args.prompt_init_text else "random")
        token_ids = None
        if init == "text":
            if not args.prompt_init_text:
                raise UserError("--prompt_init text needs --prompt_init_text \"...\"")
            if tokenizer is None:
                raise UserError("--prompt_init text needs the model's tokenizer, and this model has none")
            token_ids = tokenizer(args.prompt_init_text, add_special_tokens=False)["input_ids"]
        elif args.prompt_init_text:
            raise UserError("--prompt_init_text is used only with --prompt_init text")
        return config_class(num_virtual_tokens=given(args.num_virtual_tokens, 20),
                            prompt_tuning_init={"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}[init],
                            prompt_tuning_init_text=args.prompt_init_text, prompt_tuning_init_token_ids=token_ids,
                            tokenizer_name_or_path=getattr(tokenizer, "name_or_path", None) if token_ids else None)
    if name == "selective":
        if args.freeze_layers is None:
            raise UserError('--modification_type selective needs --freeze_layers, e.g. "0,1,2,3"')
        from minipeft.core.layers import num_hidden_layers, parse_layer_spec

        layers = parse_layer_spec(args.freeze_layers, num_hidden_layers(model), "--freeze_layers")
        return config_class(freeze_layers=layers, train_embeddings=bool(args.train_embeddings),
                            train_final_norm=not args.no_train_final_norm, train_lm_head=bool(args.train_lm_head))
    if name == "ia3":
        return config_class(target_modules=_names(args.target_modules),
                            feedforward_modules=_names(args.feedforward_modules),
                            modules_to_save=_names(args.modules_to_save))
    if name == "bitfit":
        return config_class(target_modules=_names(args.target_modules))
    raise AssertionError(name)
