"""Did the run train? The one line for a run that failed, never "Trained N steps" (issue #26).

Two ways a run fails, each one ``error:`` line and exit status 2 (:class:`~minipeft.core.errors.UserError`):

- *diverged* during training: :func:`divergence_message`, after ``--max_nonfinite_steps`` skipped steps in a row;
- *trained nothing usable*, found at the end by :func:`failure_message`, before the final adapter is written
  (so ``adapter/`` and ``metrics.json`` never hold a failed run): no optimizer step was taken (every step's loss
  or gradient was not finite), the final eval loss is not finite, or an adapter tensor is not finite or beyond
  :data:`WEIGHT_BOUND` (an adapter's weights are of order 1: a learning rate of 1e30 makes them 1e30, finite
  yet meaningless).
"""

import math

from minipeft.core.finite import first_nonfinite_tensor

WEIGHT_BOUND = 1e6  # |w| of any trained adapter weight; a million times the usual scale is a broken run


def failure_message(state, optimizer, tensors: dict, precision: str) -> str | None:
    """Why the finished run at ``state`` is not a result (``None``: it is). ``tensors``: the adapter's, by name
    (empty on the processes of a sharded run that do not hold them)."""
    remedies = "lower --learning_rate (or a scale such as --lora_alpha)" + (
        " or use --precision fp32" if precision != "fp32" else "")
    if not optimizer.state:  # AdamW keeps state for a parameter from its first step on
        return (f"no optimizer step was taken: the loss or gradient was not finite at every one of the "
                f"{state.step} steps; {remedies}; no adapter saved")
    if state.eval_loss is not None and not math.isfinite(state.eval_loss):
        return f"the eval loss at step {state.eval_step} is {state.eval_loss}; {remedies}; no adapter saved"
    bad = first_nonfinite_tensor(tensors)
    if bad is not None:
        return f"adapter tensor {bad} is not finite at step {state.step}; {remedies}; no adapter saved"
    for name, tensor in tensors.items():
        largest = float(tensor.detach().abs().max()) if tensor.numel() and tensor.is_floating_point() else 0.0
        if largest > WEIGHT_BOUND:
            return (f"adapter tensor {name} reaches {largest:.3g} at step {state.step}, beyond any trained "
                    f"adapter's scale ({WEIGHT_BOUND:g}); {remedies}; no adapter saved")
    return None


def divergence_message(what: str, steps: int, precision: str, checkpoints: list) -> str:
    """The one line for a run stopped by non-finite steps: what was not finite, what to try, where to go back.

    Every checkpoint holds finite weights (the loop saves no other), so the newest one is a good one.
    """
    remedies = "lower --learning_rate" + (" or use --precision fp32" if precision != "fp32" else "")
    where = (f"the last good checkpoint (finite weights) is {checkpoints[-1]}" if checkpoints
             else "no checkpoint was saved before it")
    note = ", while the loss was finite" if what == "gradient norm" else ""
    return (f"training diverged: the {what} was not finite for {steps} steps in a row{note} "
            f"(--max_nonfinite_steps); {remedies}; {where}")

