"""Held-out evaluation: base vs policy reward on the same prompts and seeds (a paired comparison)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from drpo_core.algorithms.groups import stable_seed
from drpo_core.training.statistics import clustered_mean


def heldout_seeds(n: int, salt: str = "eval") -> list[int]:
    """Seeds disjoint in practice from training seeds (different hash domain)."""
    return [stable_seed("heldout", salt, i) for i in range(n)]


@torch.no_grad()
def reward_table(generator, reward, prompts: list[str], seeds: list[int], base: bool, batch: int = 64) -> torch.Tensor:
    """Scores `[P, S]` of ``generator`` (or its frozen base) for every (prompt, seed)."""
    pairs = [(p, s) for p in prompts for s in seeds]
    scores = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        _, images = generator.generate([p for p, _ in chunk], [s for _, s in chunk], base=base)
        scores.append(torch.as_tensor(reward(images, [p for p, _ in chunk], None), dtype=torch.float32).cpu())
    return torch.cat(scores).view(len(prompts), len(seeds))


@dataclass
class PairedResult:
    """Base vs policy on the same prompts × seeds. Every ``*_se`` is prompt-clustered (see ``statistics``)."""

    base_mean: float
    policy_mean: float
    base_se: float
    policy_se: float
    gain: float
    gain_se: float
    z: float
    n: int            # valid paired cells
    n_prompts: int    # clusters behind the standard errors

    def as_dict(self) -> dict:
        return asdict(self)


def paired_gain(base: torch.Tensor, policy: torch.Tensor) -> PairedResult:
    """Mean gain over paired (prompt, seed) cells of `[P, S]` tables, with prompt-clustered standard errors.

    A cell missing (NaN) on either side is dropped from both, so base, policy and gain use the same cells.
    """
    if base.shape != policy.shape:
        raise ValueError(f"paired tables differ in shape: base {tuple(base.shape)} vs policy {tuple(policy.shape)}")
    base, policy = base.reshape(base.shape[0], -1).double(), policy.reshape(policy.shape[0], -1).double()
    missing = torch.isnan(base) | torch.isnan(policy)
    base, policy = base.masked_fill(missing, math.nan), policy.masked_fill(missing, math.nan)
    b, p, d = clustered_mean(base), clustered_mean(policy), clustered_mean(policy - base)
    z = d.mean / d.se if d.se > 0 else math.copysign(math.inf, d.mean) if d.mean else 0.0
    return PairedResult(base_mean=b.mean, policy_mean=p.mean, base_se=b.se, policy_se=p.se, gain=d.mean,
                        gain_se=d.se, z=z, n=d.n_cells, n_prompts=d.n_prompts)


@torch.no_grad()
def diversity(generator, prompt: str, seeds: list[int], base: bool) -> float:
    """Mean pairwise L2 distance between images of one prompt across seeds (per pixel, RMS)."""
    _, images = generator.generate([prompt] * len(seeds), seeds, base=base)
    flat = images.flatten(1)
    d = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    n = flat.shape[0]
    return float(d.sum() / (n * (n - 1)))


def evaluate(generator, reward, prompts: list[str], seeds: list[int], group_of=None) -> dict:
    """Paired base-vs-policy evaluation, overall and per prompt class (``group_of(prompt) -> str``)."""
    base = reward_table(generator, reward, prompts, seeds, base=True)
    policy = reward_table(generator, reward, prompts, seeds, base=False)
    result = {"overall": paired_gain(base, policy).as_dict(), "per_class": {}, "prompts": len(prompts), "seeds": len(seeds)}
    if group_of is not None:
        classes: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            classes.setdefault(group_of(p) or "other", []).append(i)
        for name, idx in classes.items():
            result["per_class"][name] = paired_gain(base[idx], policy[idx]).as_dict()
    result["diversity"] = {
        "base": sum(diversity(generator, p, seeds, base=True) for p in prompts[:4]) / min(4, len(prompts)),
        "policy": sum(diversity(generator, p, seeds, base=False) for p in prompts[:4]) / min(4, len(prompts)),
    }
    return result
