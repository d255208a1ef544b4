"""`drpo eval` and `drpo eval compare`: fixed-seed evaluation with any rewards, GenEval-layout samples."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from services.cli.common import fail, load

eval_app = typer.Typer(add_completion=False, invoke_without_command=True,
                       help="Evaluate a checkpoint or the base model on fixed prompts and seeds; `compare` pairs two results.")


def load_for_eval(cfg, checkpoint: Path | None, weights: str = "auto"):
    """(generator of ``cfg.model`` with ``checkpoint``'s trained weights, the weights file it loaded or None for the
    base). LoRA config from the checkpoint; ``weights``: auto | ema | raw, see ``checkpoint.trained_weights_file``."""
    from safetensors.torch import load_file

    from drpo_core.config import LoraConfig
    from drpo_core.models.generator_factory import load_generator
    from drpo_core.training.checkpoint import CheckpointError, latest_checkpoint, model_identity, trained_weights_file

    if checkpoint is None:
        return load_generator(cfg.model, cfg.lora), None
    folder = checkpoint if (checkpoint / "state.json").is_file() else latest_checkpoint(checkpoint)
    if folder is None:
        raise CheckpointError(f"--checkpoint {checkpoint} is neither a checkpoint folder nor a run folder with checkpoints")
    state = json.loads((folder / "state.json").read_text())
    generator = load_generator(cfg.model, LoraConfig(**state["lora"]))
    if state["base_model"] != model_identity(generator):
        raise CheckpointError(f"checkpoint {folder} was trained on a different base model than model.path {cfg.model.path!r}")
    weights_file = trained_weights_file(folder, weights)
    generator.load_trainable_state_dict(load_file(str(weights_file)))
    generator.merge_lora()
    return generator, weights_file


def select_rewards(cfg, spec: str | None) -> dict:
    """``--rewards``: comma-separated labels of the config's rewards, or a YAML file with a ``rewards:`` list."""
    import yaml

    from drpo_core.config import RewardConfig
    from drpo_core.rewards import build_reward

    entries = list(cfg.rewards)
    if spec and Path(spec).is_file():
        raw = yaml.safe_load(Path(spec).read_text()) or {}
        entries = [RewardConfig(**r) for r in (raw.get("rewards") if isinstance(raw, dict) else raw) or []]
    elif spec:
        labels = [s.strip() for s in spec.split(",") if s.strip()]
        known = {r.label: r for r in entries}
        missing = [lbl for lbl in labels if lbl not in known]
        if missing:
            raise ValueError(f"--rewards: {missing} are not rewards of the config (have {sorted(known)}) nor a YAML file")
        entries = [known[lbl] for lbl in labels]
    if not entries:
        raise ValueError("--rewards selects no reward")
    return {r.label: build_reward(r) for r in entries}


