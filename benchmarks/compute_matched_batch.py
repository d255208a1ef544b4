"""Matched-batch cost of one optimizer update: DrPO (reward never differentiated) vs DRaFT (reward backprop).

    python benchmarks/compute_matched_batch.py                       # CPU: tiny models (CI-sized)
    python benchmarks/compute_matched_batch.py --size real \\
        --rewards vit-h-14 llama-1.8b llama-3.5b llama-7b            # a GPU: SD-Turbo architecture, 512 px, K=24

Both methods consume the same effective batch (``--prompts`` × ``--candidates`` candidates) per update
with the same generator, LoRA, optimizer and micro-batching; nothing is downloaded (random weights of
the real architectures: cost does not depend on weight values). Timed per update, per stage:

    drpo (fused)   policy forward with grad → [base forward] → decode (no grad) → reward (no grad) →
                   rank, φ forward, drift loss → backward (φ, then UNet) → clip + AdamW
    draft          policy forward with grad → decode with grad → reward with grad → backward
                   (reward, then decode, then UNet; split by autograd hooks) → clip + AdamW
    drpo-pipeline  the trainer's own path (CandidateSampler with the LoRA merged for sampling → reward
                   → DrpoLearner.update, which recomputes the policy forward): the actor–learner runtime's cost

``--ref on/off``: DrPO with the reference drift (base forward + λ_ref 0.2) and without (λ_ref 0, no base
forward; the paper's timing run kept the base forward at weight 0). Methods alternate within each repeat;
the ratio is the median over repeats of paired DRaFT / DrPO totals. On CUDA: synchronised wall time; on CPU:
process CPU time with one thread (robust to a shared machine's load). Stage times are medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.reward_towers import TOWERS, build_tower, parameter_count  # noqa: E402


class StageClock:
    """Accumulates seconds per stage of one update; ``mark`` closes the stage running since the last mark."""

    def __init__(self, cuda: bool):
        self.cuda, self.times, self._last = cuda, {}, None
        self.now = time.perf_counter if cuda else time.process_time

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def start(self):
        self._sync()
        self._last = self.now()

    def mark(self, stage: str):
        self._sync()
        t = self.now()
        self.times[stage] = self.times.get(stage, 0.0) + t - self._last
        self._last = t

    @contextlib.contextmanager
    def stage(self, name: str):
        self.start()
        yield
        self.mark(name)


class Bench:
    """Generator, φ, reward tower and the optimizer shared by every method (only the loss path differs)."""

    def __init__(self, args, tower_name: str, model_path: str):
        from drpo_core.config import AlgoConfig, FeaturesConfig, LoraConfig, ModelConfig
        from drpo_core.features import build_encoder
        from drpo_core.models.generator_factory import load_generator

        self.args, self.cuda = args, args.device == "cuda"
        dtype = "bfloat16" if self.cuda else "float32"
        self.model_cfg = ModelConfig(path=model_path, resolution=args.resolution, dtype=dtype, device=args.device)
        self.lora_cfg = LoraConfig()
        self.gen = load_generator(self.model_cfg, self.lora_cfg)
        with torch.no_grad():  # a non-zero adapter, as after some training
            for p in self.gen.trainable_parameters():
                p.normal_(0, 0.01)
        real = args.size == "real"
        self.features = FeaturesConfig(kind="latent_resnet", width=128 if real else 32, stage_blocks=[3, 4, 6, 3] if real else [1, 1],
                                       downsample=real, groups=32 if real else 0)
        self.encoder = build_encoder(self.features, self.gen.latent_shape[0], self.gen.device)
        self.tower = build_tower(tower_name, args.device, torch.bfloat16 if self.cuda else torch.float32,
                                 checkpointing=tower_name.startswith("llama") and self.cuda)
        self.tower_params = parameter_count(self.tower)
        K = args.candidates
        self.algo = {ref: AlgoConfig(num_candidates=K, num_anchors=max(1, K // 3), lambda_ref=0.2 if ref else 0.0) for ref in (True, False)}
        self.prompts = [f"a photo of a {c} car" for c in ("red", "green", "blue", "purple")][: args.prompts]
        self.prompts += [self.prompts[-1]] * (args.prompts - len(self.prompts))
        self.seeds = [list(range(b * K, (b + 1) * K)) for b in range(args.prompts)]
        self.optimizer = torch.optim.AdamW(self.gen.trainable_parameters(), lr=1e-5)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def chunks(self, size: int):
        """(prompt, seeds) micro-batches of at most ``size`` candidates (gradient accumulation)."""
        for prompt, seeds in zip(self.prompts, self.seeds):
            for start in range(0, len(seeds), size):
                yield prompt, seeds[start:start + size]

    def step_optimizer(self, clock: StageClock):
        with clock.stage("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.gen.trainable_parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    # -- DrPO, fused: one policy forward serves the ranking and the loss ---------------------------
    def drpo(self, ref: bool) -> dict[str, float]:
        from drpo_core.algorithms.loss import drpo_group_loss
        from drpo_core.algorithms.ranking import select_anchors

        gen, algo, clock = self.gen, self.algo[ref], StageClock(self.cuda)
        n = self.args.prompts * self.args.candidates
        for prompt, seeds in self.chunks(self.args.candidates):  # DrPO ranks a whole group at once
            with clock.stage("policy_fwd"), self.autocast():
                noise, emb = gen.noise(seeds), gen.encode_prompts([prompt] * len(seeds))
                x = gen.predict_x0(noise, emb)
            if ref:
                with clock.stage("base_fwd"), torch.no_grad(), gen.base_model(), self.autocast():
                    x_base = gen.predict_x0(noise, emb)
            with clock.stage("decode_fwd"), torch.no_grad(), self.autocast():
                images = gen.vae_decode(x.detach())
            with clock.stage("reward_fwd"), torch.no_grad(), self.autocast():
                scores = self.tower(images).float().cpu()
            with clock.stage("loss_fwd"), self.autocast():
                sel = select_anchors(scores[None], algo.num_anchors)
                feats = {k: v.float() for k, v in self.encoder(x).items()}
                # the anchors are candidates of this same forward: their φ is a detached slice of feats
                # (φ of x.detach()[idx] would recompute the same values: a duplicate forward)
                anchor_idx = torch.cat([sel.pos_idx[0], sel.neg_idx[0]]).to(x.device)
                anchors = {k: v[anchor_idx].detach() for k, v in feats.items()}
                with torch.no_grad():
                    base = {k: v.float() for k, v in self.encoder(x_base).items()} if ref else None
                M = algo.num_anchors
                loss, _ = drpo_group_loss(feats, {k: v[:M] for k, v in anchors.items()}, {k: v[M:] for k, v in anchors.items()},
                                          base, algo)
            self._backward(loss * len(seeds) / n, clock, {"phi_bwd": x}, last="unet_bwd")
        self.step_optimizer(clock)
        return clock.times

    # -- DRaFT: the reward's gradient through decode -----------------------------------------------
    def draft(self) -> dict[str, float]:
        gen, clock = self.gen, StageClock(self.cuda)
        n = self.args.prompts * self.args.candidates
        for prompt, seeds in self.chunks(self.args.draft_chunk or self.args.candidates):
            with clock.stage("policy_fwd"), self.autocast():
                x = gen.predict_x0(gen.noise(seeds), gen.encode_prompts([prompt] * len(seeds)))
            with clock.stage("decode_fwd"), self.autocast():
                images = gen.vae_decode(x)
            with clock.stage("reward_fwd"), self.autocast():
                loss = -self.tower(images).float().sum() / n
            self._backward(loss, clock, {"reward_bwd": images, "decode_bwd": x}, last="unet_bwd")
        self.step_optimizer(clock)
        return clock.times

    def _backward(self, loss: torch.Tensor, clock: StageClock, hooks: dict[str, torch.Tensor], last: str):
        """Backward, split into stages by hooks that fire when the gradient reaches each tensor."""
        handles = [t.register_hook(lambda g, name=name: clock.mark(name)) for name, t in hooks.items()]
        clock.start()
        loss.backward()
        clock.mark(last)
        for h in handles:
            h.remove()

    # -- DrPO as the trainer runs it: sample (merged LoRA), score, learner update -------------------
    def drpo_pipeline(self, ref: bool) -> dict[str, float]:
        from drpo_core.config import TrainerConfig
        from drpo_core.training.learner import DrpoLearner
        from drpo_core.training.sampler import CandidateSampler

        if not hasattr(self, "_pipeline"):
            self._pipeline = {}
        if ref not in self._pipeline:
            learner = DrpoLearner(self.gen, self.encoder, self.algo[ref], TrainerConfig(lr=1e-5, mixed_precision="bf16" if self.cuda else "no"))
            self._pipeline[ref] = (CandidateSampler.for_algo(self.gen, self.algo[ref]), learner)
        sampler, learner = self._pipeline[ref]
        clock = StageClock(self.cuda)
        groups = []
        for b, (prompt, seeds) in enumerate(zip(self.prompts, self.seeds)):
            with clock.stage("sample"), self.gen.merged(), self.autocast():
                g = sampler.sample(f"bench:{b}", prompt, seeds)
            with clock.stage("reward_fwd"), torch.no_grad(), self.autocast():
                g.scores = self.tower(g.images.to(self.gen.device)).float().cpu()
            groups.append(g)
        with clock.stage("learner_update"):
            learner.update(groups)
        return clock.times


def total(times: dict[str, float]) -> float:
    return sum(times.values())


def run(args, tower: str, model_path: str) -> dict:
    bench = Bench(args, tower, model_path)
    methods = {"drpo_ref_on": lambda: bench.drpo(True), "drpo_ref_off": lambda: bench.drpo(False), "draft": bench.draft}
    if args.pipeline:
        methods.update({"pipeline_ref_on": lambda: bench.drpo_pipeline(True), "pipeline_ref_off": lambda: bench.drpo_pipeline(False)})
    for fn in methods.values():  # warm-up
        fn()
    samples = {name: [] for name in methods}
    names = list(methods)
    for r in range(args.repeats):  # alternate the order every repeat
        for name in (names if r % 2 == 0 else names[::-1]):
            samples[name].append(methods[name]())
    ratio = {ref: statistics.median(total(d) / total(o) for d, o in zip(samples["draft"], samples[f"drpo_ref_{ref}"]))
             for ref in ("on", "off")}
    stages = {name: {s: statistics.median(t[s] for t in runs) for s in runs[0]} for name, runs in samples.items()}
    totals = {name: statistics.median(total(t) for t in runs) for name, runs in samples.items()}
    out = {"reward": tower, "reward_params": bench.tower_params, "stages_s": stages, "total_s": totals,
           "ratio_draft_over_drpo": ratio}
    if args.pipeline:
        out["ratio_draft_over_pipeline"] = {ref: statistics.median(total(d) / total(o) for d, o in
                                                                   zip(samples["draft"], samples[f"pipeline_ref_{ref}"]))
                                            for ref in ("on", "off")}
    del bench
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return out


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| reward tower | params | method | stages (median s) | total s | DRaFT / DrPO (median of paired) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        for name, stages in row["stages_s"].items():
            cells = ", ".join(f"{k} {v:.3g}" for k, v in stages.items())
            ratio = ""
            if name.startswith("drpo_ref_"):
                ratio = f"{row['ratio_draft_over_drpo'][name.split('_')[-1]]:.2f}×"
            elif name.startswith("pipeline_ref_"):
                ratio = f"{row['ratio_draft_over_pipeline'][name.split('_')[-1]]:.2f}×"
            lines.append(f"| {row['reward']} | {row['reward_params'] / 1e6:.1f} M | {name} | {cells} | {row['total_s'][name]:.3g} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["real", "tiny"], default="real" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rewards", nargs="+", default=None, choices=TOWERS,
                        help="reward towers (default: vit-h-14 + the llama sweep on real, the tiny ones on tiny)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per update (default 2 real / 2 tiny)")
    parser.add_argument("--candidates", type=int, default=None, help="K per prompt (default 24 real / 8 tiny)")
    parser.add_argument("--resolution", type=int, default=None, help="default 512 real / 32 tiny")
    parser.add_argument("--draft-chunk", type=int, default=None, help="DRaFT candidates per backward (memory); default "
                        "4 with a llama tower on real, else K")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pipeline", action="store_true", help="also time the trainer's actor-learner path")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--model-path", default=None, help="an SD-Turbo-architecture pipeline folder already built "
                        "(benchmarks/gpu_check.py passes its own); default: build the real one / the tiny model")
    args = parser.parse_args(argv)
    real = args.size == "real"
    args.rewards = args.rewards or (["vit-h-14", "llama-1.8b", "llama-3.5b", "llama-7b"] if real else ["vit-tiny", "llama-tiny", "llama-cpu-s", "llama-cpu-m"])
    args.prompts = args.prompts or 2
    args.candidates = args.candidates or (24 if real else 8)
    args.resolution = args.resolution or (512 if real else 32)
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_path:
            path = args.model_path
        elif real:
            from benchmarks.gpu_model_costs import build_real

            path = str(build_real("sd-turbo", Path(tmp) / "sd-turbo", args.device,
                                  torch.bfloat16 if args.device == "cuda" else torch.float32))
        else:
            path = "tiny"
        for tower in args.rewards:
            chunk_default = args.draft_chunk
            if real and args.draft_chunk is None and tower.startswith("llama"):
                args.draft_chunk = 4
            rows.append(run(args, tower, path))
            args.draft_chunk = chunk_default
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU, 1 thread, process CPU time"
    header = (f"{args.size} SD-Turbo architecture, {device}; {args.prompts} prompts × K={args.candidates} = "
              f"{args.prompts * args.candidates} candidates per update, {args.resolution} px, {args.repeats} paired repeats")
    print(markdown(rows, header))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
