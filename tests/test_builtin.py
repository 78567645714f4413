"""The built-in model, tokenizer and data set: committed files match their generators and are usable."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

from minipeft.builtin import MODEL_DIR, default_dataset_path, load_builtin_model_and_tokenizer, load_builtin_tokenizer
from minipeft.pretraining.corpus import generate_corpus
from minipeft.builtin.facts import ANTONYMS, COUNTRIES, PLURALS
from minipeft.builtin.tasks import NUM_RECORDS, default_data_text, generate_instruction_data

# The architecture documented in minipeft/builtin/__init__.py.
VOCAB, N_EMBD, N_LAYER, N_POSITIONS = 3063, 160, 4, 512


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_builtin_model_and_tokenizer()


def test_committed_data_file_equals_generator_output():
    assert default_dataset_path().read_text(encoding="utf-8") == default_data_text()


def test_generators_are_deterministic_and_seeded():
    assert generate_corpus(20, seed=3) == generate_corpus(20, seed=3)
    assert generate_corpus(20, seed=3) != generate_corpus(20, seed=4)
    assert generate_instruction_data(50, seed=5) == generate_instruction_data(50, seed=5)


def test_data_set_is_alpaca_layout_unique_mixed_and_short():
    records = json.loads(default_dataset_path().read_text(encoding="utf-8"))
    assert len(records) == NUM_RECORDS
    assert all(list(record) == ["instruction", "input", "output"] for record in records)
    assert all(isinstance(value, str) and value.strip() == value for r in records for value in r.values())
    assert all(record["instruction"] and record["output"] for record in records)
    assert len({(r["instruction"], r["input"]) for r in records}) == len(records)  # no train/validation leak
    with_input = sum(1 for record in records if record["input"])
    assert 0.3 * len(records) < with_input < 0.8 * len(records)
    assert default_dataset_path().stat().st_size < 1_000_000


def test_answers_are_determined_by_the_facts():
    words = [word for pair in ANTONYMS for word in pair]
    assert len(words) == len(set(words))  # each word has exactly one opposite
    assert len({capital for capital, _ in COUNTRIES.values()}) == len(COUNTRIES)
    records = generate_instruction_data()
    for record in records:
        if record["instruction"] == "Write the plural form of this noun.":
            assert record["output"] == PLURALS[record["input"]]
        if record["instruction"] == "Name the capital of this country.":
            assert record["output"] == COUNTRIES[record["input"]][0]
        if record["instruction"] == "Sort these words in alphabetical order.":
            assert record["output"] == ", ".join(sorted(record["input"].split(", ")))


def test_tokenizer_is_fast_gpt2_style_and_round_trips():
    tokenizer = load_builtin_tokenizer()
    assert tokenizer.is_fast
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.bos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token is None
    assert len(tokenizer) == VOCAB
    for text in ["The capital of France is Paris.", "  spaces\tand\nnew lines ", "Ünïcödé, emoji 🙂 and 12345!"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert tokenizer(" Paris")["input_ids"] == [tokenizer.convert_tokens_to_ids("ĠParis")]  # a word, one token


def test_model_loads_with_plain_transformers_and_has_the_documented_size():
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    assert isinstance(model, GPT2LMHeadModel) and model.dtype == torch.float32
    config = model.config
    assert (config.vocab_size, config.n_embd, config.n_layer, config.n_positions) == (VOCAB, N_EMBD, N_LAYER, N_POSITIONS)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    d = N_EMBD
    per_block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = VOCAB * d + N_POSITIONS * d + N_LAYER * per_block + 2 * d  # embeddings, blocks, final LayerNorm
    assert sum(p.numel() for p in model.parameters()) == expected == 1_809_440
    assert config.eos_token_id == AutoTokenizer.from_pretrained(MODEL_DIR).eos_token_id
    assert sum(f.stat().st_size for f in MODEL_DIR.iterdir()) < 10_000_000


def test_model_has_low_loss_on_held_out_corpus_text(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    documents = generate_corpus(40, seed=987)  # pretraining used seeds 0 and 1
    ids = tokenizer(f"{tokenizer.eos_token}".join(documents), return_tensors="pt")["input_ids"][:, :512]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    # An untrained model sits near ln(vocab) ≈ 8.0; the corpus holds random word lists no model can
    # predict, so the pretrained model's loss on fresh documents is ≈ 3.8 (pretraining's own held-out: 0.84).
    assert loss < 0.5 * math.log(VOCAB)


def test_model_knows_facts_it_was_pretrained_on(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    for prompt, answer in [("The capital of France is", " Paris"), ("The opposite of hot is", " cold"),
                           ("The plural of mouse is", " mice")]:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        output = model.generate(ids, max_new_tokens=1, do_sample=False)
        assert tokenizer.decode(output[0, ids.shape[1]:]) == answer


def test_dtype_argument_is_honoured():
    model, _ = load_builtin_model_and_tokenizer(dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not model.training
