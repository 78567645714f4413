"""Modules swapped in for the length of a run, and the very same objects put back afterwards.

A faster path that needs a module of its own (a lean norm, a projection that drops by gaps) is put in the way
adapters are: the parent's attribute is set (``setattr(parent, name, stand_in)``, nn.Module's own way to
replace a child), never a class or a ``forward`` of transformers. :func:`swapped_in` does that for a list of
:class:`Swap` s and undoes it on the way out, whatever happened in between::

    enter      parent.name = stand_in                 (the original is kept aside)
    exit       original.weight = stand_in.weight      (for each name in ``shared``: a resumed run may have
                                                        given the stand-in a new Parameter; the original keeps it)
               parent.name = original                 (the same object as before the run)

Putting back never raises: a run does not end in a traceback, and lose its saved adapter, because an
optimisation could not be undone. If the parent's child is no longer the stand-in (another tool replaced it
during the run), it is left as it is, with a warning; any other failure is a warning too, and the model keeps
the stand-in, which computes the same values.
"""

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn


def warn_at_run_time(message: str) -> None:
    """The default ``warn`` of every optimisation: a :class:`RuntimeWarning` (a run passes its own printer)."""
    warnings.warn(message, RuntimeWarning, stacklevel=2)


@dataclass
class Swap:
    """Children of one ``parent``, replaced together and put back together (never one without the others).

    Attributes:
        parent: the module whose children are replaced.
        stand_ins: ``{child name: the module that stands in for it}``.
        shared: names of Parameters a stand-in holds of its original (the same objects, e.g. ``"weight"``);
            an original that has such a Parameter takes the stand-in's back.
        originals: ``{child name: the original child}``, filled in when the swap is made.
    """

    parent: nn.Module
    stand_ins: dict
    shared: tuple = ()
    originals: dict = field(default_factory=dict)

    def make(self) -> None:
        for name, stand_in in self.stand_ins.items():
            self.originals[name] = getattr(self.parent, name)
            setattr(self.parent, name, stand_in)

    def undo(self, warn) -> None:
        """Put the originals back (see the module docstring); raises only what ``warn`` should hear of."""
        for name, original in self.originals.items():
            for parameter_name in self.shared:
                if hasattr(original, parameter_name):
                    parameter = getattr(self.stand_ins[name], parameter_name)
                    if parameter is not getattr(original, parameter_name):
                        setattr(original, parameter_name, parameter)
        changed = [name for name, stand_in in self.stand_ins.items() if getattr(self.parent, name, None) is not stand_in]
        if changed:
            warn(f"warning: {type(self.parent).__name__}.{changed[0]} was replaced during the run; left as it is")
            return
        for name, original in self.originals.items():
            setattr(self.parent, name, original)


@contextmanager
def swapped_in(swaps: list, warn=None, what: str = "the original modules",
               if_left: str = "the model keeps the stand-in, which computes the same values"):
    """Within the ``with``: every :class:`Swap` of ``swaps`` made; yields how many. Afterwards the originals
    are back, each swap as one. ``warn(message)`` (default :func:`warn_at_run_time`) hears of a swap that could
    not be undone, in the words ``could not put {what} back in a {parent class} ({error}); {if_left}``."""
    warn = warn or warn_at_run_time
    for swap in swaps:
        swap.make()
    try:
        yield len(swaps)
    finally:
        for swap in swaps:
            try:
                swap.undo(warn)
            except Exception as error:  # noqa: BLE001 (never cost the run its saved adapter)
                warn(f"warning: could not put {what} back in a {type(swap.parent).__name__} ({error}); {if_left}")
