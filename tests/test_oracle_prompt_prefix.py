"""Hugging Face peft as an oracle: prompt- and prefix-tuning adapters cross over in both directions with
equal logits, and both libraries count the same parameters; on GPT-2 and on a grouped-query Llama."""

import pytest
import torch

from minipeft import get_peft_model, load_adapter
from minipeft.methods.prefix import PrefixTuningConfig
from minipeft.methods.prompt import PromptTuningConfig

peft = pytest.importorskip("peft")
pytestmark = [
    pytest.mark.oracle,
    # peft's own prefix forward still passes transformers' old cache keyword; minipeft's never does
    # (tests/test_prefix.py runs it with every deprecation an error)
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
]

TOKENS = torch.tensor([[5, 17, 256, 3, 999, 42, 8], [700, 11, 64, 1, 2, 3, 4]])
N = 4

# (our config, peft's config) for the same adapter
CASES = {
    "prompt": lambda: (PromptTuningConfig(num_virtual_tokens=N),
                       peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)),
    "prefix": lambda: (PrefixTuningConfig(num_virtual_tokens=N),
                       peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)),
    "prefix_projection": lambda: (
        PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=24),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True,
                                encoder_hidden_size=24)),
}


def real_token_logits(output, method):
    """Prompt tuning returns n + T positions (in both libraries); the real tokens are the last T."""
    return output.logits[:, N:] if method == "prompt" else output.logits


@pytest.mark.parametrize("method", list(CASES))
def test_minipeft_adapter_loads_in_peft(tiny_model_factory, tmp_path, method):
    ours_config, _ = CASES[method]()
    ours = get_peft_model(tiny_model_factory(), ours_config).eval()
    ours.save_adapter(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model_factory(), tmp_path).eval()
    mask = torch.ones_like(TOKENS)
    with torch.no_grad():
        expected = real_token_logits(ours(input_ids=TOKENS, attention_mask=mask), method)
        got = real_token_logits(theirs(input_ids=TOKENS, attention_mask=mask), method)
    assert got.shape == expected.shape == (2, TOKENS.shape[1], 1000)
    assert (got - expected).abs().max() <= 1e-5
    with torch.no_grad():  # and the adapter is not a no-op
        assert (expected - tiny_model_factory()(input_ids=TOKENS).logits).abs().max() > 1e-3


@pytest.mark.parametrize("method", list(CASES))
def test_peft_adapter_loads_in_minipeft(tiny_model_factory, tmp_path, method):
    _, peft_config = CASES[method]()
    torch.manual_seed(2)
    theirs = peft.get_peft_model(tiny_model_factory(), peft_config).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_model_factory(), tmp_path)
    mask = torch.ones_like(TOKENS)
    with torch.no_grad():
        expected = real_token_logits(theirs(input_ids=TOKENS, attention_mask=mask), method)
        got = real_token_logits(ours(input_ids=TOKENS, attention_mask=mask), method)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("method", list(CASES))
def test_parameter_counts_match_peft(tiny_model_factory, method):
    ours_config, peft_config = CASES[method]()
    ours = get_peft_model(tiny_model_factory(), ours_config).parameter_stats()
    trainable, total = peft.get_peft_model(tiny_model_factory(), peft_config).get_nb_trainable_parameters()
    assert (ours.trainable, ours.total) == (trainable, total)


def test_config_fields_match_peft_for_grouped_query_attention(llama_tiny):
    ours = get_peft_model(llama_tiny, PrefixTuningConfig(num_virtual_tokens=N)).peft_config
    theirs = peft.get_peft_model(llama_tiny, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                     num_virtual_tokens=N)).peft_config["default"]
    for field in ("token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"):
        assert getattr(ours, field) == getattr(theirs, field), field
