"""The ``drpo`` command line: ``main.py`` (the app and its commands), ``eval.py`` (``drpo eval``),
``pretrain_toy.py`` (``drpo pretrain-toy``) over ``common.py`` (the shared one-line errors and config loading)."""
