"""Tiny model directories (a model plus a tokenizer, as ``--model DIR`` expects) and adapters with visible
effects, for the generation, merge and comparison tests (tests/test_generation_cli.py, test_merge.py, ...).

The tokenizer is a byte-level BPE trained in a few milliseconds on a handful of sentences (300 tokens, so
any text encodes); the models are conftest's tiny GPT-2 and Llama (vocabulary 1,000).
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import make_gpt2_tiny, make_llama_tiny
from tests.contract_formulas import from_own_tests
from minipeft.methods import METHODS
from minipeft.model.peft_model import get_peft_model

FACTORIES = {"gpt2": make_gpt2_tiny, "llama": make_llama_tiny}
EOS = "<|endoftext|>"
CORPUS = ["Below is an instruction that describes a task. Write a response that appropriately completes the request.",
          "### Instruction:\nWhat is the capital of France?\n\n### Response:\nParis.",
          "The cat sat on the mat. The dog ran in the park. Name the opposite of hot: cold.",
          "Give three tips for staying healthy: eat well, sleep, and move every day."] * 4


def make_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS)


def save_model_dir(family: str, directory: Path, tokenizer=None) -> Path:
    """A tiny ``family`` model and the tiny tokenizer, written as a standard model directory."""
    tokenizer = tokenizer or make_tokenizer()
    model = FACTORIES[family]()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger random weights than the 0.02 init: sharper, more varied next-token choices
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.15, generator=generator)
    for config in (model.config, model.generation_config):
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = None
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def method_config(name: str, family: str, **overrides):
    """A small config of method ``name`` for the tiny models (targets both families have); a method not listed
    here (one added later) runs with ``SERVING_SETTINGS`` of its own test module ``tests/test_<name>.py``, or
    else with its config's defaults."""
    config_class = METHODS[name].config_class
    built_in = {
        "lora": dict(r=4, lora_alpha=8),
        "dora": dict(r=4, lora_alpha=8, use_dora=True),
        "ia3": {},
        "adapter": dict(bottleneck_size=8),
        "prefix": dict(num_virtual_tokens=3),
        "prompt": dict(num_virtual_tokens=3),
        "bitfit": {},
        "selective": dict(freeze_layers=[0]),
    }
    settings = built_in[name] if name in built_in else from_own_tests(name, "SERVING_SETTINGS", {})
    return config_class(**{**settings, **overrides})


def perturb(peft_model, seed: int = 0, scale: float = 0.05):
    """Give every trained parameter a visible, seeded change (most methods start as the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in peft_model.adapter_parameters().values():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))
    return peft_model


def save_adapter_for(model_dir: Path, method: str, family: str, adapter_dir: Path, template: str = "plain",
                     seed: int = 0, **overrides) -> Path:
    """A perturbed adapter of ``method`` for the model in ``model_dir``, saved with its template recorded."""
    from minipeft.loading.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(model_dir))
    torch.manual_seed(seed)  # the method's own initialisation (LoRA's A, ...)
    peft_model = perturb(get_peft_model(model, method_config(method, family, **overrides)), seed)
    peft_model.save_adapter(adapter_dir, base_model_name_or_path=str(model_dir), template=template)
    return Path(adapter_dir)
