"""Candidate sampling (algorithm lines 3–5): K candidates per prompt from the current policy, plus
the frozen base's outputs for the same noises when the reference drift is on."""

from __future__ import annotations

import torch

from drpo_core.models.generator import OneStepGenerator
from drpo_core.algorithms.groups import CandidateGroup


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoded images in [0, 1] → uint8 `[N, 3, H, W]` on CPU: what any reward reads (a PNG, a PIL image),
    at a quarter of the bytes of fp32, and never a CUDA tensor in a message between processes."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


class CandidateSampler:
    """Plain worker class: the generator side of DrPO. Runs as-is locally or inside a Ray actor."""

    def __init__(self, generator: OneStepGenerator, with_base: bool):
        self.generator, self.with_base = generator, with_base
        self.version = 0

    def sample(self, group_id: str, prompt: str, seeds: list[int], metadata: dict | None = None) -> CandidateGroup:
        latents, images = self.generator.generate([prompt] * len(seeds), seeds)
        base = self.generator.generate([prompt] * len(seeds), seeds, base=True)[0] if self.with_base else None
        return CandidateGroup(group_id=group_id, prompt=prompt, seeds=list(seeds), latents=latents.float(),
                              images=to_uint8(images), version=self.version,
                              base_latents=None if base is None else base.float(), metadata=metadata)

    def sample_many(self, requests: list[tuple[str, str, list[int], dict | None]]) -> list[CandidateGroup]:
        """Several prompt groups ``(group_id, prompt, seeds, metadata)`` in one batched forward (and one for the
        base): the same candidates as one :meth:`sample` per group, with fewer, larger UNet and VAE calls."""
        prompts = [prompt for _, prompt, seeds, _ in requests for _ in seeds]
        seeds = [s for _, _, group_seeds, _ in requests for s in group_seeds]
        latents, images = self.generator.generate(prompts, seeds)
        base = self.generator.generate(prompts, seeds, base=True)[0] if self.with_base else None
        sizes = [len(group_seeds) for _, _, group_seeds, _ in requests]
        parts = zip(latents.float().split(sizes), to_uint8(images).split(sizes),
                    base.float().split(sizes) if base is not None else [None] * len(sizes))
        return [CandidateGroup(group_id=gid, prompt=prompt, seeds=list(group_seeds), latents=lat, images=img, version=self.version,
                               base_latents=b, metadata=meta)
                for (gid, prompt, group_seeds, meta), (lat, img, b) in zip(requests, parts)]

    def extend(self, group: CandidateGroup, seeds: list[int]) -> CandidateGroup:
        """Another sampling round for the same prompt (binary rewards); base latents stay those of the first K."""
        latents, images = self.generator.generate([group.prompt] * len(seeds), seeds)
        group.seeds = group.seeds + list(seeds)
        group.latents = torch.cat([group.latents, latents.float().to(group.latents.device)])
        group.images = torch.cat([group.images, to_uint8(images)])
        group.rewards, group.scores = {}, None
        return group

    def set_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.generator.load_trainable_state_dict(state)
        self.version = version
