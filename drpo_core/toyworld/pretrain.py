"""Pretrain the tiny one-step base generator of the shapes world (`drpo pretrain-toy`).

Three stages, all on renders of the world drawn on the fly (no dataset on disk):

1. **Autoencoder** — diffusers ``AutoencoderKL`` (channels 32/64/64, ×4 down, 4 latent channels):
   L1 + MSE reconstruction + a tiny KL; its ``scaling_factor`` is then set to 1 / std of the latents.
1b. **Scene encoder** (``latent+scene`` only; :mod:`drpo_core.toyworld.scene_encoder`) — a latent ResNet that
   learns to count each colour × kind from the autoencoder's latents of renders; saved to ``scene_encoder/``.
2. **Generator** — ``UNet2DConditionModel`` (channels 32/64, cross-attention) and a tiny
   ``CLIPTextModel`` trained jointly as a one-step generator ``x = G(ε, c)`` exactly as
   :class:`drpo_core.models.generator.OneStepGenerator` runs it (t = 999, v-prediction conversion), with
   the Drifting Models objective (arXiv 2602.04770) and the project's drift field: per prompt, the K
   generated latents are drifted toward K renders of that prompt (from an encoded pool, positives) and
   away from themselves (the generated batch as negatives, self-masked), in a frozen feature space φ:

       L = mean_prompts Σ_keys drift_loss(φ_key(G(ε, c)), φ_key(E(render(c))), ∅)

   φ (:class:`ToyPhi`, ``feature_space``): ``"latent"`` = :class:`LatentFeatures` (raw latent, 2×2 pool,
   statistics of a random conv net on the latent; 10 point sets); ``"latent+scene"`` (default) adds the
   **scene encoder** (:mod:`drpo_core.toyworld.scene_encoder`, trained in stage 1b on the autoencoder's latents
   of renders to count each colour × shape; its global and 2×2 mean/std, 4 more); ``"latent+pixel"`` (the
   previous base) adds :class:`PixelFeatures` on the decoded image (random-conv statistics on pixels; 12 more,
   and a decoder backward per step). Translation-invariant statistics are what let the field match objects
   whose positions are random (raw-latent distances alone mostly measure position); the scene encoder's are
   what make triangles come out instead of round blobs.
   Stage 2 runs a fixed number of steps, so the result does not depend on the machine's load.
   With ``caption_noise`` > 0 the positives are **noisily captioned**, as web alt-text is: each named colour of a
   prompt's pool render is another colour with that probability (:func:`~drpo_core.toyworld.prompts.miscaptioned`),
   so the base learns to follow colour words only as often as its data did, a failure a reward can see and fix.

The result is a stock ``StableDiffusionPipeline`` folder (safetensors, fp16 weights, the project's
offline CLIP tokenizer, an Euler "trailing" v-prediction scheduler) that ``model.path`` loads.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from drpo_core.algorithms.drift import drift_loss
from drpo_core.toyworld.prompts import PRETRAIN_TASK_WEIGHTS, RENDER_TASK_WEIGHTS, ToyPrompt, miscaptioned, pretraining_sampler, toy_prompts
from drpo_core.toyworld.scene_encoder import FOLDER as SCENE_FOLDER
from drpo_core.toyworld.scene_encoder import SceneEncoderSettings, save_scene_encoder, train_scene_encoder
from drpo_core.toyworld.toy_features import LatentFeatures, PixelFeatures
from drpo_core.toyworld.world import SIZE, render

TIMESTEP = 999
FEATURE_SPACES = ("latent+scene", "latent+pixel", "latent")


@dataclass
class PretrainSettings:
    """Knobs of :func:`pretrain_toy` (defaults: the committed base)."""

    steps: int = 2500  # generator steps (stage 2)
    vae_steps: int = 500  # autoencoder steps (stage 1)
    vae_batch: int = 32
    vae_lr: float = 1e-3
    prompts_per_step: int = 8
    samples_per_prompt: int = 16  # K generated and K rendered per prompt
    pool_per_prompt: int = 96  # renders per training prompt, encoded once; positives are drawn from them
    lr: float = 5e-4
    grad_clip: float = 1.0
    radii: tuple[float, ...] = (0.02, 0.05, 0.2)
    feature_space: str = "latent+scene"  # one of FEATURE_SPACES (module docstring)
    caption_noise: float = 0.0  # per named colour, the chance that a positive shows another colour (web-like captions)
    task_weights: dict[str, float] = field(default_factory=lambda: dict(PRETRAIN_TASK_WEIGHTS))  # stage 2's task mix
    scene: SceneEncoderSettings = field(default_factory=SceneEncoderSettings)  # stage 1b, for "latent+scene"
    seed: int = 0
    max_minutes: float = 0.0  # stop stage 2 early after this wall time (0 = no limit)
    log_every: int = 50
    checkpoint_every: int = 0  # also save the pipeline every N steps (0 = only at the end)


def build_toy_models(seed: int = 0):
    """Untrained (unet, vae, text_encoder, tokenizer, scheduler) of the toy base architecture."""
    import tempfile

    from transformers import CLIPTokenizer

    from drpo_core.models.tiny_models import sd_turbo_family_components, write_clip_tokenizer

    unet, vae, text_encoder, scheduler = sd_turbo_family_components(
        seed, image_size=SIZE, vae_channels=(32, 64, 64), text_width=64, prediction_type="v_prediction")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp)))
    return unet, vae, text_encoder, tokenizer, scheduler


def render_batch(prompts: list[ToyPrompt], seeds: list[int]) -> torch.Tensor:
    """Renders `[N, 3, 32, 32]` in [0, 1] of (prompt, seed) pairs."""
    return torch.stack([render(p.scene(s)) for p, s in zip(prompts, seeds)])


class ToyOneStep:
    """G(ε, c) on the toy models, the same arithmetic as :class:`OneStepGenerator` (t = 999, v-prediction)."""

    def __init__(self, unet, text_encoder, tokenizer, scheduler):
        self.unet, self.text_encoder, self.tokenizer = unet, text_encoder, tokenizer
        alpha_bar = scheduler.alphas_cumprod[TIMESTEP].item()
        self.a, self.b = alpha_bar**0.5, (1 - alpha_bar) ** 0.5

    def encode(self, texts: list[str]) -> torch.Tensor:
        from drpo_core.models.generator import tokenize_prompts

        return self.text_encoder(tokenize_prompts(self.tokenizer, texts).input_ids)[0]

    def __call__(self, noise: torch.Tensor, text_hidden: torch.Tensor) -> torch.Tensor:
        x_t = self.b * noise
        t = torch.full((noise.shape[0],), TIMESTEP, dtype=torch.long)
        v = self.unet(x_t, t, encoder_hidden_states=text_hidden).sample
        return self.a * x_t - self.b * v


def train_autoencoder(vae, s: PretrainSettings, log: Callable[[dict], None]) -> float:
    """Stage 1; returns the latent scaling factor (1 / std of the posterior means)."""
    draw = pretraining_sampler(s.seed + 1, weights=RENDER_TASK_WEIGHTS)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr)
    vae.train()
    start, seed = time.time(), 10**6
    for step in range(1, s.vae_steps + 1):
        x = render_batch(draw(s.vae_batch), list(range(seed, seed + s.vae_batch))) * 2 - 1
        seed += s.vae_batch
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % s.log_every == 0 or step == s.vae_steps:
            log({"stage": "vae", "step": step, "loss": round(loss.item(), 4), "l1": round(F.l1_loss(recon, x).item(), 4),
                 "seconds": round(time.time() - start, 1)})
    vae.eval()
    with torch.no_grad():
        x = render_batch(draw(256), list(range(seed, seed + 256))) * 2 - 1
        std = float(vae.encode(x).latent_dist.mean.std())
    return 1.0 / max(std, 1e-3)


class PositivePool:
    """``per_prompt`` renders of every prompt (seeds 0…per_prompt−1), VAE-encoded once: the encoder pass
    over fresh renders cost as much as the UNet forward per step, and the world's scene distribution is
    well covered by ~100 random layouts per prompt."""

    def __init__(self, prompts, per_prompt: int, vae, batch: int = 128, decoded: bool = False,
                 caption_noise: float = 0.0):
        self.index = {p.text: i for i, p in enumerate(prompts)}
        # With caption noise, an entry filed under a prompt shows what a noisy caption's image shows.
        pairs = [(miscaptioned(p, s, caption_noise), s) for p in prompts for s in range(per_prompt)]
        latents, pixels = [], []
        with torch.no_grad():
            for i in range(0, len(pairs), batch):
                chunk = pairs[i:i + batch]
                images = render_batch([p for p, _ in chunk], [s for _, s in chunk])
                z = vae.encode(images * 2 - 1).latent_dist.mean
                latents.append(z * vae.config.scaling_factor)
                if decoded:  # what the decoder makes of the render: a target the generator can reach
                    pixels.append(vae.decode(z).sample.half())
        self.latents = torch.cat(latents).reshape(len(prompts), per_prompt, *latents[0].shape[1:])
        self.pixels = torch.cat(pixels).reshape(len(prompts), per_prompt, 3, SIZE, SIZE) if decoded else None

    def draw(self, prompts: list[ToyPrompt], k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents `[B·K, 4, h, w]` (and decoded images `[B·K, 3, 32, 32]` if kept) of k distinct pool entries
        per prompt."""
        picks = [(self.index[p.text], torch.randperm(self.latents.shape[1], generator=gen)[:k]) for p in prompts]
        latents = torch.cat([self.latents[i][j] for i, j in picks])
        pixels = None if self.pixels is None else torch.cat([self.pixels[i][j] for i, j in picks]).float()
        return latents, pixels


