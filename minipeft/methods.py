"""The PEFT methods minipeft knows, by the name users pass as ``--modification_type``.

Each method lives in its own module with its config dataclass beside it; this table only says where,
what its ``peft_type`` is in adapter files, and whether its update can be merged into the weights.
Every ``apply`` function has the same shape: ``apply(model, config) -> prompt_encoder | None`` — it edits
``model`` in place (the model is already frozen) and returns the prompt/prefix module that prompt-learning
methods keep beside the base model, or None.
"""

import importlib
from dataclasses import dataclass

from minipeft.errors import UserError
from minipeft.finite import finite_float


@dataclass(frozen=True)
class Method:
    name: str               # --modification_type
    module: str             # where the method lives
    config_class_name: str  # its config dataclass
    apply_name: str         # apply(model, config) -> prompt_encoder | None
    peft_type: str          # "peft_type" in adapter_config.json (peft's own name where peft has the method)
    mergeable: bool
    learning_rate: float    # the default peak learning rate (AdamW) of train_llm.py and compare
    learning_rate_source: str  # where that rate comes from
    why_not_mergeable: str = ""

    @property
    def config_class(self):
        return getattr(importlib.import_module(self.module), self.config_class_name)

    def apply(self, model, config):
        return getattr(importlib.import_module(self.module), self.apply_name)(model, config)


# Default learning rates, one per method, for AdamW and short runs (tens to hundreds of steps). How far a
# method's parameters sit from the loss sets its rate: matrices added beside frozen weights (LoRA, adapters)
# take ~1e-3; a few vectors or virtual tokens need 3e-3 to 3e-2; base weights (selective) need what full
# fine-tuning uses. Each method's docs page repeats its rate and source. ``--learning_rate`` overrides.
METHODS = {
    method.name: method
    for method in [
        Method("lora", "minipeft.lora", "LoRAConfig", "apply_lora", "LORA", mergeable=True,
               learning_rate=1e-3, learning_rate_source="between the LoRA paper's 2e-4 (GPT-2, 5 epochs) and "
               "peft's causal-LM LoRA example's 3e-3 (20 epochs)"),
        Method("dora", "minipeft.lora", "LoRAConfig", "apply_lora", "LORA", mergeable=True,
               learning_rate=1e-3, learning_rate_source="as LoRA (DoRA trains the same matrices plus a magnitude)"),
        Method("ia3", "minipeft.ia3", "IA3Config", "apply_ia3", "IA3", mergeable=True,
               learning_rate=3e-3, learning_rate_source="Liu et al. 2022 (T-Few), the IA3 paper: 3e-3"),
        Method("adapter", "minipeft.adapters", "AdapterConfig", "apply_adapters", "BOTTLENECK_ADAPTER",
               mergeable=False, learning_rate=1e-3, learning_rate_source="Houlsby et al. 2019, inside their sweep "
               "{3e-5, 3e-4, 3e-3}",
               why_not_mergeable="a bottleneck adapter has a nonlinearity between its "
               "down and up projections, so it is not a change of any existing weight"),
        Method("prefix", "minipeft.prefix", "PrefixTuningConfig", "apply_prefix_tuning", "PREFIX_TUNING",
               mergeable=False, learning_rate=1e-2, learning_rate_source="peft's prefix-tuning example (1e-2)",
               why_not_mergeable="prefixes are extra attention keys and values, not a change of any weight"),
        Method("prompt", "minipeft.prompt", "PromptTuningConfig", "apply_prompt_tuning", "PROMPT_TUNING",
               mergeable=False, learning_rate=3e-2, learning_rate_source="peft's prompt-tuning example with "
               "AdamW (3e-2); Lester et al. 2021 use 0.3 with Adafactor, whose steps scale with the weights",
               why_not_mergeable="virtual tokens are extra inputs, not a change of any weight"),
        Method("selective", "minipeft.freeze", "SelectiveConfig", "apply_selective", "SELECTIVE",
               mergeable=False, learning_rate=1e-4, learning_rate_source="full fine-tuning practice for small "
               "language models (1e-5 to 1e-4), at its top for short runs",
               why_not_mergeable="selective fine-tuning trains the base weights themselves; "
               "save the full model instead"),
        Method("bitfit", "minipeft.bitfit", "BitFitConfig", "apply_bitfit", "BITFIT",
               mergeable=False, learning_rate=1e-3, learning_rate_source="Ben Zaken et al. 2021, the top of "
               "their sweep {1e-4, 4e-4, 7e-4, 1e-3}",
               why_not_mergeable="BitFit trains the base biases themselves; save the full model instead"),
    ]
}


def default_learning_rate(name: str) -> float:
    """The default peak learning rate of method ``name`` (see :data:`METHODS`)."""
    return METHODS[name].learning_rate


def method_for_config(config) -> Method:
    """The :class:`Method` a config object belongs to (DoRA is LoRA with ``use_dora=True``, as in peft)."""
    for method in METHODS.values():
        if type(config).__name__ == method.config_class_name and type(config).__module__ == method.module:
            if method.peft_type == "LORA":
                return METHODS["dora" if getattr(config, "use_dora", False) else "lora"]
            return method
    raise UserError(f"{type(config).__name__} is not the config of a minipeft method")


def method_for_peft_type(peft_type: str, source: str = "adapter_config.json") -> Method:
    for method in METHODS.values():
        if method.peft_type == peft_type:
            return method
    known = sorted({method.peft_type for method in METHODS.values()})
    raise UserError(f"{source}: peft_type {peft_type!r} is not supported (known: {', '.join(known)})")


# --- command-line flags ------------------------------------------------------------------------------------
# The flags of every method, shared by modify_llm.py, train_llm.py and `python -m minipeft compare`. A flag
# of one method given with another method is an error, never silently ignored.

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
            from minipeft.freeze import num_hidden_layers, parse_layer_spec

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
        from minipeft.freeze import num_hidden_layers, parse_layer_spec

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