@eval_app.callback()
def eval_command(
    ctx: typer.Context,
    config: list[Path] = typer.Option([], "--config", "-c", help="YAML config (model, features, rewards, prompts)"),
    set_: list[str] = typer.Option([], "--set", "-s", help="override one config field"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="checkpoint folder, or a run folder (its newest)"),
    base: bool = typer.Option(False, "--base", help="evaluate the base model (no checkpoint)"),
    weights: str = typer.Option("auto", "--weights", help="a checkpoint's ema (moving average, trainer.ema_decay), raw "
                                "(the optimizer's weights) or auto (ema when the run kept one)"),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="toy-heldout | toy-train | toy-all | train | heldout "
                                          "(default: the config's held-out set) or a .jsonl (GenEval metadata) / .txt file"),
    seeds: str = typer.Option("0-3", "--seeds", help="noise seeds, e.g. 0-3 or 0,5,9-12"),
    rewards: Optional[str] = typer.Option(None, "--rewards", help="comma-separated reward labels of the config, or a YAML file with rewards:"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="where eval.json, grids and samples/ go"),
    grid_prompts: int = typer.Option(24, "--grid-prompts", min=1, help="prompts shown in the captioned grids"),
    grid_seeds: int = typer.Option(6, "--grid-seeds", min=1, help="seeds shown per prompt in the captioned grids"),
) -> None:
    """Generate every (prompt, seed) cell, score it with the rewards, write eval.json, grids and GenEval-layout samples."""
    if ctx.invoked_subcommand is not None:
        return
    if (checkpoint is None) == (not base):
        fail("give exactly one of --checkpoint DIR or --base")
    if output_dir is None:
        fail("--output-dir is required")
    if (output_dir / "eval.json").exists():
        fail(f"{output_dir}/eval.json exists; choose a new --output-dir (nothing is overwritten)")
    cfg = load(config, set_)
    from drpo_core.models.model_arch import ModelLoadError
    from drpo_core.training.checkpoint import CheckpointError, EMA_FILE
    from drpo_core.training.eval_suite import parse_seeds, resolve_prompts

    try:
        seed_list = parse_seeds(seeds)
        prompt_list = resolve_prompts(prompts, cfg.prompts)
        reward_fns = select_rewards(cfg, rewards)
        generator, used = load_for_eval(cfg, checkpoint, weights)
    except (ValueError, CheckpointError, ModelLoadError) as e:
        fail(str(e))
    t0 = time.perf_counter()
    record = write_eval(cfg, generator, reward_fns, prompt_list, seed_list, base=base, output_dir=output_dir,
                        source={"config": [str(c) for c in config], "set": list(set_), "model": cfg.model.path,
                                "checkpoint": None if checkpoint is None else str(checkpoint), "base": base,
                                "weights": None if used is None else ("ema" if used.name == EMA_FILE else "raw"),
                                "prompts": prompts or "heldout"},
                        grid_prompts=grid_prompts, grid_seeds=grid_seeds)
    for label, entry in record["rewards"].items():
        overall = entry.get("per_task", {}).get("overall")
        extra = f"  GenEval overall {overall:.4f}" if overall is not None else ""
        se = "n/a" if entry["se"] is None else f"{entry['se']:.4f}"
        typer.echo(f"{label:24s} mean {entry['mean']:.4f} ± {se} (n={entry['n']}, {entry['n_prompts']} prompts){extra}")
    typer.echo(f"wrote {output_dir}/eval.json, grid.png, samples/ ({time.perf_counter() - t0:.1f} s)")


