"""`drpo pretrain-toy`: train the shapes world's tiny one-step base generator (drpo_core.toyworld.pretrain)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from services.cli.common import fail


def pretrain_toy_command(
    output: Path = typer.Option(..., "--output", "-o", help="folder for the diffusers pipeline (created; must be empty or new)"),
    steps: int = typer.Option(2500, "--steps", min=1, help="generator steps (stage 2; the committed base: 2500)"),
    vae_steps: int = typer.Option(500, "--vae-steps", min=1, help="autoencoder steps (stage 1)"),
    max_minutes: float = typer.Option(0.0, "--max-minutes", min=0.0, help="stop stage 2 after this wall time (0 = no limit)"),
    feature_space: str = typer.Option("latent+scene", "--feature-space",
                                      help="frozen φ of the drift loss: latent+scene (the committed base), latent+pixel "
                                           "(the previous base) or latent (the first)"),
    scene_steps: int = typer.Option(2000, "--scene-steps", min=1, help="scene-encoder steps (stage 1b, latent+scene)"),
    scene_renders: int = typer.Option(12000, "--scene-renders", min=2, help="renders the scene encoder learns from "
                                      "(the last 1,000, or a tenth if fewer, only scored)"),
    caption_noise: float = typer.Option(0.0, "--caption-noise", min=0.0, max=1.0,
                                        help="per named colour, the chance that a positive render shows another colour "
                                             "(noisy captions, as web alt-text has; 0 = every render shows its caption)"),
    task_weights: str = typer.Option("", "--task-weights", help="stage 2's task mix, e.g. color_attr=0.35,counting=0.25 "
                                     "(unnamed tasks keep their defaults: drpo_core/toyworld/prompts.py PRETRAIN_TASK_WEIGHTS)"),
    pool_per_prompt: int = typer.Option(96, "--pool-per-prompt", min=1, help="encoded renders per training prompt"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", min=0, help="also save OUTPUT/checkpoints/step-N every N steps"),
    seed: int = typer.Option(0, "--seed"),
    log_every: int = typer.Option(50, "--log-every", min=1),
) -> None:
    """Pretrain the toy base (autoencoder, then UNet + text encoder with the Drifting objective)."""
    from drpo_core.toyworld.pretrain import FEATURE_SPACES, PretrainSettings, pretrain_toy
    from drpo_core.toyworld.scene_encoder import SceneEncoderSettings

    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        fail(f"--output {output} exists and is not an empty folder; choose a new one (nothing is overwritten)")
    if feature_space not in FEATURE_SPACES:
        fail(f"--feature-space {feature_space!r}: expected one of {', '.join(FEATURE_SPACES)}")
    from drpo_core.toyworld.prompts import task_weights as parse_task_weights

    try:
        weights = parse_task_weights(task_weights)
    except ValueError as e:
        fail(f"--task-weights: {e}")
    scene = SceneEncoderSettings(scenes=scene_renders, holdout=min(1000, max(1, scene_renders // 10)), steps=scene_steps)
    settings = PretrainSettings(steps=steps, feature_space=feature_space, vae_steps=vae_steps, max_minutes=max_minutes, seed=seed,
                                pool_per_prompt=pool_per_prompt, caption_noise=caption_noise, task_weights=weights,
                                checkpoint_every=checkpoint_every, log_every=log_every, scene=scene)
    output.mkdir(parents=True, exist_ok=True)
    log_file = (output / "pretrain_log.jsonl").open("a")

    def log(record: dict) -> None:
        line = json.dumps(record)
        typer.echo(line)
        log_file.write(line + "\n")
        log_file.flush()

    summary = pretrain_toy(output, settings, log=log)
    typer.echo(f"saved {output} ({summary['generator_steps']} generator steps, {summary['generator_seconds']} s)")
