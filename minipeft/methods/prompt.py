"""Prompt tuning (Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
https://arxiv.org/abs/2104.08691).

The whole model stays frozen; what trains is ``n`` "virtual token" embeddings ``P`` put in front of the
input's word embeddings, as if the prompt were ``n`` words no vocabulary has::

      P (n × d, trained)      wte(input_ids)  (T × d, frozen lookup)
    ┌────┬────┬────┐    ┌─────┬─────┬─────┬─────┐
    │ p0 │ p1 │ p2 │ ++ │ The │ cat │ sat │  on │ ──► frozen transformer ──► logits (n + T positions)
    └────┴────┴────┘    └─────┴─────┴─────┴─────┘
     mask: 1    1    1     mask of the real tokens
     labels: -100 ×n       labels of the real tokens (the virtual tokens are never predicted)
     positions: 0 … n-1    n, n+1, … (counting real tokens only, so left padding changes nothing)

- Parameters added: ``n · d`` (GPT-2 small, n = 20: 20 · 768 = 15,360). Nothing else changes.
- Initialisation (Lester et al. §3.2; peft's names): ``RANDOM`` draws ``P ~ N(0, 1)`` (``nn.Embedding``'s
  default, as peft does); ``SAMPLE_VOCAB`` copies the embeddings of ``n`` random vocabulary tokens; ``TEXT``
  copies the embeddings of a text's tokens (e.g. "Classify the sentiment:"), repeated to fill ``n``.
  The paper found the vocabulary-based starts train faster and better than random ones on small models.
- The model's outputs have ``n + T`` positions, as in peft; the real tokens' logits are the last ``T``.

The virtual-token bookkeeping (mask, positions) is shared with prefix tuning (:mod:`minipeft.methods.prefix`),
which puts its ``n`` virtual tokens inside every attention layer instead of at the input.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from minipeft.core.bounds import check_virtual_tokens
from minipeft.core.errors import UserError
from minipeft.core.method import Method
from minipeft.core.options import flag_of, option
from minipeft.core.transformers_api import cache_keyword_argument, pop_cache
from minipeft.core.virtual_tokens import (PromptEncoder, extend_mask_and_positions, is_continuing,
                                          load_prompt_embeddings)

PROMPT_TUNING_INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")
PROMPT_INIT_FLAG_VALUES = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}  # --prompt_init -> field


@dataclass
class PromptTuningConfig:
    """Prompt tuning settings; field names are peft's ``PromptTuningConfig`` (see docs/peft_format.md).

    Args:
        num_virtual_tokens: ``n``, the number of trained embeddings put before the input (``--num_virtual_tokens``).
        prompt_tuning_init: ``"RANDOM"``, ``"SAMPLE_VOCAB"`` or ``"TEXT"`` (``--prompt_init random|vocab|text``).
        prompt_tuning_init_text: the text whose token embeddings start the prompt (``--prompt_init_text``).
        tokenizer_name_or_path: recorded for peft; minipeft never loads a tokenizer here.
        prompt_tuning_init_token_ids: the init text's token ids (the CLI tokenizes the text; ``apply`` needs ids).
        token_dim, num_layers, num_attention_heads: filled from the model by :func:`apply_prompt_tuning`.
        num_transformer_submodules: 1 for decoder-only models (2 is for encoder-decoders, not supported).
        inference_mode: peft's flag, True in saved files: the weights come from the file, so no init is done.
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    num_virtual_tokens: int = option(20, flag="--num_virtual_tokens", help="number of virtual tokens")
    prompt_tuning_init: str = option("RANDOM", flag="--prompt_init", choices=list(PROMPT_INIT_FLAG_VALUES),
                                     parse=PROMPT_INIT_FLAG_VALUES.get,
                                     help="how the virtual tokens start: random, vocab or text")
    prompt_tuning_init_text: str = option(None, flag="--prompt_init_text",
                                          help="text whose token embeddings start the prompt (--prompt_init text)")
    tokenizer_name_or_path: str = None
    prompt_tuning_init_token_ids: list = None
    token_dim: int = None
    num_layers: int = None
    num_attention_heads: int = None
    num_transformer_submodules: int = 1
    inference_mode: bool = False

    @classmethod
    def from_flags(cls, given: dict, model=None, tokenizer=None) -> "PromptTuningConfig":
        """The config of the flags given. An init text implies ``--prompt_init text``, and is tokenized here
        (``apply`` needs token ids, and only the command line has the tokenizer at hand)."""
        init_flag, text_flag = flag_of(cls, "prompt_tuning_init"), flag_of(cls, "prompt_tuning_init_text")
        text = given.get("prompt_tuning_init_text")
        init = given.get("prompt_tuning_init") or ("TEXT" if text else cls.prompt_tuning_init)
        if init != "TEXT":
            if text:
                raise UserError(f"{text_flag} is used only with {init_flag} text")
            return cls(**{**given, "prompt_tuning_init": init})
        if not text:
            raise UserError(f"{init_flag} text needs {text_flag} \"...\"")
        if tokenizer is None:
            flag = init_flag + " text" if given.get("prompt_tuning_init") else text_flag
            raise UserError(f"{flag} needs the model's tokenizer, and this model has none")
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return cls(**{**given, "prompt_tuning_init": init, "prompt_tuning_init_token_ids": token_ids,
                      "tokenizer_name_or_path": getattr(tokenizer, "name_or_path", None) if token_ids else None})

    def validate(self, name=str) -> None:
        """Check the settings; ``name(field)`` is how a message names one (the command line passes its flags)."""
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise UserError(f"{name('num_virtual_tokens')} must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise UserError(f"{name('prompt_tuning_init')} must be one of {', '.join(PROMPT_TUNING_INITS)}, "
                            f"got {self.prompt_tuning_init!r}")
        if self.prompt_tuning_init == "TEXT" and not self.inference_mode and not self.prompt_tuning_init_token_ids:
            raise UserError(f"{name('prompt_tuning_init')} TEXT needs {name('prompt_tuning_init_text')} (a non-empty "
                            "text, tokenized into prompt_tuning_init_token_ids)")
        if self.num_transformer_submodules != 1:
            raise UserError(f"{name('num_transformer_submodules')} must be 1 (decoder-only models), "
                            f"got {self.num_transformer_submodules!r}")

    def check_model(self, model: nn.Module, name=str) -> None:
        """The virtual tokens against the model's positions, before any embedding is allocated."""
        check_virtual_tokens(self.num_virtual_tokens, model, name("num_virtual_tokens"))


