"""Resume restores the learning-rate schedule: a run stopped inside its warm-up continues on the same LR
curve and ends with the same weights as a run that was never stopped."""

import torch

from drpo_core.config import load_config
from drpo_core.training.trainer import DrpoTrainer

# warm-up over 4 updates: the LR of update n (1-based) is lr·n/4, so a scheduler restarted at step 0 would
# re-run the warm-up and every later update would be smaller
SCHEDULED = ["trainer.prompts_per_step=2", "algo.num_candidates=6", "algo.num_anchors=2", "trainer.lr=1e-2",
             "trainer.warmup_steps=4"]


def make(tmp_path, name):
    return DrpoTrainer(load_config([], SCHEDULED), output_dir=tmp_path / name)


def test_resume_inside_warmup_continues_the_lr_curve_and_matches_an_uninterrupted_run(tmp_path):
    straight = make(tmp_path, "straight")
    straight_lrs = [straight.train_step()["update/lr"] for _ in range(4)]
    assert straight_lrs == [0.005, 0.0075, 0.01, 0.01]  # the LR after updates 1..4 (LambdaLR reports the next one)

    first = make(tmp_path, "first")
    first_lrs = [first.train_step()["update/lr"] for _ in range(2)]
    checkpoint = first.save_checkpoint()
    del first

    resumed = make(tmp_path, "resumed")
    resumed.resume(checkpoint)
    resumed_lrs = [resumed.train_step()["update/lr"] for _ in range(2)]
    assert first_lrs + resumed_lrs == straight_lrs
    a = straight.generator.trainable_state_dict()
    b = resumed.generator.trainable_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
