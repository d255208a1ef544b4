"""Convert the official latent-MAE ``.pth`` to the safetensors file ``features.checkpoint`` reads, once, offline.

    python -m drpo_core.features.convert_mae models/mae_latent_256_torch.pth models/drpo-mae-latent-256.safetensors \\
        --sha256 4810249905d2882a41d5a0fe97ebac995af8918dbe121daa9871e5bc605445b1

Steps: (1) check the file's SHA-256 when given (the official one is in the DrPO README and
docs/reference/drpo-method.md §1.6.4); (2) ``torch.load(weights_only=True)``: tensors and plain
containers only, no code runs; (3) unwrap one level of ``state_dict`` / ``model`` / ``encoder`` nesting
and a ``module.`` prefix (DataParallel); (4) keep the tensors, save as safetensors; (5) print what the
checkpoint looks like in drpo's terms (width, blocks per stage) so ``features.width`` /
``features.stage_blocks`` can be set to match. Loading checks every key and shape (latent_mae.py).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import torch

NESTING_KEYS = ("state_dict", "model", "encoder", "model_state_dict")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(src: Path, dst: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    from drpo_core.features.latent_mae import to_model_key

    if sha256 and sha256_of(src) != sha256.lower():
        raise ValueError(f"{src}: SHA-256 {sha256_of(src)} is not the expected {sha256} (a different or truncated file)")
    obj = torch.load(str(src), map_location="cpu", weights_only=True)
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise ValueError(f"{src}: no tensors found (top-level keys: {sorted(obj)[:8]})")
        obj = inner
    tensors = {k.removeprefix("module."): v.contiguous() for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{src}: holds no tensors")
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst))
    return {to_model_key(k): v for k, v in tensors.items()}


def main(argv: list[str] | None = None) -> int:
    from drpo_core.features.latent_mae import describe_checkpoint

    parser = argparse.ArgumentParser(prog="python -m drpo_core.features.convert_mae", description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--sha256", default=None, help="expected SHA-256 of SRC")
    args = parser.parse_args(argv)
    try:
        state = convert(args.src, args.dst, args.sha256)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"convert_mae: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}: {len(state)} tensors; {describe_checkpoint(state)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
