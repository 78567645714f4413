"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
https://arxiv.org/abs/2101.00190).

The whole model stays frozen; every attention layer gets ``n`` extra trained keys and values in front of
the ones computed from the input, so each real token can attend to ``n`` "virtual tokens" that exist only
as keys and values (nothing is computed *for* them)::

    layer i:      keys   [ Kp_i (n, trained) | K = x W_k  (T) ]      queries: only the T real tokens
                  values [ Vp_i (n, trained) | V = x W_v  (T) ]
                  out = softmax(Q [Kp_i ; K]ᵀ / √hd + mask) [Vp_i ; V]

    mask:      1 … 1 (n ones)  | mask of the real tokens
    positions: (taken by the prefix: 0 … n-1) | n, n+1, … for the real tokens

- The prefix enters through the model's own KV-cache interface (the forward's cache keyword; see
  :mod:`minipeft.core.transformers_api`): a transformers ``DynamicCache`` that already holds ``n`` positions
  per layer is exactly "n tokens seen before", so the model's causal mask (built by
  ``transformers.masking_utils`` from the cache length, not by SDPA's ``is_causal``, which would align the
  triangle to the wrong corner) lets every real token see the prefix.
  Real tokens take positions ``n … n+T-1``, as peft does (starting them at 0 changes the logits).
