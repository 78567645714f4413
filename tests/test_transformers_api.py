"""minipeft.core.transformers_api: the current transformers names where they exist, without a deprecation."""

import warnings

import pytest
import torch

from minipeft.core.transformers_api import (CACHE_KEYWORD, cache_keyword_argument, cache_of,
                                       enable_activation_checkpointing, is_activation_checkpointing, pop_cache)


def test_the_cache_round_trip_and_activation_checkpointing_raise_no_deprecation(gpt2_tiny):
    tokens = torch.tensor([[1, 2, 3]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning, not only deprecations
        with torch.no_grad():
            cache = cache_of(gpt2_tiny(input_ids=tokens, use_cache=True))
            assert cache.get_seq_length() == 3
            step = gpt2_tiny(input_ids=tokens[:, :1], use_cache=True, **cache_keyword_argument(cache))
        assert cache_of(step).get_seq_length() == 4
        assert not is_activation_checkpointing(gpt2_tiny)
        enable_activation_checkpointing(gpt2_tiny)
        assert is_activation_checkpointing(gpt2_tiny)
        assert not is_activation_checkpointing(torch.nn.Linear(2, 2))  # not a transformers model


def test_pop_cache_takes_either_name_and_refuses_both():
    assert CACHE_KEYWORD in ("cache", "past_key_values")
    for name in ("cache", "past_key_values"):
        kwargs = {name: "the cache", "use_cache": True}
        assert pop_cache(kwargs) == "the cache" and kwargs == {"use_cache": True}
    assert pop_cache({}) is None
    with pytest.raises(TypeError, match="not both"):
        pop_cache({"cache": 1, "past_key_values": 2})


def test_a_transformers_without_boolean_logits_to_keep_gets_every_logit(gpt2_tiny, monkeypatch):
    """transformers 5.17 (seen on a CUDA machine) takes only an int ``logits_to_keep`` and fails on a mask: the
    training run then uses the reference loss, which computes every logit, with the same result."""
    from minipeft.fast import loss as fast_loss
    from minipeft.training.loop import loss_for
    from minipeft.training.loss import causal_lm_loss_sum

    labels = torch.tensor([[-100, -100, 5, 7, 9, -100], [-100, 3, 4, 6, 8, 2]])
    batch = {"input_ids": labels.clamp(min=1), "attention_mask": torch.ones_like(labels), "labels": labels}
    assert fast_loss.accepts_logits_to_keep(gpt2_tiny)  # the installed transformers takes a mask
    assert loss_for(gpt2_tiny) is fast_loss.target_only_loss_sum
    with_mask = loss_for(gpt2_tiny)(gpt2_tiny, batch)
    monkeypatch.setattr(fast_loss, "BOOLEAN_LOGITS_TO_KEEP", False)
    assert not fast_loss.accepts_logits_to_keep(gpt2_tiny)
    assert loss_for(gpt2_tiny) is causal_lm_loss_sum
    calls = []
    original_forward = gpt2_tiny.forward
    monkeypatch.setattr(gpt2_tiny, "forward", lambda **kwargs: calls.append(kwargs) or original_forward(**kwargs))
    without = loss_for(gpt2_tiny)(gpt2_tiny, batch)
    assert calls and "logits_to_keep" not in calls[0]
    assert without[1] == with_mask[1] == 8
    assert without[0].item() == pytest.approx(with_mask[0].item(), rel=1e-5)
