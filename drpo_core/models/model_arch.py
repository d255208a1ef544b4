"""Which architecture a pipeline folder holds, read from its UNet config before any weight is loaded.

A wrong ``model.kind`` (an SDXL folder loaded as SD-Turbo or the reverse) would otherwise surface as
a shape error deep inside the first UNet call, or not at all; this check names the problem first.
"""

from __future__ import annotations

import json
from pathlib import Path

# model.kind → what the UNet config's addition_embed_type must be
KIND_ADDITION_EMBED = {"sd-turbo": None, "sdxl-turbo": "text_time"}
KIND_PIPELINE = {"sd-turbo": "StableDiffusionPipeline", "sdxl-turbo": "StableDiffusionXLPipeline"}


class ModelLoadError(ValueError):
    """The model path is missing or does not hold a supported pipeline."""


def read_unet_config(path: str) -> dict | None:
    """``unet/config.json`` of a local folder or a hub id (the local HF cache when offline); None if unreadable."""
    local = Path(path)
    if local.is_dir():
        file = local / "unet" / "config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, "unet/config.json")).read_text())
    except (OSError, ValueError):  # not reachable / not cached: from_pretrained reports the real problem
        return None


def architecture_of(unet_config: dict) -> str:
    """The ``model.kind`` whose UNet layout ``unet_config`` has, or ``unsupported (...)``."""
    embed = unet_config.get("addition_embed_type")
    for kind, expected in KIND_ADDITION_EMBED.items():
        if embed == expected:
            return kind
    return f"unsupported (addition_embed_type={embed!r})"


def check_architecture(path: str, shown: str, kind: str) -> None:
    """Raise :class:`ModelLoadError` if the pipeline at ``path`` is not of ``kind``; ``shown`` is the user's spelling."""
    unet_config = read_unet_config(path)
    if unet_config is None:
        return
    found = architecture_of(unet_config)
    if found != kind:
        hint = f"; set model.kind: {found}" if found in KIND_ADDITION_EMBED else ""
        raise ModelLoadError(f"model.path {shown!r} holds a {found} pipeline (UNet addition_embed_type="
                             f"{unet_config.get('addition_embed_type')!r}), but model.kind is {kind!r}{hint}")
