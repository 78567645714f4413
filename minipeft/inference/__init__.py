"""Using a trained adapter: prompts and templates for generation (:mod:`~minipeft.inference.prompts`), several
adapters on one base (:mod:`~minipeft.inference.multi_adapter`), and merging into a plain model
(:mod:`~minipeft.inference.merge`). The generation loop itself is :mod:`minipeft.core.generation`."""
