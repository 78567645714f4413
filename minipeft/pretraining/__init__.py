"""How the built-in model was made: its synthetic corpus (:mod:`~minipeft.pretraining.corpus`) and its
pretraining loop (:mod:`~minipeft.pretraining.pretrain`, ``python -m minipeft pretrain``). A program, apart from
the library: nothing but the command line imports it; :mod:`minipeft.builtin` holds only what it produced."""
