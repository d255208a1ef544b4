"""Loading a safetensors checkpoint of our own latent ResNet (:class:`LatentResNetEncoder`, kind latent_resnet).

The official latent-MAE checkpoint (``mae_latent_256_torch.pth``) is loaded by kind ``latent_mae``
(:mod:`drpo_core.features.latent_mae`), not here. Two key spellings are accepted: this module's own (``stages.{i}.{j}...``, ``norms.{i}...``) and the
paper's stage names (``layer{i+1}.{j}...``, ``layer{i+1}_norm...``). The file is checked against the
configured model key by key and shape by shape before anything is loaded; a mismatch names what differs
and what the checkpoint looks like (width, blocks per stage), so the config can be fixed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn


def to_model_key(key: str) -> str:
    """``layer3_norm.weight`` → ``norms.2.weight``; ``layer3.1.conv1.weight`` → ``stages.2.1.conv1.weight``."""
    key = re.sub(r"^layer(\d+)_norm\.", lambda m: f"norms.{int(m.group(1)) - 1}.", key)
    return re.sub(r"^layer(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.", key)


def describe_checkpoint(state: dict[str, torch.Tensor]) -> str:
    """What a (model-keyed) state dict looks like: input channels, width, blocks per stage."""
    parts = []
    stem = state.get("stem.0.weight")
    if stem is not None and stem.ndim == 4:
        parts.append(f"in_channels={stem.shape[1]}, width={stem.shape[0]}")
    blocks: dict[int, int] = {}
    for key in state:
        m = re.match(r"stages\.(\d+)\.(\d+)\.", key)
        if m:
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    if blocks:
        parts.append(f"stage_blocks={[blocks[i] for i in sorted(blocks)]}")
    return ", ".join(parts) or "no recognisable latent-ResNet keys"


ARCHITECTURE_FIELDS = ("width", "stage_blocks", "downsample", "groups")


def resolve_latent_resnet_checkpoint(path: str) -> str:
    """``toy`` → the committed shapes-world scene encoder; a folder → its ``model.safetensors``; else ``path``."""
    if path == "toy":
        from drpo_core.toyworld import SCENE_ENCODER

        return str(SCENE_ENCODER / "model.safetensors")
    folder = Path(path).expanduser()
    return str(folder / "model.safetensors") if folder.is_dir() else path


def check_saved_architecture(path: str, cfg) -> None:
    """If the checkpoint has a ``config.json`` beside it (``drpo pretrain-toy`` writes one), the config's
    width / stage_blocks / downsample / groups must equal it: a stride or normalisation mismatch loads
    without a shape error and silently computes another φ."""
    import json

    sidecar = Path(path).expanduser().parent / "config.json"
    if not sidecar.is_file():
        return
    saved = json.loads(sidecar.read_text())
    if saved.get("kind") != "latent_resnet":
        return
    wrong = [f"{f}={getattr(cfg, f)!r} (saved: {saved[f]!r})" for f in ARCHITECTURE_FIELDS
             if f in saved and getattr(cfg, f) != saved[f]]
    if wrong:
        raise ValueError(f"features.checkpoint {path!r} was saved with another architecture; set features."
                         + ", features.".join(wrong))


def load_latent_resnet_checkpoint(encoder: nn.Module, path: str, config_desc: str) -> None:
    """Load ``path`` (safetensors) into ``encoder`` after checking every key and shape; ValueError otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"features.checkpoint {path!r} does not exist")
    if file.suffix != ".safetensors":
        raise ValueError(f"features.checkpoint {path!r} must be a .safetensors file (convert a .pth once with "
                         "safetensors.torch.save_file(torch.load(p, weights_only=True), out))")
    try:
        raw = load_file(str(file))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"features.checkpoint {path!r} is not a readable safetensors file: {str(e).splitlines()[0]}") from None
    state = {to_model_key(k): v for k, v in raw.items()}
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            problems.append(f"{len(wrong)} shape mismatches (e.g. {wrong[0]}, checkpoint vs model)")
        raise ValueError(f"features.checkpoint {path!r} does not fit the latent ResNet ({config_desc}): "
                         f"{'; '.join(problems)}; the checkpoint looks like {describe_checkpoint(state)}")
    encoder.load_state_dict(state)
