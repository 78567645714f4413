"""What every method goes through. Imports only :mod:`minipeft.builtin` (nothing, in fact) from the package.

- :mod:`~minipeft.core.errors`: :class:`UserError`, the one exception for bad input;
- :mod:`~minipeft.core.finite`: refusing NaN and infinity in flags, configs and tensors;
- :mod:`~minipeft.core.options`: a config field that is also a command-line flag;
- :mod:`~minipeft.core.method`: the registry record (:class:`Method`) each method module declares;
- :mod:`~minipeft.core.adapter_layer`: the :class:`AdapterLayer` contract every method layer keeps;
- :mod:`~minipeft.core.inject`: finding target modules, replacing them, freezing, counting;
- :mod:`~minipeft.core.layers`: blocks, norms, layer specs and linear shapes, as methods see them;
- :mod:`~minipeft.core.virtual_tokens`: what prompt and prefix tuning share;
- :mod:`~minipeft.core.generation`: one KV-cached generation loop for every method;
- :mod:`~minipeft.core.transformers_api`: transformers' renamed keywords, in one place.
"""
