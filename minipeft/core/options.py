"""Settings that are also command-line flags: a setting's flag, help and default, declared once, on its field.

A method's config dataclass declares each setting a user can give on the command line with :func:`option`
instead of a bare default (from :mod:`minipeft.methods.lora`)::

    @dataclass
    class LoRAConfig:
        r: int = option(8, flag="--lora_rank", help="LoRA rank r")
        lora_alpha: float = option(16.0, flag="--lora_alpha", help="scale numerator alpha; the update is x alpha/r")
        bias: str = option("none", flag="--lora_bias", choices=["none", "all", "lora_only"], help="which biases train")
        target_modules: object = target_modules_option()
        init_lora_weights: bool = True          # no flag: an ordinary field

``minipeft/cli/arguments.py`` builds the flags of every method in :data:`minipeft.methods.METHODS` from these
fields, so a new method module's options reach ``modify_llm.py``, ``train_llm.py`` and ``compare`` with no edit
to ``cli/``. The rules, all of them:

- **Default.** A flag that is not given leaves the field at its dataclass default: ``LoRAConfig()`` and
  ``--modification_type lora`` agree by construction. ``--help`` shows the default (``(default: 8)``).
- **Type.** The flag reads what the field's annotation says: ``int`` an integer, ``float`` a finite float
  (:func:`~minipeft.core.finite.finite_float`), ``bool`` a switch that sets the opposite of the default
  (``--use_rslora`` sets a False default to True; name a True default's flag ``--no_...``), anything else the
  text as typed. ``parse``, when given, turns what was read into the field's value (``"c_attn,c_proj"`` ->
  ``["c_attn", "c_proj"]``; ``random`` -> ``"RANDOM"``). ``choices`` are what the user may type.
- **Shared flags.** Several configs may declare the same flag (``--target_modules``): it is one flag that
  applies to each of their methods, and it must be declared the same way in each (use
  :func:`target_modules_option` and :func:`modules_to_save_option`). A flag given with a method whose config
  does not declare it is an error.
- **Values that need the model.** A list of blocks (``"0-5,-1"``: ``-1`` needs the number of blocks) is
  declared with :func:`layers_option`, and the command line converts it, for every method alike. Any other
  setting that only the model or tokenizer can turn into a value (an init text needs the tokenizer) is
  converted by the config's classmethod ``from_flags(given, model, tokenizer)``, where ``given`` maps field
  names to the values of the flags the user gave; without that classmethod the config is ``Config(**given)``.
- **Checks.** Range and type checks live in the config's ``validate(name=str)``, nowhere else. ``name(field)`` is
  how a message names the setting: the field itself by default (the API; ``adapter_config.json``, whose
  loader puts the file in front), the flag on the command line (``--lora_dropout must be in [0, 1), got 1.5``).

**Run settings.** The training and data configs (:class:`minipeft.training.config.TrainingConfig`,
:class:`minipeft.data.config.DataConfig`) declare their flags the same way, once, on the field, with
:func:`setting`, and :func:`add_setting_flags` adds them to a parser. Their flag is ``--<field name>`` and their
help is argparse's own text (``%(default)s`` shows the default)::

    epochs: int = setting(1, "passes over the training data (default: %(default)s)")

A ``bool`` field is a switch: ``--name`` sets a False default to True; a True default's ``--no_name`` sets it to
False; a True default's ``--name`` also gets ``--no-name`` (argparse's ``BooleanOptionalAction``).
"""

import argparse
import dataclasses
import re
import typing

from minipeft.core.errors import UserError
from minipeft.core.finite import finite_float


def option(default, *, flag: str = None, help: str = "", choices=None, parse=None, layer_spec=False):
    """A dataclass field whose value a user can also give as ``flag`` (see the module docstring).

    Args:
        default: the setting's one default, for the API and the command line alike.
        flag: ``"--lora_rank"``; None: an ordinary field with no flag.
        help: one line for ``--help``, without the default (that is added from ``default``).
        choices: the words a user may type for this flag.
        parse: turns the flag's value (text, or a number for int/float fields) into the field's value.
        layer_spec: the flag's text names transformer blocks (``"0-5,-1"``); the command line turns it into
            block indices with the model's block count (see :func:`layers_option`).
    """
    metadata = {"flag": flag, "help": help, "choices": choices, "parse": parse, "layer_spec": layer_spec}
    if isinstance(default, (list, dict, set)):  # a mutable default: each config gets its own copy
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(config_class, field_name: str):
    """The flag of a config field (``"--lora_rank"`` for ``LoRAConfig``'s ``r``), or None."""
    for field in dataclasses.fields(config_class):
        if field.name == field_name:
            return field.metadata.get("flag")
    raise KeyError(field_name)


