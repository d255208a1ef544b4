"""GenEval rules over a scripted detector (a test double of the Detector interface), and the real backends
(OWLv2 detector, CLIP colour classifier) on tiny random models saved and loaded back."""

from __future__ import annotations

import json
import math

import pytest
import torch

from drpo_core.config import RewardConfig
from drpo_core.rewards import build_reward
from drpo_core.rewards.geneval import (
    COCO_CLASSES, COLORS, Detections, Found, GenEvalReward, Thresholds, detections_from_per_class, evaluate_exact,
    evaluate_geneval, keep_detections, load_metadata_jsonl, parse_metadata, relative_position, summarize,
)
from drpo_core.rewards.geneval.detection import greedy_nms, iou_plus_one
from drpo_core.rewards.geneval.rules import GREY_999, crop_for_color

RGB = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0),
       "yellow": (1.0, 1.0, 0.0)}


class ScriptedDetector:
    """Test double of the Detector interface: returns pre-written detections in call order, records queries."""

    model_id = "scripted"

    def __init__(self, *per_call: Detections):
        self.per_call, self.queries = list(per_call), []

    def __call__(self, image, classes):
        self.queries.append(list(classes))
        return self.per_call[len(self.queries) - 1]


class MajorityPixelColor:
    """Test double of the ColorClassifier interface: the candidate colour with the most exactly-matching pixels."""

    def __init__(self):
        self.crops = []

    def __call__(self, crops, classname, colors):
        self.crops += crops
        out = []
        for crop in crops:
            counts = {c: int((crop == torch.tensor(RGB[c]).view(3, 1, 1)).all(0).sum()) for c in colors if c in RGB}
            out.append(max(counts, key=counts.get))
        return out


def dets(*items, size=None) -> Detections:
    """items: (label, score, (x1, y1, x2, y2)[, mask])."""
    masks = [it[3] for it in items if len(it) > 3]
    return Detections(boxes=torch.tensor([list(it[2]) for it in items], dtype=torch.float32).reshape(-1, 4),
                      labels=[it[0] for it in items], scores=torch.tensor([it[1] for it in items]).reshape(-1),
                      masks=torch.stack(masks) if masks else None)


def canvas(*painted, h=64, w=64) -> torch.Tensor:
    """Black `[3, h, w]` image with (box, colour name) rectangles painted in."""
    image = torch.zeros(3, h, w)
    for (x1, y1, x2, y2), color in painted:
        image[:, y1:y2, x1:x2] = torch.tensor(RGB[color]).view(3, 1, 1)
    return image


def score_one(meta, detections, image=None, mode="geneval", **thresholds):
    reward = GenEvalReward(ScriptedDetector(detections), MajorityPixelColor(), mode=mode, **thresholds)
    image = canvas() if image is None else image
    verdict = reward.evaluate(image, meta)
    return verdict, reward


SINGLE = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
TWO = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}],
       "prompt": "a photo of a cat and a dog"}
COUNTING = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
            "prompt": "a photo of two clocks"}
COLOR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
COLOR_ATTR = {"tag": "color_attr", "prompt": "a photo of a red car and a blue bench",
              "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "bench", "count": 1, "color": "blue"}]}


def position(relation: str, count: int = 1) -> dict:
    return {"tag": "position", "prompt": f"a photo of a dog {relation} a cat",
            "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": count, "position": [relation, 0]}]}


# --- metadata ---------------------------------------------------------------------------------------


def test_parse_official_metadata_lines(tmp_path):
    lines = [COUNTING, position("right of"), COLOR_ATTR, SINGLE]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(m) for m in lines) + "\n\n")
    specs = load_metadata_jsonl(path)
    assert [s.tag for s in specs] == ["counting", "position", "color_attr", "single_object"]
    assert specs[0].exclude[0].count == 3 and specs[0].classes == ["clock"]
    assert specs[1].include[1].position == ("right of", 0) and specs[1].classes == ["cat", "dog"]
    assert specs[2].include[1].color == "blue"
    assert len(COCO_CLASSES) == 80 and COCO_CLASSES[0] == "person" and COCO_CLASSES[-1] == "toothbrush"


