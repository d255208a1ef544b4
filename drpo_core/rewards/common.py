"""Shared plumbing of the model-based rewards: input checks, local-path checks, devices, micro-batches.

Every model reward in this package reads weights from a *local* file or folder only (the hub is never
contacted): a wrong path is a user error and gets one ValueError line naming the option, not a
traceback from deep inside ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch


def check_reward_inputs(images: torch.Tensor, prompts: list[str], metadata: list | None = None) -> None:
    """Validate the reward protocol's arguments: images `[N, 3, H, W]`, N prompts, N metadata entries."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a [N, 3, H, W] tensor in [0, 1], got {shape}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
    if metadata is not None and len(metadata) != images.shape[0]:
        raise ValueError(f"{len(metadata)} metadata entries for {images.shape[0]} images")


def require_local_path(path: str | Path | None, field: str, kind: str, want: str = "any") -> Path:
    """Return ``path`` as a Path if it exists locally, else raise one ValueError line naming ``field``.

    ``want`` is "file", "dir" or "any". ``kind`` is the reward kind, for the message.
    """
    if path is None or str(path).strip() == "":
        raise ValueError(f"reward {kind!r}: {field} is required (a local model {'folder' if want == 'dir' else 'file'})")
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"reward {kind!r}: {field} {str(path)!r} does not exist")
    if want == "file" and not p.is_file():
        raise ValueError(f"reward {kind!r}: {field} {str(path)!r} is not a file")
    if want == "dir" and not p.is_dir():
        raise ValueError(f"reward {kind!r}: {field} {str(path)!r} is not a folder")
    return p


def resolve_device(device: str | None) -> torch.device:
    """None → the first CUDA device when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, kind: str) -> torch.dtype:
    """Autocast dtype for the forward pass; float32 (no autocast) by default."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"reward {kind!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision like the official scorers (HPSv2 runs under CUDA autocast); a no-op for float32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def micro_batches(n: int, batch_size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in chunks of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def unique_prompts(prompts: list[str]) -> tuple[list[str], torch.Tensor]:
    """Distinct prompts in first-seen order and, per input, its index into them (`[N]` long).

    A group of K candidates shares one prompt, so each text is encoded once per call.
    """
    order: dict[str, int] = {}
    index = [order.setdefault(p, len(order)) for p in prompts]
    return list(order), torch.tensor(index, dtype=torch.long)
