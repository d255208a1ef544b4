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
from drpo_core.algorithms.binary_pools import official_binary_pools
from drpo_core.algorithms.groups import CandidateGroup, stable_seed
from drpo_core.algorithms.loss import drpo_group_loss
from drpo_core.algorithms.ranking import select_anchors
from drpo_core.training import data_parallel
from drpo_core.training.ema import TrainableEMA
from drpo_core.training.objectives import build_objective
from drpo_core.training.precision import autocast_context, needs_grad_scaler  # noqa: F401 (autocast_context re-exported)


def _phi(encoder: FeatureEncoder, latents: torch.Tensor, prompts: list[str]):
    """φ(latents); a prompt-conditioned encoder (official teacher UNet) also gets each latent's prompt."""
    return encoder(latents, prompts=prompts) if getattr(encoder, "needs_prompts", False) else encoder(latents)


def _select(feats: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in feats.items()}


class DrpoLearner:
    """Plain worker class holding the optimizer; ``update(groups)`` is one DrPO step.

    ``algo.kind`` other than ``drpo`` (or offline anchors) swaps only the loss: the objective of
    :mod:`drpo_core.training.objectives`, with the same micro-batching, clipping and AdamW step.
    ``rewards`` (label → (fn, weight)) are needed in the learner only by DRaFT.
    """

    def __init__(self, generator: OneStepGenerator, encoder: FeatureEncoder, algo: AlgoConfig, trainer: TrainerConfig,
                 rewards: dict[str, tuple] | None = None):
        self.generator, self.encoder, self.algo, self.trainer_cfg = generator, encoder, algo, trainer
        params = generator.trainable_parameters()
        if not params:
            raise ValueError("the generator has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=trainer.lr, betas=tuple(trainer.betas), eps=trainer.eps,
                                           weight_decay=trainer.weight_decay)
        warmup = trainer.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        # fp16 autocast needs loss scaling against gradient underflow (CPU too); a no-op otherwise
        self.scaler = torch.amp.GradScaler(generator.device.type,
                                           enabled=needs_grad_scaler(generator.device, trainer.mixed_precision))
        self.version = 0  # number of optimizer updates applied
        self.objective = build_objective(generator, encoder, algo, rewards)
        # θ_ema for evaluation and export; the candidates keep coming from θ (on-policy)
        self.ema = TrainableEMA(generator, trainer.ema_decay) if trainer.ema_decay > 0 else None

    def averaged_weights(self):
        """Context in which the generator holds the weights users get: θ_ema when kept, else θ."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def update(self, groups: list[CandidateGroup]) -> dict[str, float]:
        if self.objective is not None:
            return self._objective_update(groups)
        K, M = self.algo.num_candidates, self.algo.num_anchors
        stats: dict[str, float] = {"update/groups": float(len(groups))}
        # DrPO line 7: disjoint top-M / bottom-M per prompt from the ranking scores, or (binary rewards,
        # official rule) random anchors from capped pass/fail pools with only the positives regressed
        kept, anchors, regress = [], [], []
        pools = self.algo.binary_threshold is not None and self.algo.binary_rule == "pools"
        for g in groups:
            if pools:
                rng = torch.Generator().manual_seed(stable_seed("binary-pools", self.trainer_cfg.seed, g.group_id))
                pick = official_binary_pools(g.scores, K, M, self.algo.binary_threshold, rng)
                if pick is None:
                    stats["skipped/too_few_passes_or_fails"] = stats.get("skipped/too_few_passes_or_fails", 0.0) + 1
                    continue
                kept.append(g)
                anchors.append((pick.pos_idx, pick.neg_idx))
                regress.append(pick.regress_idx)
                continue
            sel = select_anchors(g.scores[None], M, binary_threshold=self.algo.binary_threshold)
            for reason, n in sel.skipped.items():
                stats[f"skipped/{reason}"] = stats.get(f"skipped/{reason}", 0.0) + n
            if bool(sel.keep[0]):
                kept.append(g)
                anchors.append((sel.pos_idx[0], sel.neg_idx[0]))
                regress.append(torch.arange(K))  # the first K candidates
        stats["update/kept_groups"] = float(len(kept))
        stats["update/applied"] = 0.0
        # data-parallel: this worker holds a share of the step's groups; n counts the kept groups of all workers
        n = data_parallel.all_reduce_count(len(kept), self.generator.device)
        if not n:
            return data_parallel.sum_stats(stats)
        # the loss is a mean over prompts; the official binary rule counts a skipped prompt as a zero-loss slot
        denominator = data_parallel.all_reduce_count(len(groups), self.generator.device) if pools else n

        # DrPO lines 8–14 in micro-batches of prompts: the loss is a mean over prompts, so accumulating
        # each chunk's share of the gradient is exact and bounds activation memory
        self.optimizer.zero_grad(set_to_none=True)
        chunk = self.trainer_cfg.micro_batch_prompts or max(1, len(kept))
        total, sums = 0.0, {}
        for start in range(0, len(kept), chunk):
            part = slice(start, start + chunk)
            loss, part_stats = self._chunk_loss(kept[part], anchors[part], regress[part])
            loss = loss / denominator
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite DrPO loss {float(loss.detach())} at version {self.version}")
            self.scaler.scale(loss).backward()  # the reward is never differentiated
            total += float(loss.detach())
            for k, v in part_stats.items():
                sums[k] = sums.get(k, 0.0) + v / denominator
        return self._step(stats, sums, total, kept, n)

    def _step(self, stats: dict[str, float], sums: dict[str, float], total: float, kept: list[CandidateGroup],
              n: int) -> dict[str, float]:
        """All-reduce, clip, AdamW, and the update's stats (every objective; ``n`` = kept groups of all workers)."""
        lag = float(sum(self.version - g.version for g in kept))
        data_parallel.all_reduce_gradients(self.generator.trainable_parameters())  # Σ_w: the gradient of the whole step
        # clip, AdamW (every worker steps the same gradient from the same state)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.generator.trainable_parameters(), self.trainer_cfg.grad_clip)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)  # fp16: skipped when a gradient overflowed, and the scale halves
        self.scaler.update()
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale
        self.scheduler.step()  # the schedule follows the step count (version), applied or skipped
        if self.ema is not None:
            self.ema.step()
        self.version += 1
        stats.update(sums)
        stats.update({"loss": total, "update/policy_lag": lag / n})
        stats = data_parallel.sum_stats(stats)  # additive statistics of all workers' shares
        stats.update({"update/applied": 0.0 if skipped else 1.0, "update/grad_norm": float(grad_norm),
                      "update/lr": self.scheduler.get_last_lr()[0]})
        if self.scaler.is_enabled():  # fp16 only: the loss scale, and 1 for a step skipped on a non-finite gradient
            stats.update({"update/loss_scale": self.scaler.get_scale(), "update/skipped_nonfinite": float(skipped)})
        return stats

    def _objective_update(self, groups: list[CandidateGroup]) -> dict[str, float]:
        """One step of a non-default objective: its group filter, then the same micro-batched backward."""
        stats: dict[str, float] = {"update/groups": float(len(groups))}
        kept = []
        for g in groups:
            reason = self.objective.keep(g)
            if reason is None:
                kept.append(g)
            else:
                stats[f"skipped/{reason}"] = stats.get(f"skipped/{reason}", 0.0) + 1
        stats["update/kept_groups"], stats["update/applied"] = float(len(kept)), 0.0
        n = data_parallel.all_reduce_count(len(kept), self.generator.device)
        if not n:
            return data_parallel.sum_stats(stats)
        self.optimizer.zero_grad(set_to_none=True)
        chunk = self.trainer_cfg.micro_batch_prompts or max(1, len(kept))
        total, sums = 0.0, {}
        for start in range(0, len(kept), chunk):
            with autocast_context(self.generator.device, self.trainer_cfg.mixed_precision):
                loss, part = self.objective.chunk_loss(kept[start:start + chunk])
            loss = loss / n
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite {self.algo.kind} loss {float(loss.detach())} at version {self.version}")
            self.scaler.scale(loss).backward()
            total += float(loss.detach())
            for k, v in part.items():
                sums[k] = sums.get(k, 0.0) + v / n
        return self._step(stats, sums, total, kept, n)

    def _base_latents(self, g: CandidateGroup, idx: torch.Tensor) -> torch.Tensor:
        """G_base(ε_i, c) for candidates ``idx``: the sampled ones where they exist, else recomputed (no grad)."""
        if g.base_latents is not None and int(idx.max()) < g.base_latents.shape[0]:
            return g.base_latents[idx]
        gen = self.generator
        with gen.base_model():
            return gen.predict_x0(gen.noise([g.seeds[i] for i in idx.tolist()]), gen.encode_prompts([g.prompt] * len(idx))).float()

    def _chunk_loss(self, kept: list[CandidateGroup], anchors: list[tuple[torch.Tensor, torch.Tensor]],
                    regress: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Σ over the chunk's prompts of the per-prompt DrPO loss, and Σ of their stats.

        ``regress[b]`` are the candidates of prompt b whose features are regressed (default: the first K).
        """
        K, M = self.algo.num_candidates, self.algo.num_anchors
        regress = regress or [torch.arange(K)] * len(kept)
        offsets = [0]
        for r in regress:
            offsets.append(offsets[-1] + len(r))
        gen = self.generator
        device = gen.device
        # φ of the policy, the anchors and the base under ONE precision: at θ = θ_base a candidate and its base
        # twin must get identical features, or the reference drift sees a rounding difference as a force
        with autocast_context(device, self.trainer_cfg.mixed_precision):
            # DrPO line 4 (with grad): x_i = G_θ(ε_i, c) on the candidates' own noises
            seeds = [g.seeds[i] for g, r in zip(kept, regress) for i in r.tolist()]
            prompts = [g.prompt for g, r in zip(kept, regress) for _ in range(len(r))]
            x = gen.predict_x0(gen.noise(seeds), gen.encode_prompts(prompts))
            gen_feats = _phi(self.encoder, x, prompts)  # key -> [B·K, L, D]
            with torch.no_grad():
                anchor_feats = self._anchor_features(kept, anchors, regress, offsets, gen_feats)  # [B·2M, L, D]
                use_ref = self.algo.lambda_ref > 0 or self.algo.feature_l2_weight > 0
                base_latents = (torch.cat([self._base_latents(g, r).to(device) for g, r in zip(kept, regress)])
                                if self.algo.needs_base else None)
                ref_feats = _phi(self.encoder, base_latents, prompts) if use_ref else None

        # DrPO lines 8–13: per-prompt drift targets and regression, in fp32 (outside autocast, fp32 features)
        total = torch.zeros((), device=device)
        sums: dict[str, float] = {}
        for b in range(len(kept)):
            group = slice(offsets[b], offsets[b + 1])
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

    def _anchor_features(self, kept: list[CandidateGroup], anchors: list[tuple[torch.Tensor, torch.Tensor]],
                         regress: list[torch.Tensor], offsets: list[int], gen_feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """φ of each prompt's anchors A⁺ = top-M, A⁻ = bottom-M, `[B·2M, L, D]` (detached), where the policy maps them now.

        A group sampled with the current weights (lag 0) holds those positions in its scored latents. A group
        sampled ``lag ≥ 1`` updates ago does not: each regressed point x_i = G_θ(ε_i, c) has moved by the updates
        since, while its scored copy stayed behind among the anchors. A bottom-ranked x_i is then repelled from
        its own old position — pushed further along its last updates (positive feedback); on-policy the copy
        coincides with x_i and pushes nothing. With ``algo.stale_anchors = "current"`` a stale group's anchors are
        the learner's own forward on their noises (the regressed rows, detached; recomputed for an anchor that is
        not regressed), so a lagged step is the on-policy step with the older ranking (docs/ray.md "Staleness").
        """
        M, gen = self.algo.num_anchors, self.generator
        picks = [torch.cat([p, n]) for p, n in anchors]
        as_sampled = [g.version == self.version or self.algo.stale_anchors == "sampled" for g in kept]
        parts: list[dict[str, torch.Tensor] | None] = [None] * len(kept)
        sampled = [b for b, yes in enumerate(as_sampled) if yes]
        if sampled:  # one φ call over every such group (the on-policy computation, unchanged)
            latents = torch.cat([kept[b].latents[picks[b]] for b in sampled]).to(gen.device)
            feats = _phi(self.encoder, latents, [kept[b].prompt for b in sampled for _ in range(2 * M)])
            for j, b in enumerate(sampled):
                parts[b] = {k: v[j * 2 * M:(j + 1) * 2 * M] for k, v in feats.items()}
        for b in (b for b, yes in enumerate(as_sampled) if not yes):
            g, idx = kept[b], picks[b]
            row = {c: offsets[b] + k for k, c in enumerate(regress[b].tolist())}
            if all(i in row for i in idx.tolist()):  # the learner's own forward already holds them
                rows = torch.tensor([row[i] for i in idx.tolist()], device=gen.device)
                parts[b] = {k: v[rows].detach() for k, v in gen_feats.items()}
            else:  # an anchor that is not regressed (binary pools): G_θ(ε_j, c) without grad (the caller's precision)
                now = gen.predict_x0(gen.noise([g.seeds[i] for i in idx.tolist()]), gen.encode_prompts([g.prompt] * len(idx)))
                parts[b] = _phi(self.encoder, now, [g.prompt] * len(idx))
        return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "version": self.version,
                "scaler": self.scaler.state_dict(), "ema": None if self.ema is None else self.ema.state()}

    def load_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.version = int(state["version"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):  # the data-parallel broadcast; checkpoints use ema.safetensors
            self.ema.load_state(state["ema"])
