"""The training loop's settings: one dataclass, one field per ``train_llm.py`` flag of the same name.

Each field declares its flag's help and default once, with :func:`~minipeft.core.options.setting`, and
:func:`add_training_arguments` generates the flags from the fields. The data flags (``--batch_size``, ``--seed``,
``--max_length``, ...) belong to :class:`minipeft.data.DataConfig` and the method flags (``--modification_type``,
``--lora_rank``, ...) to :mod:`minipeft.methods`.
"""

import argparse
from dataclasses import dataclass

from minipeft.core.bounds import path_name, thread_count
from minipeft.core.errors import UserError
from minipeft.core.finite import require_finite
from minipeft.core.options import add_setting_flags, setting
from minipeft.methods import METHODS
from minipeft.training.schedule import SCHEDULES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SHARDINGS = ("ddp", "fsdp")
LEARNING_RATE_HELP = ("peak learning rate (default: the method's own: "
                      + ", ".join(f"{name} {method.learning_rate:g}" for name, method in METHODS.items()) + ")")


@dataclass
class TrainingConfig:
    """How the adapter is trained.

    Args:
        output_dir: where the adapter, checkpoints and metrics go (layout: :mod:`minipeft.training.loop`).
        epochs: passes over the training data (ignored when ``max_steps`` is given). One by default: on the
            built-in task one epoch of LoRA takes the eval loss down by ~70%, in about a minute on 2 cores.
        max_steps: optimizer steps to take, overriding ``epochs``.
        gradient_accumulation_steps: micro-batches per optimizer step; the loss is normalised by the target
            tokens of the whole window, so ``batch b × k`` trains exactly like one batch of ``b·k``.
        learning_rate: peak learning rate, reached after warmup. ``train_llm.py`` without ``--learning_rate``
            uses the method's own default (``Method.learning_rate`` in :mod:`minipeft.methods`); the 1e-3 here
            is LoRA's.
        lr_schedule: ``constant``, ``linear`` or ``cosine`` (decaying to ``min_lr``).
        warmup_steps / warmup_ratio: linear warmup, in optimizer steps or as a fraction of them (one of them).
        min_lr: where ``linear`` and ``cosine`` end.
        weight_decay: AdamW's decoupled weight decay, applied only where it belongs (see
            :mod:`minipeft.training.optimizer`).
        max_grad_norm: clip the global gradient norm to this (0: no clipping; the norm is logged either way).
        precision: ``fp32``; ``bf16`` (autocast, CPU or CUDA); ``fp16`` (autocast + grad scaler, CUDA only);
            ``auto``: bf16 where the hardware computes it natively (CUDA with bf16, a CPU with AMX or
            AVX512_BF16), else fp32 (:mod:`minipeft.training.precision`).
        tf32: let CUDA matmuls use TensorFloat-32 (no effect on CPU).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        num_threads: CPU threads for PyTorch (None: ``train_llm.py`` chooses, see ``choose_cpu_threads``).
        gradient_checkpointing: recompute activations in backward (less memory, ~30% more time).
        compile: run the transformer blocks through ``torch.compile`` (:mod:`minipeft.fast.compile`):
            faster steps after a one-time compile (~75 s for SmolLM2 on 2 cores, seconds when cached).
        eval_every: evaluate every N optimizer steps and at the end (None: 5 evaluations per run).
        eval_max_batches: evaluate on at most this many validation batches (None: all of them).
        log_every: print the log line every N optimizer steps.
        save_every: write a checkpoint every N steps (None: at every evaluation); always at the end.
        save_total_limit: keep this many most recent checkpoints (the best one is kept as well).
        early_stopping_patience: stop after N evaluations without a better eval loss (0: never).
        max_nonfinite_steps: stop after N optimizer steps in a row whose loss was NaN or infinite.
        resume: ``latest`` or a checkpoint (or run) directory to continue from.
        resume_new_data: resume on other data than the checkpoint's (from its first batch), on purpose.
        overwrite_output_dir: start afresh in an ``output_dir`` that holds an earlier run's checkpoints.
        seed: seeds the adapter's initialisation and dropout (the data pipeline uses the same flag).
        sharding: under ``torchrun``: ``ddp`` (every process holds the whole model) or ``fsdp`` (PyTorch's FSDP2:
            each process holds 1/N of every tensor; :mod:`minipeft.training.sharding`).
        fsdp_cpu_offload: with ``fsdp``, keep the pieces, gradients and optimizer step in host memory.
    """

    output_dir: str = setting("outputs", "where the adapter, checkpoints, metrics and loss curve go (default: "
                              "%(default)s)", type=path_name)
    epochs: int = setting(1, "passes over the training data (default: %(default)s)")
    max_steps: int | None = setting(None, "optimizer steps to take; overrides --epochs")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step (default: %(default)s)")
    learning_rate: float = setting(1e-3, LEARNING_RATE_HELP, flag_default=None)  # the flag's None: the method's
    lr_schedule: str = setting("cosine", "learning-rate schedule after warmup (default: %(default)s)",
                               choices=SCHEDULES)
    warmup_steps: int | None = setting(None, "linear warmup over this many optimizer steps")
    warmup_ratio: float | None = setting(None, "linear warmup over this fraction of the steps")
    min_lr: float = setting(0.0, "where linear and cosine schedules end (default: %(default)s)")
    weight_decay: float = setting(0.01, "AdamW weight decay on the matrices a method adds (default: %(default)s)")
    max_grad_norm: float = setting(1.0, "clip the global gradient norm; 0: no clipping (default: %(default)s)")
    precision: str = setting("auto", "fp32; bf16 autocast (CPU or CUDA); fp16 autocast with a grad scaler (CUDA); "
                             "auto: bf16 where the hardware has it natively (CUDA with bf16, a CPU with "
                             "AMX/AVX512_BF16), else fp32 (default: %(default)s)", choices=PRECISIONS)
    tf32: bool = setting(True, "TensorFloat-32 matmuls on CUDA (default: on; no effect on CPU)")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    num_threads: int | None = setting(None, "CPU threads for PyTorch (default: 1 for models under 20M parameters, "
                                      "else one per core; OMP_NUM_THREADS, when set, wins)", type=thread_count)
    gradient_checkpointing: bool = setting(False, "recompute activations during backward: less memory, more time")
    compile: bool = setting(False, "torch.compile the transformer blocks: faster steps after a one-time compile "
                            "(about a minute for SmolLM2 on 2 cores, seconds when cached); pays on runs of more than "
                            "a hundred-odd steps without dropout on a CPU (docs/benchmarks.md)")
    eval_every: int | None = setting(None, "evaluate every N optimizer steps and at the end (default: 5 evaluations "
                                     "per run)")
    eval_max_batches: int | None = setting(None, "evaluate on at most N validation batches")
    log_every: int = setting(10, "print a log line every N steps (default: %(default)s)")
    save_every: int | None = setting(None, "checkpoint every N steps (default: at every evaluation)")
    save_total_limit: int = setting(2, "keep the N newest checkpoints, plus the best (default: %(default)s)")
    early_stopping_patience: int = setting(0, "stop after N evaluations without a better eval loss; 0: never "
                                           "(default: %(default)s)")
    max_nonfinite_steps: int = setting(5, "stop after N steps in a row with a NaN/inf loss (default: %(default)s)")
    sharding: str = setting("ddp", "under torchrun: ddp (every process holds the whole model) or fsdp (PyTorch's "
                            "FSDP2: each process holds 1/N of every tensor; docs/sharding.md) (default: %(default)s)",
                            choices=SHARDINGS)
    fsdp_cpu_offload: bool = setting(False, "with --sharding fsdp: keep the pieces, gradients and optimizer step in "
                                     "host memory")
    resume: str | None = setting(None, "continue from the newest checkpoint in --output_dir (latest) or from a "
                                 "checkpoint directory", metavar="latest|DIR")
    resume_new_data: bool = setting(False, "with --resume: continue on data other than the run's (an edited "
                                    "file, another file or data setting) from its first batch; without it such a "
                                    "resume is refused")
    overwrite_output_dir: bool = setting(False, "start afresh in an --output_dir that holds an earlier run's "
                                         "checkpoints")
    seed: int = 42  # no flag of its own: DataConfig's --seed sets it too

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UserError` naming the flag when a value cannot work."""
        if self.resume is not None and not str(self.resume).strip():  # (argparse would take it for "no --resume")
            raise UserError(f"--resume {self.resume!r}: an empty name; give latest or a checkpoint folder")
        positive = ["epochs", "gradient_accumulation_steps", "log_every", "save_total_limit", "max_nonfinite_steps"]
        positive_or_none = ["max_steps", "eval_every", "eval_max_batches", "save_every", "num_threads"]
        for name in positive + positive_or_none:
            value = getattr(self, name)
            if (value is not None or name in positive) and (not isinstance(value, int) or value < 1):
                raise UserError(f"--{name} {value}: must be a positive integer")
        for name in ("learning_rate", "min_lr", "weight_decay", "max_grad_norm", "warmup_ratio"):
            if getattr(self, name) is not None:
                require_finite(f"--{name}", getattr(self, name))
        if not self.learning_rate > 0:
            raise UserError(f"--learning_rate {self.learning_rate}: must be positive")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise UserError(f"--min_lr {self.min_lr}: must be between 0 and --learning_rate {self.learning_rate}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} {getattr(self, name)}: must be 0 or more")
        if self.early_stopping_patience < 0:
            raise UserError(f"--early_stopping_patience {self.early_stopping_patience}: must be 0 (off) or more")
        if self.lr_schedule not in SCHEDULES:
            raise UserError(f"--lr_schedule {self.lr_schedule}: choose one of {', '.join(SCHEDULES)}")
        if self.min_lr and self.lr_schedule == "constant":
            raise UserError(f"--min_lr {self.min_lr}: is where the linear and cosine schedules end; --lr_schedule "
                            "constant keeps --learning_rate throughout (drop --min_lr, or choose linear or cosine)")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise UserError("--warmup_steps and --warmup_ratio: give one of them, not both")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserError(f"--warmup_steps {self.warmup_steps}: must be 0 or more")
        if self.warmup_ratio is not None and not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"--warmup_ratio {self.warmup_ratio}: must be in [0, 1)")
        if self.sharding not in SHARDINGS:
            raise UserError(f"--sharding {self.sharding}: choose one of {', '.join(SHARDINGS)}")
        if self.fsdp_cpu_offload and self.sharding != "fsdp":
            raise UserError("--fsdp_cpu_offload needs --sharding fsdp")
        if self.sharding == "fsdp" and self.compile:
            raise UserError("--sharding fsdp with --compile: minipeft compiles by swapping the blocks' modules, "
                            "which FSDP2's per-block units own; drop --compile or use --sharding ddp")
        if self.resume_new_data and self.resume is None:
            raise UserError("--resume_new_data needs --resume (it says how to continue a run)")
        if self.resume is not None and self.overwrite_output_dir:
            raise UserError("--resume and --overwrite_output_dir: continue a run or start it over, not both")


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training flags (one per :class:`TrainingConfig` field) to ``parser`` and return it."""
    add_setting_flags(parser.add_argument_group("training"), TrainingConfig)
    return parser
