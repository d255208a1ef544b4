"""HPS-style human-preference reward: an open_clip ViT-H-14 loaded with an HPSv2 / HPSv2.1 checkpoint.

What it computes (tgxs002/HPSv2 ``hpsv2/img_score.py``, prior-art.md §3.1)::

    x   = letterbox(image)                      # longest side → 224 (bicubic), pad to 224×224 with 0
    x   = (x − CLIP mean) / CLIP std            # OpenAI CLIP statistics
    e_i = encode_image(x) / ‖·‖                 # [N, D]
    e_t = encode_text(tokenize(prompt)) / ‖·‖   # [N, D]
    score = ⟨e_i, e_t⟩                          # plain cosine, no logit_scale (as the official code)

Scores are ~0.2–0.35 and only comparable between images of the same prompt, and only between
checkpoints of the same ``version``: HPSv2.0 and HPSv2.1 scores are not comparable, so every instance
carries ``model_id`` and ``version`` labels. This is *not* HPSv3 (a Qwen2-VL-7B reward model).

Deviation from the official pipeline, on purpose: images arrive as float tensors, so the resize runs
in torch (bicubic with antialias, like PIL's) without PIL's 8-bit round trip; and a non-square image
whose longest side is already 224 is still padded to a square (the official ``ResizeMaxSize`` skips
padding when no resize is needed, which would feed the model a non-square input).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from drpo_core.rewards.common import (
    autocast, check_reward_inputs, micro_batches, require_local_path, resolve_device, resolve_dtype, unique_prompts,
)

# OpenAI CLIP normalisation (open_clip.constants.OPENAI_DATASET_MEAN / _STD), used by HPSv2.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def letterbox(images: torch.Tensor, size: int) -> torch.Tensor:
    """`[N, 3, H, W]` in [0, 1] → `[N, 3, size, size]`: scale the longest side to ``size``, pad with 0.

    HPSv2's ``ResizeMaxSize(size, fill=0)``: new side = round(side · size / max(H, W)); the padding is
    split evenly, the extra pixel going to the right/bottom (torchvision ``F.pad`` order l, t, r, b).
    """
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        images = images.clamp(0.0, 1.0)  # PIL clips bicubic overshoot to the 8-bit range
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


def infer_hps_version(path: str | Path) -> str | None:
    """Version label from the official file names: HPS_v2.1_compressed.pt → "hpsv2.1", HPS_v2_… → "hpsv2.0"."""
    name = Path(path).name.lower()
    if re.search(r"v2[._]1(?!\d)", name):
        return "hpsv2.1"
    if re.search(r"v2(?![._]?\d)", name):
        return "hpsv2.0"
    return None


def load_state_dict_file(path: Path, kind: str = "hps") -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``: no code execution).

    Accepts the official HPS layout ``{"state_dict": {...}, ...}`` and strips a DDP ``module.`` prefix.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle refusing non-tensor objects, truncated files, not a checkpoint at all
            raise ValueError(f"reward {kind!r}: path {str(path)!r} is not a readable weights-only torch checkpoint "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"reward {kind!r}: path {str(path)!r} holds no state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def resolve_architecture(architecture: str | Path) -> str:
    """An open_clip model name, or a path to a model-config JSON registered under its file stem."""
    import open_clip

    arch = str(architecture)
    if arch.endswith(".json"):
        config_file = require_local_path(arch, "options.architecture", "hps", want="file")
        open_clip.add_model_config(config_file)
        arch = config_file.stem
    if open_clip.get_model_config(arch) is None:
        raise ValueError(f"reward 'hps': options.architecture {arch!r} is not an open_clip model config")
    return arch


class HpsStyleReward:
    """HPSv2/v2.1-compatible preference score via open_clip (see module docstring for the formula).

    ``path``: the checkpoint (``HPS_v2.1_compressed.pt`` or a ``.safetensors`` export). ``version``:
    label of the checkpoint ("hpsv2.0", "hpsv2.1", or your own); inferred from official file names.
    ``architecture``: "ViT-H-14" for the real checkpoints; tests pass a tiny config JSON.
    ``strict``: require checkpoint keys to match the architecture exactly (a partial load would
    score with random weights).
    """

    def __init__(self, path: str, version: str | None = None, architecture: str = "ViT-H-14",
                 device: str | None = None, dtype: str | None = None, batch_size: int = 32, strict: bool = True):
        import open_clip

        checkpoint = require_local_path(path, "path", "hps", want="file")
        self.version = version or infer_hps_version(checkpoint)
        if not self.version:
            raise ValueError(f"reward 'hps': cannot tell the HPS version from {checkpoint.name!r}; "
                             "set options.version (e.g. 'hpsv2.0' or 'hpsv2.1': their scores are not comparable)")
        self.architecture = resolve_architecture(architecture)
        self.model_id = f"hps-openclip/{self.architecture}"
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype, "hps")
        self.batch_size = batch_size
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # open_clip warns "initialized randomly"; the checkpoint loads next
        try:
            self.model = open_clip.create_model(self.architecture, pretrained=None)
        finally:
            logging.disable(previous)
        state = load_state_dict_file(checkpoint)
        try:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # tensor shape mismatches raise even when strict=False
            raise ValueError(f"reward 'hps': checkpoint {checkpoint.name!r} does not fit open_clip {self.architecture}: "
                             f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
        if strict and (missing or unexpected):
            raise ValueError(f"reward 'hps': checkpoint {checkpoint.name!r} does not fit open_clip {self.architecture}: "
                             f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                             f"(e.g. {unexpected[:3]}); set options.strict: false to load it anyway")
        self.load_report = {"missing": list(missing), "unexpected": list(unexpected)}
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(self.architecture)
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self._mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """`[N, 3, H, W]` in [0, 1] → normalised `[N, 3, S, S]` model input (S = the tower's image size)."""
        boxed = letterbox(images.to(self.device, torch.float32).clamp(0, 1), self.image_size)
        return (boxed - self._mean) / self._std

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings `[T, D]` (float32)."""
        out = []
        for part in micro_batches(len(prompts), self.batch_size):
            tokens = self.tokenizer(prompts[part]).to(self.device)
            with autocast(self.device, self.dtype):
                out.append(self.model.encode_text(tokens, normalize=True).float())
        return torch.cat(out)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings `[N, D]` (float32) of images in [0, 1]."""
        out = []
        for part in micro_batches(images.shape[0], self.batch_size):
            pixels = self.preprocess(images[part])
            with autocast(self.device, self.dtype):
                out.append(self.model.encode_image(pixels, normalize=True).float())
        return torch.cat(out)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list | None = None) -> torch.Tensor:
        """Cosine similarity per (image, prompt) pair: `[N]` float32 on the CPU."""
        check_reward_inputs(images, prompts, metadata)
        texts, index = unique_prompts(prompts)
        text_emb = self.embed_texts(texts)[index.to(self.device)]  # [N, D]
        image_emb = self.embed_images(images)  # [N, D]
        return (image_emb * text_emb).sum(-1).float().cpu()
