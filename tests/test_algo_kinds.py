"""Every ``algo.kind`` trains the tiny default through ``drpo train --local``; DRaFT refuses a
non-differentiable reward before training; offline anchors train from a dataset the test writes."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from drpo_core.config import load_config
from services.cli.main import app

# the tiny default with fewer candidates and no held-out eval: each run takes seconds
FAST = ["trainer.steps=2", "trainer.prompts_per_step=2", "algo.num_candidates=6", "algo.num_anchors=2",
        "trainer.heldout_eval_seeds=0", "trainer.eval_seeds=1"]
# a metric only that kind's loss writes: proves the dispatch ran the kind's objective, not DrPO's
KINDS = {"drpo": "drift/", "drpo-awr": "awr/effective_count/", "drpo-awr-topk": "awr/top_count/",
         "drpo-awr-hard": "awr/hard_anchors/", "drpo-awr-advsign": "awr/positives/", "dpo": "dpo/logit",
         "grpo": "grpo/ratio_mean", "raft": "raft/fit", "draft": "draft/soft_hue/mean"}


def train(out, *overrides):
    args = ["train", "--local", "--config", "deploy/configs/tiny.yaml", "--output-dir", str(out)]
    for o in [*FAST, *overrides]:
        args += ["--set", o]
    return CliRunner().invoke(app, args)


def lora_up_norm(run) -> float:
    """‖B‖ of the LoRA (peft starts B at 0: a non-zero norm means the updates moved the weights)."""
    state = load_file(str(run / "checkpoints" / "step_2" / "trainable.safetensors"))
    return sum(float(v.norm()) for k, v in state.items() if "lora_B" in k)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_trains_the_tiny_default(tmp_path, kind):
    extra = ["rewards=[{kind: soft_hue}]"] if kind == "draft" else []
    result = train(tmp_path / kind, f"algo.kind={kind}", *extra)
    assert result.exit_code == 0, result.output[-2000:]
    rows = [json.loads(line) for line in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
    assert [r["update/applied"] for r in rows] == [1.0, 1.0]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert all(any(k.startswith(KINDS[kind]) for k in r) for r in rows), sorted(rows[0])
    assert lora_up_norm(tmp_path / kind) > 0
    if kind == "dpo":  # step 1: the policy is still the base (LoRA B = 0) on the same noises, so its margin is the base's
        assert abs(rows[0]["dpo/logit"]) < 1e-3 < abs(rows[1]["dpo/logit"])
    if kind == "grpo":  # step 1 is on-policy: ratio 1, and centred advantages give a zero surrogate
        assert rows[0]["grpo/ratio_mean"] == pytest.approx(1.0, abs=1e-4) and abs(rows[0]["loss"]) < 1e-4


def test_draft_refuses_the_hue_reward_before_training(tmp_path):
    result = train(tmp_path / "draft", "algo.kind=draft")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "not differentiable" in lines[0] and "hue_fraction" in lines[0]
    assert not (tmp_path / "draft").exists()  # nothing was built or written


def test_objective_options_are_checked_once_at_load():
    with pytest.raises(ValueError, match="num_anchors"):
        load_config([], ["algo.kind=grpo", "algo.num_candidates=4", "algo.num_anchors=1", "algo.grpo.num_anchors=5"])
    with pytest.raises(ValueError, match="unknown key"):
        load_config([], ["algo.dpo.betta=3"])
    with pytest.raises(ValueError, match="algo.offline.dataset"):
        load_config([], ["algo.kind=dpo", "algo.offline.dataset=x.jsonl"])


def write_dataset(root, prompts, size=32):
    """Per prompt: two 'chosen' images in the prompt's colour, two 'rejected' grey ones."""
    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "purple": (150, 40, 200)}
    lines = []
    for i, p in enumerate(prompts):
        color = next(c for c in rgb if c in p)
        names = {"chosen": [], "rejected": []}
        for side, value in (("chosen", rgb[color]), ("rejected", (128, 128, 128))):
            for j in range(2):
                noise = np.random.default_rng(i * 10 + j).integers(-20, 20, (size, size, 3))
                arr = np.clip(np.array(value)[None, None] + noise, 0, 255).astype(np.uint8)
                name = f"img/{i}_{side}_{j}.png"
                (root / "img").mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / name)
                names[side].append(name)
        lines.append(json.dumps({"prompt": p, **names}))
    (root / "prefs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "prefs.jsonl"


@pytest.mark.parametrize("mode", ["images", "distance"])
def test_offline_anchors_train_from_a_local_dataset(tmp_path, mode):
    data = write_dataset(tmp_path / "data", ["a photo of a red car", "a photo of a blue cup", "a photo of a green bird"])
    extra = [f"algo.offline.dataset={data}", f"algo.offline.mode={mode}", f"prompts.file={data}"]
    if mode == "distance":
        extra.append("algo.offline.include_data_anchors=true")
    result = train(tmp_path / mode, *extra)
    assert result.exit_code == 0, result.output[-2000:]
    rows = [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    assert [r["update/applied"] for r in rows] == [1.0, 1.0]
    assert lora_up_norm(tmp_path / mode) > 0


def test_grpo_sampler_and_learner_agree_on_the_neighbour_noises(tmp_path):
    from drpo_core.training.sampler import group_noise
    from drpo_core.training.trainer import DrpoTrainer

    cfg = load_config(["deploy/configs/tiny.yaml"], [*FAST, "algo.kind=grpo"])
    trainer = DrpoTrainer(cfg, output_dir=tmp_path / "grpo")
    groups, _ = trainer.collect(0, ["a photo of a red car"])
    g, objective = groups[0], trainer.learner.objective
    index = objective.anchor_index(g)
    with torch.no_grad():
        anchors = objective.policy_latents([g], [index])
    torch.testing.assert_close(anchors, g.latents[index], atol=1e-5, rtol=1e-5)  # on-policy: ratio 1 at the first step
    eps = group_noise(trainer.generator, g.seeds, cfg.algo.grpo.neighbor_sigma).flatten(1)
    corr = torch.corrcoef(eps[:2])[0, 1].item()
    assert corr == pytest.approx(1 - 0.3**2, abs=0.1)  # neighbours share the base noise
    assert torch.corrcoef(trainer.generator.noise(g.seeds[:2]).flatten(1))[0, 1].abs() < 0.2
