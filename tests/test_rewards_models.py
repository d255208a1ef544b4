"""Model rewards (HPS-style open_clip, PickScore, CLIP score) on tiny random models saved and loaded back."""

from __future__ import annotations

import pickle

import pytest
import torch

from drpo_core.config import RewardConfig
from drpo_core.rewards import build_reward
from drpo_core.rewards.clip_score import ClipScoreReward
from drpo_core.rewards.hps import HpsStyleReward, infer_hps_version, letterbox
from drpo_core.rewards.pickscore import PickScoreReward
from tests.tiny_reward_models import (
    TINY_OPENCLIP_CONFIG, build_openclip_state_dict, build_tiny_hf_clip, write_openclip_config,
)

PROMPTS = ["a photo of a red car", "a blue bird", "a photo of a red car", "a green house",
           "a purple flower on a table", "a blue bird", "a cup", "a boat at sea"]


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(8, 3, 40, 56, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    """Tiny open_clip config + its weights as an official-style .pt ({"state_dict": ...}) and as safetensors."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("hps")
    config = write_openclip_config(folder)
    state = build_openclip_state_dict(config, seed=3)
    torch.save({"epoch": 1, "state_dict": state}, folder / "HPS_v2.1_compressed.pt")
    save_file(state, str(folder / "hps-tiny.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, folder / "HPS_v2_ddp.pt")
    return {"config": config, "state": state, "pt": folder / "HPS_v2.1_compressed.pt",
            "safetensors": folder / "hps-tiny.safetensors", "ddp": folder / "HPS_v2_ddp.pt", "folder": folder}


@pytest.fixture(scope="module")
def hps(hps_files) -> HpsStyleReward:
    return HpsStyleReward(str(hps_files["pt"]), architecture=str(hps_files["config"]), device="cpu")


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """PickScore layout: model folder and a separate processor folder (tokenizer + preprocessor config)."""
    root = tmp_path_factory.mktemp("clip")
    build_tiny_hf_clip(root / "model", root / "processor", seed=3)  # seed 3: cosines of both signs
    return root / "model", root / "processor"


# --- HPS-style open_clip reward -------------------------------------------------------------------


def test_hps_loads_checkpoint_weights_and_labels_version(hps, hps_files):
    assert hps.version == "hpsv2.1" and hps.model_id == "hps-openclip/drpo-tiny-hps"
    loaded = hps.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in hps_files["state"].items())
    assert hps.load_report == {"missing": [], "unexpected": []}


def test_hps_score_is_cosine_of_letterboxed_image_and_prompt(hps, images):
    scores = hps(images, PROMPTS)
    assert scores.shape == (8,) and scores.dtype == torch.float32
    # independent recomputation through open_clip's forward (normalised features, no logit_scale)
    import open_clip

    pixels = (letterbox(images, 32) - torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = hps.model(pixels, open_clip.get_tokenizer("drpo-tiny-hps")(PROMPTS))
    image_features, text_features = out[0], out[1]  # forward() returns normalised features
    expected = (image_features * text_features).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert scores.abs().max() <= 1.0
    assert scores[0] != scores[2]  # same prompt, different images


def test_hps_is_deterministic_and_batching_invariant(hps_files, images):
    one = HpsStyleReward(str(hps_files["pt"]), architecture=str(hps_files["config"]), device="cpu", batch_size=1)
    eight = HpsStyleReward(str(hps_files["pt"]), architecture=str(hps_files["config"]), device="cpu", batch_size=8)
    a, b = one(images, PROMPTS), eight(images, PROMPTS)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(eight(images, PROMPTS), b, atol=0, rtol=0)
    torch.testing.assert_close(eight(images[3:4], PROMPTS[3:4]), b[3:4], atol=1e-5, rtol=0)


def test_hps_safetensors_and_ddp_prefixed_checkpoints_give_the_same_scores(hps, hps_files, images):
    from_st = HpsStyleReward(str(hps_files["safetensors"]), version="hpsv2.1", architecture=str(hps_files["config"]),
                             device="cpu")
    from_ddp = HpsStyleReward(str(hps_files["ddp"]), architecture=str(hps_files["config"]), device="cpu")
    assert from_ddp.version == "hpsv2.0"  # "HPS_v2_..." is the v2.0 file name
    expected = hps(images, PROMPTS)
    torch.testing.assert_close(from_st(images, PROMPTS), expected, atol=0, rtol=0)
    torch.testing.assert_close(from_ddp(images, PROMPTS), expected, atol=0, rtol=0)


def test_letterbox_matches_hpsv2_resize_max_size_on_pil():
    """HPSv2's ResizeMaxSize (PIL bicubic resize of the longest side, centred zero padding) vs ours."""
    import torchvision.transforms.functional as TF

    image = torch.rand(3, 30, 48, generator=torch.Generator().manual_seed(2))
    pil = TF.to_pil_image((image * 255).round().to(torch.uint8))
    scale = 32 / max(30, 48)
    new_h, new_w = round(30 * scale), round(48 * scale)
    ref = TF.resize(pil, [new_h, new_w], TF.InterpolationMode.BICUBIC)
    pad_h, pad_w = 32 - new_h, 32 - new_w
    ref = TF.to_tensor(TF.pad(ref, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0))
    ours = letterbox((image * 255).round()[None] / 255, 32)[0]
    assert ours.shape == ref.shape == (3, 32, 32)
    top, bottom = pad_h // 2, 32 - (pad_h - pad_h // 2)  # 6 rows of zero padding above and below
    assert top == 6 and bottom == 26
    for padded in (ours, ref):
        assert padded[:, :top].abs().max() == 0 and padded[:, bottom:].abs().max() == 0
    # PIL's 8-bit bicubic vs torch's float bicubic (both antialiased): small per-pixel differences only
    assert (ours - ref)[:, top:bottom].abs().mean() < 0.005, (ours - ref).abs().mean()


def test_hps_version_inference_and_required_label(hps_files):
    assert infer_hps_version("HPS_v2.1_compressed.pt") == "hpsv2.1"
    assert infer_hps_version("HPS_v2_compressed.pt") == "hpsv2.0"
    assert infer_hps_version("my_reward.pt") is None
    with pytest.raises(ValueError, match="options.version"):
        HpsStyleReward(str(hps_files["safetensors"]), architecture=str(hps_files["config"]), device="cpu")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_hps_loading_errors_are_one_clear_line(hps_files, tmp_path):
    arch = str(hps_files["config"])
    with pytest.raises(ValueError, match="path .* does not exist"):
        HpsStyleReward(str(tmp_path / "HPS_v2.1_missing.pt"), architecture=arch)
    with pytest.raises(ValueError, match="path is required"):
        HpsStyleReward(None, architecture=arch)
    garbage = tmp_path / "HPS_v2.1_garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable weights-only torch checkpoint"):
        HpsStyleReward(str(garbage), architecture=arch)
    unsafe = tmp_path / "HPS_v2.1_unsafe.pt"
    unsafe.write_bytes(pickle.dumps({"state_dict": {"x": object()}}))
    with pytest.raises(ValueError, match="weights-only"):
        HpsStyleReward(str(unsafe), architecture=arch)
    other = dict(TINY_OPENCLIP_CONFIG, embed_dim=8)  # a checkpoint of another architecture
    wrong = tmp_path / "HPS_v2.1_wrong.pt"
    torch.save({"state_dict": build_openclip_state_dict(write_openclip_config(tmp_path, "drpo-tiny-other", other))}, wrong)
    with pytest.raises(ValueError, match="does not fit open_clip drpo-tiny-hps"):
        HpsStyleReward(str(wrong), architecture=arch)
    partial = tmp_path / "HPS_v2.1_partial.pt"
    torch.save({k: v for k, v in hps_files["state"].items() if not k.startswith("visual.")}, partial)
    with pytest.raises(ValueError, match="missing keys"):
        HpsStyleReward(str(partial), architecture=arch)
    with pytest.raises(ValueError, match="not an open_clip model config"):
        HpsStyleReward(str(hps_files["pt"]), architecture="no-such-arch")


