"""Accuracy of the shapes world's classical GenEval detector on images with known ground truth.

For every prompt of the world (train and held-out) × ``--seeds`` seeds, a render of a scene that satisfies
the prompt is scored by the GenEval rules over :class:`ShapeDetector` + :class:`PaletteColorClassifier`.
A correct detector passes every one, so the pass rate *is* the accuracy. Reported per GenEval task:

* ``geneval``: the benchmark rule passes; ``strict``: flow_grpo's exact-count rule passes;
* ``scene``: the detected multiset of (shape, colour) equals the scene's exactly.

With ``--model PATH`` (a toy pipeline folder) the same is measured on the renders after a round trip
through its autoencoder (encode → decode), i.e. on images as blurry as the generator's can be at best.

    .venv/bin/python benchmarks/toy_detector_accuracy.py [--seeds 10] [--model drpo_core/toyworld/base_model]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

from drpo_core.toyworld.detector import PaletteColorClassifier, ShapeDetector, toy_geneval_reward
from drpo_core.toyworld.prompts import TOY_TASKS, toy_prompts
from drpo_core.toyworld.world import render


def scene_matches(detector: ShapeDetector, classify: PaletteColorClassifier, image: torch.Tensor, scene) -> bool:
    """Detected (shape, colour) multiset == the scene's."""
    from drpo_core.rewards.geneval.detection import Found
    from drpo_core.rewards.geneval.rules import crop_for_color
    from drpo_core.toyworld.world import COLORS

    dets = detector(image)
    found = []
    for i, label in enumerate(dets.labels):
        crop = crop_for_color(image, Found(dets.boxes[i], 1.0, dets.masks[i]))
        found.append((label, classify([crop], label, COLORS)[0]))
    return sorted(found) == sorted((s.kind, s.color) for s in scene)


def measure(seeds: int, roundtrip=None) -> dict:
    rewards = {"geneval": toy_geneval_reward("geneval"), "strict": toy_geneval_reward("strict")}
    detector, classify = ShapeDetector(), PaletteColorClassifier()
    hits: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for prompt in toy_prompts("all"):
        scenes = [prompt.scene(s) for s in range(seeds)]
        images = torch.stack([render(sc) for sc in scenes])
        if roundtrip is not None:
            images = roundtrip(images)
        for name, reward in rewards.items():
            hits[prompt.tag][name] += reward(images, [prompt.text] * seeds, [prompt.metadata()] * seeds).tolist()
        hits[prompt.tag]["scene"] += [float(scene_matches(detector, classify, im, sc)) for im, sc in zip(images, scenes)]
    table = {t: {k: sum(v) / len(v) for k, v in hits[t].items()} | {"n": len(hits[t]["scene"])} for t in TOY_TASKS}
    every = [x for t in TOY_TASKS for x in hits[t]["geneval"]]
    table["all"] = {k: sum(x for t in TOY_TASKS for x in hits[t][k]) / len(every) for k in ("geneval", "strict", "scene")}
    table["all"]["n"] = len(every)
    return table


def autoencoder_roundtrip(path: str):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32).eval()

    @torch.no_grad()
    def roundtrip(images: torch.Tensor) -> torch.Tensor:
        latents = vae.encode(images * 2 - 1).latent_dist.mean
        return (vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)

    return roundtrip


def markdown(table: dict, title: str) -> str:
    lines = [f"| {title} | n | GenEval rule | strict rule | exact scene |", "|---|---|---|---|---|"]
    for task, row in table.items():
        lines.append(f"| {task} | {row['n']} | {100 * row['geneval']:.1f} % | {100 * row['strict']:.1f} % | {100 * row['scene']:.1f} % |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--model", default=None, help="toy pipeline folder: also measure on its autoencoder's reconstructions")
    parser.add_argument("--out", type=Path, default=None, help="write the tables as JSON here")
    args = parser.parse_args()
    result = {"clean": measure(args.seeds)}
    print(markdown(result["clean"], "clean renders"))
    if args.model:
        result["autoencoder"] = measure(args.seeds, autoencoder_roundtrip(args.model))
        print()
        print(markdown(result["autoencoder"], "autoencoder round trip"))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