def write_eval(cfg, generator, reward_fns, prompt_list, seed_list, *, base, output_dir: Path, source: dict,
               grid_prompts: int = 24, grid_seeds: int = 6) -> dict:
    """Run the evaluation and write eval.json, grid.png (+ before_after.png for a checkpoint) and samples/."""
    import torch

    from drpo_core.features import build_encoder
    from drpo_core.training.eval_images import captioned_grid, write_geneval_layout
    from drpo_core.training.eval_suite import run_eval

    try:
        encoder = build_encoder(cfg.features, generator.latent_shape[0], generator.device, generator)
    except ValueError:
        encoder = None
    with torch.random.fork_rng(devices=[]):
        record, arrays = run_eval(generator, reward_fns, prompt_list, seed_list, base=base, encoder=encoder, source=source)
    output_dir.mkdir(parents=True, exist_ok=True)
    texts = [p for p, _ in prompt_list]
    write_geneval_layout(output_dir / "samples", arrays["images"], texts, [m for _, m in prompt_list])
    # frames show a pass/fail reward when there is one (GenEval's rule), else the first reward's values
    binary = [k for k, t in arrays["tables"].items() if bool(((t == 0) | (t == 1) | t.isnan()).all())]
    shown = binary[0] if binary else next(iter(arrays["tables"]))
    first = arrays["tables"][shown]
    rows, cols = slice(0, grid_prompts), slice(0, grid_seeds)
    name = "base" if base else "checkpoint"
    captioned_grid(output_dir / "grid.png", texts[rows], [(f"{name} ({shown})",
                                                            arrays["images"][rows, cols], first[rows, cols])])
    if not base:
        base_scores = None
        if any(m is not None for _, m in prompt_list):
            from drpo_core.training.eval_suite import score_cells

            base_scores = score_cells(reward_fns[shown], arrays["base_images"], texts, [m for _, m in prompt_list])
        captioned_grid(output_dir / "before_after.png", texts[rows],
                       [("before (base)", arrays["base_images"][rows, cols], None if base_scores is None else base_scores[rows, cols]),
                        ("after (checkpoint)", arrays["images"][rows, cols], first[rows, cols])])
    (output_dir / "eval.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


@eval_app.command("compare")
def compare_command(a: Path = typer.Argument(..., help="eval.json of A (e.g. the base)"),
                    b: Path = typer.Argument(..., help="eval.json of B (e.g. the checkpoint)"),
                    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the comparison as JSON")) -> None:
    """Paired differences B − A on the cells both share, standard errors clustered by prompt."""
    from drpo_core.training.eval_suite import compare, format_compare, json_safe

    try:
        records = [json.loads(p.read_text()) for p in (a, b)]
        result = compare(*records)
    except (OSError, ValueError, KeyError) as e:
        fail(f"eval compare: {e}")
    typer.echo(format_compare(result, str(a), str(b)))
    if json_out:
        json_out.write_text(json.dumps(json_safe(result), indent=1) + "\n")


STARTED = ".started"  # `make demo` writes `date +%s` here before training, so the summary can give the wall time


def _wall(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"


def format_summary(run_dir: Path, result: dict, wall_s: float | None) -> str:
    """What `make demo` prints last: per reward the held-out headline base → final, the per-task table
    (`format_compare`'s, so the two never disagree), the wall time, and where the outputs are (only those that exist)."""
    from drpo_core.training.checkpoint import EMA_FILE, latest_checkpoint
    from drpo_core.training.eval_suite import format_compare, format_se_z

    run = Path(run_dir)
    try:  # which prompts were scored (the demo: the held-out set), as the final eval recorded it
        prompts = json.loads((run / "eval-final" / "eval.json").read_text())["source"]["prompts"] + " "
    except (OSError, ValueError, KeyError, TypeError):
        prompts = ""
    lines = [f"drpo run {run}: wall time " + (_wall(wall_s) if wall_s is not None else f"unknown (no {run / STARTED})"),
             f"base → final on {result['prompts']} {prompts}prompts × {result['seeds']} seeds, paired; "
             "± = standard error clustered by prompt, z = gain / s.e."]
    for label, entry in result["rewards"].items():
        r = entry["all"]
        se, z = format_se_z(r, digits=3)
        lines.append(f"  {label:24s} {r['base_mean']:.3f} → {r['policy_mean']:.3f}   gain {r['gain']:+.3f} ± {se}   z {z}")
    # compare.json does not record its inputs: name the demo's folders only where they are
    names = [str(run / n) if (run / n).is_dir() else f"{side} of compare.json" for n, side in (("eval-base", "A"), ("eval-final", "B"))]
    lines += ["", format_compare(result, *names, ("base", "final", "gain")), ""]

    def existing(*names: str) -> str:
        return ", ".join(str(run / n) + ("/" if (run / n).is_dir() else "") for n in names if (run / n).exists())

    ckpt = latest_checkpoint(run)
    if ckpt is not None:
        kind = ("full UNet, diffusers layout in unet/" if (ckpt / "unet").is_dir()
                else "LoRA, pytorch_lora_weights.safetensors" if (ckpt / "pytorch_lora_weights.safetensors").is_file()
                else "trainable weights")
        # unet/ and the LoRA file are written from the moving average when the run kept one (checkpoint.py)
        kind += "; the moving average of the weights" if (ckpt / EMA_FILE).is_file() else ""
    grids = existing("eval-final/before_after.png", "eval-final/grid.png", "samples")
    where = [("image grids", grids + (" (captioned prompts × seeds; a frame is green/red for a pass/fail reward)" if grids else "")),
             ("curves", existing("plots/reward_curve.png", "metrics.jsonl", "tensorboard")),
             ("checkpoint", f"{ckpt}/ ({kind})" if ckpt is not None else ""),
             ("eval files", existing("eval-base/eval.json", "eval-final/eval.json", "compare.json")
              + (f" (GenEval layout in {run}/eval-*/samples/)" if (run / "eval-final" / "samples").is_dir() else ""))]
    lines += [f"{name + ':':13s}{paths}" for name, paths in where if paths]
    return "\n".join(lines)


@eval_app.command("summary")
def summary_command(run_dir: Path = typer.Argument(..., help="a run folder holding compare.json (what `make demo` writes)")) -> None:
    """A run at a glance: held-out base → final per task with gain ± s.e. and z, wall time, where everything is."""
    try:
        result = json.loads((run_dir / "compare.json").read_text())
    except (OSError, ValueError) as e:
        fail(f"eval summary: {run_dir}/compare.json: {e} (write it with `drpo eval compare A B --json`)")
    try:
        wall_s = time.time() - int((run_dir / STARTED).read_text().strip())
    except (OSError, ValueError):
        wall_s = None
    typer.echo(format_summary(run_dir, result, wall_s))
