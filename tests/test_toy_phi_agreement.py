"""benchmarks/toy_phi_agreement.py: the detector's class counts and the prompt check it compares φ against."""

from __future__ import annotations

from benchmarks.toy_phi_agreement import detected_counts, satisfies
from drpo_core.toyworld.detector import PaletteColorClassifier, ShapeDetector
from drpo_core.toyworld.prompts import find_prompt, toy_prompts
from drpo_core.toyworld.scene_encoder import count_labels
from drpo_core.toyworld.world import render


def test_detected_counts_equal_the_scene_on_renders():
    """On clean renders the detector's per-(colour, kind) counts are the scene's own labels (the same
    12-class layout as the scene encoder's head), for every task of the world."""
    detector, classify = ShapeDetector(), PaletteColorClassifier()
    checked = 0
    for prompt in toy_prompts("all")[::7]:
        for seed in range(3):
            scene = prompt.scene(seed)
            assert detected_counts(detector, classify, render(scene)).tolist() == count_labels([scene])[0].tolist(), (prompt.text, seed)
            checked += 1
    assert checked >= 60


def test_satisfies_checks_every_group_and_colour():
    two_red = find_prompt("a photo of two red circles")
    scene = two_red.scene(0)
    counts = count_labels([scene])[0]
    assert satisfies(two_red, counts)
    assert not satisfies(find_prompt("a photo of three red circles"), counts)
    assert not satisfies(find_prompt("a photo of two blue circles"), counts)
    assert satisfies(find_prompt("a photo of two circles"), counts)  # no colour asked: any colour counts
    attr = find_prompt("a photo of a red circle and a blue bar")
    assert satisfies(attr, count_labels([attr.scene(1)])[0])
    assert not satisfies(attr, count_labels([two_red.scene(1)])[0])