def flag_names(config_class):
    """``name(field)`` for ``validate``: a field's flag where it has one, else the field's own name."""
    return lambda field_name: flag_of(config_class, field_name) or field_name


def module_names(text: str):
    """``"c_attn,c_proj"`` -> ``["c_attn", "c_proj"]``; ``"re:.*attn.*"`` -> the regex string ``".*attn.*"``."""
    if text.startswith("re:"):
        try:
            re.compile(text[3:])
        except re.error as error:  # "re:[": a traceback from deep in the injection otherwise
            raise UserError(f"--target_modules {text!r}: not a regular expression ({error})") from None
        return text[3:]
    return [name.strip() for name in text.split(",") if name.strip()]


def target_modules_option():
    """``target_modules``, as every method that adapts named layers declares it (one ``--target_modules``)."""
    return option(None, flag="--target_modules", parse=module_names,
                  help='comma list of module names or suffixes, or "re:<regex>" (default: the method\'s own for '
                       'the model family, see its page)')


def modules_to_save_option():
    """``modules_to_save``: modules trained in full beside the adapter (one ``--modules_to_save``)."""
    return option(None, flag="--modules_to_save", parse=module_names,
                  help='modules trained in full, e.g. "lm_head"')


def layers_option(default, *, flag: str, help: str):
    """A list of transformer blocks (``--layers_to_transform``, ``--freeze_layers``): the user types
    ``"0,1,2,3"``, ``"0-5"`` or ``"-1"`` (the last block), and the command line converts that text with the
    model's block count (:func:`minipeft.core.layers.parse_layer_spec`) before the config is built."""
    return option(default, flag=flag, help=help, layer_spec=True)


# --- run settings: the flags of TrainingConfig and DataConfig ------------------------------------------------------

def setting(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING, flag: str = None,
            type=None, choices=None, metavar: str = None, flag_default=dataclasses.MISSING, off_flag: str = None,
            off_help: str = ""):
    """A run setting's field and its flag (see "Run settings" in the module docstring).

    Args:
        default / default_factory: the field's default (a factory: computed when a config or parser is made).
        help: the flag's ``--help`` text, as argparse takes it (``%(default)s``: the flag's default).
        flag: the flag's name when it is not ``--<field name>`` (a True switch: ``--no_<field name>``).
        type: argparse's ``type=`` when the annotation's is not enough (``int``: int, ``float``: a finite float).
        choices, metavar: as argparse takes them.
        flag_default: the flag's default when it differs from the field's (``--learning_rate``: None, the
            method's own rate, while the API's default is LoRA's).
        off_flag, off_help: a second switch that turns the setting off (``--no_cache``: ``cache_dir`` None);
            argparse stores it under its own name, and the config is built from both.
    """
    metadata = {"setting": True, "flag": flag, "help": help, "type": type, "choices": choices, "metavar": metavar,
                "flag_default": flag_default, "off_flag": off_flag, "off_help": off_help}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def setting_flag(field: dataclasses.Field) -> str:
    """The flag of a :func:`setting` field: ``--epochs``, or the one it declares."""
    return field.metadata["flag"] or f"--{field.name}"


def add_setting_flags(group, config_class) -> None:
    """Add a flag to argparse ``group`` for each :func:`setting` field of ``config_class``, in field order."""
    for field in dataclasses.fields(config_class):
        if not field.metadata.get("setting"):
            continue  # an ordinary field (TrainingConfig.seed: DataConfig's --seed sets both)
        group.add_argument(setting_flag(field), **setting_keywords(field))
        if field.metadata["off_flag"]:
            group.add_argument(field.metadata["off_flag"], action="store_true", help=field.metadata["off_help"])


def setting_keywords(field: dataclasses.Field) -> dict:
    """``add_argument``'s keywords for one :func:`setting` field."""
    metadata = field.metadata
    default = field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
    if metadata["flag_default"] is not dataclasses.MISSING:
        default = metadata["flag_default"]
    keywords = {"dest": field.name, "help": metadata["help"]}
    if field.type is bool:
        if not default:
            return dict(keywords, action="store_true")
        if setting_flag(field).startswith("--no_"):
            return dict(keywords, action="store_false")
        return dict(keywords, action=argparse.BooleanOptionalAction, default=default)
    kinds = set(typing.get_args(field.type)) - {type(None)} or {field.type}  # int | None -> int
    parse = metadata["type"] or {int: int, float: finite_float}.get(kinds.pop() if len(kinds) == 1 else None)
    keywords.update(default=default)
    for key, value in (("type", parse), ("choices", metadata["choices"]), ("metavar", metadata["metavar"])):
        if value is not None:
            keywords[key] = value
    return keywords
