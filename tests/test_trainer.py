"""The single-process trainer: a real step on the tiny model, resume equivalence, skipped groups."""

import json

import pytest
import torch

from drpo_core.training.checkpoint import CheckpointError, latest_checkpoint
from drpo_core.config import load_config
from drpo_core.training.trainer import DrpoTrainer

FAST = ["trainer.prompts_per_step=2", "algo.num_candidates=6", "algo.num_anchors=2", "trainer.lr=1e-2"]


def make(tmp_path, *overrides, name="run"):
    return DrpoTrainer(load_config([], [*FAST, *overrides]), output_dir=tmp_path / name)


def weights(trainer):
    return {k: v.clone() for k, v in trainer.generator.trainable_state_dict().items()}


def test_one_step_updates_trainable_weights_and_reports(tmp_path):
    trainer = make(tmp_path)
    before = weights(trainer)
    stats = trainer.train_step()
    after = weights(trainer)
    assert stats["update/applied"] == 1.0 and stats["version"] == 1
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for key in ("reward/mean", "reward/std", "loss", "time/step_s", "loss/pref", "loss/ref", "update/grad_norm"):
        assert key in stats and stats[key] == stats[key], key  # present and not NaN


def test_resume_matches_uninterrupted_run_bitwise(tmp_path):
    straight = make(tmp_path, name="straight")
    for _ in range(4):
        straight.train_step()

    first = make(tmp_path, name="first")
    for _ in range(2):
        first.train_step()
    ckpt = first.save_checkpoint()
    del first

    resumed = make(tmp_path, name="resumed")
    resumed.resume(ckpt)
    assert resumed.step == 2 and resumed.learner.version == 2
    for _ in range(2):
        resumed.train_step()
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_layout_has_no_pickles(tmp_path):
    trainer = make(tmp_path)
    trainer.train_step()
    folder = trainer.save_checkpoint()
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["optimizer.safetensors", "pytorch_lora_weights.safetensors", "state.json", "trainable.safetensors"]
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 1 and state["version"] == 1 and "sampler" in state
    assert latest_checkpoint(tmp_path / "run") == folder


def test_resume_rejects_checkpoint_of_another_lora_shape(tmp_path):
    trainer = make(tmp_path)
    folder = trainer.save_checkpoint()
    other = make(tmp_path, "lora.rank=4", name="other")
    with pytest.raises(CheckpointError):
        other.resume(folder)


def test_shuffled_control_changes_ranking_not_machinery(tmp_path):
    trainer = make(tmp_path, "algo.shuffle_rewards=true")
    groups, _ = trainer.collect(0, ["a photo of a red car", "a photo of a blue cup"])
    for g in groups:
        raw = g.rewards["hue_fraction"]
        assert sorted(g.scores.tolist()) == pytest.approx(sorted(((raw - raw.mean()) / (raw.std(unbiased=False) + 1e-8)).tolist()), abs=1e-4)


def test_prompts_without_reward_signal_are_skipped_not_fatal(tmp_path):
    trainer = make(tmp_path, "prompts.colors=[red]", "prompts.template=a photo of a {object}")  # no colour → NaN scores
    stats = trainer.train_step()
    assert stats["update/applied"] == 0.0 and stats["skipped/too_few_valid"] == 2.0
    assert stats["reward/hue_fraction/missing"] == 12.0


def test_binary_reward_runs_extra_rounds(tmp_path):
    trainer = make(tmp_path, "algo.binary_threshold=0.2", "algo.max_extra_rounds=2")
    stats = trainer.train_step()
    assert "sampler/extra_rounds" in stats
    assert stats["update/kept_groups"] + sum(v for k, v in stats.items() if k.startswith("skipped/")) == 2


def test_jsonl_prompt_file_carries_metadata_to_groups(tmp_path):
    records = [{"tag": "colors", "prompt": "a photo of a red car", "include": [{"class": "car", "count": 1, "color": "red"}]},
               {"tag": "colors", "prompt": "a photo of a blue cup", "include": [{"class": "cup", "count": 1, "color": "blue"}]}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    trainer = make(tmp_path, f"prompts.file={path}")
    groups, _ = trainer.collect(0, trainer.prompts.next(2))
    assert {g.prompt: g.metadata for g in groups} == {r["prompt"]: r for r in records}


def test_bad_prompt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        make(tmp_path, f"prompts.file={path}")


def test_micro_batches_give_the_same_update(tmp_path):
    # AdamW's first step is ~lr·g/(|g|+eps): eps=1 makes it linear in g, so gradient equality shows as weight equality
    whole = make(tmp_path, "trainer.prompts_per_step=3", "trainer.eps=1.0", name="whole")
    chunked = make(tmp_path, "trainer.prompts_per_step=3", "trainer.eps=1.0", "trainer.micro_batch_prompts=1", name="chunked")
    a, b = whole.train_step(), chunked.train_step()
    # the loss value sums kernel terms of size ~60 computed in batches of another size: float noise ~5e-5 relative;
    # the weights (the gradient) agree to ~1e-7 of steps ~6e-4
    assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, abs(a["loss"]))
    wa, wb = weights(whole), weights(chunked)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)  # steps are ~1e-4: 1% of a step
    assert any(not torch.equal(wa[k], weights(make(tmp_path, name="fresh"))[k]) for k in wa)  # it did move
