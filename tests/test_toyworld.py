"""The shapes world: renderer, prompts and split, classical detector, and the GenEval rules on its output."""

from __future__ import annotations

import itertools

import pytest
import torch

from drpo_core.rewards.geneval import parse_metadata, relative_position
from drpo_core.toyworld.detector import PaletteColorClassifier, ShapeDetector, classify_shape, toy_geneval_reward
from drpo_core.toyworld.prompts import PRETRAIN_TASK_WEIGHTS, RENDER_TASK_WEIGHTS, TOY_TASKS, find_prompt, pretraining_sampler, task_weights, toy_prompts
from drpo_core.toyworld.world import BACKGROUND, GAP, PALETTE, SIZE, render

SAMPLE = toy_prompts("all")[::5]  # every task, every word


def test_render_is_deterministic_per_prompt_and_seed():
    prompt = find_prompt("a photo of two red circles")
    assert torch.equal(render(prompt.scene(3)), render(prompt.scene(3)))
    assert not torch.equal(render(prompt.scene(3)), render(prompt.scene(4)))
    image = render(prompt.scene(3))
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1


@pytest.mark.parametrize("prompt", SAMPLE, ids=lambda p: p.text)
def test_scene_matches_its_prompt_and_is_drawn(prompt):
    for seed in range(3):
        scene = prompt.scene(seed)
        want = sorted((g.kind, g.color) for g in prompt.groups for _ in range(g.count))
        got = sorted((s.kind, s.color if any(g.color for g in prompt.groups if g.kind == s.kind) else None) for s in scene)
        assert got == want
        for a, b in itertools.combinations(scene, 2):  # never touching: a gap of GAP pixels
            assert (a.box[2] + GAP <= b.box[0] or b.box[2] + GAP <= a.box[0]
                    or a.box[3] + GAP <= b.box[1] or b.box[3] + GAP <= a.box[1])
        image = render(scene)
        for s in scene:  # the centre pixel of every shape has its colour (a triangle's centroid is below the box centre)
            x, y = int(s.center[0]), int(s.center[1]) + (1 if s.kind == "triangle" else 0)
            assert torch.allclose(image[:, y, x] * 255, torch.tensor(PALETTE[s.color], dtype=torch.float32), atol=1)
        assert torch.allclose(image[:, 0, 0] * 255, torch.tensor(BACKGROUND, dtype=torch.float32), atol=1)
        if prompt.relation:
            a, b = (torch.tensor(s.box, dtype=torch.float64) for s in scene)
            assert prompt.relation in relative_position(a, b)


def test_prompts_metadata_and_split():
    train, held = toy_prompts("train"), toy_prompts("heldout")
    assert set(p.text for p in train).isdisjoint(p.text for p in held)
    assert {p.tag for p in held} == set(TOY_TASKS) == {p.tag for p in train}
    train_words = set(" ".join(p.text for p in train).split())
    assert set(" ".join(p.text for p in held).split()) <= train_words  # only combinations are new
    for p in toy_prompts("all"):
        spec = parse_metadata(p.metadata())
        assert spec.tag == p.tag and spec.prompt == p.text
    position = find_prompt("a photo of a circle left of a bar").metadata()
    assert position["include"] == [{"class": "bar", "count": 1},
                                   {"class": "circle", "count": 1, "position": ["left of", 0]}]
    assert find_prompt("a photo of three circles").metadata()["exclude"] == [{"class": "circle", "count": 4}]
    with pytest.raises(ValueError, match="not a prompt"):
        find_prompt("a photo of a purple hexagon")


