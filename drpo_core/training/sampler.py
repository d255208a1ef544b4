"""Candidate sampling (algorithm lines 3–5): K candidates per prompt from the current policy, plus
the frozen base's outputs for the same noises when the objective uses them (reference drift, DPO's
reference policy, a baseline's L2 to the base)."""

from __future__ import annotations

import torch

from drpo_core.algorithms.grpo import neighbor_noise
from drpo_core.algorithms.groups import CandidateGroup, stable_seed
from drpo_core.models.generator import OneStepGenerator


def group_noise(generator: OneStepGenerator, seeds: list[int], neighbor_sigma: float | None = None) -> torch.Tensor:
    """ε of one prompt's candidates `[K, C, h, w]` from their seeds.

    ``neighbor_sigma`` (Neighbor-GRPO): ε_i = √(1−σ²) ε_base + σ ε(seed_i) with ε_base from a seed
    derived from ``seeds[0]``, so the learner regenerates any candidate's noise from the group's seeds.
    """
    noise = generator.noise(seeds)
    if neighbor_sigma is None:
        return noise
    base = generator.noise([stable_seed("neighbor-base", seeds[0])])[0]
    return neighbor_noise(base.float(), noise.float(), neighbor_sigma).to(noise.dtype)


def needs_base_latents(algo) -> bool:
    """Whether the objective of ``algo`` (an AlgoConfig) reads the frozen base's outputs."""
    kind = algo.kind
    if kind == "drpo":
        return algo.needs_base  # reference drift, β_l2 or γ_feat
    if kind in ("drpo-awr", "drpo-awr-topk"):
        return True  # the base's features are part of the force
    if kind == "dpo":
        return not algo.dpo.reference_free or algo.dpo.ref_l2_weight > 0
    options = {"draft": algo.draft, "grpo": algo.grpo, "raft": algo.raft}.get(kind)
    return options is not None and options.ref_l2_weight > 0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Decoded images in [0, 1] → uint8 `[N, 3, H, W]` on CPU: what any reward reads (a PNG, a PIL image),
    at a quarter of the bytes of fp32, and never a CUDA tensor in a message between processes."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