- One flat table holds all prefixes (peft's layout, so files are interchangeable):
  ``E (n, 2L · H_kv · hd)``; ``E.view(n, 2L, H_kv, hd)[:, 2i]`` is layer i's key, ``[:, 2i+1]`` its value.
  With grouped-query attention (Llama, SmolLM2) the cache holds the ``H_kv`` key/value heads, so
  ``token_dim = H_kv · hd`` (SmolLM2-135M: 3 · 64 = 192) and ``num_attention_heads = H_kv``.
- Parameters added, without projection: ``n · 2L · token_dim``
  (GPT-2 small: n = 20 → 20 · 2 · 12 · 768 = 368,640; n = 50 → 921,600).
- Reparameterisation (§4.3, ``prefix_projection=True``): the paper found training ``E`` directly unstable
  and trains it through an MLP instead, ``E = W2 tanh(W1 e + b1) + b2`` with ``e (n, token_dim)`` (peft's
  ``PrefixEncoder``). Parameters: ``n·td + (td + 1)·h + (h + 1)·2L·td`` with ``td = token_dim``,
  ``h = encoder_hidden_size`` (default ``td``). After training only ``E`` matters: the adapter file stores
  ``E`` (:meth:`PrefixEncoder.prefix_embeddings`, the MLP folded into plain prefixes), the same shape
  either way, and a loaded adapter is a plain table (no MLP; peft does the same).
- Gradient checkpointing: not possible. The checkpointed layers of transformers drop the KV cache
  in training mode (``GradientCheckpointingLayer``; GPT-2's model drops it before its blocks), because a
  recomputed layer would write the cache a second time, so the prefix would never reach attention.
  :meth:`PrefixEncoder.prepare_inputs` raises a :class:`UserError` saying so.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import DynamicCache

from minipeft.core.bounds import check_allocation, check_virtual_tokens
from minipeft.core.errors import UserError
from minipeft.core.method import Method
from minipeft.core.options import flag_of, option
from minipeft.core.transformers_api import cache_keyword_argument, is_activation_checkpointing, pop_cache
from minipeft.core.virtual_tokens import (PromptEncoder, extend_mask_and_positions, is_continuing,
                                          load_prompt_embeddings)


@dataclass
class PrefixTuningConfig:
    """Prefix tuning settings; field names are peft's ``PrefixTuningConfig`` (see docs/peft_format.md).

    Args:
        num_virtual_tokens: ``n``, the prefix length in every layer (``--prefix_length``).
        prefix_projection: train the prefixes through an MLP (§4.3 of the paper; ``--prefix_projection``).
        encoder_hidden_size: the MLP's hidden width ``h`` (``--prefix_hidden_size``; default ``token_dim``).
        token_dim: width of one layer's key (or value) for one token: ``H_kv · hd``; filled from the model.
        num_layers: transformer blocks ``L``; filled from the model.
        num_attention_heads: key/value heads ``H_kv``; filled from the model.
        num_transformer_submodules: 1 for decoder-only models (2 is for encoder-decoders, not supported).
        inference_mode: peft's flag, True in saved files: the file holds the prefixes themselves (the MLP's
            output), so the encoder is built as a plain table even when ``prefix_projection`` is True.
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    num_virtual_tokens: int = option(20, flag="--prefix_length",
                                     help="number of prefix key/value vectors per layer")
    prefix_projection: bool = option(False, flag="--prefix_projection", help="MLP reparameterisation")
    encoder_hidden_size: int = option(None, flag="--prefix_hidden_size",
                                      help="hidden size of the prefix MLP (default: token_dim, kv heads x head dim)")
    token_dim: int = None
    num_layers: int = None
    num_attention_heads: int = None
    num_transformer_submodules: int = 1
    inference_mode: bool = False

    @classmethod
    def from_flags(cls, given: dict, model=None, tokenizer=None) -> "PrefixTuningConfig":
        """The config of the flags given: a hidden size is the MLP's, so it means nothing without the MLP.
        (A saved config holds ``encoder_hidden_size`` either way: ``apply`` fills it in, as peft does.)"""
        hidden = given.get("encoder_hidden_size")
        if isinstance(hidden, int) and hidden > 0 and not given.get("prefix_projection"):  # (a bad size: validate)
            size, projection = flag_of(cls, "encoder_hidden_size"), flag_of(cls, "prefix_projection")
            raise UserError(f"{size} sizes the MLP of {projection}, which is off: add {projection} or drop {size}")
        return cls(**given)

    def validate(self, name=str) -> None:
        """Check the settings; ``name(field)`` is how a message names one (the command line passes its flags)."""
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise UserError(f"{name('num_virtual_tokens')} must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.encoder_hidden_size is not None and (
                not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size <= 0):
            raise UserError(f"{name('encoder_hidden_size')} must be a positive integer, "
                            f"got {self.encoder_hidden_size!r}")
        if self.num_transformer_submodules != 1:
            raise UserError(f"{name('num_transformer_submodules')} must be 1 (decoder-only models), "
                            f"got {self.num_transformer_submodules!r}")

    def check_model(self, model: nn.Module, name=str) -> None:
        """The virtual tokens against the model's positions, before any embedding is allocated."""
        check_virtual_tokens(self.num_virtual_tokens, model, name("num_virtual_tokens"))
        if self.prefix_projection and self.encoder_hidden_size is not None:  # the MLP, before it is allocated
            layers, heads, head_dim = key_value_shape(model)
            token_dim = heads * head_dim
            check_allocation(4 * self.encoder_hidden_size * (token_dim + 2 * layers * token_dim),
                             f"{name('encoder_hidden_size')} {self.encoder_hidden_size}",
                             f"the prefix MLP (float32, {token_dim} -> {self.encoder_hidden_size} -> "
                             f"{2 * layers * token_dim})")


def key_value_shape(model: nn.Module):
    """``(num_layers, kv_heads, head_dim)`` of a transformers causal LM (its KV cache's shape per layer)."""
    config = model.config.get_text_config()
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    return config.num_hidden_layers, kv_heads, head_dim


class PrefixEncoder(PromptEncoder):
    """The trained per-layer key/value prefixes (see the module docstring).

    Shapes: ``prefix_embeddings() (n, 2L · H · hd)``; :meth:`key_values` gives layer i's key and value,
    each ``(B, H, n, hd)``, where ``H`` is the number of key/value heads. A
    :class:`~minipeft.core.virtual_tokens.PromptEncoder` whose virtual tokens live in attention's keys and
    values only, not in the sequence (``in_sequence`` is False: the outputs keep the real tokens' positions).
    """

    in_sequence = False

    def __init__(self, num_virtual_tokens: int, num_layers: int, num_heads: int, head_dim: int,
                 prefix_projection: bool = False, encoder_hidden_size: int = None, device=None):
        super().__init__(num_virtual_tokens)
        self.num_layers = num_layers
        self.num_heads, self.head_dim = num_heads, head_dim
        self.prefix_projection = prefix_projection
        token_dim = num_heads * head_dim
        width = num_layers * 2 * token_dim
        # Starts N(0, 1) (nn.Embedding's default, as in peft); float32, what the optimizer updates.
        if prefix_projection:
            hidden = encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim, dtype=torch.float32, device=device)
            self.transform = nn.Sequential(
                nn.Linear(token_dim, hidden, dtype=torch.float32, device=device),
                nn.Tanh(),
                nn.Linear(hidden, width, dtype=torch.float32, device=device),
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, width, dtype=torch.float32, device=device)

    def prefix_embeddings(self) -> torch.Tensor:
        """``E (n, 2L · token_dim)``: the table itself, or the MLP's output for the n tokens (the fold)."""
        if self.prefix_projection:
            return self.transform(self.embedding.weight)  # (n, td) -> (n, h) -> (n, 2L·td)
        return self.embedding.weight

    def key_values(self, batch_size: int, dtype: torch.dtype) -> list:
        """``[(key_i, value_i) for each layer]``, each ``(B, H, n, hd)``, in peft's layout."""
        n, layers = self.num_virtual_tokens, self.num_layers
        prefixes = self.prefix_embeddings().to(dtype)  # (n, 2L·H·hd)
        prefixes = prefixes.view(n, 2 * layers, self.num_heads, self.head_dim).permute(1, 2, 0, 3)  # (2L, H, n, hd)
        prefixes = prefixes.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # (2L, B, H, n, hd)
        return [(prefixes[2 * i], prefixes[2 * i + 1]) for i in range(layers)]

    def prepare_inputs(self, base_model, input_ids=None, attention_mask=None, labels=None, position_ids=None,
                       inputs_embeds=None, **kwargs) -> dict:
        """The keyword arguments for ``base_model(**kwargs)``: a cache holding the prefix, the mask with n
        ones in front, real-token positions starting at n. Labels are not extended (the prefix produces no
        outputs). A forward that continues from a KV cache (generation) finds the prefix already in it.

        Raises:
            UserError: in training mode with gradient checkpointing on (see the module docstring).
        """
        if base_model.training and is_activation_checkpointing(base_model):
            raise UserError("--gradient_checkpointing cannot be used with prefix tuning: the prefix reaches "
                            "attention through the KV cache, and transformers' checkpointed layers drop "
                            "the KV cache in training mode (a recomputed layer would write the cache twice); "
                            "turn gradient checkpointing off, or use prompt tuning or LoRA")
        cache = pop_cache(kwargs)  # given by a decode step; None in training and prefill
        tokens = input_ids if input_ids is not None else inputs_embeds
        batch_size, length = tokens.shape[:2]
        if not is_continuing(cache):
            dtype = inputs_embeds.dtype if inputs_embeds is not None else base_model.get_input_embeddings().weight.dtype
            cache = DynamicCache(self.key_values(batch_size, dtype), config=base_model.config)
        if attention_mask is None:
            seen = cache.get_seq_length() - self.num_virtual_tokens
            attention_mask = torch.ones(batch_size, seen + length, dtype=torch.long, device=tokens.device)
        attention_mask, position_ids = extend_mask_and_positions(self.num_virtual_tokens, attention_mask,
                                                                 position_ids, length)
        return dict(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    position_ids=position_ids, labels=labels, **cache_keyword_argument(cache), **kwargs)

    def peft_state_dict(self) -> dict:
        """``{"prompt_embeddings": E (n, 2L · token_dim)}``; with the MLP, its output (peft saves the same)."""
        return {"prompt_embeddings": self.prefix_embeddings().detach()}

    def training_state(self) -> dict | None:
        """What a training checkpoint needs beyond the adapter file: with the MLP, its own weights (``embedding``
        and ``transform``; the file holds only their output, from which training cannot go on); else None."""
        if not self.prefix_projection:
            return None
        return {name: tensor.detach() for name, tensor in self.state_dict().items()}

    @torch.no_grad()
    def load_training_state(self, state: dict, source: str) -> None:
        """:meth:`training_state`'s tensors back into the MLP (every name, every shape, as saved)."""
        own = self.state_dict()
        for name in sorted(set(own) | set(state)):
            if name not in state or name not in own or state[name].shape != own[name].shape:
                problem = "missing" if name not in state else "unexpected" if name not in own else \
                    f"of shape {list(state[name].shape)}, the MLP's is {list(own[name].shape)}"
                raise UserError(f"{source}: tensor {name} is {problem} (was the checkpoint written with other "
                                "--prefix_* flags?)")
        self.load_state_dict(state)

    @torch.no_grad()
    def load_peft_state_dict(self, state: dict, source: str = "adapter_model.safetensors") -> None:
        if self.prefix_projection:
            raise UserError(f"{source}: prompt_embeddings holds finished prefixes, which cannot be loaded into "
                            "an MLP; build the adapter with inference_mode=True (load_adapter does)")
        load_prompt_embeddings(self.embedding.weight, state, source)


def apply_prefix_tuning(model: nn.Module, config: PrefixTuningConfig) -> PrefixEncoder:
    """Build the :class:`PrefixEncoder` for ``model`` (the model itself is not changed, only frozen).

    Fills ``config.num_layers``, ``num_attention_heads`` (= key/value heads) and ``token_dim``
    (= kv_heads · head_dim) from the model, and ``encoder_hidden_size`` (default ``token_dim``).

    Raises:
        UserError: when a config (e.g. read from an adapter file) gives another shape than the model has.
    """
    config.validate()
    num_layers, kv_heads, head_dim = key_value_shape(model)
    expected = {"num_layers": num_layers, "num_attention_heads": kv_heads, "token_dim": kv_heads * head_dim}
    for name, value in expected.items():
        given = getattr(config, name)
        if given is not None and given != value:
            raise UserError(f"prefix tuning: {name} is {given} but {type(model).__name__} needs {value} "
                            "(was the adapter trained on another model?)")
        setattr(config, name, value)
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    return PrefixEncoder(config.num_virtual_tokens, num_layers, kv_heads, head_dim,
                         prefix_projection=config.prefix_projection and not config.inference_mode,
                         encoder_hidden_size=config.encoder_hidden_size,
                         device=model.get_input_embeddings().weight.device)


METHOD = Method(
    from_flags=PrefixTuningConfig.from_flags,
    name="prefix", config_class=PrefixTuningConfig, apply=apply_prefix_tuning, peft_type="PREFIX_TUNING",
    mergeable=False, order=50,
    why_not_sharded="its adapter file is computed from its modules (the prefix encoder's output), "
    "not a copy of the sharded parameters",
    learning_rate=1e-2, learning_rate_source="peft's prefix-tuning example (1e-2)",
    why_not_mergeable="prefixes are extra attention keys and values, not a change of any weight")