@pytest.mark.parametrize("bad, message", [
    ({"tag": "color", "include": [{"class": "car", "count": 1}]}, "tag 'color' is not one of"),
    ({"tag": "colors", "include": []}, "non-empty 'include'"),
    ({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "teal"}]}, r"include\[0\].color 'teal'"),
    ({"tag": "counting", "include": [{"class": "car", "count": 0}]}, r"include\[0\].count must be an integer"),
    ({"tag": "position", "include": [{"class": "cat", "count": 1, "position": ["right of", 0]}]}, "earlier include"),
    ({"tag": "position", "include": [{"class": "cat"}, {"class": "dog", "position": ["beside", 0]}]}, "relation in"),
    ({"tag": "counting", "include": [{"class": "cat"}], "exclude": [{"class": "cat", "count": 2, "color": "red"}]},
     "exclude clauses take only"),
    ("{not json", "not valid JSON"),
])
def test_malformed_metadata_is_one_clear_line(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_metadata(bad)


def test_metadata_file_errors_name_the_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(SINGLE) + "\n" + json.dumps({"tag": "nope", "include": [{"class": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"m.jsonl:2: geneval metadata tag 'nope'"):
        load_metadata_jsonl(path)


# --- detection post-processing ----------------------------------------------------------------------


def test_keep_detections_threshold_depends_on_tag_and_is_strict():
    d = dets(("clock", 0.85, (0, 0, 9, 9)), ("clock", 0.95, (20, 0, 29, 9)), ("clock", 0.3, (40, 0, 49, 9)))
    normal = keep_detections(d, "two_object")
    assert [f.score for f in normal["clock"]] == pytest.approx([0.95, 0.85])  # 0.3 is not > 0.3; sorted by score
    counting = keep_detections(d, "counting")
    assert [f.score for f in counting["clock"]] == pytest.approx([0.95])
    assert keep_detections(dets(("cat", 0.2, (0, 0, 5, 5))), "single_object") == {}


def test_keep_detections_caps_at_max_objects_and_dedups_only_below_nms_one():
    many = dets(*[("cup", 0.5 + i / 100, (i, 0, i + 9, 9)) for i in range(20)])
    kept = keep_detections(many, "counting", Thresholds(counting_threshold=0.4))["cup"]
    assert len(kept) == 16 and kept[0].score == pytest.approx(0.69)
    twins = dets(("cat", 0.9, (0, 0, 9, 9)), ("cat", 0.8, (1, 0, 10, 9)), ("cat", 0.7, (30, 30, 39, 39)))
    assert len(keep_detections(twins, "single_object")["cat"]) == 3  # NMS 1.0: GenEval's default keeps duplicates
    assert len(keep_detections(twins, "single_object", Thresholds(nms_threshold=0.5))["cat"]) == 2


def test_iou_uses_the_plus_one_pixel_convention_and_nms_plain_iou():
    a, b = torch.tensor([0.0, 0, 9, 9]), torch.tensor([5.0, 0, 14, 9])
    assert iou_plus_one(a, a) == 1.0 and iou_plus_one(a, b) == pytest.approx(50 / 150)
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]])
    assert greedy_nms(boxes, torch.tensor([0.5, 0.9, 0.4]), 0.3).tolist() == [1, 2]


def test_mmdet_per_class_results_convert_to_detections():
    import numpy as np

    masks = [np.zeros((8, 8), bool), np.ones((8, 8), bool)]
    d = detections_from_per_class([np.array([[0, 0, 4, 4, 0.9]]), np.zeros((0, 5)), np.array([[1, 1, 5, 5, 0.4]])],
                                  [[masks[0]], [], [masks[1]]], ["person", "bicycle", "car"])
    assert d.labels == ["person", "car"] and d.scores.tolist() == pytest.approx([0.9, 0.4])
    assert d.masks.shape == (2, 8, 8) and bool(d.masks[1].all())
    with pytest.raises(ValueError, match="2 per-class results for 3 class names"):
        detections_from_per_class([np.zeros((0, 5))] * 2, None, ["a", "b", "c"])


# --- rules: every task type ---------------------------------------------------------------------------


def test_single_object():
    assert score_one(SINGLE, dets(("cat", 0.5, (0, 0, 9, 9))))[0].correct
    verdict, _ = score_one(SINGLE, dets(("cat", 0.3, (0, 0, 9, 9)), ("dog", 0.9, (0, 0, 9, 9))))
    assert not verdict.correct and verdict.reasons == ["expected cat>=1, found 0"]


def test_two_object_needs_both():
    both = dets(("cat", 0.5, (0, 0, 9, 9)), ("dog", 0.6, (20, 0, 29, 9)))
    assert score_one(TWO, both)[0].correct
    verdict, _ = score_one(TWO, dets(("cat", 0.5, (0, 0, 9, 9))))
    assert not verdict.correct and verdict.clauses[0].matched and not verdict.clauses[1].matched


def test_counting_uses_counting_threshold_and_exclusion():
    two = dets(("clock", 0.95, (0, 0, 9, 9)), ("clock", 0.93, (20, 0, 29, 9)), ("clock", 0.5, (40, 0, 49, 9)))
    assert score_one(COUNTING, two)[0].correct  # the 0.5 clock is below the 0.9 counting threshold
    three = dets(("clock", 0.95, (0, 0, 9, 9)), ("clock", 0.93, (20, 0, 29, 9)), ("clock", 0.91, (40, 0, 49, 9)))
    verdict, _ = score_one(COUNTING, three)
    assert not verdict.correct and verdict.clauses[0].matched and verdict.reasons == ["expected clock<3, found 3"]
    verdict, _ = score_one(COUNTING, dets(("clock", 0.95, (0, 0, 9, 9)), ("clock", 0.85, (20, 0, 29, 9))))
    assert not verdict.correct and verdict.reasons == ["expected clock>=2, found 1"]


def test_colors_classify_the_cropped_object():
    red_car = canvas(((10, 10, 30, 30), "red"), ((40, 40, 60, 60), "blue"))
    verdict, reward = score_one(COLOR, dets(("car", 0.8, (10, 10, 30, 30))), image=red_car)
    assert verdict.correct and verdict.clauses[0].colors_found == ["red"]
    assert reward.color_classifier.crops[0].shape == (3, 20, 20)
    verdict, _ = score_one(COLOR, dets(("car", 0.8, (40, 40, 60, 60))), image=red_car)
    assert not verdict.correct and verdict.reasons[0].startswith("expected red car>=1, found 0 red")


def test_colour_crop_composites_the_mask_over_grey():
    image = canvas(((0, 0, 40, 15), "red"), ((0, 15, 40, 40), "blue"))  # box: 600 red px, 1000 blue px
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[0:15, 0:40] = True
    crop = crop_for_color(image, Found(torch.tensor([0.0, 0, 40, 40]), 0.9, mask))
    assert crop.shape == (3, 40, 40) and torch.all(crop[:, 15:] == GREY_999) and torch.all(crop[0, :15] == 1)
    masked, _ = score_one(COLOR, dets(("car", 0.8, (0, 0, 40, 40), mask)), image=image)
    unmasked, _ = score_one(COLOR, dets(("car", 0.8, (0, 0, 40, 40))), image=image)
    assert masked.correct and unmasked.clauses[0].colors_found == ["blue"]


CAT = (20, 20, 40, 40)
SIDES = {"right of": (44, 20, 64, 40), "left of": (0, 20, 16, 40), "above": (20, 0, 40, 16), "below": (20, 44, 40, 64)}


@pytest.mark.parametrize("relation", list(SIDES))
@pytest.mark.parametrize("where", list(SIDES))
def test_position_every_relation(relation, where):
    detections = dets(("cat", 0.9, CAT), ("dog", 0.9, SIDES[where]))
    verdict, _ = score_one(position(relation), detections)
    assert verdict.correct == (relation == where)
    assert verdict.clauses[1].position_ok == (relation == where)


def test_position_edge_cases():
    overlapping = dets(("cat", 0.9, CAT), ("dog", 0.9, (22, 20, 42, 40)))  # inside the dead zone: no relation
    verdict, _ = score_one(position("right of"), overlapping)
    assert not verdict.correct and "found no relation to target" in verdict.reasons[0]
    verdict, _ = score_one(position("right of"), dets(("dog", 0.9, SIDES["right of"])))
    assert not verdict.correct and verdict.reasons == ["expected cat>=1, found 0", "no target for dog to be right of"]
    two_dogs = dets(("cat", 0.9, CAT), ("dog", 0.9, SIDES["right of"]), ("dog", 0.8, SIDES["left of"]))
    assert not score_one(position("right of", count=2), two_dogs)[0].correct  # every dog must be right of the cat
    assert score_one(position("right of", count=1), two_dogs)[0].correct  # only the top-1 dog is checked


def test_relative_position_numbers():
    box = lambda cx, cy, s: torch.tensor([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2])  # noqa: E731
    assert relative_position(box(10, 50, 20), box(90, 50, 20)) == {"left of"}  # (−80 + 4)/80 = −0.95
    assert relative_position(box(50, 50, 100), box(65, 50, 100)) == set()  # |−15| − 20 < 0 → dead zone
    assert relative_position(box(60, 60, 10), box(10, 10, 10)) == {"right of", "below"}  # 48/70.7 = 0.68 each
    assert relative_position(box(60, 12, 10), box(10, 10, 10)) == {"right of"}  # dy shrinks to 0
    assert relative_position(box(10, 10, 10), box(10, 10, 10)) == set()


def test_color_attr_checks_each_object_colour():
    image = canvas(((0, 0, 20, 20), "red"), ((30, 30, 60, 50), "blue"))
    right = dets(("car", 0.7, (0, 0, 20, 20)), ("bench", 0.7, (30, 30, 60, 50)))
    swapped = dets(("car", 0.7, (30, 30, 60, 50)), ("bench", 0.7, (0, 0, 20, 20)))
    assert score_one(COLOR_ATTR, right, image=image)[0].correct
    verdict, _ = score_one(COLOR_ATTR, swapped, image=image)
    assert not verdict.correct and len(verdict.reasons) == 2


# --- flow_grpo exact / partial rule --------------------------------------------------------------------


def test_exact_rule_requires_exact_count_and_gives_partial_credit():
    three = dets(*[("clock", 0.95, (i * 20, 0, i * 20 + 9, 9)) for i in range(3)])
    no_exclude = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "prompt": "two clocks"}
    assert score_one(no_exclude, three)[0].correct  # benchmark rule: top-2 of 3 is enough
    strict, _ = score_one(no_exclude, three, mode="strict")
    assert not strict.correct and strict.score == pytest.approx(0.5)  # 1 − |2 − 3| / 2
    wrong_colour, _ = score_one(COLOR, dets(("car", 0.8, (0, 0, 10, 10))), image=canvas(((0, 0, 10, 10), "blue")),
                                mode="partial")
    assert not wrong_colour.correct and wrong_colour.score == pytest.approx(0.5)  # count term 1, colour term 0
    misplaced, _ = score_one(position("right of"), dets(("cat", 0.9, CAT), ("dog", 0.9, SIDES["above"])), mode="partial")
    assert misplaced.score == pytest.approx(2 / 3)  # cat 1, dog 1, position 0 (flow_grpo would add another 1)
    no_dog, _ = score_one(position("right of"), dets(("cat", 0.9, CAT)), mode="partial")
    assert no_dog.score == pytest.approx(1 / 3)  # cat 1, dog 0, and 0 for the position that could not be checked
    crowded, _ = score_one(SINGLE, dets(*[("cat", 0.9, (i * 20, 0, i * 20 + 9, 9)) for i in range(3)]), mode="partial")
    assert crowded.score == pytest.approx(-1.0)  # 1 − |1 − 3| / 1, unclamped as in flow_grpo
    passed = evaluate_exact(canvas(), keep_detections(dets(("cat", 0.9, CAT)), "single_object"), parse_metadata(SINGLE))
    assert passed.correct and passed.score == 1.0