class CandidateSampler:
    """Plain worker class: the generator side of DrPO. Runs as-is locally or inside a Ray actor."""

    def __init__(self, generator: OneStepGenerator, with_base: bool, neighbor_sigma: float | None = None,
                 threads: int = 1):
        self.generator, self.with_base, self.neighbor_sigma = generator, with_base, neighbor_sigma
        self.version = 0
        self.threads = threads  # decoding threads of sample_groups
        self._pool = None

    @classmethod
    def for_algo(cls, generator: OneStepGenerator, algo, threads: int = 1) -> "CandidateSampler":
        """The sampler an objective needs: base latents when it reads them, neighbour noises for GRPO."""
        return cls(generator, with_base=needs_base_latents(algo),
                   neighbor_sigma=algo.grpo.neighbor_sigma if algo.kind == "grpo" else None, threads=threads)

    def _pool_for_decoding(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            n = torch.get_num_threads()  # the workers run the same one-threaded (or n-threaded) kernels
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="decode",
                                            initializer=torch.set_num_threads, initargs=(n,))
        return self._pool

    def sample_groups(self, requests: list[tuple[str, str, list[int], dict | None]]) -> list[CandidateGroup]:
        """One :meth:`sample` per group ``(group_id, prompt, seeds, metadata)``, the same calls on the same inputs,
        with ``threads > 1`` overlapped: this thread runs each group's UNet calls (policy, then the frozen base)
        while worker threads decode the groups whose latents are ready; this thread then decodes the groups no
        worker has started. Each call is the same kernel on the same input as sequentially, so every latent and
        image is bit-identical (the VAE is only read; the base forward swaps nothing the decoders use)."""
        if self.threads <= 1 or len(requests) < 2:
            return [self.sample(gid, prompt, seeds, metadata=meta) for gid, prompt, seeds, meta in requests]
        pool, decode = self._pool_for_decoding(), self.generator.decode
        latents, futures, bases = [], [], []
        for _, prompt, seeds, _ in requests:
            noise = self._noise(seeds)
            lat, _ = self.generator.generate([prompt] * len(seeds), seeds, noise=noise, decode=False)
            latents.append(lat)
            futures.append(pool.submit(decode, lat))
            bases.append(self._base_latents([prompt] * len(seeds), seeds, noise) if self.with_base else None)
        images: list[torch.Tensor | None] = [None] * len(requests)
        for i in reversed(range(len(requests))):  # the groups no worker has started, from the back: decode here
            if futures[i].cancel():
                images[i] = decode(latents[i])
        images = [img if img is not None else f.result() for img, f in zip(images, futures)]
        return [CandidateGroup(group_id=gid, prompt=prompt, seeds=list(seeds), latents=lat.float(), images=to_uint8(img),
                               version=self.version, base_latents=None if b is None else b.float(), metadata=meta)
                for (gid, prompt, seeds, meta), lat, img, b in zip(requests, latents, images, bases)]

    def _noise(self, seeds: list[int]) -> torch.Tensor | None:
        return group_noise(self.generator, seeds, self.neighbor_sigma) if self.neighbor_sigma is not None else None

    def _generate(self, prompt: str, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.generator.generate([prompt] * len(seeds), seeds, noise=self._noise(seeds))

    @torch.no_grad()
    def _base_latents(self, prompts: list[str], seeds: list[int], noise: torch.Tensor | None) -> torch.Tensor:
        """G_base(ε_i, c) without decoding: the base's images are never scored, so no VAE decode is spent on them."""
        gen = self.generator
        noise = gen.noise(seeds) if noise is None else noise
        with gen.base_model():
            return gen.predict_x0(noise, gen.encode_prompts(prompts))

    def sample(self, group_id: str, prompt: str, seeds: list[int], metadata: dict | None = None) -> CandidateGroup:
        noise = self._noise(seeds)
        latents, images = self.generator.generate([prompt] * len(seeds), seeds, noise=noise)
        base = self._base_latents([prompt] * len(seeds), seeds, noise) if self.with_base else None
        return CandidateGroup(group_id=group_id, prompt=prompt, seeds=list(seeds), latents=latents.float(),
                              images=to_uint8(images), version=self.version,
                              base_latents=None if base is None else base.float(), metadata=metadata)

    def sample_many(self, requests: list[tuple[str, str, list[int], dict | None]]) -> list[CandidateGroup]:
        """Several prompt groups ``(group_id, prompt, seeds, metadata)`` in one batched forward (and one for the
        base): the same candidates as one :meth:`sample` per group, with fewer, larger UNet and VAE calls."""
        prompts = [prompt for _, prompt, seeds, _ in requests for _ in seeds]
        seeds = [s for _, _, group_seeds, _ in requests for s in group_seeds]
        noise = None if self.neighbor_sigma is None else torch.cat([self._noise(list(s)) for _, _, s, _ in requests])
        latents, images = self.generator.generate(prompts, seeds, noise=noise)
        base = self._base_latents(prompts, seeds, noise) if self.with_base else None
        sizes = [len(group_seeds) for _, _, group_seeds, _ in requests]
        parts = zip(latents.float().split(sizes), to_uint8(images).split(sizes),
                    base.float().split(sizes) if base is not None else [None] * len(sizes))
        return [CandidateGroup(group_id=gid, prompt=prompt, seeds=list(group_seeds), latents=lat, images=img, version=self.version,
                               base_latents=b, metadata=meta)
                for (gid, prompt, group_seeds, meta), (lat, img, b) in zip(requests, parts)]

    def extend(self, group: CandidateGroup, seeds: list[int]) -> CandidateGroup:
        """Another sampling round for the same prompt (binary rewards); base latents stay those of the first K."""
        latents, images = self._generate(group.prompt, seeds)
        group.seeds = group.seeds + list(seeds)
        group.latents = torch.cat([group.latents, latents.float().to(group.latents.device)])
        group.images = torch.cat([group.images, to_uint8(images)])
        group.rewards, group.scores = {}, None
        return group

    def set_weights(self, state: dict[str, torch.Tensor], version: int) -> None:
        self.generator.load_trainable_state_dict(state)
        self.version = version
