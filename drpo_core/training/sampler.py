"""Candidate sampling (algorithm lines 3–5): K candidates per prompt from the current policy, plus
the frozen base's outputs for the same noises when the reference drift is on."""

from __future__ import annotations

import torch

from drpo_core.models.generator import OneStepGenerator
from drpo_core.algorithms.groups import CandidateGroup


class CandidateSampler:
    """Plain worker class: the generator side of DrPO. Runs as-is locally or inside a Ray actor."""

    def __init__(self, generator: OneStepGenerator, with_base: bool):
        self.generator, self.with_base = generator, with_base
        self.version = 0

    def sample(self, group_id: str, prompt: str, seeds: list[int], metadata: dict | None = None) -> CandidateGroup:
        latents, images = self.generator.generate([prompt] * len(seeds), seeds)
        base = self.base_latents(prompt, seeds) if self.with_base else None
        return CandidateGroup(group_id=group_id, prompt=prompt, seeds=list(seeds), latents=latents.float(),
                              images=images, version=self.version, base_latents=None if base is None else base.float(),
                              metadata=metadata)

    @torch.no_grad()
    def base_latents(self, prompt: str, seeds: list[int]) -> torch.Tensor:
        """G_base(ε_i, c) without decoding images (the learner needs only the latents)."""
        gen = self.generator
        with gen.base_model():
            return gen.predict_x0(gen.noise(seeds), gen.encode_prompts([prompt] * len(seeds)))

    def extend(self, group: CandidateGroup, seeds: list[int]) -> CandidateGroup:
        """Another sampling round for the same prompt (binary rewards); base latents stay those of the first K."""
        latents, images = self.generator.generate([group.prompt] * len(seeds), seeds)
        group.seeds = group.seeds + list(seeds)
        group.latents = torch.cat([group.latents, latents.float()])
        group.images = torch.cat([group.images, images])
        group.rewards, group.scores = {}, None
        return group

    def set_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.generator.load_trainable_state_dict(state)
        self.version = version