# --- the reward class ------------------------------------------------------------------------------------


def test_reward_scores_modes_missing_metadata_and_stats():
    d_ok, d_bad = dets(("cat", 0.9, (0, 0, 9, 9))), dets(("dog", 0.9, (0, 0, 9, 9)))
    images = torch.stack([canvas(), canvas(), canvas(), canvas()])
    meta = [SINGLE, SINGLE, None, COUNTING]
    two_clocks = dets(("clock", 0.95, (0, 0, 9, 9)), ("clock", 0.95, (20, 0, 29, 9)))
    detector = ScriptedDetector(d_ok, d_bad, two_clocks)
    reward = GenEvalReward(detector, MajorityPixelColor())
    scores = reward(images, ["p"] * 4, meta)
    assert scores[:2].tolist() == [1.0, 0.0] and math.isnan(scores[2]) and scores[3] == 1.0
    assert detector.queries == [["cat"], ["cat"], ["clock"]]
    assert reward.last_verdicts[2] is None and reward.last_verdicts[1].reasons == ["expected cat>=1, found 0"]
    stats = reward.pop_stats()
    assert stats == {"pass/single_object": 0.5, "pass/counting": 1.0, "overall": 0.75,
                     "images_correct": pytest.approx(2 / 3), "n/single_object": 2.0, "n/counting": 1.0,
                     "missing_metadata": 1.0}
    assert reward.pop_stats() == {"missing_metadata": 0.0}
    assert reward.version == "geneval-geneval/scripted" and reward.model_id == "geneval"


