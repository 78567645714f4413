"""The transformers names that changed during 5.x, in one place.

minipeft supports every transformers release its ``pyproject.toml`` allows. Two interfaces it uses were
renamed during 5.x; the old names still work for a while with a ``FutureWarning``, then disappear. Every
call that touches them goes through this module, so the next rename is one edit here (and the test
settings turn deprecation warnings into errors, so it fails a test before it reaches a user):

- The KV cache: a causal LM's forward takes the keys and values of earlier positions and returns them
  extended. The keyword and output field ``past_key_values`` became ``cache`` (old name removed in 5.40).
  minipeft passes a cache in generation's decode steps and in prefix and prompt tuning.
  :data:`CACHE_KEYWORD`, :func:`cache_keyword_argument`, :func:`cache_of`, :func:`pop_cache`.
- Activation ("gradient") checkpointing: ``gradient_checkpointing_enable`` and
  ``is_gradient_checkpointing`` became ``activation_checkpointing_enable`` and
  ``is_activation_checkpointing`` (old names removed in v6).
  :func:`enable_activation_checkpointing`, :func:`is_activation_checkpointing`.

One capability arrived during 5.x: ``logits_to_keep`` given as a boolean ``(B, T)`` mask (logits only at the
positions the mask keeps, through ``transformers.modeling_utils.slice_logits_to_keep``). Earlier releases take
only an int there and fail on a mask (seen with transformers 5.17 on a CUDA machine), so the loss asks
:data:`BOOLEAN_LOGITS_TO_KEEP` first and otherwise computes every logit.
"""

import dataclasses

import transformers.modeling_utils
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

BOOLEAN_LOGITS_TO_KEEP = hasattr(transformers.modeling_utils, "slice_logits_to_keep")

# The output dataclass lists the current name as a field; the old name, where it is kept, is only a property.
CACHE_KEYWORD = ("cache" if "cache" in {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
                 else "past_key_values")


def cache_keyword_argument(cache) -> dict:
    """``{"cache": cache}`` (``{"past_key_values": cache}`` on an older transformers), for ``model(**...)``."""
    return {CACHE_KEYWORD: cache}


def cache_of(outputs):
    """The KV cache a forward with ``use_cache=True`` returned (``None`` when it returned none)."""
    return getattr(outputs, CACHE_KEYWORD, None)


def pop_cache(kwargs: dict):
    """Remove and return the cache from forward keyword arguments, whichever name the caller used.

    Raises:
        TypeError: when both names are given (the same mistake transformers refuses).
    """
    if "cache" in kwargs and "past_key_values" in kwargs:
        raise TypeError("give the KV cache as `cache` or as `past_key_values`, not both")
    return kwargs.pop("cache", kwargs.pop("past_key_values", None))


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Recompute each block's activations in backward instead of storing them (transformers' own switch)."""
    options = {"use_reentrant": use_reentrant}
    if hasattr(type(model), "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def is_activation_checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` (a transformers model, or anything else: then False) recomputes activations."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # the class attribute: no warning
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False
