"""Tiny random-initialised models of the real architectures, written once and loaded back offline.

No weights can be downloaded here, so tests and the embedded default build small models of the
same diffusers/transformers classes from configs, ``save_pretrained`` them into a cache folder, and
the normal ``from_pretrained`` loading code reads them back with the hub switched off. The CLIP
tokenizer is built from the BPE merges file that open_clip_torch ships, so it needs no download and
tokenizes exactly like ``open_clip.tokenize``.
"""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

TINY_SD_TURBO_VERSION = "tiny-sd-turbo-v1"
TINY_SDXL_VERSION = "tiny-sdxl-turbo-v1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DRPO_CACHE", Path.home() / ".cache" / "drpo"))


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable-unicode table (the same table open_clip and transformers use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write vocab.json, merges.txt and tokenizer config for CLIP's 49408-token BPE into ``folder``.

    Mirrors ``open_clip.tokenizer.SimpleTokenizer``: 256 byte tokens, their ``</w>`` forms, 48894
    merges, then ``<|startoftext|>`` and ``<|endoftext|>``. ``pad_token`` is ``<|endoftext|>`` as in
    SD-Turbo's and SDXL's first tokenizer; SDXL's second tokenizer pads with ``!`` (id 0, like open_clip).
    """
    import open_clip.tokenizer as oct

    merges = gzip.open(oct.default_bpe(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in merges[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}))
    return folder


def sd_turbo_family_components(seed: int, image_size: int, vae_channels: tuple[int, int, int], text_width: int,
                               prediction_type: str):
    """Untrained (unet, vae, text_encoder, scheduler) of a tiny SD-Turbo-family pipeline, seeded.

    UNet2DConditionModel (channels 32/64, cross-attention at the low resolution, cross-attention dim =
    ``text_width``), AutoencoderKL with three blocks (4× spatial compression: ``image_size`` px ↔
    4×(image_size/4)² latents), a 2-layer CLIPTextModel of hidden size ``text_width``, and SD-Turbo's
    EulerDiscreteScheduler settings (scaled-linear betas, trailing spacing: one step at t=999).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=image_size // 4, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=text_width,
            attention_head_dim=8, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size, layers_per_block=1,
            block_out_channels=vae_channels,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=text_width, intermediate_size=2 * text_width, num_attention_heads=4, num_hidden_layers=2,
            vocab_size=49408, max_position_embeddings=77, projection_dim=text_width,
            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        ))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=prediction_type, timestep_spacing="trailing", steps_offset=1,
    )
    return unet, vae, text_encoder, scheduler


def build_tiny_sd_turbo(folder: Path, seed: int = 0) -> Path:
    """Save a tiny SD-Turbo-architecture pipeline folder (model_index.json layout) into ``folder``: 32 px images
    ↔ 4×8×8 latents, hidden size 32, epsilon prediction (see :func:`sd_turbo_family_components`), plus the
    offline CLIP tokenizer."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    unet, vae, text_encoder, scheduler = sd_turbo_family_components(
        seed, image_size=32, vae_channels=(16, 32, 32), text_width=32, prediction_type="epsilon")
    tokenizer_dir = write_clip_tokenizer(folder / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    (folder / "DRPO_TINY_MODEL").write_text(TINY_SD_TURBO_VERSION + "\n")
    return folder


def _cached_build(version: str, build, cache_dir: Path | None) -> Path:
    """Path of a tiny model folder in the cache, building it on first use (atomic rename)."""
    folder = (cache_dir or default_cache_dir()) / version
    if (folder / "DRPO_TINY_MODEL").exists():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    build(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process built it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def tiny_sd_turbo_path(cache_dir: Path | None = None) -> Path:
    """Path of the tiny SD-Turbo folder in the cache, building it on first use."""
    return _cached_build(TINY_SD_TURBO_VERSION, build_tiny_sd_turbo, cache_dir)


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """Save a tiny SDXL-Turbo-architecture pipeline folder into ``folder``.

    UNet2DConditionModel with ``addition_embed_type="text_time"`` (pooled text embeds + six added
    time ids, as SDXL), cross-attention dim 64 = the two text encoders' hidden sizes concatenated;
    AutoencoderKL as in the tiny SD model with SDXL's scaling factor; CLIPTextModel (32) and
    CLIPTextModelWithProjection (32, projection 32); two offline tokenizers; SDXL-Turbo's
    EulerAncestralDiscreteScheduler settings.
    """
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def text_config(projection_dim: int) -> CLIPTextConfig:
        return CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                              vocab_size=49408, max_position_embeddings=77, projection_dim=projection_dim,
                              bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu")

    time_embed_dim, projection_dim = 8, 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
            attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
            addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
            block_out_channels=(16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=8, scaling_factor=0.13025,
        )
        text_encoder = CLIPTextModel(text_config(projection_dim))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(projection_dim))
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", timestep_spacing="trailing", steps_offset=1,
    )
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tokenizer_src"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tokenizer_2_src", pad_token="!"))
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder)
    (folder / "DRPO_TINY_MODEL").write_text(TINY_SDXL_VERSION + "\n")
    return folder


def tiny_sdxl_path(cache_dir: Path | None = None) -> Path:
    """Path of the tiny SDXL-Turbo folder in the cache, building it on first use."""
    return _cached_build(TINY_SDXL_VERSION, build_tiny_sdxl, cache_dir)


TINY_PIXEL_VERSIONS = {"dinov2": "tiny-dinov2-v1", "vit_mae": "tiny-vit-mae-v1"}


def build_tiny_pixel_encoder(kind: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random ``Dinov2Model`` (4 layers, patch 4, 32 px) or ``ViTMAEModel`` (2 layers, patch 8,
    32 px) with its image processor, for the ``dinov2`` / ``vit_mae`` feature encoders."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, ViTImageProcessor, ViTMAEConfig, ViTMAEModel

    common = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, image_size=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "dinov2":
            model = Dinov2Model(Dinov2Config(num_hidden_layers=4, patch_size=4, **common))
            processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        else:
            model = ViTMAEModel(ViTMAEConfig(num_hidden_layers=2, patch_size=8, mask_ratio=0.75, **common))
            processor = ViTImageProcessor(size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "DRPO_TINY_MODEL").write_text(TINY_PIXEL_VERSIONS[kind] + "\n")
    return folder


def tiny_pixel_encoder_path(kind: str, cache_dir: Path | None = None) -> Path:
    """Path of the tiny ``dinov2`` / ``vit_mae`` folder in the cache, building it on first use."""
    return _cached_build(TINY_PIXEL_VERSIONS[kind], lambda folder: build_tiny_pixel_encoder(kind, folder), cache_dir)