def test_reward_threshold_override_and_option_errors():
    lowish = dets(("cat", 0.5, (0, 0, 9, 9)))
    assert score_one(SINGLE, lowish)[0].correct
    assert not score_one(SINGLE, lowish, threshold=0.6)[0].correct
    with pytest.raises(ValueError, match="mode 'soft' is not one of"):
        GenEvalReward(ScriptedDetector(), mode="soft")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['treshold'\]"):
        GenEvalReward(ScriptedDetector(), treshold=0.5)
    with pytest.raises(ValueError, match="asks for a red car but no colour classifier"):
        GenEvalReward(ScriptedDetector(dets(("car", 0.9, (0, 0, 9, 9)))))(canvas()[None], ["p"], [COLOR])


def test_summarize_is_unweighted_mean_of_task_means():
    verdicts = [evaluate_geneval(canvas(), objs, parse_metadata(m)) for objs, m in [
        ({"cat": [Found(torch.tensor([0.0, 0, 9, 9]), 0.9)]}, SINGLE), ({}, SINGLE), ({}, SINGLE), ({}, SINGLE),
        ({"cat": [Found(torch.tensor([0.0, 0, 9, 9]), 0.9)], "dog": [Found(torch.tensor([20.0, 0, 29, 9]), 0.9)]}, TWO),
    ]]
    summary = summarize(verdicts)
    assert summary["accuracy/single_object"] == 0.25 and summary["accuracy/two_object"] == 1.0
    assert summary["overall"] == pytest.approx(0.625) and summary["images_correct"] == pytest.approx(0.4)


