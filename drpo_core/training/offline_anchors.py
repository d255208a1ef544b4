"""Offline anchors: DrPO's A⁺ / A⁻ from a local preference dataset (drpo-method.md §1.6.6, "beyond online
reward ranking").

Dataset: JSON lines, one prompt per line::

    {"prompt": "a photo of a red car", "chosen": ["img/c0.png", ...], "rejected": ["img/r0.png"]}

(a single path string works too; relative paths are relative to the file). Two uses:

* ``mode: images`` (official ``train_mode=offline``): the VAE-encoded chosen / rejected images are the
  positive / negative anchors; the K online candidates are only the regressed set.
* ``mode: distance`` (``train_mode=offline_distance``): the K online candidates are ranked by the
  feature-space margin d(x, rejected) − d(x, chosen) (:func:`distance_margin_scores`) and the top / bottom M
  become the anchors, as with an online reward; optionally the data images join A⁺ / A⁻.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from drpo_core.algorithms.ranking import zscore
from drpo_core.features.common import FeatureDict


@dataclass(frozen=True)
class PreferenceRecord:
    prompt: str
    chosen: tuple[Path, ...]
    rejected: tuple[Path, ...]


def _paths(value, root: Path, field: str, line: int, file: Path) -> tuple[Path, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(p, str) for p in items):
        raise ValueError(f"{file}:{line}: '{field}' must be an image path or a non-empty list of paths")
    paths = tuple((root / p) if not Path(p).is_absolute() else Path(p) for p in items)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"{file}:{line}: {field} image {missing[0]} does not exist")
    return paths


def load_preference_dataset(path: str | Path) -> dict[str, PreferenceRecord]:
    """prompt → record; every error names the file and line (a prompt listed twice is an error)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"algo.offline.dataset {str(path)!r} does not exist")
    records: dict[str, PreferenceRecord] = {}
    for n, raw in enumerate(file.read_text().splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"{file}:{n}: expected an object with a 'prompt' string")
        if obj["prompt"] in records:
            raise ValueError(f"{file}:{n}: prompt {obj['prompt']!r} is listed twice")
        records[obj["prompt"]] = PreferenceRecord(obj["prompt"], _paths(obj.get("chosen"), file.parent, "chosen", n, file),
                                                  _paths(obj.get("rejected"), file.parent, "rejected", n, file))
    if not records:
        raise ValueError(f"algo.offline.dataset {file} holds no records")
    return records


def load_images(paths: tuple[Path, ...], resolution: int) -> torch.Tensor:
    """RGB images resized (bicubic) to ``resolution``², `[n, 3, R, R]` in [0, 1]."""
    import numpy as np
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as img:
            arr = np.asarray(img.convert("RGB").resize((resolution, resolution), Image.BICUBIC), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(arr).permute(2, 0, 1))
    return torch.stack(out)


@torch.no_grad()
def encode_images(generator, images: torch.Tensor) -> torch.Tensor:
    """VAE latents of images in [0, 1] (the posterior mode × scaling factor, the official ``anchor_encode_mode mode``)."""
    vae = generator.vae
    x = (images * 2 - 1).to(device=generator.device, dtype=vae.dtype)
    return (vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).float()


def distance_margin_scores(candidates: FeatureDict, chosen: FeatureDict, rejected: FeatureDict) -> torch.Tensor:
    """Ranking scores `[K]` of online candidates from their distance to the data images.

    Steps (per feature key; features ``key -> [n, L, D]`` are flattened to one vector per image):

    1. d⁺_i = mean_j ‖φ(x_i) − φ(chosen_j)‖, d⁻_i = mean_j ‖φ(x_i) − φ(rejected_j)‖.
    2. margin_i = d⁻_i − d⁺_i (closer to chosen than to rejected is better), z-scored over the K.
    3. score_i = mean over keys of the z-scored margins.
    """
    total = None
    for key, x in candidates.items():
        flat = x.detach().float().reshape(x.shape[0], -1)
        d_pos = torch.cdist(flat, chosen[key].float().reshape(chosen[key].shape[0], -1)).mean(1)  # 1.
        d_neg = torch.cdist(flat, rejected[key].float().reshape(rejected[key].shape[0], -1)).mean(1)
        z = zscore((d_neg - d_pos)[None])[0]  # 2.
        total = z if total is None else total + z
    return total / len(candidates)  # 3.
