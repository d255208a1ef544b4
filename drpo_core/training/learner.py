"""The learner (algorithm lines 7–14): rank, build detached drift targets, regress, step.

It recomputes the trainable forward G_θ(ε_i, c) on the candidates' own noises; the scored latents
serve only as detached anchors, so groups sampled with older weights (bounded staleness) are used
exactly as in the synchronous case.
"""

from __future__ import annotations

import contextlib

import torch

from drpo_core.config import AlgoConfig, TrainerConfig
from drpo_core.features.common import FeatureEncoder
from drpo_core.models.generator import OneStepGenerator
from drpo_core.algorithms.groups import CandidateGroup
from drpo_core.algorithms.loss import drpo_group_loss
from drpo_core.algorithms.ranking import select_anchors


def autocast_context(device: torch.device, mixed_precision: str):
    """bf16/fp16 autocast on GPU; fp32 on CPU (CPU autocast is slower than fp32 for these convs)."""
    if device.type != "cuda" or mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def _phi(encoder: FeatureEncoder, latents: torch.Tensor, prompts: list[str]):
    """φ(latents); a prompt-conditioned encoder (official teacher UNet) also gets each latent's prompt."""
    return encoder(latents, prompts=prompts) if getattr(encoder, "needs_prompts", False) else encoder(latents)


def _select(feats: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in feats.items()}


class DrpoLearner:
    """Plain worker class holding the optimizer; ``update(groups)`` is one DrPO step."""

    def __init__(self, generator: OneStepGenerator, encoder: FeatureEncoder, algo: AlgoConfig, trainer: TrainerConfig):
        self.generator, self.encoder, self.algo, self.trainer_cfg = generator, encoder, algo, trainer
        params = generator.trainable_parameters()
        if not params:
            raise ValueError("the generator has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=trainer.lr, betas=tuple(trainer.betas), eps=trainer.eps,
                                           weight_decay=trainer.weight_decay)
        warmup = trainer.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        # fp16 autocast needs loss scaling against gradient underflow; a no-op otherwise
        fp16 = generator.device.type == "cuda" and trainer.mixed_precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.version = 0  # number of optimizer updates applied

    def update(self, groups: list[CandidateGroup]) -> dict[str, float]:
        K, M = self.algo.num_candidates, self.algo.num_anchors
        stats: dict[str, float] = {"update/groups": float(len(groups))}
        # DrPO line 7: disjoint top-M / bottom-M per prompt from the ranking scores
        kept, anchors = [], []
        for g in groups:
            sel = select_anchors(g.scores[None], M, binary_threshold=self.algo.binary_threshold)
            for reason, n in sel.skipped.items():
                stats[f"skipped/{reason}"] = stats.get(f"skipped/{reason}", 0.0) + n
            if bool(sel.keep[0]):
                kept.append(g)
                anchors.append((sel.pos_idx[0], sel.neg_idx[0]))
        stats["update/kept_groups"] = float(len(kept))
        stats["update/applied"] = 0.0
        if not kept:
            return stats

        # DrPO lines 8–14 in micro-batches of prompts: the loss is a mean over prompts, so accumulating
        # each chunk's share of the gradient is exact and bounds activation memory
        self.optimizer.zero_grad(set_to_none=True)
        chunk = self.trainer_cfg.micro_batch_prompts or len(kept)
        total, sums = 0.0, {}
        for start in range(0, len(kept), chunk):
            loss, part_stats = self._chunk_loss(kept[start:start + chunk], anchors[start:start + chunk])
            loss = loss / len(kept)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite DrPO loss {float(loss.detach())} at version {self.version}")
            self.scaler.scale(loss).backward()  # the reward is never differentiated
            total += float(loss.detach())
            for k, v in part_stats.items():
                sums[k] = sums.get(k, 0.0) + v / len(kept)

        # clip, AdamW
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.generator.trainable_parameters(), self.trainer_cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.version += 1
        stats.update(sums)
        stats.update({"loss": total, "update/applied": 1.0, "update/grad_norm": float(grad_norm),
                      "update/lr": self.scheduler.get_last_lr()[0],
                      "update/policy_lag": float(sum(self.version - 1 - g.version for g in kept)) / len(kept)})
        return stats

    def _chunk_loss(self, kept: list[CandidateGroup], anchors: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
        """Σ over the chunk's prompts of the per-prompt DrPO loss, and Σ of their stats."""
        K, M = self.algo.num_candidates, self.algo.num_anchors
        gen = self.generator
        device = gen.device
        with autocast_context(device, self.trainer_cfg.mixed_precision):
            # DrPO line 4 (with grad): x_i = G_θ(ε_i, c) on the candidates' own noises
            seeds = [s for g in kept for s in g.seeds[:K]]
            prompts = [g.prompt for g in kept for _ in range(K)]
            x = gen.predict_x0(gen.noise(seeds), gen.encode_prompts(prompts))
            gen_feats = _phi(self.encoder, x, prompts)  # key -> [B·K, L, D]
        with torch.no_grad():
            anchor_latents = torch.cat([g.latents[torch.cat([p, n])] for g, (p, n) in zip(kept, anchors)]).to(device)
            anchor_feats = _phi(self.encoder, anchor_latents, [g.prompt for g in kept for _ in range(2 * M)])  # [B·2M, L, D]
            use_ref = self.algo.lambda_ref > 0 or self.algo.feature_l2_weight > 0
            base_latents = torch.cat([g.base_latents for g in kept]).to(device) if self.algo.needs_base else None
            ref_feats = _phi(self.encoder, base_latents, prompts) if use_ref else None

        # DrPO lines 8–13: per-prompt drift targets and regression
        total = torch.zeros((), device=device)
        sums: dict[str, float] = {}
        for b in range(len(kept)):
            group = slice(b * K, (b + 1) * K)
            mine = {k: v[group].float() for k, v in gen_feats.items()}
            a = {k: v[b * 2 * M:(b + 1) * 2 * M].float() for k, v in anchor_feats.items()}
            ref = {k: v[group].float() for k, v in ref_feats.items()} if use_ref else None
            loss, s = drpo_group_loss(mine, _select(a, slice(0, M)), _select(a, slice(M, 2 * M)), ref, self.algo)
            if self.algo.latent_l2_weight > 0:  # β_l2: the official ref_model_l2 term on the latents themselves
                latent_l2 = (x[group].float() - base_latents[group].float()).square().mean()
                loss = loss + self.algo.latent_l2_weight * latent_l2
                s["loss/latent_l2"] = float(latent_l2.detach())
            total = total + loss
            for k, v in s.items():
                sums[k] = sums.get(k, 0.0) + v
        return total, sums

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "version": self.version,
                "scaler": self.scaler.state_dict()}

    def load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.version = int(state["version"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