class PromptEmbedding(PromptEncoder):
    """``n`` trained input embeddings put before the real tokens (see the module docstring).

    Shapes: ``embedding.weight (n, d)``; the base model then sees ``inputs_embeds (B, n + T, d)``.
    Parameters: ``n · d``. A :class:`~minipeft.core.virtual_tokens.PromptEncoder` whose virtual tokens are
    positions of the sequence (``in_sequence``).
    """

    in_sequence = True

    def __init__(self, num_virtual_tokens: int, token_dim: int, init_embeddings: torch.Tensor = None,
                 device=None):
        super().__init__(num_virtual_tokens)
        # nn.Embedding starts N(0, 1): peft's RANDOM init. Kept in float32 (what the optimizer updates).
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim, dtype=torch.float32, device=device)
        if init_embeddings is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init_embeddings)

    def prepare_inputs(self, base_model, input_ids=None, attention_mask=None, labels=None, position_ids=None,
                       inputs_embeds=None, **kwargs) -> dict:
        """The keyword arguments for ``base_model(**kwargs)``: ``inputs_embeds = cat(P, wte(ids))`` etc.

        In a forward that continues from a KV cache (generation), ``P`` is already in the cache: only the mask
        and positions are extended.
        """
        cache = pop_cache(kwargs)  # given by a decode step; None in training and prefill
        if inputs_embeds is None:
            inputs_embeds = base_model.get_input_embeddings()(input_ids)  # (B, T, d)
        batch_size, length = inputs_embeds.shape[:2]
        n = self.num_virtual_tokens
        query_length = length
        if not is_continuing(cache):
            prompts = self.embedding.weight.to(inputs_embeds.dtype)  # (n, d)
            prompts = prompts.unsqueeze(0).expand(batch_size, -1, -1)  # (B, n, d)
            inputs_embeds = torch.cat([prompts, inputs_embeds], dim=1)  # (B, n + T, d)
            query_length = n + length
            if labels is not None:  # virtual tokens are never targets
                labels = torch.cat([labels.new_full((batch_size, n), -100), labels], dim=1)  # (B, n + T)
        if attention_mask is None:
            seen = cache.get_seq_length() - n if is_continuing(cache) else 0
            attention_mask = torch.ones(batch_size, seen + length, dtype=torch.long, device=inputs_embeds.device)
        attention_mask, position_ids = extend_mask_and_positions(n, attention_mask, position_ids, query_length)
        return dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                    labels=labels, **cache_keyword_argument(cache), **kwargs)

    def peft_state_dict(self) -> dict:
        """``{"prompt_embeddings": (n, d)}``, peft's tensor name and shape."""
        return {"prompt_embeddings": self.embedding.weight.detach()}

    @torch.no_grad()
    def load_peft_state_dict(self, state: dict, source: str = "adapter_model.safetensors") -> None:
        load_prompt_embeddings(self.embedding.weight, state, source)


