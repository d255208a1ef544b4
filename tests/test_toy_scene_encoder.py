"""The shapes world's scene encoder (drpo_core/toyworld/scene_encoder.py): labels, training, saving, and
loading the committed one as DrPO's φ (``features.checkpoint: toy``)."""

from __future__ import annotations

import json

import pytest
import torch

from drpo_core.config import FeaturesConfig
from drpo_core.features import build_encoder
from drpo_core.toyworld import BASE_MODEL, SCENE_ENCODER
from drpo_core.toyworld.prompts import RENDER_TASK_WEIGHTS, pretraining_sampler
from drpo_core.toyworld.scene_encoder import (ARCHITECTURE, CLASSES, SceneEncoderSettings, count_labels, encode_renders,
                                              load_scene_encoder, save_scene_encoder, scene_accuracy, train_scene_encoder)
from drpo_core.toyworld.world import Shape


def _toy_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(BASE_MODEL, subfolder="vae", torch_dtype=torch.float32).eval()


def test_count_labels_count_each_colour_and_kind():
    scene = (Shape("bar", "red", (1, 1, 9, 5)), Shape("bar", "red", (12, 1, 20, 5)),
             Shape("triangle", "blue", (1, 12, 9, 20)))
    labels = count_labels([scene, ()])
    assert labels.shape == (2, 12) and labels[1].sum() == 0
    assert labels[0, CLASSES.index(("red", "bar"))] == 2 and labels[0, CLASSES.index(("blue", "triangle"))] == 1
    assert labels[0].sum() == 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A briefly trained encoder on the committed autoencoder, saved to a folder (about 20 s)."""
    vae = _toy_vae()
    settings = SceneEncoderSettings(scenes=2000, holdout=300, steps=400, batch=128)
    logs = []
    encoder, head, summary = train_scene_encoder(vae, seed=0, s=settings, log=logs.append)
    folder = tmp_path_factory.mktemp("scene") / "scene_encoder"
    save_scene_encoder(folder, encoder, head, summary)
    return vae, encoder, head, summary, folder, logs


def test_training_learns_counts_beyond_the_base_rate(trained):
    vae, encoder, head, summary, folder, logs = trained
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    assert logs[-1]["heldout_scene_accuracy"] == summary["heldout_scene_accuracy"]
    # the majority guess (no objects of any class) is never right: every scene holds 1–3 objects
    assert summary["heldout_scene_accuracy"] > 0.3, summary


def test_save_load_round_trip_and_sidecar(trained, tmp_path):
    vae, encoder, head, summary, folder, _ = trained
    config = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in ARCHITECTURE} == ARCHITECTURE and config["in_channels"] == 4
    again, again_head = load_scene_encoder(folder)
    z = torch.randn(3, 4, 8, 8)
    for key, value in encoder(z).items():
        torch.testing.assert_close(again(z)[key], value)
    torch.testing.assert_close(again_head.weight, head.weight)


def test_loads_as_drpo_features_and_refuses_another_architecture(trained):
    _, encoder, _, _, folder, _ = trained
    cfg = FeaturesConfig(kind="latent_resnet", checkpoint=str(folder), patch_sizes=[], **ARCHITECTURE)
    phi = build_encoder(cfg, in_channels=4, device=torch.device("cpu"))
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(phi(z)["layer2_mean"], encoder(z)["layer2_mean"])
    # a stride mismatch loads without a shape error; the sidecar config catches it
    wrong = FeaturesConfig(kind="latent_resnet", checkpoint=str(folder), patch_sizes=[], **{**ARCHITECTURE, "downsample": False})
    with pytest.raises(ValueError, match="downsample=False"):
        build_encoder(wrong, in_channels=4, device=torch.device("cpu"))


def test_committed_encoder_reads_fresh_renders():
    """The committed φ (``features.checkpoint: toy``) counts each colour × kind on renders it never saw."""
    vae = _toy_vae()
    encoder, head = load_scene_encoder(SCENE_ENCODER)
    prompts = pretraining_sampler(999, weights=RENDER_TASK_WEIGHTS)(200)  # the mix it was trained on
    scenes = [p.scene(5 * 10**7 + i) for i, p in enumerate(prompts)]
    mean, _ = encode_renders(vae, scenes)
    accuracy = scene_accuracy(encoder, head, mean * vae.config.scaling_factor, count_labels(scenes))
    assert accuracy >= 0.9, accuracy
    cfg = FeaturesConfig(kind="latent_resnet", checkpoint="toy", patch_sizes=[], **ARCHITECTURE)
    phi = build_encoder(cfg, in_channels=4, device=torch.device("cpu"))
    z = mean[:4] * vae.config.scaling_factor
    torch.testing.assert_close(phi(z)["layer2_std"], encoder(z)["layer2_std"])
