"""`drpo train --local`: the single-process trainer with progress (bar or log lines) and friendly errors."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from rich.console import Console

from drpo_core.training.stopping import GracefulStop, StopRequested


AUTO = "auto"


def check_output_dir(out: Path, resume: Path | None, fail: Callable[[str], None]) -> Path | None:
    """Refuse to write a new run over an existing one (nothing already saved is lost); returns what to resume.

    ``--resume auto`` (a job that a scheduler restarts with the same command) continues ``out`` from its
    newest complete checkpoint, or starts it fresh when it has none yet (the rows a killed first attempt
    wrote are moved to ``metrics.rolled_back.jsonl``).
    """
    from drpo_core.training.checkpoint import latest_checkpoint

    if resume is not None and str(resume) == AUTO and not Path(resume).exists():
        return out if latest_checkpoint(out) is not None else None
    if resume is None and (out / "metrics.jsonl").exists():
        fail(f"output dir {out} already holds a run; pass --resume {out} (or --resume auto) to continue it or choose another --output-dir")
    if resume is not None and not Path(resume).exists():
        fail(f"--resume {resume}: no such run or checkpoint folder")
    return resume


def run_local(cfg, resume: Path | None, fail: Callable[[str], None]) -> dict:
    from safetensors import SafetensorError

    from drpo_core.training.checkpoint import CheckpointError
    from drpo_core.models.generator import ModelLoadError
    from drpo_core.training.precision import format_precision
    from drpo_core.training.tracking import TrackerError
    from drpo_core.training.trainer import DrpoTrainer, build_rewards
    from services.observability.progress import StepProgress
    from services.rewards.clients import build_reward

    console = Console(stderr=True, soft_wrap=True)  # log files: one line per message
    out = Path(cfg.output.dir)
    resume = check_output_dir(out, resume, fail)
    try:
        trainer = DrpoTrainer(cfg, output_dir=out, rewards=build_rewards(cfg, builder=build_reward))
    except (ModelLoadError, ValueError) as e:
        fail(str(e))
    with StepProgress(console, cfg.trainer.steps, "DrPO", cfg.trainer.log_every) as progress, \
            GracefulStop(cfg.runtime.stop_grace_s) as stop:
        try:
            result = trainer.run(on_step=progress.update, resume=resume, stop=stop,
                                 on_start=lambda report: console.print(format_precision(report), highlight=False))
        except StopRequested as e:
            stopped(console, e, out)
        except (CheckpointError, TrackerError) as e:
            fail(str(e))
        except (OSError, SafetensorError) as e:  # read-only or full run folder: the last checkpoint stands
            fail(f"cannot write to the run folder {out}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
    print_run_summary(console, trainer.step, out, result)
    return result


def stopped(console: Console, e: "StopRequested", out: Path) -> None:
    """A run stopped by a signal: where its checkpoint is, how to continue; exit 128 + the signal's number."""
    console.print(f"[yellow]{e}[/]: checkpoint {out / 'checkpoints' / f'step_{e.step}'}; the same command with "
                  "--resume auto continues it")
    raise SystemExit(e.exit_code)


def print_run_summary(console: Console, steps: int, out: Path, result: dict) -> None:
    """Where the outputs are, and the held-out base-vs-policy result (both runtimes)."""
    console.print(f"[green]done[/] {steps} steps → {out}")
    for key in ("reward_curve", "samples", "before_after", "checkpoint", "metrics", "eval"):
        if key in result:
            console.print(f"  {key:13s} {result[key]}")
    if "eval_summary" in result:
        e = result["eval_summary"]
        console.print(f"  held-out reward: base {e['base_mean']:.4f} → policy {e['policy_mean']:.4f}, "
                      f"paired gain {e['gain']:+.4f} ± {e['gain_se']:.4f} ({e['z']:.1f} s.e. clustered over {e['n_prompts']} prompts, n={e['n']})")
