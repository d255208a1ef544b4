"""The frozen feature spaces φ of the toy base's pretraining (drpo_core/toyworld/toy_features.py)."""

from __future__ import annotations

import torch

from drpo_core.toyworld.toy_features import LatentFeatures, PixelFeatures
from drpo_core.toyworld.world import Shape, render


def _scene_image(dx: int = 0, dy: int = 0, kind: str = "circle") -> torch.Tensor:
    """`[1, 3, 32, 32]` in [-1, 1]: one red 8-px shape at (8 + dx, 8 + dy)."""
    scene = (Shape(kind, "red", (8 + dx, 8 + dy, 16 + dx, 16 + dy)),)
    return render(scene)[None] * 2 - 1


def test_output_keys_and_shapes():
    latent = LatentFeatures(0)(torch.randn(5, 4, 8, 8))
    assert {k: tuple(v.shape) for k, v in latent.items()} == {
        "latent": (5, 256), "latent_2x2": (5, 16),
        **{f"conv1_{s}": (5, n) for s, n in (("mean", 32), ("std", 32), ("mean_2x2", 128), ("std_2x2", 128))},
        **{f"conv2_{s}": (5, n) for s, n in (("mean", 64), ("std", 64), ("mean_2x2", 256), ("std_2x2", 256))}}
    pixel = PixelFeatures(1)(torch.rand(3, 3, 32, 32) * 2 - 1)
    assert len(pixel) == 12 and all(v.shape[0] == 3 and torch.isfinite(v).all() for v in pixel.values())
    assert pixel["pix3_mean"].shape == (3, 64) and pixel["pix1_std_2x2"].shape == (3, 128)


def test_frozen_seeded_and_global_rng_untouched():
    a, b, c = PixelFeatures(1), PixelFeatures(1), PixelFeatures(2)
    assert not any(p.requires_grad for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.convs[0].weight, c.convs[0].weight)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    LatentFeatures(0), PixelFeatures(1)
    assert torch.equal(torch.rand(3), expected)
    # gradients still flow to the input (the generator is trained through φ)
    x = torch.zeros(2, 3, 32, 32, requires_grad=True)
    sum(v.sum() for v in PixelFeatures(1)(x).values()).backward()
    assert x.grad.abs().sum() > 0


def test_pixel_global_statistics_are_translation_invariant_and_see_shape():
    """Shifting the scene by a multiple of the total stride (4 px) within the uniform background (every shape
    pixel ≥ 7 px, pix3's receptive-field radius, from the border before and after) leaves every
    global per-channel mean/std unchanged; the 2×2 layout maps change; a triangle in place of the circle
    changes the global statistics (shape information, which the position-blind keys must carry)."""
    phi = PixelFeatures(1)
    base, shifted, triangle = (phi(_scene_image()), phi(_scene_image(dx=8, dy=8)), phi(_scene_image(kind="triangle")))
    global_keys = [k for k in base if not k.endswith("_2x2")]
    assert len(global_keys) == 6
    for key in global_keys:
        torch.testing.assert_close(shifted[key], base[key], atol=1e-5, rtol=1e-5, msg=key)
    assert all((shifted[k] - base[k]).abs().max() > 1e-3 for k in base if k.endswith("_2x2"))
    for key in global_keys:
        assert (triangle[key] - base[key]).abs().max() > 1e-3, key  # vs < 1e-5 for the shift