class ToyPhi(nn.Module):
    """φ of a generated/positive batch: :class:`LatentFeatures` on the latent; plus the scene encoder's global
    and 2×2 mean/std (each flattened to one vector per image) when ``scene`` is given; plus
    :class:`PixelFeatures` on the decoded image when ``decoder`` is given (the frozen VAE; gradients flow
    through it to the latent)."""

    def __init__(self, seed: int, decoder=None, scene: nn.Module | None = None):
        super().__init__()
        self.latent = LatentFeatures(seed)
        self.pixel = PixelFeatures(seed + 1) if decoder is not None else None
        self.decoder = decoder
        self.scene = scene
        if scene is not None:
            scene.patch_sizes = (2,)  # global statistics (what it was trained on) and a coarse layout

    def forward(self, latents: torch.Tensor, pixels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.latent(latents)
        if self.scene is not None:
            out.update({f"scene_{k}": v.flatten(1) for k, v in self.scene(latents).items()})
        if self.pixel is not None:
            if pixels is None:
                pixels = self.decoder.decode(latents / self.decoder.config.scaling_factor).sample
            out.update(self.pixel(pixels))
        return out


def generator_loss(gen: ToyOneStep, features: ToyPhi, pool: PositivePool, prompts: list[ToyPrompt], k: int,
                   radii, noise_gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Drifting loss of one step (mean over prompts of the per-key drift losses)."""
    texts = [p.text for p in prompts]
    hidden = gen.encode(texts)  # [B, 77, E]
    noise = torch.randn((len(prompts) * k, 4, SIZE // 4, SIZE // 4), generator=noise_gen)
    x = gen(noise, hidden.repeat_interleave(k, dim=0))  # [B·K, 4, 8, 8]
    with torch.no_grad():
        pos_feats = features(*pool.draw(prompts, k, noise_gen))
    feats = features(x)
    loss, stats = x.new_zeros(()), {"drift_norm": 0.0}
    for key, f in feats.items():
        no_negatives = f.new_zeros((0, f.shape[1]))  # the generated batch itself is the negative block
        for i in range(len(prompts)):
            rows = slice(i * k, (i + 1) * k)
            part, st = drift_loss(f[rows], pos_feats[key][rows], no_negatives,
                                  pos_weight=1.0, neg_weight=1.0, self_weight=1.0, radii=tuple(radii))
            loss = loss + part / len(prompts)
            stats["drift_norm"] += st["drift_norm"] / len(prompts)
    return loss, stats


def save_pipeline(folder: Path, unet, vae, text_encoder, tokenizer, scheduler, dtype=torch.float16) -> Path:
    """A stock StableDiffusionPipeline folder (safetensors), weights stored in ``dtype``."""
    import copy

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).to(dtype), text_encoder=copy.deepcopy(text_encoder).to(dtype), tokenizer=tokenizer,
        unet=copy.deepcopy(unet).to(dtype), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def pretrain_toy(output: str | Path, settings: PretrainSettings = PretrainSettings(),
                 log: Callable[[dict], None] = print) -> dict:
    """Train the toy base and save it to ``output``; returns a summary (steps, seconds, settings)."""
    s = settings
    if s.feature_space not in FEATURE_SPACES:  # before any compute
        raise ValueError(f"feature_space {s.feature_space!r}: expected one of {', '.join(FEATURE_SPACES)}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    unet, vae, text_encoder, tokenizer, scheduler = build_toy_models(s.seed)
    t0 = time.time()
    vae.register_to_config(scaling_factor=train_autoencoder(vae, s, log))
    vae.requires_grad_(False)
    vae_seconds = time.time() - t0
    scene, scene_head, scene_summary = None, None, None
    if s.feature_space == "latent+scene":
        scene, scene_head, scene_summary = train_scene_encoder(vae, s.seed, s.scene, log)
        save_scene_encoder(output / SCENE_FOLDER, scene, scene_head, scene_summary)

    gen = ToyOneStep(unet, text_encoder, tokenizer, scheduler)
    pixel = s.feature_space == "latent+pixel"
    features = ToyPhi(s.seed, decoder=vae if pixel else None, scene=scene)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr)
    draw = pretraining_sampler(s.seed, weights=s.task_weights)  # stages 1 and 1b draw from RENDER_TASK_WEIGHTS
    t1_pool = time.time()
    pool = PositivePool(toy_prompts("train"), s.pool_per_prompt, vae, decoded=pixel, caption_noise=s.caption_noise)
    log({"stage": "pool", "renders": int(pool.latents.shape[0] * pool.latents.shape[1]), "seconds": round(time.time() - t1_pool, 1)})
    noise_gen = torch.Generator().manual_seed(s.seed)
    unet.train(), text_encoder.train()
    t1, steps_done = time.time(), 0
    for step in range(1, s.steps + 1):
        prompts = draw(s.prompts_per_step)
        loss, stats = generator_loss(gen, features, pool, prompts, s.samples_per_prompt, s.radii, noise_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        opt.step()
        steps_done = step
        elapsed = time.time() - t1
        if step % s.log_every == 0 or step == s.steps:
            log({"stage": "generator", "step": step, "loss": round(loss.item(), 4),
                 "drift_norm": round(stats["drift_norm"], 4), "grad_norm": round(float(grad_norm), 3),
                 "seconds": round(elapsed, 1)})
        if s.checkpoint_every and step % s.checkpoint_every == 0:
            folder = save_pipeline(output / "checkpoints" / f"step-{step:06d}", unet, vae, text_encoder, tokenizer, scheduler)
            if scene is not None:
                save_scene_encoder(folder / SCENE_FOLDER, scene, scene_head, scene_summary)
        if s.max_minutes and elapsed > s.max_minutes * 60:
            log({"stage": "generator", "stopped": "max_minutes", "step": step})
            break
    unet.eval(), text_encoder.eval()
    save_pipeline(output, unet, vae, text_encoder, tokenizer, scheduler)
    summary = {"generator_steps": steps_done, "vae_steps": s.vae_steps, "vae_seconds": round(vae_seconds, 1),
               "generator_seconds": round(time.time() - t1, 1), "scaling_factor": vae.config.scaling_factor,
               "unet_parameters": sum(p.numel() for p in unet.parameters()),
               "vae_parameters": sum(p.numel() for p in vae.parameters()),
               "text_encoder_parameters": sum(p.numel() for p in text_encoder.parameters()),
               "scene_encoder": scene_summary,
               "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}}
    (output / "pretrain_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
