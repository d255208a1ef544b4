"""The embedded tiny SD-Turbo-architecture model: offline tokenizer, save/load round trip, seeding."""

import open_clip
import pytest
import torch

from drpo_core.config import LoraConfig, ModelConfig
from drpo_core.models.generator import ModelLoadError, OneStepGenerator, candidate_noise, tokenize_prompts
from drpo_core.models.tiny_models import tiny_sd_turbo_path

TEXTS = ["a photo of a red car", "A  Photo of   GREEN dog!!", "héllo wörld, 1234 :) &amp; <b>tags</b>",
         "it's a cat's toy; they're here", "", "word " * 120, "emoji 😀 and ümlauts", "3.14 pies, 1/2 cakes"]


@pytest.fixture(scope="module")
def tiny_path():
    return tiny_sd_turbo_path()


@pytest.fixture(scope="module")
def generator(tiny_path):
    return OneStepGenerator(ModelConfig(path=str(tiny_path)), LoraConfig())


def test_tokenizer_matches_open_clip(tiny_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_path / "tokenizer")
    ours = tokenize_prompts(tok, TEXTS)
    ref = open_clip.tokenize(TEXTS)
    for i, text in enumerate(TEXTS):
        length = int(ours.attention_mask[i].sum())
        # identical content tokens (start, BPE ids, end, truncation at 77)...
        assert ours.input_ids[i, :length].tolist() == ref[i, :length].tolist(), text
        # ...and padding after the end token (open_clip pads with 0, ours with <|endoftext|>)
        assert (ref[i, length:] == 0).all() and (ours.input_ids[i, length:] == tok.pad_token_id).all()
    assert ours.input_ids[5, -1] == 49407 and ref[5, -1] == 49407  # truncated with the end token kept


def test_save_load_round_trip_is_exact(tiny_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_path, local_files_only=True)
    pipe.save_pretrained(tmp_path / "copy")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "copy", local_files_only=True)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_candidate_regenerated_from_its_seed_is_bit_identical(generator):
    torch.manual_seed(0)
    lat_a, img_a = generator.generate(["a photo of a red car"] * 3, [11, 12, 13])
    torch.manual_seed(999)  # global RNG state must not matter
    torch.randn(100)
    lat_b, img_b = generator.generate(["a photo of a red car"] * 3, [11, 12, 13])
    assert torch.equal(lat_a, lat_b) and torch.equal(img_a, img_b)
    assert not torch.equal(lat_a[0], lat_a[1])
    # alone (batch of one) it is the same candidate up to the kernels' batch-size-dependent rounding
    lat_c, img_c = generator.generate(["a photo of a red car"], [12])
    torch.testing.assert_close(lat_c, lat_a[1:2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(img_c, img_a[1:2], rtol=1e-4, atol=1e-5)


def test_noise_depends_only_on_seed():
    a = candidate_noise([5, 6], (4, 8, 8), torch.device("cpu"))
    b = candidate_noise([6], (4, 8, 8), torch.device("cpu"))
    assert torch.equal(a[1], b[0]) and a.std() > 0.5


def test_policy_starts_at_base_and_base_is_adapter_disabled(generator):
    lat_policy, _ = generator.generate(["a photo of a blue cup"], [3])
    lat_base, _ = generator.generate(["a photo of a blue cup"], [3], base=True)
    torch.testing.assert_close(lat_policy, lat_base)  # LoRA B starts at zero
    with torch.no_grad():
        for p in generator.trainable_parameters():
            p.add_(0.05)
    moved, _ = generator.generate(["a photo of a blue cup"], [3])
    base_again, _ = generator.generate(["a photo of a blue cup"], [3], base=True)
    assert not torch.allclose(moved, lat_base) and torch.equal(base_again, lat_base)
    with torch.no_grad():
        for p in generator.trainable_parameters():
            p.sub_(0.05)


def test_bad_model_paths_fail_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        OneStepGenerator(ModelConfig(path=str(tmp_path / "nope")), LoraConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline"):
        OneStepGenerator(ModelConfig(path=str(tmp_path / "empty")), LoraConfig())


def test_lora_targets_matching_nothing_fail_clearly(tiny_path):
    with pytest.raises(ModelLoadError, match="match no module"):
        OneStepGenerator(ModelConfig(path=str(tiny_path)), LoraConfig(target_modules=["no_such_layer"]))
