"""Recipe details of the official code, each against a re-derivation written here: LoRA initialisation
(peft's default vs gaussian) and the clean-latent conversion x0 for a given ε̂ (official vs stock pipeline)."""

import math

import pytest
import torch

from drpo_core.config import ConfigError, LoraConfig, ModelConfig, load_config
from drpo_core.models.generator import OneStepGenerator
from drpo_core.models.tiny_models import tiny_sd_turbo_path


@pytest.fixture(scope="module")
def tiny_path():
    return str(tiny_sd_turbo_path())


def lora_pairs(gen):
    mods = {n: m for n, m in gen.unet.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    return [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in mods.values()]


def test_lora_init_default_is_peft_kaiming_uniform_and_gaussian_is_selectable(tiny_path):
    assert LoraConfig().init == "default"
    official = OneStepGenerator(ModelConfig(path=tiny_path), LoraConfig(rank=4))
    gaussian = OneStepGenerator(ModelConfig(path=tiny_path), LoraConfig(rank=4, init="gaussian"))
    for A, B in lora_pairs(official):  # kaiming_uniform(a=√5): U(−1/√fan_in, 1/√fan_in), std 1/√(3·fan_in)
        bound = 1 / math.sqrt(A.shape[1])
        assert A.abs().max() <= bound and torch.equal(B, torch.zeros_like(B))
        assert A.abs().max() > 0.8 * bound
    a = torch.cat([A.detach().flatten() for A, _ in lora_pairs(gaussian)])
    assert abs(float(a.std()) - 1 / 4) < 0.02  # N(0, 1/r) with r = 4
    assert all(torch.equal(B, torch.zeros_like(B)) for _, B in lora_pairs(gaussian))


def test_official_x0_for_a_given_eps_hat(tiny_path):
    gen = OneStepGenerator(ModelConfig(path=tiny_path, x0="official"), LoraConfig())
    noise = torch.randn(3, *gen.latent_shape, generator=torch.Generator().manual_seed(1))
    eps_hat = torch.randn(3, *gen.latent_shape, generator=torch.Generator().manual_seed(2))
    seen = {}

    def fake_unet(sample, t, cond):
        seen["sample"], seen["t"] = sample, t
        return eps_hat

    gen.unet_forward = fake_unet
    x0 = gen.predict_x0(noise, gen.encode_prompts(["a"] * 3))
    # official sdturbo.one_step_clean_latent, element by element: ((z − 0.9977ε̂)/0.0683)·0.9996 + 0.0292ε̂, z = ε
    for i, (z, e, got) in enumerate(zip(noise.flatten(), eps_hat.flatten(), x0.flatten())):
        if i % 97 == 0:
            assert abs(float(got) - ((float(z) - 0.9977 * float(e)) / 0.0683 * 0.9996 + 0.0292 * float(e))) < 1e-4
    assert torch.equal(seen["sample"], noise) and seen["t"].tolist() == [999] * 3  # the UNet sees ε unscaled


def test_pipeline_x0_for_a_given_eps_hat(tiny_path):
    gen = OneStepGenerator(ModelConfig(path=tiny_path), LoraConfig())
    from diffusers import DDPMScheduler

    abar = float(DDPMScheduler.from_pretrained(tiny_path, subfolder="scheduler").alphas_cumprod[999])
    noise = torch.randn(2, *gen.latent_shape, generator=torch.Generator().manual_seed(1))
    eps_hat = torch.randn(2, *gen.latent_shape, generator=torch.Generator().manual_seed(2))
    gen.unet_forward = lambda sample, t, cond: eps_hat
    x_t = math.sqrt(1 - abar) * noise
    want = (x_t - math.sqrt(1 - abar) * eps_hat) / math.sqrt(abar)
    torch.testing.assert_close(gen.predict_x0(noise, gen.encode_prompts(["a"] * 2)), want, rtol=1e-5, atol=1e-5)


def test_official_x0_only_where_its_constants_hold():
    with pytest.raises(ConfigError, match="model.x0"):
        load_config(overrides=["model.kind=sdxl-turbo", "model.path=tiny-sdxl", "model.x0=official"])
    with pytest.raises(ConfigError, match="model.x0"):
        load_config(overrides=["model.x0=official", "model.timestep=500"])


# -- β_l2 (latent MSE to the base), γ_feat (feature MSE to the base), key aggregation ------------------------
def _feats(seed, n, keys=("a", "b")):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, 2 + i, 5, generator=g, dtype=torch.float64) for i, k in enumerate(keys)}


