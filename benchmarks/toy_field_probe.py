"""Does the DrPO field point toward passing images? A probe in latent space, without any training.

For every ``--every``-th training prompt of the shapes world: K candidates from the model, scored by the
config's rewards (GenEval pass/fail and partial credit, z-scored and summed, as the demo ranks them), top-M /
bottom-M anchors, then the gradient of the DrPO loss with respect to the candidates' **latents** (not the
parameters). Each latent is moved against that gradient by η · 0.1 · ‖latent‖ and the moved images are scored
again. Three directions, the same size per candidate:

* ``ranked``   — the DrPO gradient with the reward's ranking;
* ``shuffled`` — the DrPO gradient with the scores shuffled within the group (no preference information);
* ``random``   — a Gaussian direction.

``ranked − shuffled`` is the preference information the field carries; ``shuffled − random`` its systematic
effect that does not depend on the reward. ``--freeze-positives`` moves only the candidates outside the top-M.
Reported per η: the mean change of the GenEval pass rate over prompts and its standard error (prompts are the
units). Parameter updates can only follow a field that already helps at this level.

    .venv/bin/python benchmarks/toy_field_probe.py [--set model.path=...] [--etas 0.5,1,2] [--freeze-positives]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from drpo_core.algorithms.loss import drpo_group_loss
from drpo_core.algorithms.ranking import select_anchors, zscore
from drpo_core.config import load_config
from drpo_core.features import build_encoder
from drpo_core.models.generator import OneStepGenerator
from drpo_core.rewards import build_reward
from drpo_core.toyworld.prompts import toy_prompts

DIRECTIONS = ("ranked", "shuffled", "random")


def direction(name: str, latents, scores, encoder, algo, gen: torch.Generator, freeze_positives: bool) -> torch.Tensor | None:
    """Step direction `[K, C, h, w]`, each row scaled to 0.1·‖latent‖ (zero rows stay zero), or None if the
    ranking skips the group."""
    K, M = latents.shape[0], algo.num_anchors
    if name == "shuffled":
        scores = scores[:, torch.randperm(K, generator=gen)]
    sel = select_anchors(scores, M)
    if not bool(sel.keep[0]):
        return None
    if name == "random":
        d = torch.randn(latents.shape, generator=gen)
    else:
        x = latents.clone().requires_grad_(True)
        feats = encoder(x)
        pos = {k: v[sel.pos_idx[0]].detach() for k, v in feats.items()}
        neg = {k: v[sel.neg_idx[0]].detach() for k, v in feats.items()}
        loss, _ = drpo_group_loss(feats, pos, neg, None, algo)
        d = -torch.autograd.grad(loss, x)[0]
    if freeze_positives:
        d[sel.pos_idx[0]] = 0
    norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
    moved = (d.flatten(1).abs().sum(1) > 0).float()
    return d / norm.view(-1, 1, 1, 1) * (0.1 * latents.flatten(1).norm(dim=1) * moved).view(-1, 1, 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="deploy/configs/toy.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. model.path=/tmp/base")
    ap.add_argument("--every", type=int, default=4, help="use every N-th training prompt")
    ap.add_argument("--etas", default="0.5,1,2")
    ap.add_argument("--freeze-positives", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    cfg = load_config([args.config], args.set)
    etas = [float(e) for e in args.etas.split(",")]
    generator = OneStepGenerator(cfg.model, cfg.lora)
    encoder = build_encoder(cfg.features, in_channels=4, device=torch.device("cpu"), generator=generator)
    rewards = {r.label: build_reward(r) for r in cfg.rewards}
    pass_label = next(r.label for r in cfg.rewards if r.options.get("mode") == "geneval")
    K = cfg.algo.num_candidates
    gen = torch.Generator().manual_seed(args.seed)

    def score(images, texts, metas) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(fn(images, texts, metas), dtype=torch.float32) for k, fn in rewards.items()}

    changes = {(d, e): [] for d in DIRECTIONS for e in etas}
    base_pass = []
    for i, prompt in enumerate(toy_prompts("train")[::args.every]):
        texts, metas = [prompt.text] * K, [prompt.metadata()] * K
        with torch.no_grad():
            latents, images = generator.generate(texts, [10_000 + 100 * i + k for k in range(K)])
        latents = latents.float()
        scores = score(images.float(), texts, metas)
        ranking = sum(zscore(s[None]) for s in scores.values())
        before = scores[pass_label].mean().item()
        base_pass.append(before)
        for name in DIRECTIONS:
            d = direction(name, latents, ranking, encoder, cfg.algo, gen, args.freeze_positives)
            if d is None:
                continue
            for eta in etas:
                with torch.no_grad():
                    moved = generator.decode((latents + eta * d).to(latents.dtype))
                after = score(moved.float(), texts, metas)[pass_label].mean().item()
                changes[(name, eta)].append(after - before)
    result = {"prompts": len(base_pass), "base_pass": sum(base_pass) / len(base_pass), "K": K,
              "M": cfg.algo.num_anchors, "freeze_positives": args.freeze_positives, "rows": []}
    print(f"{len(base_pass)} prompts, K={K}, M={cfg.algo.num_anchors}, base pass rate {result['base_pass']:.3f}"
          f"{', positives frozen' if args.freeze_positives else ''}")
    print(f"{'direction':<10} {'eta':>5} {'n':>4} {'Δ pass':>8} {'± se':>7}")
    for (name, eta), v in changes.items():
        mean = sum(v) / len(v)
        se = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1) / len(v)) if len(v) > 1 else float("nan")
        result["rows"].append({"direction": name, "eta": eta, "n": len(v), "delta_pass": mean, "se": se})
        print(f"{name:<10} {eta:>5} {len(v):>4} {mean:>+8.4f} {se:>7.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
