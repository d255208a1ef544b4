"""Bad model input through the real CLI: one clear `drpo: error:` line naming the problem, exit code 2,
before any training step; and `drpo export` on the command line."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRPO = [sys.executable, "-m", "services.cli"]
SMALL = ["--set", "trainer.steps=1", "--set", "trainer.prompts_per_step=1", "--set", "algo.num_candidates=4",
         "--set", "algo.num_anchors=1", "--set", "trainer.heldout_eval_seeds=0"]


def drpo(*args):
    return subprocess.run([*DRPO, *map(str, args)], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real 1-step SD-Turbo-architecture checkpoint (LoRA)."""
    from drpo_core.config import load_config
    from drpo_core.training.trainer import DrpoTrainer

    out = tmp_path_factory.mktemp("ckpt")
    args = [a for a in SMALL if a != "--set"]
    trainer = DrpoTrainer(load_config([], args), output_dir=out / "run")
    trainer.train_step()
    return trainer.save_checkpoint()


def test_bad_model_inputs_exit_2_with_one_clear_line(checkpoint, tmp_path):
    from drpo_core.models.tiny_models import tiny_sd_turbo_path, tiny_sdxl_path

    cases = {
        "sdxl folder as sd-turbo": (["--set", f"model.path={tiny_sdxl_path()}"],
                                    "holds a sdxl-turbo pipeline (UNet addition_embed_type='text_time'), but model.kind is 'sd-turbo'"),
        "sd folder as sdxl-turbo": (["--set", "model.kind=sdxl-turbo", "--set", f"model.path={tiny_sd_turbo_path()}"],
                                    "holds a sd-turbo pipeline (UNet addition_embed_type=None), but model.kind is 'sdxl-turbo'"),
        "alias of the other kind": (["--set", "model.path=tiny-sdxl"], "'tiny-sdxl' is the embedded sdxl-turbo model"),
        "lora targets": (["--set", "lora.target_modules=[to_qq, proj_nope]"], "lora.target_modules ['to_qq', 'proj_nope'] match no module"),
        "checkpoint of another base": (["--set", "model.kind=sdxl-turbo", "--set", "model.path=tiny-sdxl", "--resume", checkpoint],
                                       "was trained on a different base model"),
    }
    runs = {name: ["train", "--local", *SMALL, *args, "--output-dir", tmp_path / name.replace(" ", "_")]
            for name, (args, _) in cases.items()}
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = dict(zip(runs, pool.map(lambda a: drpo(*a), runs.values())))
    for name, (_, needle) in cases.items():
        proc = procs[name]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("drpo: error:")]
        assert proc.returncode == 2, (name, proc.stderr[-1500:])
        assert len(errors) == 1 and needle in errors[0], (name, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr, name
        assert not (tmp_path / name.replace(" ", "_") / "metrics.jsonl").exists(), name  # no training step ran


def test_export_command(checkpoint, tmp_path):
    out = tmp_path / "exported"
    ok = drpo("export", "--checkpoint", checkpoint.parent.parent, "--out", out)  # a run folder: its newest checkpoint
    assert ok.returncode == 0, ok.stderr[-1500:]
    assert (out / "pytorch_lora_weights.safetensors").stat().st_size > 0 and "lora" in ok.stdout
    again = drpo("export", "--checkpoint", checkpoint, "--out", out)
    assert again.returncode == 2 and "already holds an export" in again.stderr
    missing = drpo("export", "--checkpoint", tmp_path / "nothing", "--out", tmp_path / "o2")
    assert missing.returncode == 2 and "not a drpo checkpoint" in missing.stderr and "Traceback" not in missing.stderr
