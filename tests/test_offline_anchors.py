"""Offline anchors: the dataset format's errors, and the distance ranking on a case with a known order."""

import json

import pytest
import torch
from PIL import Image

from drpo_core.training.offline_anchors import distance_margin_scores, load_images, load_preference_dataset


def test_distance_margin_ranks_candidates_closest_to_chosen_first():
    chosen, rejected = {"k": torch.ones(2, 1, 4)}, {"k": -torch.ones(2, 1, 4)}
    t = torch.tensor([0.9, -0.8, 0.1, 0.5])[:, None, None]  # positions along the chosen − rejected axis
    scores = distance_margin_scores({"k": t * torch.ones(4, 1, 4)}, chosen, rejected)
    assert scores.argsort(descending=True).tolist() == [0, 3, 2, 1]
    assert scores.mean().abs() < 1e-6  # z-scored per key
    two = distance_margin_scores({"k": t * torch.ones(4, 1, 4), "j": t * torch.ones(4, 1, 4)},
                                 {**chosen, "j": chosen["k"]}, {**rejected, "j": rejected["k"]})
    torch.testing.assert_close(two, scores)  # the mean over keys of identical keys is the key


def test_loader_reads_relative_paths_and_single_strings(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "c.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "r.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c.png", "rejected": ["r.png"]}) + "\n\n")
    rec = load_preference_dataset(tmp_path / "d.jsonl")["p"]
    images = load_images(rec.chosen + rec.rejected, 16)
    assert images.shape == (2, 3, 16, 16)
    assert images[0, 0].mean() > 0.99 and images[1, 2].mean() > 0.99


@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    (json.dumps({"chosen": ["c.png"], "rejected": ["c.png"]}), "'prompt' string"),
    (json.dumps({"prompt": "p", "chosen": [], "rejected": ["c.png"]}), "'chosen' must be"),
    (json.dumps({"prompt": "p", "chosen": ["c.png"], "rejected": ["gone.png"]}), "gone.png does not exist"),
])
def test_loader_errors_name_file_and_line(tmp_path, line, message):
    Image.new("RGB", (4, 4)).save(tmp_path / "c.png")
    (tmp_path / "d.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=message) as err:
        load_preference_dataset(tmp_path / "d.jsonl")
    assert "d.jsonl:1" in str(err.value)


def test_missing_dataset_and_duplicate_prompts(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_preference_dataset(tmp_path / "nope.jsonl")
    Image.new("RGB", (4, 4)).save(tmp_path / "c.png")
    rec = json.dumps({"prompt": "p", "chosen": "c.png", "rejected": "c.png"})
    (tmp_path / "d.jsonl").write_text(rec + "\n" + rec + "\n")
    with pytest.raises(ValueError, match="listed twice"):
        load_preference_dataset(tmp_path / "d.jsonl")