# --- real backends on tiny random models -----------------------------------------------------------------


@pytest.fixture(scope="module")
def backend_dirs(tmp_path_factory):
    from tests.tiny_reward_models import build_tiny_hf_clip, build_tiny_owlv2

    root = tmp_path_factory.mktemp("geneval")
    return build_tiny_owlv2(root / "owlv2", seed=0), build_tiny_hf_clip(root / "clip", seed=1)


@pytest.fixture(scope="module")
def mask2former_dir(tmp_path_factory):
    from tests.tiny_reward_models import build_tiny_mask2former

    return build_tiny_mask2former(tmp_path_factory.mktemp("geneval") / "mask2former", seed=0)


def test_owl_detector_returns_queried_classes_inside_the_image(backend_dirs):
    from drpo_core.rewards.geneval.owl import OwlDetector

    detector = OwlDetector(str(backend_dirs[0]), device="cpu", score_floor=0.0, nms_iou=0.3)
    assert detector.model_id == "owlv2/owlv2"
    image = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(0))
    d = detector(image, ["cat", "dog", "cat"])
    assert len(d.labels) > 0 and set(d.labels) <= {"cat", "dog"} and d.masks is None
    assert d.boxes[:, 0::2].min() >= 0 and d.boxes[:, 0::2].max() <= 64 and d.boxes[:, 1::2].max() <= 48
    for cls in set(d.labels):  # class-wise NMS left no same-class pair overlapping ≥ 0.3
        idx = [i for i, label in enumerate(d.labels) if label == cls]
        assert greedy_nms(d.boxes[idx], d.scores[idx], 0.3).numel() == len(idx)
    again = detector(image, ["cat", "dog"])
    assert again.labels == d.labels and torch.equal(again.boxes, d.boxes)
    assert detector(image, []).labels == []


