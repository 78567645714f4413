"""Tiny models, hand-made batches and loaders for the training tests (tests/test_training_*.py).

Import what a test module needs (``from training_fixtures import one_thread``); pytest finds fixtures there.
Everything is small enough that a training step takes milliseconds on one CPU thread.
"""

import argparse
import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from minipeft.cli.arguments import add_method_arguments, config_from_args
from minipeft.model.peft_model import get_peft_model

VOCAB = 100
NAN_TOKEN = VOCAB - 1  # tests that need a non-finite loss give this token an embedding of NaN


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads per process are ~50x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(family: str = "gpt2", dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    if family == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, resid_pdrop=dropout,
                            embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
        return GPT2LMHeadModel(config)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=True,
                         attention_dropout=dropout, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config)


def method_config(model, method: str = "lora", *flags: str):
    """The config ``--modification_type method flags...`` describes (as train_llm.py builds it)."""
    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    if method == "selective" and "--freeze_layers" not in flags:
        flags = ("--freeze_layers", "0") + flags
    return config_from_args(parser.parse_args(["--modification_type", method, *flags]), model, None)


def tiny_peft_model(method: str = "lora", *flags: str, family: str = "gpt2", dropout: float = 0.0, seed: int = 0):
    model = tiny_model(family, dropout, seed)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, method_config(model, method, *flags))


def make_batches(count: int, rows: int = 2, length: int = 12, seed: int = 0) -> list:
    """``count`` batches with uneven numbers of target tokens: each row has a prompt of random length
    (labels -100) and some rows end in right padding (attention 0, labels -100)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(1, NAN_TOKEN, (rows, length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        labels = input_ids.clone()
        for row in range(rows):
            prompt = int(torch.randint(1, length // 2, (1,), generator=generator))
            padding = int(torch.randint(0, length // 3, (1,), generator=generator))
            labels[row, :prompt] = -100
            if padding:
                input_ids[row, -padding:] = 0
                attention_mask[row, -padding:] = 0
                labels[row, -padding:] = -100
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def concatenate(batches: list) -> dict:
    """Several batches of the same width as one batch (rows stacked)."""
    return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}


class ListLoader:
    """A loader over fixed batches, reshuffled per epoch by ``(seed, epoch)`` like the data pipeline's sampler
    (its own generator: the global RNG is not touched). ``interrupt_at=(epoch, index)`` raises SIGINT when that
    batch is fetched, as a user pressing Ctrl-C would; ``kill_at=(epoch, index)`` sends SIGKILL to this process
    (no handler, no checkpoint: a machine lost)."""

    def __init__(self, batches: list, seed: int = 0, shuffle: bool = True, interrupt_at=None, kill_at=None):
        self.batches, self.seed, self.shuffle, self.interrupt_at = batches, seed, shuffle, interrupt_at
        self.kill_at = kill_at
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        import signal

        order = list(range(len(self.batches)))
        if self.shuffle:
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for index, batch_index in enumerate(order):
            if self.interrupt_at == (self.epoch, index):
                signal.raise_signal(signal.SIGINT)
            if self.kill_at == (self.epoch, index):
                signal.raise_signal(signal.SIGKILL)
            yield self.batches[batch_index]


def read_records(path, kind: str = None, drop=("seconds", "tokens_per_s", "eval_seconds")) -> list:
    """metrics.jsonl records without the timing fields (which differ between any two runs)."""
    records = [json.loads(line) for line in open(path)]
    return [{key: value for key, value in record.items() if key not in drop}
            for record in records if kind is None or record["kind"] == kind]


def assert_same_training_steps(run_dir, reference_dir, steps: int, rel: float = 1e-5) -> None:
    """Two runs' metrics.jsonl: ``steps`` train records each, the same losses and gradient norms within ``rel``."""
    got = read_records(Path(run_dir) / "metrics.jsonl", "train")
    expected = read_records(Path(reference_dir) / "metrics.jsonl", "train")
    assert len(got) == len(expected) == steps
    for step, want in zip(got, expected):
        assert step["loss"] == pytest.approx(want["loss"], rel=rel)
        assert step["grad_norm"] == pytest.approx(want["grad_norm"], rel=rel)


def adapter_tensors(peft_model) -> dict:
    from minipeft.model.adapter_files import peft_state_dict

    return {name: tensor.detach().clone() for name, tensor in peft_state_dict(peft_model).items()}
