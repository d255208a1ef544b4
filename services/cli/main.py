"""The ``drpo`` command line: a table of contents; each command loads the config and calls one function."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from services.cli.common import fail, load
from services.cli.eval import eval_app
from services.cli.pretrain_toy import pretrain_toy_command

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Drifting Preference Optimization for one-step generators.")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"drpo {version('drpo')}")
        except PackageNotFoundError:  # a source checkout that was never pip-installed
            typer.echo("drpo (not installed: run `pip install -e .`)")
        raise typer.Exit()


@app.callback()
def _root(_: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit")) -> None:
    """Drifting Preference Optimization for one-step generators."""


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
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="run folder (default: output.dir)"),
    local: bool = typer.Option(False, "--local", help="run every worker in this process (no Ray)"),
    resume: Optional[Path] = typer.Option(None, "--resume", help="run folder or checkpoint folder to continue from; "
                                          "'auto': the output dir's newest checkpoint, or a fresh start if it has none"),
) -> None:
    """Train with DrPO and write metrics, reward curve, sample grids and checkpoints."""
    cfg = load(config, set_, output_dir)
    from services.rewards.clients import check_reward_endpoints

    try:
        check_reward_endpoints(cfg)  # an unreachable reward server: one line now, not a run of NaN scores
    except ValueError as e:
        fail(str(e))
    if local:
        from services.runtime.train_local import run_local

        run_local(cfg, resume=resume, fail=fail)
    else:  # Ray: joins RAY_ADDRESS (e.g. under `ray job submit`) or starts an embedded local cluster
        from services.runtime.train_ray import run_ray

        run_ray(cfg, resume=resume, fail=fail)


@app.command("serve-reward")
def serve_reward(
    reward: str = typer.Option("hue_fraction", "--reward", "-r", help="reward kind (as in rewards[].kind)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="reward field, e.g. --set options.min_saturation=0.3 or --set path=/models/hps"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (0.0.0.0 for all interfaces)"),
    port: int = typer.Option(8000, "--port", "-p", help="1-65535"),  # range checked by serve_reward: one error line
    token_env: Optional[str] = typer.Option(None, "--token-env", help="environment variable holding the bearer token clients must send"),
    grpc: bool = typer.Option(False, "--grpc", help="serve drpo.reward.v1.RewardService over gRPC instead of JSON over HTTP"),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="--grpc only: serve Prometheus /metrics on this port"),
) -> None:
    """Serve one reward to remote trainers over HTTP (JSON) or gRPC, with /healthz and Prometheus metrics."""
    from drpo_core.config import ConfigError
    from services.rewards.server import reward_config_from_cli, serve_reward as serve

    try:
        serve(reward_config_from_cli(reward, set_), host, port, token_env, use_grpc=grpc, metrics_port=metrics_port)
    except (ConfigError, ValueError) as e:
        fail(str(e))


@app.command()
def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="checkpoint folder, or a run folder (its newest checkpoint)"),
    out: Path = typer.Option(..., "--out", help="output folder: pytorch_lora_weights.safetensors for pipe.load_lora_weights(OUT)"),
    full_pipeline: bool = typer.Option(False, "--full-pipeline", help="also write a full diffusers pipeline into OUT "
                                       "(LoRA fused), loadable with AutoPipelineForText2Image.from_pretrained(OUT)"),
) -> None:
    """Export a checkpoint for stock diffusers: LoRA weights and, optionally, a full pipeline folder."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from drpo_core.models.export import export_checkpoint

    if not os.environ.get("DRPO_VERBOSE"):  # "Loading pipeline components" bars: diffusers' own switch, not HF_HUB's
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    try:
        written = export_checkpoint(checkpoint, out, full_pipeline=full_pipeline)
    except ValueError as e:  # ExportError, ModelLoadError (base model missing)
        fail(str(e))
    for what, path in written.items():
        typer.echo(f"{what:11s} {path}")


def quiet_libraries() -> None:
    """Library chatter off: loading bars and advice meant for library developers hide our one-line messages
    (DRPO_VERBOSE=1 keeps them, for debugging a load)."""
    if os.environ.get("DRPO_VERBOSE"):
        return
    import logging
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", module=r"(diffusers|transformers|peft|huggingface_hub)\b")


app.command("pretrain-toy")(pretrain_toy_command)
app.add_typer(eval_app, name="eval")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    app(prog_name="drpo")


if __name__ == "__main__":
    sys.exit(main())
