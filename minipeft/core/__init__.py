"""What every method goes through. Imports nothing from the rest of minipeft.

- :mod:`~minipeft.core.errors`: :class:`UserError`, the one exception for bad input;
- :mod:`~minipeft.core.finite`: refusing NaN and infinity in flags, configs and tensors;
- :mod:`~minipeft.core.input_files`: reading inputs (regular files only, size-limited; JSON duplicate keys);
- :mod:`~minipeft.core.safe_files`: writing outputs atomically, never touching others' files;
- :mod:`~minipeft.core.transformers_api`: transformers' renamed keywords, in one place;
- :mod:`~minipeft.core.models`, :mod:`~minipeft.core.loading`: base models and tokenizers by name, offline first;
- :mod:`~minipeft.core.nf4_format`, :mod:`~minipeft.core.nf4`: the 4-bit NormalFloat format, and QLoRA's
  4-bit base layer (``Linear4bit``) and whole-model quantization;
- :mod:`~minipeft.core.layers`: blocks, norms, layer specs and linear shapes, as methods see them;
- :mod:`~minipeft.core.inject`: finding target modules, replacing them, freezing, counting;
- :mod:`~minipeft.core.virtual_tokens`: what prompt and prefix tuning share;
- :mod:`~minipeft.core.generation`: one KV-cached generation loop for every method.
"""
