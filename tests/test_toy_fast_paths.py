"""The demo's speed-ups change no result: each fast path against the slow, obviously-correct version it replaced.

* ``ShapeDetector.detect_batch`` (one connected-component pass per colour over a batch, sizes by bincount, memo)
  against the per-image, per-colour loop it replaced (:func:`slow_detect`);
* ``keep_detections`` in plain Python against the tensor version (:func:`slow_keep_detections`);
* ``GenEvalReward`` with the batch detector and the memo against a fresh per-image evaluation.

Every comparison is ``torch.equal`` / ``==``: bit for bit (docs/toyworld.md "Where a demo step's time goes").
"""

from __future__ import annotations

import random

import pytest
import torch
from scipy import ndimage

from drpo_core.rewards.geneval.detection import Detections, Found, Thresholds, keep_detections
from drpo_core.toyworld.detector import PaletteColorClassifier, ShapeDetector, classify_shape, color_labels, toy_geneval_reward
from drpo_core.toyworld.prompts import toy_prompts
from drpo_core.toyworld.world import COLORS, SIZE, render


# -- the oracles: the implementations the fast paths replaced, kept verbatim ---------------------------------------
def slow_detect(image: torch.Tensor, min_pixels: int = 12, triangle_ratio: float = 0.6, bar_aspect: float = 1.4) -> Detections:
    labels_map = color_labels(image).numpy()
    boxes, labels, masks = [], [], []
    for c in range(len(COLORS)):
        components, n = ndimage.label(labels_map == c)
        for index, window in enumerate(ndimage.find_objects(components), start=1):
            if window is None:
                continue
            mask = components == index
            if mask.sum() < min_pixels:
                continue
            ys, xs = window
            labels.append(classify_shape(mask[window], triangle_ratio, bar_aspect))
            boxes.append([xs.start, ys.start, xs.stop, ys.stop])
            masks.append(torch.from_numpy(mask))
    if not labels:
        return Detections.empty()
    return Detections(boxes=torch.tensor(boxes, dtype=torch.float32), labels=labels,
                      scores=torch.ones(len(labels)), masks=torch.stack(masks))


def slow_keep_detections(dets: Detections, tag: str, th: Thresholds = Thresholds()) -> dict[str, list[Found]]:
    from drpo_core.rewards.geneval.detection import iou_plus_one

    cutoff = th.counting_threshold if tag == "counting" else th.threshold
    kept: dict[str, list[Found]] = {}
    for cls in dict.fromkeys(dets.labels):
        idx = torch.tensor([i for i, label in enumerate(dets.labels) if label == cls], dtype=torch.long)
        scores = dets.scores[idx].float()
        order = idx[torch.sort(scores, descending=True, stable=True).indices]
        order = order[dets.scores[order] > cutoff].tolist()[: th.max_objects]
        found: list[Found] = []
        while order:
            best = order.pop(0)
            found.append(Found(dets.boxes[best].float(), float(dets.scores[best]),
                               None if dets.masks is None else dets.masks[best].bool()))
            if th.nms_threshold < 1.0:
                order = [i for i in order if iou_plus_one(dets.boxes[best], dets.boxes[i]) < th.nms_threshold]
        if found:
            kept[cls] = found
    return kept


def slow_classify(crops: list[torch.Tensor], classname: str, colors) -> list[str]:
    from drpo_core.rewards.geneval.rules import GREY_999

    out = []
    for crop in crops:
        labels = color_labels(crop, extra_background=(GREY_999,) * 3)
        counts = torch.bincount(labels[labels >= 0].flatten(), minlength=len(COLORS))
        allowed = torch.tensor([c in colors for c in COLORS])
        counts = torch.where(allowed, counts, torch.zeros_like(counts))
        out.append(COLORS[int(counts.argmax())] if counts.sum() > 0 else "none")
    return out


def same_detections(a: Detections, b: Detections) -> bool:
    return (a.labels == b.labels and torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores)
            and ((a.masks is None and b.masks is None) or torch.equal(a.masks, b.masks)))


def same_kept(a: dict[str, list[Found]], b: dict[str, list[Found]]) -> bool:
    return list(a) == list(b) and all(
        len(a[k]) == len(b[k]) and all(torch.equal(x.box, y.box) and x.score == y.score
                                       and ((x.mask is None and y.mask is None) or torch.equal(x.mask, y.mask))
                                       for x, y in zip(a[k], b[k])) for k in a)


def clear_memos() -> None:
    ShapeDetector._memo.items.clear()
    PaletteColorClassifier._memo.items.clear()


