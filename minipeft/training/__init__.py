"""Training: the loop (:mod:`~minipeft.training.loop`) and its parts.

- :mod:`~minipeft.training.loss`: the causal-LM loss, the one place where labels are shifted;
- :mod:`~minipeft.training.schedule`: ``get_lr`` (constant, linear, cosine; warmup);
- :mod:`~minipeft.training.optimizer`: AdamW, weight decay only where it belongs;
- :mod:`~minipeft.training.checkpoint`: atomic checkpoints and exact resume;
- :mod:`~minipeft.training.metrics`: the log line, ``metrics.jsonl``, the loss curve;
- :mod:`~minipeft.training.distributed`: devices and DistributedDataParallel;
- :mod:`~minipeft.cli.train`: ``train_llm.py`` / ``python -m minipeft train``.
"""

from minipeft.training.config import TrainingConfig
from minipeft.training.loop import train
from minipeft.training.loss import causal_lm_loss_sum, perplexity

__all__ = ["TrainingConfig", "causal_lm_loss_sum", "perplexity", "train"]
