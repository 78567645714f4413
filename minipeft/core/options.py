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
"""

import dataclasses


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
