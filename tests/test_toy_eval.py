"""`drpo pretrain-toy` (a few steps), loading its output like any model, and `drpo eval` / `drpo eval compare`."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from services.cli.main import app

runner = CliRunner()
TOY = "deploy/configs/toy.yaml"


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    """A toy base from `drpo pretrain-toy` with a handful of steps (seconds)."""
    out = tmp_path_factory.mktemp("toy") / "base"
    result = runner.invoke(app, ["pretrain-toy", "--output", str(out), "--steps", "3", "--vae-steps", "2",
                                 "--pool-per-prompt", "2", "--scene-steps", "2", "--scene-renders", "40", "--log-every", "1",
                                 "--caption-noise", "0.5", "--task-weights", "color_attr=0.35"])
    assert result.exit_code == 0, result.output
    return out


def test_pretrain_toy_writes_a_pipeline_the_generator_loads(toy_model):
    from diffusers import StableDiffusionPipeline

    from drpo_core.config import LoraConfig, ModelConfig
    from drpo_core.models.generator import OneStepGenerator
    from drpo_core.toyworld.pretrain import ToyOneStep

    log = [json.loads(line) for line in (toy_model / "pretrain_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("stage") == "generator"] == [1, 2, 3]
    summary = json.loads((toy_model / "pretrain_summary.json").read_text())
    assert summary["generator_steps"] == 3 and summary["settings"]["caption_noise"] == 0.5
    assert summary["settings"]["task_weights"]["color_attr"] == 0.35 and summary["settings"]["task_weights"]["counting"] == 0.25
    assert (toy_model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (toy_model / "scene_encoder" / "model.safetensors").is_file()  # the φ it was pretrained with
    gen = OneStepGenerator(ModelConfig(path=str(toy_model), resolution=32), LoraConfig(enabled=False))
    latents, images = gen.generate(["a photo of two red circles"] * 2, [0, 1])
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    # training-time arithmetic (ToyOneStep) == the project's generator on the saved weights
    pipe = StableDiffusionPipeline.from_pretrained(toy_model, torch_dtype=torch.float32)
    toy = ToyOneStep(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
    with torch.no_grad():
        again = toy(gen.noise([0, 1]), toy.encode(["a photo of two red circles"] * 2))
    torch.testing.assert_close(again, latents, atol=1e-5, rtol=1e-4)


def test_positive_pool_with_caption_noise_files_other_colours_under_a_prompt(toy_model):
    from diffusers import AutoencoderKL

    from drpo_core.toyworld.pretrain import PositivePool
    from drpo_core.toyworld.prompts import find_prompt

    vae = AutoencoderKL.from_pretrained(toy_model, subfolder="vae")
    prompts = [find_prompt("a photo of a red circle"), find_prompt("a photo of two circles")]
    clean, noisy = (PositivePool(prompts, 4, vae, caption_noise=rate).latents for rate in (0.0, 1.0))
    assert not torch.allclose(clean[0], noisy[0], atol=1e-4)  # every red circle is now another colour
    torch.testing.assert_close(clean[1], noisy[1])  # no colour named: nothing to get wrong


def test_pretrain_toy_refuses_a_used_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["pretrain-toy", "--output", str(tmp_path / "x"), "--steps", "1"])
    assert result.exit_code == 2 and "not an empty folder" in result.output
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def _eval(model, out, *extra):
    return runner.invoke(app, ["eval", "--config", TOY, "--set", f"model.path={model}", "--base", "--seeds", "0-2",
                               "--prompts", "toy-heldout", "--output-dir", str(out), *extra])


def test_eval_is_deterministic_and_writes_the_geneval_layout(toy_model, tmp_path):
    first, second = _eval(toy_model, tmp_path / "a"), _eval(toy_model, tmp_path / "b")
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert (tmp_path / "a" / "eval.json").read_bytes() == (tmp_path / "b" / "eval.json").read_bytes()
    record = json.loads((tmp_path / "a" / "eval.json").read_text())
    from drpo_core.toyworld.prompts import toy_prompts

    held = toy_prompts("heldout")
    assert record["prompts"] == [p.text for p in held] and record["seeds"] == [0, 1, 2]
    for label in ("geneval", "geneval_partial"):
        entry = record["rewards"][label]
        assert entry["n"] == 3 * len(held) and entry["n_prompts"] == len(held)
        assert set(entry["per_task"]) == {p.tag for p in held} | {"overall"}
        assert len(record["tables"][label]) == len(held)
    # GenEval layout: <index>/metadata.jsonl + <index>/samples/<k>.png, the images the generator makes
    from drpo_core.config import LoraConfig, ModelConfig
    from drpo_core.models.generator import OneStepGenerator

    gen = OneStepGenerator(ModelConfig(path=str(toy_model), resolution=32), LoraConfig(enabled=False))
    for index in (0, len(held) - 1):
        folder = tmp_path / "a" / "samples" / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == held[index].metadata()
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["00000.png", "00001.png", "00002.png"]
        _, images = gen.generate([held[index].text], [2])
        png = torch.from_numpy(__import__("numpy").array(Image.open(folder / "samples" / "00002.png"))).permute(2, 0, 1)
        assert (png.float() - (images[0] * 255).round()).abs().max() <= 1
    assert (tmp_path / "a" / "grid.png").is_file()


def test_eval_user_errors_exit_2(toy_model, tmp_path):
    both = runner.invoke(app, ["eval", "--config", TOY, "--base", "--checkpoint", str(tmp_path), "--output-dir", str(tmp_path / "o")])
    assert both.exit_code == 2 and "exactly one" in both.output
    assert _eval(toy_model, tmp_path / "o", "--seeds", "3-1").exit_code == 2
    assert "no-such" in _eval(toy_model, tmp_path / "o", "--prompts", "no-such.jsonl").output
    assert _eval(toy_model, tmp_path / "o", "--rewards", "nope").exit_code == 2
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "eval.json").write_text("{}")
    kept = _eval(toy_model, tmp_path / "done")
    assert kept.exit_code == 2 and (tmp_path / "done" / "eval.json").read_text() == "{}"


def test_parse_seeds():
    from drpo_core.training.eval_suite import parse_seeds

    assert parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds("5,0-1") == [5, 0, 1]
    for bad in ("3-1", "a", "1,1", ""):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_compare_pairs_cells_and_clusters_by_prompt(tmp_path):
    """compare == paired_gain on the shared cells; a prompt-level shift is one cluster, not S cells."""
    from drpo_core.training.eval_suite import compare
    from drpo_core.training.evaluation import paired_gain

    g = torch.Generator().manual_seed(0)
    a_tab = torch.rand(6, 4, generator=g)
    b_tab = a_tab + torch.tensor([0.5, 0.0, 0.1, 0.0, 0.3, 0.0])[:, None] + 0.01 * torch.rand(6, 4, generator=g)
    prompts, tags = [f"p{i}" for i in range(6)], ["counting", "colors"] * 3

    def record(tab, seeds, order):
        return {"prompts": [prompts[i] for i in order], "tags": [tags[i] for i in order], "seeds": seeds,
                "tables": {"r": [[tab[i, s].item() for s in range(len(seeds))] for i in order]}}

    a = record(a_tab, [0, 1, 2, 3], range(6))
    b = record(b_tab, [0, 1, 2, 3], [5, 4, 3, 2, 1, 0])  # prompt order differs: cells are matched by name
    out = compare(a, b)["rewards"]["r"]
    want = paired_gain(a_tab.double(), b_tab.double())
    assert out["all"]["gain"] == pytest.approx(want.gain) and out["all"]["gain_se"] == pytest.approx(want.gain_se)
    per_prompt = (b_tab - a_tab).double().mean(1)
    assert out["all"]["gain_se"] == pytest.approx(float(per_prompt.std() / 6**0.5))  # se of 6 prompt means
    assert out["counting"]["gain"] == pytest.approx(float((b_tab - a_tab)[[0, 2, 4]].mean()))
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    shown = runner.invoke(app, ["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert shown.exit_code == 0 and f"{want.gain:+8.4f}" in shown.output
    (tmp_path / "c.json").write_text(json.dumps(record(b_tab, [7, 8], range(6))))
    assert runner.invoke(app, ["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "c.json")]).exit_code == 2
    # every prompt of a subset gains the same: s.e. 0, and z is n/a in the table and null in the JSON, never inf
    (tmp_path / "fail.json").write_text(json.dumps(record(torch.zeros(6, 4), [0, 1, 2, 3], range(6))))
    (tmp_path / "half.json").write_text(json.dumps(record(torch.full((6, 4), 0.5), [0, 1, 2, 3], range(6))))
    shown = runner.invoke(app, ["eval", "compare", str(tmp_path / "fail.json"), str(tmp_path / "half.json"), "--json",
                                str(tmp_path / "d_cmp.json")])
    assert shown.exit_code == 0 and "inf" not in shown.output
    assert next(line for line in shown.output.splitlines() if line.startswith("r ") and " all " in line).split()[-1] == "n/a"
    assert json.loads((tmp_path / "d_cmp.json").read_text())["rewards"]["r"]["all"]["z"] is None


def test_pretrain_toy_rejects_an_unknown_feature_space(tmp_path):
    result = runner.invoke(app, ["pretrain-toy", "--output", str(tmp_path / "out"), "--feature-space", "pixels"])
    assert result.exit_code == 2
    assert "--feature-space 'pixels'" in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec, message", [("colour_attr=0.3", "unknown task 'colour_attr'"), ("color_attr=lots", "is not a number"),
                                           ("color_attr", "expected task=weight"), ("counting=-1", "negative")])
def test_pretrain_toy_rejects_bad_task_weights(tmp_path, spec, message):
    result = runner.invoke(app, ["pretrain-toy", "--output", str(tmp_path / "out"), "--task-weights", spec])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
