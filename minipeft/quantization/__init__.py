"""Quantization: the 4-bit NormalFloat format (:mod:`~minipeft.quantization.nf4_format`) and QLoRA's 4-bit base
layer and whole-model quantization (:mod:`~minipeft.quantization.nf4`). Methods never import it: they see a
:class:`minipeft.core.inject.QuantizedLinear`."""