def initial_prompt(config: PromptTuningConfig, word_embeddings: nn.Embedding):
    """The starting ``P`` (n, d) for SAMPLE_VOCAB / TEXT, or None for RANDOM (keep N(0, 1))."""
    n = config.num_virtual_tokens
    if config.inference_mode or config.prompt_tuning_init == "RANDOM":
        return None
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        token_ids = torch.randint(0, word_embeddings.num_embeddings, (n,))  # seeded by torch's global RNG
    else:  # TEXT: the text's ids, repeated to fill n (or cut to n), as peft does
        token_ids = list(config.prompt_tuning_init_token_ids)
        token_ids = (token_ids * math.ceil(n / len(token_ids)))[:n]
        if max(token_ids) >= word_embeddings.num_embeddings or min(token_ids) < 0:
            raise UserError(f"--prompt_init_text: token id {max(token_ids)} is outside the model's vocabulary "
                            f"of {word_embeddings.num_embeddings} (was it tokenized with another tokenizer?)")
        token_ids = torch.tensor(token_ids)
    return word_embeddings.weight[token_ids.to(word_embeddings.weight.device)].detach().float()  # (n, d)


def apply_prompt_tuning(model: nn.Module, config: PromptTuningConfig) -> PromptEmbedding:
    """Build the :class:`PromptEmbedding` for ``model`` (the model itself is not changed, only frozen).

    Fills ``config.token_dim`` (the word embedding width), ``num_layers`` and ``num_attention_heads``.
    """
    config.validate()
    word_embeddings = model.get_input_embeddings()
    text_config = model.config.get_text_config()
    config.token_dim = word_embeddings.embedding_dim
    config.num_layers = config.num_layers or text_config.num_hidden_layers
    config.num_attention_heads = config.num_attention_heads or text_config.num_attention_heads
    return PromptEmbedding(config.num_virtual_tokens, config.token_dim, initial_prompt(config, word_embeddings),
                           device=word_embeddings.weight.device)


METHOD = Method(
    from_flags=PromptTuningConfig.from_flags,
    name="prompt", config_class=PromptTuningConfig, apply=apply_prompt_tuning, peft_type="PROMPT_TUNING",
    mergeable=False, order=60,
    why_not_sharded="its adapter file is computed from its modules (the prompt encoder's output), "
    "not a copy of the sharded parameters",
    learning_rate=3e-2, learning_rate_source="peft's prompt-tuning example with "
    "AdamW (3e-2); Lester et al. 2021 use 0.3 with Adafactor, whose steps scale with the weights",
    why_not_mergeable="virtual tokens are extra inputs, not a change of any weight")