def test_feature_l2_and_key_mean_against_loops():
    from drpo_core.algorithms.loss import drpo_group_loss
    from drpo_core.config import AlgoConfig

    x, pos, neg, ref = _feats(1, 6), _feats(2, 2), _feats(3, 2), _feats(4, 6)
    base = AlgoConfig(num_candidates=6, num_anchors=2)
    plain, _ = drpo_group_loss(x, pos, neg, ref, base)
    with_feat, stats = drpo_group_loss(x, pos, neg, ref, base.model_copy(update={"feature_l2_weight": 0.3}))
    oracle = 0.0  # official frozen_feature_l2: Σ_keys F.mse_loss(points(x), points(ref)), element by element
    for key in x:
        diffs = [float(a - b) ** 2 for a, b in zip(x[key].flatten().tolist(), ref[key].flatten().tolist())]
        oracle += sum(diffs) / len(diffs)
    assert abs(float(with_feat - plain) - 0.3 * oracle) < 1e-9 and abs(stats["loss/feature_l2"] - oracle) < 1e-9
    mean, _ = drpo_group_loss(x, pos, neg, ref, base.model_copy(update={"feature_l2_weight": 0.3, "key_aggregation": "mean"}))
    assert abs(float(mean) - float(with_feat) / 2) < 1e-9  # the official SDXL trainer: mean over its keys


def test_latent_l2_term_is_the_mse_of_policy_to_base_latents(tmp_path):
    from drpo_core.algorithms.groups import CandidateGroup
    from drpo_core.training.learner import DrpoLearner
    from drpo_core.training.trainer import DrpoTrainer

    cfg = load_config([], ["algo.num_candidates=4", "algo.num_anchors=1", "algo.latent_l2_weight=0.5"])
    trainer = DrpoTrainer(cfg, output_dir=tmp_path / "run")
    gen = trainer.generator
    with torch.no_grad():
        for p in gen.trainable_parameters():
            p.add_(0.05)  # B ≠ 0: the policy leaves the base
    groups = []
    for i, prompt in enumerate(["a photo of a red car", "a photo of a blue cup"]):
        seeds = [100 * i + j for j in range(4)]
        latents, images = gen.generate([prompt] * 4, seeds)
        base = gen.generate([prompt] * 4, seeds, base=True)[0]
        groups.append(CandidateGroup(group_id=str(i), prompt=prompt, seeds=seeds, latents=latents.float(), images=images,
                                     version=0, base_latents=base.float()))
    anchors = [(torch.tensor([3]), torch.tensor([0]))] * 2
    with_l2, stats = trainer.learner._chunk_loss(groups, anchors)
    without = DrpoLearner(gen, trainer.encoder, cfg.algo.model_copy(update={"latent_l2_weight": 0.0}), cfg.trainer)
    plain, _ = without._chunk_loss(groups, anchors)
    oracle = 0.0  # official ref_model_l2 = F.mse_loss(policy latents, base latents), per prompt, summed over the chunk
    for g in groups:
        diffs = [(a - b) ** 2 for a, b in zip(g.latents.flatten().tolist(), g.base_latents.flatten().tolist())]
        oracle += sum(diffs) / len(diffs)
    assert oracle > 1e-6
    assert abs(float((with_l2 - plain).detach()) - 0.5 * oracle) < 1e-4 * max(1.0, oracle)
    assert cfg.algo.model_copy(update={"lambda_ref": 0.0}).needs_base  # β_l2 alone still samples the base


def test_sampler_base_latents_skip_the_decode_but_equal_generate_base(tiny_path):
    from drpo_core.training.sampler import CandidateSampler

    gen = OneStepGenerator(ModelConfig(path=tiny_path), LoraConfig())
    with torch.no_grad():
        for p in gen.trainable_parameters():
            p.add_(0.05)
    group = CandidateSampler(gen, with_base=True).sample("g", "a photo of a red car", [1, 2, 3])
    assert torch.equal(group.base_latents, gen.generate(["a photo of a red car"] * 3, [1, 2, 3], base=True)[0].float())
    assert not torch.equal(group.base_latents, group.latents)