def test_clip_colour_classifier_matches_zero_shot_reference(backend_dirs):
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    from drpo_core.rewards.geneval.clip_color import GENEVAL_COLOR_TEMPLATES, ClipColorClassifier

    classifier = ClipColorClassifier(str(backend_dirs[1]), device="cpu")
    weights = classifier.classifier("car", COLORS)
    assert weights.shape == (10, 16) and torch.allclose(weights.norm(dim=-1), torch.ones(10))
    crops = [torch.rand(3, 20 + 7 * i, 30, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    got = classifier(crops, "car", COLORS)
    # reference: clip_benchmark's zero_shot_classifier with transformers' CLIP directly
    model = CLIPModel.from_pretrained(backend_dirs[1]).eval()
    tokenizer, processor = AutoTokenizer.from_pretrained(backend_dirs[1]), AutoImageProcessor.from_pretrained(backend_dirs[1])
    with torch.no_grad():
        rows = []
        for color in COLORS:
            tok = tokenizer([t.format(color=color, cls="car") for t in GENEVAL_COLOR_TEMPLATES], padding=True,
                            return_tensors="pt")
            emb = model.get_text_features(**tok).pooler_output
            emb = (emb / emb.norm(dim=-1, keepdim=True)).mean(0)
            rows.append(emb / emb.norm())
        pixels = processor(images=crops, do_rescale=False, return_tensors="pt")["pixel_values"]
        image_emb = model.get_image_features(pixel_values=pixels).pooler_output
    expected = (image_emb / image_emb.norm(dim=-1, keepdim=True)) @ torch.stack(rows).T
    assert got == [COLORS[i] for i in expected.argmax(-1).tolist()]
    assert classifier.classifier("car", COLORS) is weights  # cached per class


def test_build_reward_geneval_end_to_end_on_tiny_backends(backend_dirs, tmp_path):
    owl, clip = backend_dirs
    options = {"detector_path": str(owl), "color_classifier_path": str(clip), "device": "cpu",
               "detector_options": {"score_floor": 0.0}}
    reward = build_reward(RewardConfig(kind="geneval", options=options))
    assert isinstance(reward, GenEvalReward) and reward.version == "geneval-geneval/owlv2/owlv2"
    images = torch.rand(4, 3, 48, 64, generator=torch.Generator().manual_seed(3))
    meta = [SINGLE, COLOR_ATTR, position("left of"), COUNTING]
    scores = reward(images, ["p"] * 4, meta)
    assert set(scores.tolist()) <= {0.0, 1.0}
    assert torch.equal(reward(images, ["p"] * 4, meta), scores)  # deterministic
    singles = torch.cat([reward(images[i:i + 1], ["p"], meta[i:i + 1]) for i in range(4)])
    assert torch.equal(singles, scores)  # batching invariant
    assert [v.tag for v in reward.last_verdicts] == ["counting"]  # detail of the latest call only
    assert reward.pop_stats()["n/single_object"] == 3.0  # three calls covered the single-object image
    partial = build_reward(RewardConfig(kind="geneval", path=str(owl),
                                        options={"color_classifier_path": str(clip), "device": "cpu", "mode": "partial"}))
    assert partial(images, ["p"] * 4, meta).shape == (4,) and partial.mode == "partial"
    with pytest.raises(ValueError, match="reward 'geneval': options.color_classifier_path .* does not exist"):
        build_reward(RewardConfig(kind="geneval", path=str(owl), options={"color_classifier_path": str(tmp_path / "x")}))
    with pytest.raises(ValueError, match="is a 'clip' model; supported detectors: owlv2, owlvit, mask2former"):
        build_reward(RewardConfig(kind="geneval", path=str(clip)))
    with pytest.raises(ValueError, match="owlv2 detector options: .*'threshold'"):
        build_reward(RewardConfig(kind="geneval", path=str(owl), options={"detector_options": {"threshold": 0.1}}))
    with pytest.raises(ValueError, match="mode 'soft'"):
        build_reward(RewardConfig(kind="geneval", path=str(owl), options={"mode": "soft"}))


def test_mask_boxes_follow_mmdet_mask2bbox():
    from drpo_core.rewards.geneval.mask2former import mask_boxes

    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True  # rows 2..4, cols 3..8
    assert mask_boxes(masks).tolist() == [[3.0, 2.0, 9.0, 5.0], [0.0, 0.0, 0.0, 0.0]]


def test_mask2former_detector_gives_masked_instances_with_coco_names(mask2former_dir):
    from transformers import Mask2FormerForUniversalSegmentation

    from drpo_core.rewards.geneval.mask2former import Mask2FormerDetector, mask_boxes

    detector = Mask2FormerDetector(str(mask2former_dir), device="cpu", score_floor=0.0)
    assert detector.classnames == list(COCO_CLASSES) and detector.model_id == "mask2former/mask2former"
    image = torch.rand(3, 48, 64, generator=torch.Generator().manual_seed(4))
    everything = detector(image)
    assert 0 < len(everything.labels) <= 10 and everything.masks.shape == (len(everything.labels), 48, 64)
    assert torch.equal(everything.boxes, mask_boxes(everything.masks)) and (everything.scores <= 1).all()
    # scores are class probability × mean mask probability, so never above the best class probability
    model = Mask2FormerForUniversalSegmentation.from_pretrained(mask2former_dir).eval()
    pixels = detector.processor(images=[image], do_rescale=False, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        best = model(pixel_values=pixels).class_queries_logits[0].softmax(-1)[:, :-1].max()
    assert everything.scores.max() <= best + 1e-6
    wanted = sorted(set(everything.labels))[:1]
    only = detector(image, wanted)
    assert set(only.labels) == set(wanted) and len(only.labels) == everything.labels.count(wanted[0])
    again = detector(image)
    assert again.labels == everything.labels and torch.equal(again.masks, everything.masks)


def test_mask2former_postprocessing_agrees_with_transformers_on_square_images(mask2former_dir):
    """On a square image transformers' 384×384 resampling is harmless, so both must pick the same instances."""
    from drpo_core.rewards.geneval.mask2former import Mask2FormerDetector

    detector = Mask2FormerDetector(str(mask2former_dir), device="cpu", score_floor=0.0)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = detector(image)
    inputs = detector.processor(images=[image], do_rescale=False, return_tensors="pt")
    with torch.no_grad():
        out = detector.model(pixel_values=inputs["pixel_values"])
    ref = detector.processor.post_process_instance_segmentation(out, threshold=0.0, target_sizes=[(64, 64)],
                                                                return_binary_maps=True)[0]["segments_info"]
    ref_pairs = sorted((COCO_CLASSES[r["label_id"]], r["score"]) for r in ref)
    our_pairs = sorted(zip(ours.labels, ours.scores.tolist()))
    assert [c for c, _ in our_pairs] == [c for c, _ in ref_pairs]
    assert our_pairs == [(c, pytest.approx(s, abs=5e-4)) for c, s in ref_pairs]


def test_build_reward_geneval_with_mask2former_composites_masks(mask2former_dir, backend_dirs):
    reward = build_reward(RewardConfig(kind="geneval", path=str(mask2former_dir), options={
        "color_classifier_path": str(backend_dirs[1]), "device": "cpu", "detector_options": {"score_floor": 0.0},
        "threshold": 0.0}))
    assert reward.version == "geneval-geneval/mask2former/mask2former"
    image = torch.rand(1, 3, 48, 64, generator=torch.Generator().manual_seed(4))
    found = reward.detector(image[0], COCO_CLASSES)
    meta = {"tag": "colors", "include": [{"class": found.labels[0], "count": 1, "color": "red"}], "prompt": "p"}
    score = reward(image, ["p"], [meta])
    verdict = reward.last_verdicts[0]
    assert score.shape == (1,) and verdict.clauses[0].found == 1 and verdict.clauses[0].colors_found[0] in COLORS
    assert score.item() == float(verdict.clauses[0].colors_found == ["red"])
