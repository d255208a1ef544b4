"""Generators keep the LoRA merged between weight versions: the same samples as the unmerged LoRA path,
W₀ restored bit-exactly, one merge per version however often the frozen base is sampled in between."""

import torch

from drpo_core.config import load_config
from drpo_core.models.generator_factory import load_generator
from drpo_core.training.sampler import CandidateSampler
from services.runtime.actors import GeneratorActor, GroupRequest
from services.runtime.weights import WeightsHandle, pack_state


def test_merged_generator_actor_samples_like_the_unmerged_lora_and_merges_once_per_version():
    torch.set_num_threads(1)
    cfg = load_config([], ["algo.num_candidates=4", "algo.num_anchors=1", "model.merge_lora_for_sampling=true"])
    actor = GeneratorActor(cfg.model_dump_json())
    merger = actor.sampler.generator._merger
    assert merger.merged and merger.keep_merged
    unmerged = cfg.model.model_copy(update={"merge_lora_for_sampling": False})
    plain = CandidateSampler(load_generator(unmerged, cfg.lora), with_base=True)  # the unmerged LoRA path
    assert not GeneratorActor(load_config([], ["algo.num_candidates=4", "algo.num_anchors=1"]).model_dump_json()
                              ).sampler.generator._merger.merged  # off by default (CPU: merging does not help)
    w0 = {name: layer.get_base_layer().weight.clone() for name, layer in plain.generator._merger.layers}
    request = GroupRequest("0:0", 0, 0, "a photo of a red car", [11, 12, 13, 14])
    gen = torch.Generator().manual_seed(0)
    for version in (1, 2):  # a trained-looking LoRA per version (B ≠ 0), published like the learner does
        state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in plain.generator.trainable_state_dict().items()}
        plain.set_weights(state, version)
        want = plain.sample(request.group_id, request.prompt, request.seeds)
        for _ in range(2):  # the second request of a version pulls nothing and must not merge again
            for_reward, for_learner, info = actor.generate(WeightsHandle(version, pack_state(state)), request)
            assert info.version == version
            torch.testing.assert_close(for_learner.latents, want.latents, rtol=1e-4, atol=1e-5)
            assert torch.equal(for_learner.base_latents, want.base_latents)  # the base ran on the exact W₀
            assert (for_reward.images.int() - want.images.int()).abs().max() <= 1  # uint8 levels
        assert merger.merges == 1 + version  # the start-up merge + one per version, despite 4 base swaps
    actor.sampler.generator.unmerge_lora()
    for name, layer in merger.layers:
        assert torch.equal(layer.get_base_layer().weight, w0[name]), name  # W₀ back bit for bit


def test_a_batched_generate_call_makes_the_groups_of_one_call_per_group():
    """runtime.generator.batch_groups: groups of one step in one forward == one call per group (float tolerance)."""
    torch.set_num_threads(1)
    cfg = load_config([], ["algo.num_candidates=4", "algo.num_anchors=1"])
    actor = GeneratorActor(cfg.model_dump_json())
    weights = WeightsHandle(0, pack_state(actor.sampler.generator.trainable_state_dict()))
    requests = [GroupRequest(f"0:{s}", 0, s, p, [100 * s + i for i in range(4)], {"slot": s})
                for s, p in enumerate(["a photo of a red car", "a photo of a blue cup", "a photo of a green kite"])]
    *views, infos = actor.generate_batch(weights, *requests)
    assert len(views) == 6 and [i.group_id for i in infos] == ["0:0", "0:1", "0:2"]
    for k, request in enumerate(requests):
        for_reward, for_learner, _ = actor.generate(weights, request)
        got_reward, got_learner = views[2 * k], views[2 * k + 1]
        assert got_learner.group_id == request.group_id and got_learner.seeds == request.seeds
        assert got_reward.metadata == {"slot": k} and got_reward.prompt == request.prompt
        torch.testing.assert_close(got_learner.latents, for_learner.latents, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_learner.base_latents, for_learner.base_latents, rtol=1e-4, atol=1e-5)
        assert (got_reward.images.int() - for_reward.images.int()).abs().max() <= 1
