"""Training: the loop (:mod:`~minipeft.training.loop`) and its parts.

- :mod:`~minipeft.training.plan`: the run's steps, warmup and effective batch, fixed before step one;
- :mod:`~minipeft.training.loss`: the causal-LM loss (the reference), the one place where labels are shifted;
- :mod:`~minipeft.training.schedule`: ``get_lr`` (constant, linear, cosine; warmup);
- :mod:`~minipeft.training.optimizer`: AdamW, weight decay only where it belongs;
- :mod:`~minipeft.training.prepare`: precision and gradient checkpointing, before step one;
- :mod:`~minipeft.training.run_dir`: the output directory, its lock and ``--resume``: checked before loading;
- :mod:`~minipeft.training.state`: what a run carries from step to step (``TrainState``, ``TrainingRun``);
- :mod:`~minipeft.training.gradients`: token-exact gradient accumulation, and the check that gradients arrive;
- :mod:`~minipeft.training.evaluation`: eval loss and perplexity over the validation set;
- :mod:`~minipeft.training.signals`: Ctrl-C and SIGTERM: finish the step, checkpoint, return;
- :mod:`~minipeft.training.checkpoint`: atomic checkpoints and exact resume;
- :mod:`~minipeft.training.resume_checks`: what a resume checks first (another run's settings or data, a
  file swapped in) and what may change on resume;
- :mod:`~minipeft.training.state_checks`: a checkpoint's saved state and tensors, field by field;
- :mod:`~minipeft.training.metrics`: the log line, ``metrics.jsonl``, the loss curve;
- :mod:`~minipeft.training.report`: a finished run's summary (``metrics.json``) and closing lines;
- :mod:`~minipeft.training.distributed`: devices and DistributedDataParallel;
- :mod:`minipeft.fast`: the optimisations a run switches on (the fast loss, dropout by gaps, the lean
  RMSNorm, ``--compile``), each equal to its reference;
- :mod:`~minipeft.cli.train`: ``train_llm.py`` / ``python -m minipeft train``.
"""

from minipeft.training.config import TrainingConfig
from minipeft.training.loop import train
from minipeft.training.loss import causal_lm_loss_sum, perplexity
from minipeft.training.run_dir import open_run_dir
from minipeft.training.state import TrainResult

__all__ = ["TrainResult", "TrainingConfig", "causal_lm_loss_sum", "perplexity", "open_run_dir", "train"]
