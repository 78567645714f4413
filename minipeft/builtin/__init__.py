"""A built-in tiny GPT-2 and instruction data set, so that every minipeft script runs offline out of the box.

Parameter-efficient fine-tuning needs a pretrained model to adapt. This package ships one that is small
enough to commit and to fine-tune on a laptop CPU in a minute, plus data it visibly learns from:

* **the model** (``MODEL_DIR``, a standard Hugging Face directory): a :class:`transformers.GPT2LMHeadModel`
  with GPT-2's own architecture (fused ``c_attn`` Conv1D attention, ``c_fc``/``c_proj`` MLP, tied input
  and output embeddings) at toy size: 4 layers, 4 heads, ``n_embd`` 160, 512 positions, a byte-level BPE
  vocabulary of 3,063 tokens, 1,809,440 parameters, fp32 (7 MB). It was pretrained from scratch on a
  synthetic English corpus (:mod:`minipeft.pretraining.corpus`): facts about 83 countries and their capitals,
  34 animals, 66 pairs of opposites, 69 plural nouns, colors of things, sums of small numbers, the
  alphabet, lists of words, little stories. It has never seen the Alpaca prompt layout.
* **the tokenizer** (same directory): GPT-2 style byte-level BPE; ``<|endoftext|>`` is bos, eos and unk;
  there is no pad token (the data pipeline pads with eos and masks the padding).
* **the data** (:func:`default_dataset_path`): 2,000 Alpaca-format records (``instruction``, ``input``,
  ``output``; ``input`` is ``""`` for about 40% of them) written by :mod:`minipeft.builtin.tasks`: ask for a
  capital, an opposite, a plural, a sum, the sound an animal makes; reverse, sort or count a list of words.
  The model knows the facts; fine-tuning teaches it to answer in the Alpaca format, which takes the
  validation loss on response tokens down by more than 30% within a minute of LoRA training.

Everything is deterministic and written by this package, with no external data. To rebuild:

    python -m minipeft builtin-data         # default_data.json (a test checks it is unchanged)
    python -m minipeft pretrain            # model/: corpus, tokenizer, pretraining (~6 min on 2 idle cores; 36 min when they are shared)
"""

from pathlib import Path

import torch

MODEL_DIR = Path(__file__).resolve().parent / "model"


def default_dataset_path() -> Path:
    """The committed built-in instruction data set (a JSON array of Alpaca records)."""
    return Path(__file__).resolve().parent / "default_data.json"


def load_builtin_tokenizer():
    """The built-in fast tokenizer, loaded from :data:`MODEL_DIR` with plain ``transformers``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def load_builtin_model_and_tokenizer(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: the built-in GPT-2 in ``dtype`` (in eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=dtype)
    model.eval()
    return model, load_builtin_tokenizer()
