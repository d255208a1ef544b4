"""The shapes world's scene encoder: a latent ResNet trained to read what a scene holds (the toy's φ).

On SD-Turbo, DrPO's φ is a latent-MAE ResNet pretrained on the autoencoder's latents of real images
(drpo-method.md §1.6.4): a frozen encoder that already knows what images contain. A *random* frozen net
knows nothing of the kind, and on the shapes world it showed: pretraining with random-conv statistics drew
round blobs (the first two bases), and DrPO in random feature spaces never raised the GenEval pass rate.
This is the toy counterpart of the pretrained encoder:

    architecture  :class:`~drpo_core.features.latent.LatentResNetEncoder` (width 32, stages [1, 1], stride 2
                  in the second, GroupNorm 8) — the class ``features.kind: latent_resnet`` loads, so the saved
                  file is a ``features.checkpoint`` as it is
    data          the autoencoder's latents `[N, 4, 8, 8]` (× scaling factor) of renders of *training* prompts
                  (pretraining's task mix); never generated images, never the reward
    target        per (colour, shape) class (12), how many such objects the scene holds (0–3): a 4-way
                  cross-entropy per class, read by one linear head from the last stage's global mean and std —
                  the statistics DrPO's drift uses — so those carry colour, kind and count
    augmentation  posterior samples plus Gaussian noise of random scale (≤ :data:`NOISE_MAX` of the scaled
                  latent's unit std): generated latents lie off the renders' manifold, and φ must still be
                  smooth there

:func:`train_scene_encoder` returns the frozen encoder, its count head and its accuracy on renders it did not
train on (every class count right); :func:`save_scene_encoder` writes ``model.safetensors`` (the encoder alone,
a ``features.checkpoint``), ``head.safetensors`` and ``config.json``; :func:`load_scene_encoder` reads them back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from drpo_core.features.latent import LatentResNetEncoder
from drpo_core.toyworld.prompts import RENDER_TASK_WEIGHTS, pretraining_sampler
from drpo_core.toyworld.world import COLORS, SHAPES, Scene, render

CLASSES = tuple((color, kind) for color in COLORS for kind in SHAPES)  # 12 (colour, shape) classes
MAX_COUNT = 3  # a scene holds 0–3 objects of a class
NOISE_MAX = 0.3
# The encoder's architecture: what features.{width,stage_blocks,downsample,groups} must say to load it.
ARCHITECTURE = {"width": 32, "stage_blocks": [1, 1], "downsample": True, "groups": 8}
FOLDER = "scene_encoder"  # inside a pretrain-toy output folder
WEIGHTS = "model.safetensors"
HEAD_WEIGHTS = "head.safetensors"


@dataclass
class SceneEncoderSettings:
    """Knobs of :func:`train_scene_encoder` (defaults: the committed encoder)."""

    scenes: int = 12000  # renders drawn once (the last ``holdout`` are only scored)
    holdout: int = 1000
    steps: int = 2000
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4


def count_labels(scenes: list[Scene]) -> torch.Tensor:
    """`[N, 12]` long: how many objects of each :data:`CLASSES` entry each scene holds."""
    labels = torch.zeros(len(scenes), len(CLASSES), dtype=torch.long)
    for i, scene in enumerate(scenes):
        for shape in scene:
            labels[i, CLASSES.index((shape.color, shape.kind))] += 1
    return labels


def count_head(encoder: LatentResNetEncoder) -> nn.Linear:
    """The linear read-out from :func:`global_stats` to 12 × 4 count logits."""
    return nn.Linear(2 * encoder.norms[-1].num_channels, len(CLASSES) * (MAX_COUNT + 1))


def global_stats(encoder: LatentResNetEncoder, latents: torch.Tensor) -> torch.Tensor:
    """`[N, 2C]`: the last stage's per-channel global mean and std (the head's input)."""
    feats = encoder(latents)
    name = encoder.layer_name
    return torch.cat([feats[f"{name}_mean"][:, 0], feats[f"{name}_std"][:, 0]], dim=1)


@torch.no_grad()
def encode_renders(vae, scenes: list[Scene], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std `[N, 4, h, w]` (unscaled) of the scenes' renders."""
    means, stds = [], []
    for i in range(0, len(scenes), batch):
        images = torch.stack([render(s) for s in scenes[i:i + batch]]) * 2 - 1
        posterior = vae.encode(images).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_scene_encoder(vae, seed: int = 0, s: SceneEncoderSettings = SceneEncoderSettings(),
                        log: Callable[[dict], None] = print) -> tuple[LatentResNetEncoder, nn.Linear, dict]:
    """Train the encoder on ``vae``'s latents of training-prompt renders; returns (frozen encoder, head, summary)."""
    start = time.time()
    draw = pretraining_sampler(seed + 123, weights=RENDER_TASK_WEIGHTS)  # its own stream: the generator stage's stays unchanged
    scenes = [p.scene(10**7 + i) for i, p in enumerate(draw(s.scenes))]
    labels = count_labels(scenes)
    mean, std = encode_renders(vae, scenes)
    scale = vae.config.scaling_factor
    n_train = s.scenes - s.holdout
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = LatentResNetEncoder(in_channels=mean.shape[1], patch_sizes=(), **{
            k: tuple(v) if isinstance(v, list) else v for k, v in ARCHITECTURE.items()})
        head = count_head(encoder)
    encoder.requires_grad_(True).train()
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, s.steps + 1):
        idx = torch.randint(0, n_train, (s.batch,), generator=gen)
        # 1. a posterior sample of each render's latent, scaled as the generator outputs it
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        # 2. off-manifold noise of a random scale per sample
        z = z + NOISE_MAX * torch.rand((s.batch, 1, 1, 1), generator=gen) * torch.randn(z.shape, generator=gen)
        # 3. per-class count logits from the global statistics; cross-entropy per class
        logits = head(global_stats(encoder, z)).view(s.batch * len(CLASSES), MAX_COUNT + 1)
        loss = F.cross_entropy(logits, labels[idx].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == s.steps:
            log({"stage": "scene_encoder", "step": step, "loss": round(loss.item(), 4),
                 "seconds": round(time.time() - start, 1)})
    encoder.requires_grad_(False).eval()
    head.requires_grad_(False)
    accuracy = scene_accuracy(encoder, head, mean[n_train:] * scale, labels[n_train:])
    summary = {"scenes": s.scenes, "steps": s.steps, "heldout_scene_accuracy": round(accuracy, 4),
               "seconds": round(time.time() - start, 1)}
    log({"stage": "scene_encoder", **summary})
    return encoder, head, summary


@torch.no_grad()
def scene_accuracy(encoder: LatentResNetEncoder, head: nn.Linear, latents: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of scaled latents `[N, 4, h, w]` whose 12 class counts are all read right."""
    logits = head(global_stats(encoder, latents)).view(len(latents), len(CLASSES), MAX_COUNT + 1)
    return (logits.argmax(-1) == labels).all(dim=1).float().mean().item()


def save_scene_encoder(folder: Path, encoder: LatentResNetEncoder, head: nn.Linear, summary: dict) -> Path:
    """``folder/model.safetensors`` (a ``features.checkpoint`` for kind latent_resnet), ``head.safetensors``
    and ``config.json``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()}, str(folder / WEIGHTS))
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(folder / HEAD_WEIGHTS))
    config = {"kind": "latent_resnet", **ARCHITECTURE, "in_channels": encoder.stem[0].in_channels,
              "classes": [f"{c} {k}" for c, k in CLASSES], **summary}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder / WEIGHTS


def load_scene_encoder(folder: str | Path) -> tuple[LatentResNetEncoder, nn.Linear]:
    """The frozen encoder and count head saved by :func:`save_scene_encoder`."""
    from safetensors.torch import load_file

    from drpo_core.features.latent_checkpoint import load_latent_resnet_checkpoint

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    encoder = LatentResNetEncoder(in_channels=config["in_channels"], width=config["width"],
                                  stage_blocks=tuple(config["stage_blocks"]), downsample=config["downsample"],
                                  groups=config["groups"], patch_sizes=())
    load_latent_resnet_checkpoint(encoder, str(folder / WEIGHTS), f"scene encoder {folder}")
    head = count_head(encoder)
    head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
    return encoder, head.requires_grad_(False)
