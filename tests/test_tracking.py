"""What a user watches: TensorBoard/W&B files of a run, one plain progress line per step in a log file,
the weighted-ensemble reward series, captioned size-capped grids, ``drpo --version``."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drpo_core.algorithms.groups import CandidateGroup
from drpo_core.config import load_config
from drpo_core.training.grids import CAPTION_WIDTH, HEADER, MAX_SIDE, read_caption, save_before_after, save_grid
from drpo_core.training.tracking import RunTracker
from drpo_core.training.trainer import group_stats

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--set", "trainer.steps=3", "--set", "trainer.prompts_per_step=2", "--set", "algo.num_candidates=6",
         "--set", "algo.num_anchors=2", "--set", "trainer.heldout_eval_seeds=2", "--set", "trainer.eval_seeds=2"]
LINE = re.compile(r"^step (\d+)/3 reward (\S+) loss (\S+) (\S+) s/step eta \S+$")


def events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_three_step_run_to_a_file_writes_tensorboard_and_one_line_per_step(tmp_path):
    out, log = tmp_path / "run", tmp_path / "train.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log.open("w") as fh:  # not a terminal: the bar would print once, at the end
        proc = subprocess.run([sys.executable, "-m", "services.cli", "train", "--local", "-c", "deploy/configs/tiny.yaml", *SHORT,
                               "-o", str(out)], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text[-2000:]
    lines = [m for m in map(LINE.match, text.splitlines()) if m]
    assert [int(m.group(1)) for m in lines] == [1, 2, 3], text
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    for m, row in zip(lines, rows):  # the printed numbers are the logged ones
        assert float(m.group(2)) == pytest.approx(row["reward/mean"], rel=1e-3)
        assert float(m.group(3)) == pytest.approx(row["loss"], rel=1e-3)

    acc = events(out / "tensorboard")
    tags = acc.Tags()
    for tag in ("reward/mean", "reward/std", "reward/hue_fraction/mean", "loss", "time/step_s", "eval/gain"):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert [e.step for e in acc.Scalars("reward/mean")] == [1, 2, 3]
    assert [e.value for e in acc.Scalars("reward/mean")] == pytest.approx([r["reward/mean"] for r in rows], rel=1e-5)
    assert {"samples", "before_after"} <= set(tags["images"])
    assert [e.step for e in acc.Images("samples")] == [0, 3]
    captions = {t: acc.Tensors(t)[-1].tensor_proto.string_val[0].decode() for t in tags["tensors"]}
    assert "a photo of a" in captions["samples/caption/text_summary"]
    assert "before" in captions["before_after/caption/text_summary"]
    assert "num_candidates: 6" in captions["config/text_summary"]


def test_grid_is_captioned_and_capped_and_small_images_are_enlarged(tmp_path):
    prompts, seeds = ["a red car", "a blue kite", "a green cup"], [11, 22]
    small = save_grid(torch.rand(6, 3, 32, 32), prompts, seeds, tmp_path / "small.png")
    medium = save_grid(torch.rand(2, 3, 256, 256), prompts[:1], seeds, tmp_path / "medium.png")
    big = save_grid(torch.rand(6, 3, 1024, 1024), prompts, seeds, tmp_path / "big.png")
    from PIL import Image

    def size(cell, rows, cols):  # prompt column + header band + make_grid's 2 px padding
        return CAPTION_WIDTH + cols * (cell + 2) + 2, HEADER + rows * (cell + 2) + 2

    assert Image.open(small).size == size(96, 3, 2)  # 32 px cells shown at 3x
    assert Image.open(medium).size == size(256, 1, 2)  # never upscaled past MIN_CELL
    assert max(Image.open(big).size) == MAX_SIDE  # 3×1024 px rows: capped
    caption = read_caption(small)
    assert "row 1: a red car" in caption and "row 3: a green cup" in caption and "seed 22" in caption
    with pytest.raises(ValueError, match="do not fill"):
        save_grid(torch.rand(5, 3, 32, 32), prompts, seeds, tmp_path / "bad.png")


def test_before_after_has_labels_and_a_divider_between_equal_halves(tmp_path):
    from PIL import Image
    import numpy as np

    base, policy = torch.zeros(4, 3, 32, 32), torch.ones(4, 3, 32, 32)  # black above, white below
    path = save_before_after(base, policy, ["p1", "p2"], [1, 2], tmp_path / "ba.png")
    assert read_caption(path).startswith("top: before (base model); bottom: after (DrPO policy)")
    px = np.asarray(Image.open(path).convert("L")).astype(int)
    dark_rows = np.where((px < 60).mean(axis=1) > 0.99)[0]  # full-width dark rows: the divider only
    assert len(dark_rows) > 0
    mid = dark_rows.mean() / px.shape[0]
    assert 0.45 < mid < 0.55
    cells = px[:, 210:]  # right of the prompt column
    assert cells[: int(dark_rows.min())].mean() < cells[int(dark_rows.max()) + 1:].mean()  # before (black) is on top


def _group(rewards: dict[str, list[float]]) -> CandidateGroup:
    n = len(next(iter(rewards.values())))
    g = CandidateGroup("g", "p", list(range(n)), latents=torch.zeros(n, 1), images=torch.zeros(n, 3, 2, 2), version=0)
    g.rewards = {k: torch.tensor(v) for k, v in rewards.items()}
    return g


def test_reward_mean_is_the_weighted_ensemble_of_every_reward():
    groups = [_group({"a": [1.0, 2.0, float("nan")], "b": [10.0, 30.0, 50.0]}), _group({"a": [3.0, 4.0, 5.0], "b": [0.0, 0.0, 20.0]})]
    weights = {"a": 3.0, "b": 1.0}
    stats = group_stats(groups, weights=weights)
    # oracle: a loop over candidates, skipping any candidate a reward did not score
    combined = []
    for g in groups:
        for j in range(len(g.seeds)):
            vals = {k: float(v[j]) for k, v in g.rewards.items()}
            if not any(math.isnan(v) for v in vals.values()):
                combined.append(sum(weights[k] * v for k, v in vals.items()) / sum(weights.values()))
    mean = sum(combined) / len(combined)
    std = math.sqrt(sum((c - mean) ** 2 for c in combined) / (len(combined) - 1))
    assert stats["reward/mean"] == pytest.approx(mean)
    assert stats["reward/std"] == pytest.approx(std)
    assert stats["reward/a/mean"] == pytest.approx(3.0) and stats["reward/b/mean"] == pytest.approx(110 / 6)
    one = group_stats([_group({"a": [1.0, 3.0]})], weights={"a": 5.0})
    assert one["reward/mean"] == pytest.approx(2.0)  # one reward alone: its own mean, whatever its weight


def test_wandb_offline_run_is_written_in_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config([], ["output.tracker=wandb", "output.wandb_mode=offline", f"output.dir={tmp_path}"])
    grid = save_grid(torch.rand(2, 3, 32, 32), ["a red car"], [1, 2], tmp_path / "samples" / "step_0.png")
    tracker = RunTracker(tmp_path, cfg)
    tracker.image("samples", grid, 0)
    tracker.write({"step": 1, "reward/mean": 0.25, "loss": 3.0, "lag/groups": [0, 1]})
    tracker.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (tmp_path / "wandb_run_id").read_text().strip() in runs[0].name
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["reward/mean"] == 0.25


def test_version_flag():
    proc = subprocess.run([sys.executable, "-m", "services.cli", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and re.fullmatch(r"drpo \S+\n", proc.stdout), proc.stdout + proc.stderr


def test_wandb_asked_for_but_missing_is_one_clear_error(tmp_path, monkeypatch):
    from drpo_core.training.tracking import TrackerError

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = load_config([], ["output.tracker=both", f"output.dir={tmp_path}"])
    with pytest.raises(TrackerError, match=r"wandb, which is not installed \(pip install wandb\)"):
        RunTracker(tmp_path, cfg)
