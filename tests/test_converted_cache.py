"""The converted copy of a GGUF model kept between runs (:func:`minipeft.loading.models.load_converted`):
converted once, then read back exactly; a damaged copy is converted again and a cache that cannot be
written costs a note, never the run. That SmolLM2's copy (the session's ``smollm2`` fixture loads through it)
holds the GGUF file's values is checked against a second reader of the file, tensor by tensor, in
``tests/test_nf4_oracle.py::test_smollm2_streamed_from_its_file_equals_load_then_quantize``."""

import torch
from conftest import make_llama_tiny
from data_fixtures import make_tokenizer

from minipeft.loading.models import load_converted


def counting_converter():
    calls = []

    def convert():
        calls.append(1)
        return make_llama_tiny(seed=3), make_tokenizer()

    return convert, calls


def test_converted_once_then_read_back_exactly(tmp_path):
    convert, calls = counting_converter()
    directory = tmp_path / "cache" / "tiny"
    first, tokenizer = load_converted(directory, convert, torch.float32)
    second, cached_tokenizer = load_converted(directory, convert, torch.bfloat16)
    assert len(calls) == 1 and (directory / "model.safetensors").is_file()
    assert not list(directory.parent.glob(".tmp-*"))  # written aside, renamed into place
    expected = first.state_dict()
    assert {name: tensor.dtype for name, tensor in second.state_dict().items()} == dict.fromkeys(expected,
                                                                                                torch.bfloat16)
    for name, tensor in second.state_dict().items():
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name
    assert second.get_output_embeddings().weight is second.get_input_embeddings().weight  # still tied
    assert cached_tokenizer("Add the two numbers.")["input_ids"] == tokenizer("Add the two numbers.")["input_ids"]


def test_a_damaged_copy_is_converted_again(tmp_path, capsys):
    convert, calls = counting_converter()
    directory = tmp_path / "tiny"
    load_converted(directory, convert, torch.float32)
    (directory / "config.json").write_text("{not json")
    model, _ = load_converted(directory, convert, torch.float32)
    assert len(calls) == 2 and "could not be read" in capsys.readouterr().err
    assert torch.equal(model.lm_head.weight, make_llama_tiny(seed=3).lm_head.weight)
    load_converted(directory, convert, torch.float32)
    assert len(calls) == 2  # the new copy is good


def test_a_cache_that_cannot_be_written_costs_a_note_not_the_run(tmp_path, capsys):
    convert, calls = counting_converter()
    (tmp_path / "a-file").write_text("")
    model, _ = load_converted(tmp_path / "a-file" / "tiny", convert, torch.float32)
    assert len(calls) == 1 and isinstance(model, torch.nn.Module)
    assert "note: could not keep the converted model" in capsys.readouterr().err
