"""The committed toy base (drpo_core/toyworld/base_model): loads with stock diffusers and with `model.path: toy`,
and renders the world's objects in the prompt's colour — imperfectly, so that there is something to align."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from drpo_core.config import LoraConfig, ModelConfig
from drpo_core.models.generator import OneStepGenerator, resolve_model_path
from drpo_core.toyworld.detector import ShapeDetector, toy_geneval_reward
from drpo_core.toyworld.prompts import find_prompt

BASE = Path(__file__).resolve().parents[1] / "drpo_core" / "toyworld" / "base_model"


def test_toy_alias_is_the_committed_folder_and_stock_diffusers_loads_it():
    from diffusers import StableDiffusionPipeline

    assert Path(resolve_model_path("toy")) == BASE
    assert json.loads((BASE / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipe = StableDiffusionPipeline.from_pretrained(BASE, torch_dtype=torch.float32, safety_checker=None)
    out = pipe("a photo of a red circle", num_inference_steps=1, guidance_scale=0.0, height=32, width=32,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32)


def test_base_draws_objects_in_the_prompt_colour_but_not_always_right():
    gen = OneStepGenerator(ModelConfig(path="toy", resolution=32), LoraConfig(enabled=False))
    seeds = list(range(16))
    detector = ShapeDetector()
    found_colours = {}
    for colour in ("red", "blue"):
        prompt = find_prompt(f"a photo of a {colour} circle")
        _, images = gen.generate([prompt.text] * 16, seeds)
        dets = [detector(im) for im in images]
        assert sum(len(d.labels) > 0 for d in dets) >= 12  # objects, not noise
        found_colours[colour] = images
    # same seeds, different colour word → the images differ in that colour's channel balance
    red, blue = found_colours["red"], found_colours["blue"]
    assert (red[:, 0] - red[:, 2]).mean() > (blue[:, 0] - blue[:, 2]).mean() + 0.02
    prompts = [find_prompt(t) for t in ("a photo of a red circle", "a photo of two circles", "a photo of a green bar")]
    reward = toy_geneval_reward("geneval")
    scores = torch.cat([reward(gen.generate([p.text] * 16, seeds)[1], [p.text] * 16, [p.metadata()] * 16) for p in prompts])
    assert 0 < scores.mean() < 0.9  # imperfect: something to align


def test_base_draws_every_kind_not_only_round_blobs():
    """The first bases drew round blobs; the square world's last base drew triangles but squares the detector read
    as circles (16 of 64). In the bar world the detector finds the asked-for circle, bar and triangle in 63, 62 and
    51 of the four colours × 16 seeds (docs/toyworld.md)."""
    gen = OneStepGenerator(ModelConfig(path="toy", resolution=32), LoraConfig(enabled=False))
    detector = ShapeDetector()
    found = {}
    for kind in ("circle", "bar", "triangle"):
        for colour in ("red", "green", "blue", "yellow"):
            _, images = gen.generate([f"a photo of a {colour} {kind}"] * 16, list(range(16)))
            found[kind] = found.get(kind, 0) + sum(kind in detector(im).labels for im in images)
    assert all(n >= 40 for n in found.values()), found
