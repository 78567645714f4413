"""AdamW over the adapter's parameters, with weight decay only where it belongs.

Weight decay pulls a parameter toward zero. That is a sensible prior only where zero means "no change to
the model", so, in one line: **decay the weight matrices of the ``nn.Linear`` layers a method added (LoRA A
and B, bottleneck-adapter projections, the prefix MLP); never biases, norms, scaling vectors (IA3, DoRA
magnitudes), prompt/prefix embeddings, or base-model weights a method unfroze (BitFit, selective
fine-tuning, ``modules_to_save``), whose zero would wipe out the pretrained model instead.**
(nanoGPT decides by ``dim >= 2``; that would decay prompt embeddings, an IA3 vector stored ``(out, 1)``,
and the base weights of selective fine-tuning.)

The decision is structural, not by name: a method's layers (:class:`~minipeft.core.adapter_layer.AdapterLayer`)
and prompt encoder (:class:`~minipeft.core.virtual_tokens.PromptEncoder`) say which parameters they added
(``adapter_parameters()``); of those, the weights of ``nn.Linear`` modules decay.
"""

import torch
from torch import nn

from minipeft.core.adapter_layer import AdapterLayer
from minipeft.core.virtual_tokens import PromptEncoder


def added_linear_weights(model: nn.Module) -> set:
    """``id()`` of the weight of every ``nn.Linear`` that a method layer or prompt encoder of ``model`` adds."""
    ids = set()
    for module in model.modules():
        if not isinstance(module, (AdapterLayer, PromptEncoder)):
            continue
        added = {id(parameter) for parameter in module.adapter_parameters().values()}
        ids.update(id(child.weight) for child in module.modules()
                   if isinstance(child, nn.Linear) and id(child.weight) in added)
    return ids


def parameter_groups(model: nn.Module, weight_decay: float) -> list:
    """Two AdamW groups over the trainable parameters: with and without weight decay (module docstring)."""
    decayed = added_linear_weights(model)
    decay, no_decay = [], []
    for parameter in model.parameters():  # a tied parameter is yielded once
        if parameter.requires_grad:
            (decay if id(parameter) in decayed else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float,
                    betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019, https://arxiv.org/abs/1711.05101) on the trainable parameters.

    Frozen parameters are not given to the optimizer at all: no state, no memory. On CPU and CUDA the
    *fused* AdamW updates all parameters in one kernel per group instead of ~10 small ops per parameter
    (SmolLM2 with LoRA on 7 projections has 420 of them; on a busy CPU each small op waits for the thread
    pool); it computes the same update up to float rounding.
    """
    groups = [group for group in parameter_groups(model, weight_decay) if group["params"]]
    devices = {parameter.device.type for group in groups for parameter in group["params"]}
    dtypes = {parameter.dtype for group in groups for parameter in group["params"]}
    fused = bool(groups) and devices <= {"cpu", "cuda"} and dtypes <= {torch.float32, torch.float16, torch.bfloat16}
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused or None)
