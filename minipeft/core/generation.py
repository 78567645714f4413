"""Text generation: one short KV-cached loop for every model, with or without an adapter.

::

    prompt (B, T), left-padded          ┌──────────── one step per new token ─────────────┐
    ┌─────────────────────┐   prefill   │  logits[:, -1] ─► greedy / sample ─► token (B,) │
    │ pad pad  The cat sat│ ──────────► │        ▲                               │        │
    │ Once upon a time  , │  KV cache   │   model(token, cache, mask, position) ◄┘        │
    └─────────────────────┘             └── a row that produced EOS gets pad from then on ┘

- Prefill: the whole prompt in one forward; the model returns its KV cache
  (:func:`minipeft.core.transformers_api.cache_of`).
- Decode: one token per step; the cache supplies every earlier key and value, so a step costs one
  token's forward. The attention mask grows by one column per step.
- Left padding: positions count real tokens only (``cumsum(mask) - 1``), so a padded row gets the
  same positions, and so the same tokens, as when it runs alone.
- Any method: this calls ``model(input_ids=, attention_mask=, position_ids=, cache=)``. Methods
  that edit layers (LoRA, IA3, ...) need nothing more; prompt and prefix tuning put their virtual tokens
  in front inside :class:`minipeft.PeftModel`'s forward (in the cache at prefill, so later steps find them
  there). Only new tokens are returned, never the prompt or virtual tokens.
- Sampling: ``temperature`` divides the logits; ``top_k`` keeps the k likeliest tokens; ``top_p`` keeps the
  smallest set whose probability reaches p (nucleus sampling, Holtzman et al. 2019,
  https://arxiv.org/abs/1904.09751).
"""

import torch

from minipeft.core.errors import UserError
from minipeft.core.transformers_api import cache_keyword_argument, cache_of


def next_token_from_logits(logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                           top_k: int = 0, top_p: float = 1.0, generator: torch.Generator = None) -> torch.Tensor:
    """Pick one token per row from ``logits (B, V)``; returns ``(B,)``."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float()
    scaled = logits / temperature
    if not bool(torch.isfinite(scaled).all()):  # a tiny temperature (1e-300 is 0 in float32) overflows: shift
        shifted = (logits - logits.max(dim=-1, keepdim=True).values).double()  # first, in float64 (same softmax)
        scaled = (shifted / temperature).float()  # (B, V): 0 for the likeliest, -inf for the far ones
    logits = scaled
    if top_k > 0:
        kth_largest = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probabilities = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach p (the likeliest token always stays).
        drop = probabilities.cumsum(dim=-1) - probabilities >= top_p
        drop[:, 0] = False  # (rounding can make the first difference exceed a tiny top_p)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probabilities = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probabilities, num_samples=1, generator=generator).squeeze(-1)


def check_generation_settings(max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"--max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise UserError(f"--temperature must be positive when sampling, got {temperature!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise UserError(f"--top_k must be a non-negative integer (0 = off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"--top_p must be in (0, 1] (1 = off), got {top_p!r}")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor = None, max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             eos_token_id=None, pad_token_id: int = None, streamer=None,
             generator: torch.Generator = None) -> torch.LongTensor:
    """Continue each prompt row; returns the new tokens only, ``(B, new_tokens)``.

    Args:
        model: a :class:`minipeft.PeftModel` (any method) or a plain transformers causal LM.
        input_ids: ``(B, T)`` prompts, **left**-padded when their lengths differ.
        attention_mask: ``(B, T)``, 0 on padding (default: all ones).
        max_new_tokens: at most this many tokens per row.
        do_sample: sample (with ``temperature``, ``top_k``, ``top_p``) instead of greedy argmax.
        eos_token_id: an id or a list of ids; a row stops after producing one (it is kept in the output).
        pad_token_id: what a stopped row gets in later columns (default: the first EOS id).
        streamer: called with each step's new tokens ``(B,)``, e.g. to print text as it comes.
        generator: a ``torch.Generator`` for reproducible sampling.

    The model runs in eval mode (no dropout); every module's mode is restored afterwards. The loop stops
    when every row has stopped, or after ``max_new_tokens`` steps.
    """
    check_generation_settings(max_new_tokens, do_sample, temperature, top_k, top_p)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if input_ids.shape[1] > 0 and (attention_mask[:, -1] == 0).any():
        raise UserError("generate: the prompts are right-padded (the last column has padding); pad on the left "
                        "(tokenizer.padding_side = 'left') so every row's next token follows its last real token")
    eos_ids = torch.tensor([] if eos_token_id is None else
                           [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                           dtype=torch.long, device=input_ids.device)
    if pad_token_id is None:
        pad_token_id = int(eos_ids[0]) if len(eos_ids) else 0
    batch_size = input_ids.shape[0]
    modes = {module: module.training for module in model.modules()}  # restored exactly afterwards
    model.eval()
    try:
        # Prefill: every prompt token at once; positions count real tokens (left padding gets 0, masked).
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
        finished = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for step in range(max_new_tokens):
            last = outputs.logits[:, -1, :]  # (B, V)
            if not bool(torch.isfinite(last).all()):  # argmax of NaN is token 0: an empty "reply", exit 0
                raise UserError(f"the model's output is not finite (NaN or infinity) at generated token {step + 1}: "
                                "its weights or the adapter's are damaged or out of range (a huge lora_alpha?)")
            token = next_token_from_logits(last, do_sample, temperature, top_k, top_p, generator)  # (B,)
            shown = token.masked_fill(finished, pad_token_id)  # a stopped row shows padding (its input stays a token)
            new_tokens.append(shown)
            if streamer is not None:
                streamer(shown)
            finished |= torch.isin(shown, eos_ids)
            if finished.all() or step == max_new_tokens - 1:
                break
            # Decode: one token per row; the cache holds everything before it.
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch_size, 1)], dim=1)  # (B, T+s+1)
            position = attention_mask.long().sum(-1, keepdim=True) - 1  # (B, 1)
            outputs = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position,
                            use_cache=True, **cache_keyword_argument(cache_of(outputs)))
    finally:
        for module, training in modes.items():
            module.training = training
    if not new_tokens:
        return input_ids.new_zeros(batch_size, 0)
    return torch.stack(new_tokens, dim=1)  # (B, new_tokens)
