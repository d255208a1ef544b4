"""What every ``drpo`` command shares: the one-line user error (exit 2) and loading the config.

The commands (``main.py``, ``eval.py``, ``pretrain_toy.py`` in services/cli/) import this module; it imports none of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

USER_ERROR = 2


def fail(message: str) -> None:
    """One line on stderr, exit code 2: the user's input is wrong; nothing is lost."""
    typer.echo(f"drpo: error: {message}", err=True)
    raise typer.Exit(USER_ERROR)


def load(config: list[Path], overrides: list[str], output_dir: Optional[str] = None):
    """The validated config of ``--config`` files and ``--set`` overrides (``--output-dir`` wins); a user error exits 2."""
    from drpo_core.config import ConfigError, load_config

    if output_dir is not None:
        overrides = [*overrides, f"output.dir={json.dumps(output_dir)}"]  # quoted: '123' or 'no' stay folder names
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        fail(str(e))
