"""Tiny random-initialised reward models of the real architectures, saved to disk and loaded back.

Used by tests/test_rewards_models.py and tests/test_geneval.py: an open_clip CLIP (ViT + text tower)
registered from a config JSON, a transformers CLIPModel folder (PickScore / CLIP score / colour
classifier layout) and an OWLv2 detector folder; tokenizers come from drpo_core.models.tiny_models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from drpo_core.models.tiny_models import write_clip_tokenizer

TINY_OPENCLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def write_openclip_config(folder: Path, name: str = "drpo-tiny-hps", config: dict = TINY_OPENCLIP_CONFIG) -> Path:
    """The open_clip model-config JSON (registered under its file stem by the HPS reward)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def build_openclip_state_dict(config_file: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """State dict of a randomly initialised open_clip CLIP built from ``config_file``."""
    import open_clip

    open_clip.add_model_config(config_file)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(config_file.stem, pretrained=None)
    return {k: v.clone() for k, v in model.state_dict().items()}


def build_tiny_hf_clip(model_dir: Path, processor_dir: Path | None = None, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny ``CLIPModel`` folder; tokenizer + image processor into ``processor_dir`` (default: same folder)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  image_size=image_size, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(model_dir)
    processor_dir = processor_dir or model_dir
    write_clip_tokenizer(processor_dir)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(processor_dir)
    return model_dir


def build_tiny_owlv2(folder: Path, seed: int = 0) -> Path:
    """A tiny ``Owlv2ForObjectDetection`` + ``Owlv2Processor`` folder (64 px input, 4×4 patch grid)."""
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
                max_position_embeddings=16)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  image_size=64, patch_size=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(folder)
    tokenizer_dir = write_clip_tokenizer(folder / "_tokenizer_src")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=16, pad_token="!")
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                   tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_tiny_mask2former(folder: Path, seed: int = 0) -> Path:
    """A tiny ``Mask2FormerForUniversalSegmentation`` (Swin backbone, 80 COCO classes, 10 queries) + processor."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                          window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, num_labels=80, hidden_dim=32, mask_feature_size=32,
                               feature_size=32, encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1,
                               decoder_layers=2, num_attention_heads=2, num_queries=10, common_stride=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Mask2FormerForUniversalSegmentation(config)
    model.save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, size_divisor=32,
                              do_reduce_labels=False).save_pretrained(folder)
    return folder
