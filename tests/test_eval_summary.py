"""`drpo eval summary RUN_DIR`, what `make demo` prints last, on a run made the way `make demo` makes it
(train, two `drpo eval`, `drpo eval compare --json`), at a tiny size: 2 steps, 2 seeds."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli.main import app

runner = CliRunner()
TOY = "deploy/configs/toy.yaml"


def _ok(args: list[str]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The Makefile's demo recipe at a tiny size, every file written by the real commands."""
    run = tmp_path_factory.mktemp("demo") / "run"
    run.mkdir()
    (run / ".started").write_text(f"{int(time.time()) - 125}\n")  # as `date +%s` writes it, 2 min 5 s ago
    _ok(["train", "--local", "--config", TOY, "--set", "trainer.steps=2", "--set", "trainer.prompts_per_step=1",
         "--set", "algo.num_candidates=4", "--set", "algo.num_anchors=1", "--set", "trainer.sample_every=2",
         "--set", "trainer.checkpoint_every=2", "--output-dir", str(run)])
    _ok(["eval", "--config", TOY, "--base", "--seeds", "0-1", "--output-dir", str(run / "eval-base")])
    _ok(["eval", "--config", TOY, "--checkpoint", str(run), "--seeds", "0-1", "--output-dir", str(run / "eval-final")])
    _ok(["eval", "compare", str(run / "eval-base" / "eval.json"), str(run / "eval-final" / "eval.json"),
         "--json", str(run / "compare.json")])
    return run


def test_summary_gives_base_final_gain_se_z_per_task_the_wall_time_and_where_the_outputs_are(demo_run):
    shown = _ok(["eval", "summary", str(demo_run)]).output
    result = json.loads((demo_run / "compare.json").read_text())
    lines = shown.splitlines()
    wall = re.search(r"wall time (\d+) min (\d+) s", lines[0])
    assert wall and 125 <= 60 * int(wall[1]) + int(wall[2]) < 125 + 600
    assert "40 heldout prompts × 2 seeds" in lines[1]
    # the headline per reward: base → final, gain ± s.e., z, from the "all" subset
    for label, entry in result["rewards"].items():
        r = entry["all"]
        z = "n/a" if r["z"] is None else f"{r['z']:.1f}"
        assert (f"{label:24s} {r['base_mean']:.3f} → {r['policy_mean']:.3f}   gain {r['gain']:+.3f} "
                f"± {r['gain_se']:.3f}   z {z}") in shown
        # and every task's row of the table, as `drpo eval compare` prints it (z n/a where it is undefined)
        for subset, r in entry.items():
            row = next(line for line in lines if line.split()[:2] == [label, subset])
            base, final, gain, se, z = row.split()[2:]
            assert (float(base), float(final), float(gain)) == pytest.approx(
                (r["base_mean"], r["policy_mean"], r["gain"]), abs=5e-5)
            assert z == "n/a" if r["z"] is None or r["n_prompts"] < 2 else float(z) == pytest.approx(r["z"], abs=0.05)
            assert se == "n/a" if r["n_prompts"] < 2 else float(se) == pytest.approx(r["gain_se"], abs=5e-5)
    # every place it names exists: grids, curves, the checkpoint, the eval files
    where = {line.split(":", 1)[0]: line.split(":", 1)[1] for line in lines
             if line.split(":", 1)[0] in ("image grids", "curves", "checkpoint", "eval files")}
    assert set(where) == {"image grids", "curves", "checkpoint", "eval files"}
    assert "eval-final/before_after.png" in where["image grids"] and "checkpoints/step_2/" in where["checkpoint"]
    assert "unet/" in where["checkpoint"] and "compare.json" in where["eval files"]
    for paths in where.values():
        for path in paths.split(" (")[0].split(","):  # "a, b, c/ (a note)"
            assert Path(path.strip()).exists(), path


def test_summary_without_a_start_time_says_so_and_without_compare_json_exits_2(demo_run, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "compare.json").write_text((demo_run / "compare.json").read_text())
    shown = _ok(["eval", "summary", str(tmp_path / "run")]).output
    assert "wall time unknown" in shown and "checkpoint:" not in shown  # nothing listed that is not there
    missing = runner.invoke(app, ["eval", "summary", str(tmp_path)])
    assert missing.exit_code == 2 and "compare.json" in missing.output and len(missing.output.strip().splitlines()) == 1