@pytest.mark.parametrize("prompt", SAMPLE, ids=lambda p: p.text)
def test_detector_finds_every_rendered_shape(prompt):
    detector, classify = ShapeDetector(), PaletteColorClassifier()
    for seed in range(3):
        scene = prompt.scene(seed)
        image = render(scene)
        dets = detector(image, ["circle", "bar", "triangle"])
        assert sorted(dets.labels) == sorted(s.kind for s in scene)
        for s in scene:  # a detection of the right kind with the right box (±1 px) and colour
            i = min((i for i, label in enumerate(dets.labels) if label == s.kind),
                    key=lambda i: (dets.boxes[i] - torch.tensor(s.box, dtype=torch.float32)).abs().sum())
            assert (dets.boxes[i] - torch.tensor(s.box, dtype=torch.float32)).abs().max() <= 1
            crop = image[:, int(dets.boxes[i][1]):int(dets.boxes[i][3]), int(dets.boxes[i][0]):int(dets.boxes[i][2])]
            assert classify([crop], s.kind, ["red", "green", "blue", "yellow"]) == [s.color]
        assert dets.masks.shape == (len(scene), SIZE, SIZE) and bool((dets.scores == 1).all())


def test_detector_on_empty_and_noise():
    assert ShapeDetector()(torch.tensor(BACKGROUND, dtype=torch.float32)[:, None, None].expand(3, SIZE, SIZE) / 255).labels == []
    speckle = torch.full((3, SIZE, SIZE), BACKGROUND[0] / 255)
    speckle[:, 5, 5] = torch.tensor(PALETTE["red"]) / 255  # 1 px: below min_pixels, noise
    assert ShapeDetector()(speckle).labels == []


def test_shape_geometry():
    yy, xx = torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij")
    disc = ((yy - 4.5) ** 2 + (xx - 4.5) ** 2 <= 25).numpy()
    tri = ((xx >= 4.5 - yy / 2) & (xx <= 4.5 + yy / 2)).numpy()
    assert classify_shape(disc) == "circle"
    assert classify_shape(torch.ones(5, 10, dtype=torch.bool).numpy()) == "bar"
    assert classify_shape(torch.ones(10, 10, dtype=torch.bool).numpy()) == "circle"  # a square is no bar: too high
    assert classify_shape(tri) == "triangle"


@pytest.mark.parametrize("mode", ["geneval", "strict"])
def test_rules_pass_renders_of_the_prompt_and_fail_others(mode):
    reward = toy_geneval_reward(mode)
    cases = {  # rendered prompt → prompts it must fail
        "a photo of two red circles": ["a photo of three red circles", "a photo of two blue circles", "a photo of two red bars"],
        "a photo of a circle left of a bar": ["a photo of a circle right of a bar", "a photo of a bar left of a circle"],
        "a photo of a red circle and a blue bar": ["a photo of a blue circle and a red bar", "a photo of a red circle and a blue triangle"],
    }
    for rendered, wrong in cases.items():
        images = torch.stack([render(find_prompt(rendered).scene(s)) for s in range(4)])
        for text, expected in [(rendered, 1.0)] + [(w, 0.0) for w in wrong]:
            meta = [find_prompt(text).metadata()] * 4
            assert reward(images, [text] * 4, meta).tolist() == [expected] * 4, (rendered, text)
    stats = reward.pop_stats()
    assert stats["missing_metadata"] == 0 and 0 < stats["overall"] < 1


def test_geneval_rule_counts_at_least_and_strict_rule_exactly():
    three = torch.stack([render(find_prompt("a photo of three red circles").scene(s)) for s in range(2)])
    two = find_prompt("a photo of two red circles")
    assert toy_geneval_reward("geneval")(three, [two.text] * 2, [two.metadata()] * 2).tolist() == [0.0, 0.0]  # excluded: 3
    single = find_prompt("a photo of a red circle")  # colors: no exclude clause, ≥ 1 is enough for GenEval
    assert toy_geneval_reward("geneval")(three, [single.text] * 2, [single.metadata()] * 2).tolist() == [1.0, 1.0]
    assert toy_geneval_reward("strict")(three, [single.text] * 2, [single.metadata()] * 2).tolist() == [0.0, 0.0]
    partial = toy_geneval_reward("partial")(three, [two.text] * 2, [two.metadata()] * 2)
    assert torch.allclose(partial, torch.tensor([0.25, 0.25]))  # count term 1 − 1/2, colour term 0 (count wrong)


