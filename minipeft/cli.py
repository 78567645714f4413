"""Command-line entry points: ``python -m minipeft <command>`` and the three task scripts.

Every command is a ``main(argv) -> int`` function in the module that owns it; this file only dispatches
and turns :class:`~minipeft.errors.UserError` into one line on stderr and exit status 2.
"""

import importlib
import sys

from minipeft.errors import UserError

# command name -> (module holding ``main(argv) -> int``, one-line help)
COMMANDS = {
    "modify": ("minipeft.modify", "apply a PEFT method to a model and print exact parameter statistics"),
    "train": ("minipeft.training.cli", "fine-tune a model with a PEFT method (the training loop)"),
    "data": ("minipeft.data.cli", "load, template, tokenize and batch instruction data; show samples"),
    "generate": ("minipeft.generation_cli", "generate text with a base model and an adapter"),
    "merge": ("minipeft.merge", "merge an adapter into its base model and export a plain HF model"),
    "compare": ("minipeft.compare", "train several methods on the same budget and tabulate the results"),
}


def run(main, argv=None) -> int:
    """Call ``main(argv)``; a :class:`UserError` becomes ``error: ...`` on stderr and exit status 2."""
    try:
        return main(sys.argv[1:] if argv is None else argv) or 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: python -m minipeft <command> [options]", "", "commands:"]
        lines += [f"  {name:<9} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stdout if not argv or argv[0] in ("-h", "--help") else sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module_name, _ = COMMANDS[argv[0]]
    command_main = importlib.import_module(module_name).main
    return run(command_main, argv[1:])
