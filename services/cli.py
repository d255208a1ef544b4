"""The ``drpo`` command line: a table of contents; each command loads the config and calls one function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Drifting Preference Optimization for one-step generators.")

USER_ERROR = 2


def fail(message: str) -> None:
    """One line on stderr, exit code 2: the user's input is wrong; nothing is lost."""
    typer.echo(f"drpo: error: {message}", err=True)
    raise typer.Exit(USER_ERROR)


def load(config: list[Path], overrides: list[str], output_dir: Optional[Path] = None):
    from drpo_core.config import ConfigError, load_config

    if output_dir is not None:
        overrides = [*overrides, f"output.dir={output_dir}"]
    try:
        return load_config(config, overrides)
    except ConfigError as e:
        fail(str(e))


ConfigOpt = typer.Option([], "--config", "-c", help="YAML config file; repeat to layer (later files win)")
SetOpt = typer.Option([], "--set", "-s", help="override one field, e.g. --set algo.num_candidates=24")


@app.command("print-config")
def print_config(config: list[Path] = ConfigOpt, set_: list[str] = SetOpt) -> None:
    """Print the fully resolved configuration as YAML."""
    from drpo_core.config import dump_config

    typer.echo(dump_config(load(config, set_)), nl=False)


@app.command()
def train(
    config: list[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="run folder (default: output.dir)"),
    local: bool = typer.Option(False, "--local", help="run every worker in this process (no Ray)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="run folder or checkpoint folder to continue from"),
) -> None:
    """Train with DrPO and write metrics, reward curve, sample grids and checkpoints."""
    cfg = load(config, set_, output_dir)
    from services.train_local import run_local

    run_local(cfg, resume=resume, fail=fail)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="drpo")


if __name__ == "__main__":
    sys.exit(main())
