"""What quantizing the base to NF4 costs in loss, measured where a user decides (``modify_llm.py --quantize
nf4`` and the end of ``train_llm.py --quantize nf4``).

The float base is evaluated on a few validation batches, quantized to NF4 in place (the same codes the 4-bit
run used: :func:`minipeft.quantization.nf4.quantize_model` gives what streaming gives, bit for bit), and evaluated
again on the same batches, in the same precision. No adapter is involved: the difference is the base's 4-bit
rounding alone. A handful of batches keeps it cheap (seconds on SmolLM2); it is an estimate, and the line
says how many batches and target tokens it rests on.
"""

import itertools
import os
from dataclasses import dataclass

import torch

from minipeft.quantization.nf4 import quantize_model
from minipeft.training.distributed import DistributedContext
from minipeft.training.evaluation import evaluate

# What a 4-bit layer multiplies in, by the run's resolved --precision: fp32 is float32 everywhere.
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Validation batches each side is evaluated on: enough to see a change of a few percent, cheap enough to run
# on every 4-bit run.
QUANTIZATION_COST_BATCHES = 4


@dataclass
class QuantizationCost:
    """The eval loss of one float base and of the same base in NF4, on the same batches."""

    float_loss: float
    nf4_loss: float
    batches: int
    target_tokens: int

    def line(self) -> str:
        change = (self.nf4_loss - self.float_loss) / self.float_loss
        return (f"Loss change of quantizing the base to NF4: eval loss {self.float_loss:.4f} (float base) -> "
                f"{self.nf4_loss:.4f} (NF4 base), {change:+.1%}, on the first {self.batches} validation "
                f"batch(es), {self.target_tokens:,} target tokens")


def measure_quantization_cost(model, loader, autocast, device: torch.device, quantize_lm_head: bool = False,
                              compute_dtype: torch.dtype = None,
                              max_batches: int = QUANTIZATION_COST_BATCHES) -> QuantizationCost:
    """Evaluate the float ``model`` on the first ``max_batches`` of ``loader``, quantize it to NF4 **in place**
    (``model`` is a 4-bit model afterwards), and evaluate it again on the same batches."""
    batches = list(itertools.islice(loader, max_batches))
    context = DistributedContext(device=device)  # this process alone, even under torchrun
    float_loss, _, tokens = evaluate(model, batches, context, autocast)
    quantize_model(model, quantize_lm_head, compute_dtype=compute_dtype)
    nf4_loss, _, _ = evaluate(model, batches, context, autocast)
    return QuantizationCost(float_loss, nf4_loss, len(batches), tokens)


def float_model_fits(n_parameters: int, device: torch.device) -> bool:
    """Whether a float32 copy of ``n_parameters`` weights (plus a quarter for activations) fits in the memory
    ``device`` has free now: the end of a 4-bit run loads the float base only when it does."""
    needed = 4 * n_parameters * 1.25
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] > needed
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    return available > needed