def image_batch() -> torch.Tensor:
    """Rendered scenes, the same blurred and noised (a generator's look), random blocks of palette-ish colours,
    and two images whose same-colour regions touch across the batch boundary (last row / first row)."""
    gen = torch.Generator().manual_seed(0)
    scenes = torch.stack([render(p.scene(seed)) for p in toy_prompts("all")[::7] for seed in range(2)])
    blurred = torch.nn.functional.avg_pool2d(scenes, 3, stride=1, padding=1, count_include_pad=False)
    noisy = (blurred + 0.08 * torch.randn(blurred.shape, generator=gen)).clamp(0, 1)
    blocks = torch.nn.functional.interpolate(torch.rand(24, 3, 8, 8, generator=gen), size=SIZE, mode="nearest")
    touching = torch.full((2, 3, SIZE, SIZE), 205 / 255)
    touching[0, :, SIZE - 6:, 4:20] = torch.tensor([215, 40, 40])[:, None, None] / 255  # red at the bottom edge ...
    touching[1, :, :6, 4:20] = torch.tensor([215, 40, 40])[:, None, None] / 255  # ... and at the top of the next
    return torch.cat([scenes, blurred, noisy, blocks, touching])


# -- the tests -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [{}, {"min_pixels": 4, "triangle_ratio": 0.8, "bar_aspect": 1.2}])
def test_detect_batch_equals_the_per_image_loop(params):
    clear_memos()
    images = image_batch()
    detector = ShapeDetector(**params)
    batch = detector.detect_batch(images)
    want = [slow_detect(image, **params) for image in images]
    assert sum(len(d.labels) > 0 for d in want) > len(images) // 2  # the batch has something to find
    assert [i for i, (a, b) in enumerate(zip(batch, want)) if not same_detections(a, b)] == []
    clear_memos()
    assert all(same_detections(detector(image), w) for image, w in zip(images, want))  # the one-image entry point
    assert len(want[-1].labels) == len(want[-2].labels) == 1  # the touching pair: one red object each, not one merged


def test_detections_are_memoized_by_content_and_thresholds(monkeypatch):
    clear_memos()
    images = image_batch()[:12]
    calls = []
    detect = ShapeDetector._detect
    monkeypatch.setattr(ShapeDetector, "_detect", lambda self, x: calls.append(len(x)) or detect(self, x))
    first = ShapeDetector().detect_batch(images)
    again = ShapeDetector().detect_batch(images.clone())  # another detector, another tensor, the same pixels
    assert calls == [12] and all(a is b for a, b in zip(first, again))
    ShapeDetector(min_pixels=4).detect_batch(images)  # other thresholds: detected anew
    images[3, :, 0, 0] = 0.0  # one pixel changed: that image alone anew
    ShapeDetector().detect_batch(images)
    assert calls == [12, 12, 1]


def test_keep_detections_equals_the_tensor_version():
    rng = random.Random(0)
    cutoffs = [0.3, 0.9, 0.30000001, 0.29999999, 0.9000001, 1.0, 0.0, -0.0, float("nan"), float("inf")]
    checked = 0
    for _ in range(2000):
        n = rng.randint(0, 9)
        dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.float64])
        scores = torch.tensor([rng.choice(cutoffs + [rng.random()] * 3) for _ in range(n)], dtype=dtype)
        boxes = torch.tensor([[rng.uniform(0, 20), rng.uniform(0, 20), rng.uniform(20, 40), rng.uniform(20, 40)]
                              for _ in range(n)], dtype=torch.float32).reshape(n, 4)
        masks = torch.rand(n, 4, 4) > 0.5 if rng.random() < 0.5 else None
        dets = Detections(boxes=boxes, labels=[rng.choice("abc") for _ in range(n)], scores=scores, masks=masks)
        th = Thresholds(max_objects=rng.choice([16, 2]), nms_threshold=rng.choice([1.0, 0.5, 0.1]))
        tag = rng.choice(["counting", "position", "color_attr"])
        assert same_kept(keep_detections(dets, tag, th), slow_keep_detections(dets, tag, th)), (dets, tag, th)
        checked += n > 0
    assert checked > 1500


@pytest.mark.parametrize("mode", ["partial", "geneval", "strict"])
def test_geneval_reward_with_the_batch_detector_equals_a_fresh_per_image_evaluation(mode):
    prompts = [p for p in toy_prompts("all")[::5]]
    gen = torch.Generator().manual_seed(1)
    images = torch.stack([render(p.scene(s)) for p in prompts for s in range(2)])
    images = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    images = ((images + 0.05 * torch.randn(images.shape, generator=gen)).clamp(0, 1) * 255).round() / 255
    texts = [p.text for p in prompts for _ in range(2)]
    metadata = [p.metadata() for p in prompts for _ in range(2)]
    metadata[3] = None  # a missing score stays missing
    clear_memos()
    reward = toy_geneval_reward(mode=mode)
    fast = reward(images, texts, metadata)
    toy_geneval_reward(mode="partial" if mode != "partial" else "geneval")(images, texts, metadata)
    again = reward(images, texts, metadata)  # after the other mode filled the memos
    slow = toy_geneval_reward(mode=mode)
    slow.detector = lambda image, classes: slow_detect(image)  # no batch entry point: one call per image, no memo
    slow.color_classifier = slow_classify  # no memo
    reference = slow(images, texts, metadata)
    for got in (fast, again):
        assert torch.equal(got.isnan(), reference.isnan()) and torch.equal(got.nan_to_num(-7), reference.nan_to_num(-7))
    assert fast.isnan().sum() == 1 and len(set(fast.nan_to_num(-7).tolist())) > 1
