"""Base models and tokenizers by name, offline first (:mod:`~minipeft.loading.models`), and
:func:`~minipeft.loading.streaming.load_base_model`, the one loader every command calls: dense, or with its
linear layers in NF4 (streamed from SmolLM2's GGUF file, or quantized layer by layer from a checkpoint)."""