def test_geneval_reward_config_selects_the_toy_detector():
    from drpo_core.config import RewardConfig
    from drpo_core.rewards import build_reward

    reward = build_reward(RewardConfig(kind="geneval", options={"detector": "toy-shapes", "mode": "partial"}))
    assert reward.mode == "partial" and isinstance(reward.detector, ShapeDetector)
    with pytest.raises(ValueError, match="unknown option.*treshold"):
        build_reward(RewardConfig(kind="geneval", options={"detector": "toy-shapes", "treshold": 0.5}))


def test_committed_prompt_files_are_the_split(tmp_path):
    from pathlib import Path

    from drpo_core.toyworld.prompts import write_metadata_jsonl

    root = Path(__file__).resolve().parents[1] / "drpo_core" / "toyworld" / "prompt_sets"
    for split in ("train", "heldout"):
        fresh = write_metadata_jsonl(toy_prompts(split), tmp_path / f"{split}.jsonl").read_text()
        assert (root / f"{split}.jsonl").read_text() == fresh


def test_miscaptioned_changes_named_colours_at_the_given_rate_and_nothing_else():
    from drpo_core.toyworld.prompts import miscaptioned

    two = find_prompt("a photo of a red circle and a blue bar")
    assert miscaptioned(two, 3, 0.0) == two
    colour_free = find_prompt("a photo of two circles")
    assert all(miscaptioned(colour_free, s, 1.0) == colour_free for s in range(20))
    changed = [0, 0]
    for seed in range(2000):
        noisy = miscaptioned(two, seed, 0.3)
        assert noisy == miscaptioned(two, seed, 0.3)  # deterministic per (prompt, seed)
        assert (noisy.tag, noisy.relation) == (two.tag, two.relation)
        for i, (g, h) in enumerate(zip(two.groups, noisy.groups)):
            assert (h.kind, h.count) == (g.kind, g.count) and h.color in PALETTE
            changed[i] += h.color != g.color
    assert all(abs(c / 2000 - 0.3) < 0.04 for c in changed), changed
    assert all(h.color != g.color for s in range(50) for g, h in zip(two.groups, miscaptioned(two, s, 1.0).groups))


def test_pretraining_task_mix_follows_the_weights():
    assert task_weights() == PRETRAIN_TASK_WEIGHTS and task_weights("") == PRETRAIN_TASK_WEIGHTS
    only = task_weights({t: 0.0 for t in TOY_TASKS if t != "color_attr"})
    assert {p.tag for p in pretraining_sampler(0, weights=only)(200)} == {"color_attr"}
    heavy = task_weights("color_attr=0.7,counting=0.1")
    tags = [p.tag for p in pretraining_sampler(0, weights=heavy)(4000)]
    share = tags.count("color_attr") / len(tags)
    assert abs(share - 0.7 / sum(heavy.values())) < 0.03  # 4000 draws: s.e. ≈ 0.007
    default = [p.text for p in pretraining_sampler(3)(50)]
    assert default == [p.text for p in pretraining_sampler(3, weights=dict(PRETRAIN_TASK_WEIGHTS))(50)]  # the committed base's stream
    # the autoencoder and scene encoder draw from their own, counting-heavy mix
    renders = [p.tag for p in pretraining_sampler(3, weights=RENDER_TASK_WEIGHTS)(4000)]
    assert abs(renders.count("counting") / 4000 - 0.4) < 0.03 and abs(renders.count("color_attr") / 4000 - 0.1) < 0.03
    with pytest.raises(ValueError, match="all weights are 0"):
        task_weights({t: 0 for t in TOY_TASKS})
