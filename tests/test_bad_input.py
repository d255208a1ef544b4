"""Bad user input, table-driven: each case ends in ONE line naming what is wrong (exit code 2 at the CLI),
never a traceback, a hang or a run of silently missing scores.

Config and prompt-file cases run in-process (the CLI turns every ConfigError / ValueError into that line,
shown by the end-to-end cases at the bottom); the reward cases use real in-process and HTTP rewards.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from drpo_core.config import ConfigError, PromptsConfig, load_config
from drpo_core.rewards.hue import HueFractionReward
from drpo_core.training.prompts import training_prompts
from drpo_core.training.scoring import RewardScorer
from drpo_core.algorithms.groups import CandidateGroup
from services.rewards.server import create_app
from services.rewards.clients import check_reward_endpoints
from tests.reward_servers import free_port, uvicorn_server

ROOT = Path(__file__).resolve().parents[1]


def one_line(message: str) -> str:
    assert message and "\n" not in message and "Traceback" not in message, message
    return message


# -- configs ----------------------------------------------------------------------------------------
CONFIG_CASES = [
    # unknown keys
    ("unknown top-level key", {}, ["nope=1"], "nope: unknown key"),
    ("unknown nested key", {}, ["algo.num_candiates=8"], "algo.num_candiates: unknown key"),
    ("unknown key in a reward", {}, ["rewards=[{kind: hue_fraction, colour: red}]"], "rewards.0.colour: unknown key"),
    ("unknown key in a role", {}, ["runtime.learner.gpus=1"], "runtime.learner.gpus: unknown key"),
    # wrong types
    ("text for an int", {}, ["trainer.steps=many"], "trainer.steps: Input should be a valid integer"),
    ("float for an int", {}, ["algo.num_candidates=8.5"], "algo.num_candidates"),
    ("scalar for a list", {}, ["algo.radii=0.2"], "algo.radii: Input should be a valid list"),
    ("scalar for a section", {}, ["trainer=5"], "trainer: Input should be a valid dictionary"),
    ("bad literal", {}, ["algo.kernel=gaussian"], "algo.kernel: Input should be 'laplacian', 'rbf' or 'cosine'"),
    ("negative lr", {}, ["trainer.lr=-0.1"], "trainer.lr: Input should be greater than 0"),
    ("zero radius", {}, ["algo.radii=[0.2, 0]"], "algo.radii: every radius must be > 0"),
    ("port out of range", {}, ["runtime.metrics_port=70000"], "runtime.metrics_port"),
    # impossible combinations
    ("2M > K", {}, ["algo.num_candidates=6", "algo.num_anchors=4"], "2*num_anchors (2M=8) exceeds num_candidates (K=6)"),
    ("K = 1", {}, ["algo.num_candidates=1"], "K must be >= 2"),
    ("no learner", {}, ["runtime.learner.replicas=0"], "runtime.learner.replicas"),
    ("retried updates", {}, ["runtime.learner.max_task_retries=1"], "not idempotent"),
    ("remote reward without url", {}, ["rewards=[{kind: http}]"], "reward kind 'http' needs 'url'"),
    ("flow_grpo without opt-in", {}, ["rewards=[{kind: flow_grpo, url: 'http://127.0.0.1:1'}]"], "allow_unsafe_pickle"),
    ("same reward twice", {}, ["rewards=[{kind: hue_fraction}, {kind: hue_fraction}]"], "reward names must be unique"),
    ("checkpoint for a ViT encoder", {}, ["features.kind=dinov2", "features.checkpoint=x.safetensors"], "is for kinds latent_resnet / latent_mae"),
    # malformed overrides
    ("override without =", {}, ["algo.num_candidates"], "expected key.path=value"),
    ("empty key", {}, ["algo..kernel=rbf"], "empty key"),
]


@pytest.mark.parametrize("name,files,overrides,needle", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_malformed_config_is_one_line_naming_the_field(name, files, overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config([], overrides)
    assert needle in one_line(str(err.value))


FILE_CASES = [
    ("missing file", None, "config file not found"),
    ("not YAML", "algo: [1, 2\n", "is not valid YAML"),
    ("a list at the top", "- 1\n- 2\n", "must hold a mapping at the top level"),
    ("unknown key in a file", "trainer:\n  stpes: 3\n", "trainer.stpes: unknown key"),
    ("wrong type in a file", "trainer:\n  steps: [3]\n", "trainer.steps: Input should be a valid integer"),
]


@pytest.mark.parametrize("name,text,needle", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_malformed_config_file_is_one_line(tmp_path, name, text, needle):
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config([path])
    assert needle in one_line(str(err.value))


# -- prompt files -----------------------------------------------------------------------------------
PROMPT_FILES = [
    ("missing", None, "prompts.txt", "prompts.file not found"),
    ("empty", "", "prompts.txt", "holds no prompts"),
    ("blank lines only", "\n  \n\n", "prompts.txt", "holds no prompts"),
    ("not UTF-8", b"a red car\n\xff\xfe\x00bad\n", "prompts.txt", "is not UTF-8 text"),
    ("jsonl: not JSON", '{"prompt": "a red car"}\n{prompt: 1}\n', "prompts.jsonl", "line 2: not JSON"),
    ("jsonl: no prompt key", '{"text": "a red car"}\n', "prompts.jsonl", "line 1: expected an object"),
    ("jsonl: prompt not a string", '{"prompt": 7}\n', "prompts.jsonl", "line 1: expected an object"),
    ("jsonl: empty prompt", '{"prompt": "  "}\n', "prompts.jsonl", "line 1: expected an object"),
    ("jsonl: a list, not an object", '["a red car"]\n', "prompts.jsonl", "line 1: expected an object"),
]


@pytest.mark.parametrize("name,content,filename,needle", PROMPT_FILES, ids=[c[0] for c in PROMPT_FILES])
def test_malformed_prompt_file_is_one_line_naming_file_and_line(tmp_path, name, content, filename, needle):
    path = tmp_path / filename
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as err:
        training_prompts(PromptsConfig(file=str(path)))
    assert needle in one_line(str(err.value)) and str(path) in str(err.value)


# -- custom rewards that break their contract -------------------------------------------------------
def group(n: int = 4) -> CandidateGroup:
    return CandidateGroup("0:0", "a photo of a red car", list(range(n)), torch.zeros(n, 4, 8, 8), torch.rand(n, 3, 16, 16), 0)


REWARD_ANSWERS = [
    ("too few scores", lambda images, *_: torch.zeros(images.shape[0] - 1), "returned 3 scores for 4 images"),
    ("two scores per image", lambda images, *_: torch.zeros(images.shape[0], 2), "returned 8 scores for 4 images"),
    ("strings", lambda images, *_: ["good"] * images.shape[0], "not one number per image"),
    ("a dict", lambda images, *_: {"scores": [1.0] * images.shape[0]}, "not one number per image"),
    ("nested ragged lists", lambda images, *_: [[1.0], [1.0, 2.0], [], [3.0]], "not one number per image"),
]


@pytest.mark.parametrize("name,fn,needle", REWARD_ANSWERS, ids=[c[0] for c in REWARD_ANSWERS])
def test_a_custom_reward_with_a_wrong_answer_is_named_in_one_line(name, fn, needle):
    with pytest.raises(ValueError) as err:
        RewardScorer({"custom": (fn, 1.0)}).score([group()])
    assert needle in one_line(str(err.value)) and "'custom'" in str(err.value)


def test_a_custom_reward_may_answer_in_any_numeric_dtype_or_shape_n_by_1():
    for answer in (torch.arange(4, dtype=torch.int64), torch.arange(4.0, dtype=torch.float64)[:, None], np.arange(4, dtype=np.uint8),
                   [True, False, True, False], torch.arange(4.0).half()):
        g = RewardScorer({"custom": (lambda *_: answer, 1.0)}).score([group()])[0]
        assert g.rewards["custom"].dtype == torch.float32 and g.rewards["custom"].shape == (4,)


def png_bytes(array: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_server_scores_16_bit_rgba_and_palette_pngs_like_their_8_bit_rgb_equivalent():
    """Images of another bit depth or colour type from a client score as the same picture in 8-bit RGB
    (a 16-bit PNG used to reach the reward with values up to 257 instead of 1)."""
    from PIL import Image

    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :5] = (220, 30, 30)  # mostly red
    rgb[:, 5:] = (30, 30, 220)
    grey16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    variants = {
        "rgb8": png_bytes(rgb),
        "rgba8": png_bytes(np.concatenate([rgb, np.full((8, 8, 1), 255, np.uint8)], axis=2)),
        "palette": base64.b64encode(_save(Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4))).decode(),
        "grey16": png_bytes(grey16),
        "grey8": png_bytes(((grey16.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)),
    }

    def mean_pixel(images, *_):
        return images.mean(dim=(1, 2, 3))

    with uvicorn_server(create_app(mean_pixel, name="mean_pixel")) as url:
        answer = httpx.post(f"{url}/score", json={"prompts": ["x"] * len(variants), "images": list(variants.values())}, timeout=60)
    assert answer.status_code == 200, answer.text
    scores = dict(zip(variants, answer.json()["scores"]))
    assert all(0.0 <= s <= 1.0 for s in scores.values()), scores
    assert scores["rgba8"] == pytest.approx(scores["rgb8"]) and scores["palette"] == pytest.approx(scores["rgb8"], abs=0.02)
    assert scores["grey16"] == pytest.approx(scores["grey8"], abs=1e-6)


def _save(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# -- unreachable reward servers at start-up ---------------------------------------------------------
@pytest.mark.parametrize("kind,url", [("http", "http://127.0.0.1:{port}/score"), ("grpc", "127.0.0.1:{port}")])
def test_an_unreachable_remote_reward_fails_at_start_up_in_one_line(kind, url):
    port = free_port()  # nothing listens there
    cfg = load_config([], [f"rewards=[{{kind: {kind}, url: '{url.format(port=port)}'}}]"])
    with pytest.raises(ValueError) as err:
        check_reward_endpoints(cfg)
    assert f"cannot connect to 127.0.0.1:{port}" in one_line(str(err.value))


def test_a_reachable_remote_reward_passes_the_start_up_check():
    with uvicorn_server(create_app(HueFractionReward(), name="hue")) as url:
        check_reward_endpoints(load_config([], [f"rewards=[{{kind: http, url: '{url}/score'}}]"]))


# -- end to end through the CLI: exit code 2, one line, nothing written -----------------------------
def drpo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("case", ["unreachable reward", "malformed prompt file", "wrong type"])
def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, case):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red car"}\nnot json\n')
    args = {"unreachable reward": ["--set", f"rewards=[{{kind: http, url: 'http://127.0.0.1:{free_port()}/score'}}]"],
            "malformed prompt file": ["--set", f"prompts.file={bad}"],
            "wrong type": ["--set", "algo.radii=wide"]}[case]
    out = tmp_path / "run"
    # one short step, so that a missing check ends in a finished run (and a failed assertion), not a long one
    short = ["--set", "trainer.steps=1", "--set", "trainer.heldout_eval_seeds=0", "--set", "algo.num_candidates=4",
             "--set", "algo.num_anchors=1"]
    proc = drpo("train", "--local", *args, *short, "--output-dir", str(out))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("drpo: error: "), proc.stderr[-2000:]
    assert not (out / "metrics.jsonl").exists()


def test_an_unwritable_checkpoint_folder_stops_the_run_in_one_line_and_keeps_what_was_done(tmp_path):
    """`checkpoints` is a file, so no checkpoint can be written (as with a read-only or full disk, without root):
    the run stops at its first checkpoint with one line naming the folder; the metrics of the steps done stay."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")
    proc = drpo("train", "--local", "--set", "trainer.steps=2", "--set", "trainer.checkpoint_every=1",
                "--set", "trainer.heldout_eval_seeds=0", "--set", "algo.num_candidates=4", "--set", "algo.num_anchors=1",
                "--output-dir", str(out))
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.lstrip().startswith(("DrPO", "━"))]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert lines[-1].startswith(f"drpo: error: cannot write to the run folder {out}") and "Traceback" not in proc.stderr
    assert (out / "metrics.jsonl").read_text().count('"step": 1') == 1


def test_feature_keys_that_the_latent_size_cannot_give_are_refused_at_start_in_one_line(tmp_path):
    """The official latent-MAE (4 stages) on the tiny model's 8x8 latents: layer4 is 1x1, so the recipe's 2x2 / 4x4
    patch keys do not exist. Refused while building, before any step (it used to die in the first update with a
    60-line traceback)."""
    from drpo_core.features.latent_mae import random_official_state

    mae = tmp_path / "mae_latent_256_torch.pth"  # the official layout: state_dict + metadata.model_config
    torch.save({"state_dict": random_official_state(4, 8, [3, 4, 6, 3], seed=0, flax=True),
                "metadata": {"model_config": {"layers": [3, 4, 6, 3], "in_channels": 4}}}, mae)
    out = tmp_path / "run"
    proc = drpo("train", "--local", "--config", "deploy/configs/tiny.yaml", "--set", "features.kind=latent_mae",
                "--set", f"features.checkpoint={mae}", "--set", "trainer.steps=1", "--output-dir", str(out))
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("drpo: error: features.keys: 'layer4_mean_2' is not defined for (8, 8) latents: layer4 maps are 1x1")
    assert "set features.keys" in lines[0] and not (out / "metrics.jsonl").exists()
