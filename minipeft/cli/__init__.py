"""Command-line entry points: ``python -m minipeft <command>`` and the three task scripts.

Every command is a ``main(argv) -> int`` function in the module that owns it; this file only dispatches
and turns a user's mistake into one line on stderr:

- :class:`~minipeft.core.errors.UserError` (bad input) and ``OSError`` (the environment: a full or read-only disk, a
  file where a directory should be) -> ``error: ...`` naming the file or flag, exit status 2;
- a mistyped flag -> ``error: ...`` and a hint to ``--help`` (:class:`CommandLineParser`), exit status 2;
- Ctrl-C -> exit status 130; SIGTERM -> exit status 143 (128 + the signal's number, as shells report it).
"""

import argparse
import importlib
import os
import signal
import sys

from minipeft.core.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
EXIT_PIPE_CLOSED = 128 + signal.SIGPIPE  # 141: the reader of stdout left (``| head``), as shells report it


class CommandLineParser(argparse.ArgumentParser):
    """argparse, except that a usage mistake prints one ``error:`` line and where to look, not the whole usage."""

    invoked_as = None  # "python -m minipeft data" when the command came through the package, not its script

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {message}\n(see {CommandLineParser.invoked_as or self.prog} --help)\n")


# command name -> (module holding ``main(argv) -> int``, one-line help)
COMMANDS = {
    "modify": ("minipeft.cli.modify", "apply a PEFT method to a model and print exact parameter statistics"),
    "train": ("minipeft.cli.train", "fine-tune a model with a PEFT method (the training loop)"),
    "data": ("minipeft.cli.data", "load, template, tokenize and batch instruction data; show samples"),
    "generate": ("minipeft.cli.generate", "generate text with a base model and an adapter"),
    "merge": ("minipeft.cli.merge", "merge an adapter into its base model and export a plain HF model"),
    "compare": ("minipeft.cli.compare", "train several methods on the same budget and tabulate the results"),
    "builtin-data": ("minipeft.cli.builtin_data", "write the built-in instruction data (builtin/default_data.json)"),
    "pretrain": ("minipeft.cli.pretrain", "pretrain the built-in tiny model from scratch (writes builtin/model)"),
}


def handle_signals_after_loading() -> None:
    """The entry scripts leave at once on Ctrl-C or SIGTERM while torch and transformers load (nothing is
    written yet; an interrupt there would surface as a library's ImportError with a traceback). Once loaded:
    Ctrl-C raises KeyboardInterrupt (exit 130) and SIGTERM exits 143 after cleanup, both through :func:`run`."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(EXIT_TERMINATED))


def ignore_late_interrupts() -> None:
    """The command's work is done and its exit status decided: a Ctrl-C, SIGTERM or SIGHUP arriving now (a second
    Ctrl-C just after the first's checkpoint was saved, a terminal closed) changes nothing. Without this, one
    landing while Python shuts down kills the process by the signal instead of the status the command chose."""
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # (no SIGHUP on Windows)
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


def run(main, argv=None, leaving: bool = False) -> int:
    """Call ``main(argv)``; a :class:`UserError` becomes ``error: ...`` on stderr and exit status 2.

    ``leaving``: the process exits with the returned status (the entry scripts), so interrupts are ignored
    from the moment ``main`` ends (:func:`ignore_late_interrupts`)."""
    try:
        try:
            return main(sys.argv[1:] if argv is None else argv) or 0
        finally:
            if leaving:
                ignore_late_interrupts()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:
        return stdout_closed()
    except OSError as error:  # the environment, not the code: name the path and the reason
        where = f"{error.filename}: " if error.filename is not None else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # Ctrl-C inside a library's lazy import comes back wrapped in its ImportError
        if not caused_by_interrupt(error):
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def stdout_closed() -> int:
    """``... | head`` closed stdout: stop writing quietly (stdout now goes nowhere, so the flush at exit cannot
    fail a second time) and exit 141, as a program killed by SIGPIPE would."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_PIPE_CLOSED


def caused_by_interrupt(error: BaseException) -> bool:
    """True when a ``KeyboardInterrupt`` is somewhere in ``error``'s chain of causes."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def main(argv=None, leaving: bool = False) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        print(f"error: unknown command {argv[0]!r}: one of {', '.join(COMMANDS)} (see python -m minipeft --help)",
              file=sys.stderr)
        return EXIT_USER_ERROR
    if not argv or argv[0] in ("-h", "--help"):
        lines = ["usage: python -m minipeft <command> [options]", "", "commands:"]
        lines += [f"  {name:<13} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        if not argv:  # no command is a usage error, as argparse's own: the usage, then one line, exit 2
            print("\n".join([*lines, "error: no command given: one of " + ", ".join(COMMANDS)]), file=sys.stderr)
            return EXIT_USER_ERROR
        try:
            print("\n".join(lines), flush=True)
        except BrokenPipeError:
            return stdout_closed()
        return 0
    module_name, _ = COMMANDS[argv[0]]
    CommandLineParser.invoked_as = f"python -m minipeft {argv[0]}"  # (the scripts' parsers are named for them)
    try:
        # the import goes inside run(): Ctrl-C while torch and transformers load is exit 130 too, not a traceback
        return run(lambda arguments: importlib.import_module(module_name).main(arguments), argv[1:], leaving)
    finally:
        CommandLineParser.invoked_as = None
