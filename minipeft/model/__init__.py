"""The PEFT model: a frozen base plus one method's layers (:mod:`~minipeft.model.peft_model`), and its files in
peft's format (:mod:`~minipeft.model.adapter_files`). Imports ``core`` and ``methods``."""
