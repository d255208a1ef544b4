"""The moving average of the trained weights (trainer.ema_decay): its arithmetic against a loop, that sampling
keeps the raw weights, checkpoints and exact resume, and that eval / export / init_from read the average."""

import json

import pytest
import torch
from safetensors.torch import load_file

from drpo_core.config import load_config
from drpo_core.models.model_card import read_lora
from drpo_core.training.checkpoint import EMA_FILE, CheckpointError, trained_weights_file
from drpo_core.training.trainer import DrpoTrainer
from services.cli.eval import load_for_eval

FAST = ["trainer.prompts_per_step=2", "algo.num_candidates=6", "algo.num_anchors=2", "trainer.lr=1e-2"]
BETA = 0.6  # far from 1, so one step's weight is visible in the average


def make(tmp_path, *overrides, name="run"):
    return DrpoTrainer(load_config([], [*FAST, f"trainer.ema_decay={BETA}", *overrides]), output_dir=tmp_path / name)


def weights(trainer):
    return {k: v.clone() for k, v in trainer.generator.trainable_state_dict().items()}


def test_average_equals_the_loop_and_sampling_keeps_the_raw_weights(tmp_path):
    trainer = make(tmp_path)
    expected = None
    for _ in range(3):
        trainer.train_step()
        raw = weights(trainer)
        if expected is None:  # diffusers' EMAModel takes the first step's weights as they are
            expected = raw
        else:  # θ_ema ← β θ_ema + (1 − β) θ
            expected = {k: BETA * expected[k] + (1 - BETA) * raw[k] for k in raw}
    average = trainer.learner.ema.state_dict()
    assert trainer.learner.ema.steps == 3
    for k in raw:
        torch.testing.assert_close(average[k], expected[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(average[k], raw[k]) for k in raw)
    assert all(torch.equal(weights(trainer)[k], raw[k]) for k in raw)  # reading the average left θ as it was, bit-exact
    with trainer.learner.averaged_weights():
        inside = weights(trainer)
    assert all(torch.equal(inside[k], average[k]) for k in raw)
    assert all(torch.equal(weights(trainer)[k], raw[k]) for k in raw)


def test_checkpoint_holds_the_average_and_resume_continues_it_exactly(tmp_path):
    straight = make(tmp_path, name="straight")
    for _ in range(4):
        straight.train_step()
    first = make(tmp_path, name="first")
    for _ in range(2):
        first.train_step()
    folder = first.save_checkpoint()
    assert (folder / EMA_FILE).is_file()
    ema, raw = load_file(str(folder / EMA_FILE)), load_file(str(folder / "trainable.safetensors"))
    assert ema.keys() == raw.keys() and any(not torch.equal(ema[k], raw[k]) for k in ema)
    assert json.loads((folder / "state.json").read_text())["ema"] == {"decay": BETA, "steps": 2}
    # what users load holds the average: lora.init_from / the PEFT export, and drpo eval by default
    assert all(torch.equal(read_lora(str(folder))[k], ema[k]) for k in ema)
    assert trained_weights_file(folder) == folder / EMA_FILE and trained_weights_file(folder, "raw").name == "trainable.safetensors"

    resumed = make(tmp_path, name="resumed")
    resumed.resume(folder)
    for _ in range(2):
        resumed.train_step()
    a, b = straight.learner.ema.state_dict(), resumed.learner.ema.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.learner.ema.steps == 4


def test_learner_state_carries_the_average_to_another_worker(tmp_path):
    """The data-parallel join broadcasts learner.state(): a worker that takes it holds rank 0's average."""
    one, other = make(tmp_path, name="one"), make(tmp_path, name="other")
    for _ in range(2):
        one.train_step()
    other.learner.load_state(one.learner.state())
    a, b = one.learner.ema.state_dict(), other.learner.ema.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and other.learner.ema.steps == 2


def test_eval_loads_the_average_by_default_and_the_raw_weights_on_request(tmp_path):
    trainer = make(tmp_path)
    trainer.train_step()
    trainer.train_step()  # the first step's weights start the average: two steps make it differ from θ
    folder = trainer.save_checkpoint()
    cfg = trainer.cfg
    ema, raw = load_file(str(folder / EMA_FILE)), load_file(str(folder / "trainable.safetensors"))
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    for which, want in (("auto", ema), ("ema", ema), ("raw", raw)):
        got, used = load_for_eval(cfg, tmp_path / "run", which)
        assert used == trained_weights_file(folder, which)
        got.unmerge_lora()
        state = got.trainable_state_dict()
        assert all(torch.equal(state[k], want[k]) for k in want), which


def test_run_without_an_average(tmp_path):
    """ema_decay 0 writes no average; asking eval for one is a one-line error; resuming it with an average starts
    the average at the resumed weights."""
    plain = DrpoTrainer(load_config([], FAST), output_dir=tmp_path / "plain")
    plain.train_step()
    folder = plain.save_checkpoint()
    assert not (folder / EMA_FILE).exists() and plain.learner.ema is None
    assert json.loads((folder / "state.json").read_text())["ema"] is None
    with pytest.raises(CheckpointError, match="no moving average"):
        trained_weights_file(folder, "ema")
    resumed = make(tmp_path, name="resumed")
    resumed.resume(folder)
    start = resumed.learner.ema.state_dict()
    raw = load_file(str(folder / "trainable.safetensors"))
    assert all(torch.equal(start[k], raw[k]) for k in raw) and resumed.learner.ema.steps == 0


def test_decay_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ema_decay"):
        load_config([], ["trainer.ema_decay=1.0"])


def test_deployable_files_hold_the_average(tmp_path):
    """The checkpoint's diffusers files (what drpo export copies and users load) are θ_ema, not θ."""
    lora_run = make(tmp_path, name="lora")
    lora_run.train_step()
    lora_run.train_step()
    folder = lora_run.save_checkpoint()
    only_lora = tmp_path / "only_lora"
    only_lora.mkdir()
    (only_lora / "pytorch_lora_weights.safetensors").write_bytes((folder / "pytorch_lora_weights.safetensors").read_bytes())
    ema, exported = load_file(str(folder / EMA_FILE)), read_lora(str(only_lora))
    assert exported.keys() == ema.keys() and all(torch.allclose(exported[k], ema[k]) for k in ema)

    full_run = make(tmp_path, "lora.enabled=false", "trainer.lr=1e-3", name="full")
    full_run.train_step()
    full_run.train_step()
    folder = full_run.save_checkpoint()
    ema, raw = load_file(str(folder / EMA_FILE)), load_file(str(folder / "trainable.safetensors"))
    unet = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(unet[k], ema[k]) for k in ema) and any(not torch.equal(unet[k], raw[k]) for k in raw)
