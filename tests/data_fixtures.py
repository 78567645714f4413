"""Offline tokenizers, tiny models and record files for the data-pipeline tests (tests/test_data_*.py).

Import the fixtures into a test module (``from data_fixtures import tiny_tokenizer``); pytest then finds
them there. The tokenizer is a byte-level BPE trained in well under a second by the ``tokenizers``
library, like GPT-2's: EOS ``<|endoftext|>`` and no pad token.
"""

import functools
import json
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EOS = "<|endoftext|>"

RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well."},
    {"instruction": "Translate the sentence to French.", "input": "The cat sleeps.", "output": "Le chat dort."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris."},
    {"instruction": "Summarize the text in one sentence.",
     "input": "The quick brown fox jumps over the lazy dog. The dog does not move. The fox runs away.",
     "output": "A fox jumps over a lazy dog and runs away."},
    {"instruction": "Add the two numbers.", "input": "12 and 30", "output": "42"},
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "Write a haiku about the sea.", "input": "",
     "output": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."},
    {"instruction": "Classify the sentiment.", "input": "I love this film!", "output": "Positive."},
    {"instruction": "Is the number even?", "input": "7", "output": "No, 7 is odd."},
    {"instruction": "Reverse the word.", "input": "stressed", "output": "desserts"},
    {"instruction": "List two planets.", "input": "", "output": "Mars and Venus."},
    {"instruction": "Explain what a noun is.", "input": "",
     "output": "A noun is a word that names a person, place, thing or idea, such as teacher, city or joy."},
]

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@functools.lru_cache(maxsize=None)
def _trained_backend(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from minipeft.data.templates import ALPACA

    corpus = [ALPACA.prompt_with_input, ALPACA.prompt_without_input]
    corpus += [" ".join(str(value) for value in record.values()) for record in RECORDS] * 4
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer.to_str()


def make_tokenizer(chat: bool = False):
    """A fresh GPT-2-like fast tokenizer (EOS, no pad); ``chat`` adds ChatML markers and a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained_backend()), eos_token=EOS)
    if chat:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer():
    return make_tokenizer(chat=True)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The tiny tokenizer saved to a directory, for ``--model DIR`` on the command line."""
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    make_tokenizer().save_pretrained(directory)
    return directory


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture
def records_file(tmp_path):
    return write_json(tmp_path / "records.json", RECORDS)


def save_tiny_run_inputs(directory: Path, width: int) -> tuple:
    """``(model_dir, records.json)``: a tiny GPT-2 with a real tokenizer (``--model DIR``) and Alpaca data."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(n_embd=width, n_layer=2, n_head=2, vocab_size=len(tokenizer), n_positions=256,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    return directory / "model", write_json(directory / "records.json", RECORDS * 2)


def tiny_gpt2(vocab_size: int, attention: str = "eager"):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        attn_implementation=attention)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(vocab_size: int, attention: str = "eager"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         attn_implementation=attention)
    return LlamaForCausalLM(config).eval()