def test_hps_rejects_bad_inputs(hps, images):
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        hps(images[:, :1], PROMPTS)
    with pytest.raises(ValueError, match="7 prompts for 8 images"):
        hps(images, PROMPTS[:7])


# --- PickScore and CLIP score (transformers CLIPModel) ---------------------------------------------


def _reference_logits(model_dir, processor_dir, images, prompts):
    """transformers' own CLIP forward: logits_per_image = logit_scale · cos (the PickScore formula)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(processor_dir)(prompts, padding=True, return_tensors="pt")
    pixels = AutoImageProcessor.from_pretrained(processor_dir)(images=list(images), do_rescale=False,
                                                                return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pixels)
    return out.logits_per_image.diagonal(), float(model.logit_scale.exp().detach())


def test_pickscore_is_logit_scaled_cosine(clip_dirs, images):
    model_dir, processor_dir = clip_dirs
    reward = PickScoreReward(str(model_dir), processor_path=str(processor_dir), device="cpu")
    assert reward.model_id == "pickscore" and reward.version == "pickscore_v1"
    scores = reward(images, PROMPTS)
    expected, _ = _reference_logits(model_dir, processor_dir, images, PROMPTS)
    assert scores.shape == (8,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)


def test_clip_score_is_100_times_clamped_cosine(clip_dirs, images):
    model_dir, processor_dir = clip_dirs
    reward = ClipScoreReward(str(model_dir), processor_path=str(processor_dir), device="cpu")
    assert reward.model_id == "clip-score" and reward.version == "clip-score/model"
    logits, logit_scale = _reference_logits(model_dir, processor_dir, images, PROMPTS)
    cos = logits / logit_scale
    assert (cos < 0).any() and (cos > 0).any()  # both branches of max(cos, 0) are exercised
    torch.testing.assert_close(reward(images, PROMPTS), 100 * cos.clamp_min(0), atol=1e-4, rtol=0)
    hessel = ClipScoreReward(str(model_dir), processor_path=str(processor_dir), scale=2.5, device="cpu")
    torch.testing.assert_close(hessel(images, PROMPTS), 2.5 * cos.clamp_min(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [PickScoreReward, ClipScoreReward])
def test_hf_clip_rewards_are_deterministic_and_batching_invariant(cls, clip_dirs, images):
    model_dir, processor_dir = clip_dirs
    one = cls(str(model_dir), processor_path=str(processor_dir), device="cpu", batch_size=1)
    eight = cls(str(model_dir), processor_path=str(processor_dir), device="cpu", batch_size=8)
    b = eight(images, PROMPTS)
    torch.testing.assert_close(one(images, PROMPTS), b, atol=1e-4, rtol=0)
    torch.testing.assert_close(eight(images, PROMPTS), b, atol=0, rtol=0)


def test_hf_clip_loading_errors_are_one_clear_line(clip_dirs, tmp_path):
    model_dir, processor_dir = clip_dirs
    with pytest.raises(ValueError, match="reward 'pickscore': path .* does not exist"):
        PickScoreReward(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="has no preprocessor_config.json"):
        PickScoreReward(str(model_dir))  # PickScore's processor lives elsewhere: processor_path is needed
    with pytest.raises(ValueError, match="options.processor_path .* does not exist"):
        PickScoreReward(str(model_dir), processor_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="has no config.json"):
        ClipScoreReward(str(processor_dir))


# --- build_reward branches -------------------------------------------------------------------------


def test_build_reward_constructs_model_rewards_from_config(hps, hps_files, clip_dirs, images):
    model_dir, processor_dir = clip_dirs
    built = build_reward(RewardConfig(kind="hps", path=str(hps_files["pt"]),
                                      options={"architecture": str(hps_files["config"]), "device": "cpu"}))
    assert isinstance(built, HpsStyleReward) and built.version == "hpsv2.1"
    torch.testing.assert_close(built(images, PROMPTS), hps(images, PROMPTS), atol=0, rtol=0)
    pick = build_reward(RewardConfig(kind="pickscore", path=str(model_dir),
                                     options={"processor_path": str(processor_dir), "device": "cpu"}))
    clip = build_reward(RewardConfig(kind="clip", path=str(model_dir),
                                     options={"processor_path": str(processor_dir), "device": "cpu"}))
    assert isinstance(pick, PickScoreReward) and isinstance(clip, ClipScoreReward)
    assert pick(images, PROMPTS).shape == clip(images, PROMPTS).shape == (8,)


@pytest.mark.parametrize("kind", ["hps", "pickscore", "clip", "geneval"])
def test_build_reward_missing_path_names_the_field(kind, tmp_path):
    with pytest.raises(ValueError, match=f"reward '{kind}': path.* is required"):
        build_reward(RewardConfig(kind=kind))
    with pytest.raises(ValueError, match="does not exist"):
        build_reward(RewardConfig(kind=kind, path=str(tmp_path / "missing")))


def test_build_reward_rejects_unknown_options(hps_files):
    with pytest.raises(ValueError, match=r"rewards\[hps\]\.options: .*'colour'"):
        build_reward(RewardConfig(kind="hps", path=str(hps_files["pt"]), options={"colour": "red"}))
