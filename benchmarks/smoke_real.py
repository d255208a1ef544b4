"""One full DrPO update of the SD-Turbo recipe on the real SD-Turbo architecture, on CPU (`make smoke-real`).

    OMP_NUM_THREADS=2 python benchmarks/smoke_real.py [--json out.json] [--cache-dir DIR]

Real sizes, random weights, nothing downloaded: the SD-Turbo pipeline (865.9M UNet, OpenCLIP-H text tower,
SD VAE) is built from its published config (``gpu_model_costs.REAL``) and saved once to ``--cache-dir``
(fp16 on disk, loaded back in fp32 through ``load_generator``), and a full-size latent-MAE encoder (width 256,
stages [3, 4, 6, 3], Flax kernels) is written in the official checkpoint layout and loaded by kind
``latent_mae`` as ``mae_latent_256_torch.pth`` would be. The job is ``deploy/configs/sd-turbo.yaml`` (official
x0, peft LoRA init, latent-MAE keys, weights, λ_ref, gradient checkpointing, one prompt per micro-batch) with
what a CPU smoke test must change: 512 px → 64×64 latents, K = 4, M = 1, one prompt, fp32, the offline hue
reward instead of PickScore. Stages run through the project's own classes (CandidateSampler, RewardScorer,
DrpoLearner); each reports wall time and peak resident memory (RSS polled every 20 ms, so a spike shorter
than that can be missed; the process high-water mark is reported too).

Memory plan: one micro-batch, gradient checkpointing on the UNet, the frozen base is the LoRA-disabled UNet
(no second copy), the text encoder is dropped once the prompt is encoded and the VAE once the candidates
are decoded (the learner needs neither: φ reads latents). Exits 1 if the update did not apply or the
trainable weights did not move.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "a photo of a red car"
MAE_WIDTH, MAE_LAYERS = 256, [3, 4, 6, 3]  # "mae_latent_256": width 256 (Drifting §A.5) is our reading of the name


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


class StageMonitor:
    """Wall time and peak RSS of named stages (a 20 ms polling thread)."""

    def __init__(self):
        self.rows: list[dict] = []
        self.peak = rss()
        self._stop = False
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self):
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.02)

    @contextlib.contextmanager
    def stage(self, name: str):
        gc.collect()
        start_rss = rss()
        self.peak = start_rss
        t0 = time.perf_counter()
        yield
        wall = time.perf_counter() - t0
        self.peak = max(self.peak, rss())
        row = {"stage": name, "wall_s": round(wall, 1), "rss_start_gib": round(start_rss / 2**30, 2),
               "rss_peak_gib": round(self.peak / 2**30, 2)}
        self.rows.append(row)
        print(f"  {name:52s} {wall:8.1f} s   peak RSS {row['rss_peak_gib']:6.2f} GiB (start {row['rss_start_gib']:.2f})", flush=True)


def ensure_assets(cache: Path) -> tuple[Path, Path]:
    """The real-architecture SD-Turbo folder and the official-layout MAE file, built once into ``cache``."""
    from gpu_model_costs import build_real

    from drpo_core.features.latent_mae import random_official_state

    model = cache / "sd-turbo-random"
    if not (model / "model_index.json").is_file():
        build_real("sd-turbo", model, "cpu", torch.float16)
        gc.collect()
    mae = cache / "mae_latent_256_torch.pth"
    if not mae.is_file():
        state = random_official_state(4, MAE_WIDTH, MAE_LAYERS, seed=0, flax=True)
        torch.save({"state_dict": state, "metadata": {"model_config": {"layers": MAE_LAYERS, "in_channels": 4}}}, mae)
        del state
        gc.collect()
    return model, mae


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("DRPO_SMOKE_CACHE", "~/.cache/drpo/smoke-real")).expanduser())
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dry-tiny", action="store_true", help="check the script on the tiny model and a small encoder")
    args = ap.parse_args()
    torch.manual_seed(0)
    from drpo_core.algorithms.groups import candidate_seed
    from drpo_core.config import load_config
    from drpo_core.features import build_encoder
    from drpo_core.models.generator_factory import load_generator
    from drpo_core.training.trainer import build_rewards
    from drpo_core.training.learner import DrpoLearner
    from drpo_core.training.sampler import CandidateSampler
    from drpo_core.training.scoring import RewardScorer

    mon = StageMonitor()
    print(f"smoke-real: SD-Turbo recipe, real architecture, K={args.candidates}, torch threads {torch.get_num_threads()}")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    with mon.stage("build assets (cached after the first run)"):
        if args.dry_tiny:
            from drpo_core.features.latent_mae import random_official_state

            model_dir, mae_file = "tiny", args.cache_dir / "mae_tiny.pth"
            torch.save({"state_dict": random_official_state(4, 8, MAE_LAYERS, 0, flax=True)}, mae_file)
        else:
            model_dir, mae_file = ensure_assets(args.cache_dir)
    cfg = load_config([ROOT / "deploy" / "configs" / "sd-turbo.yaml"], [
        *(["model.resolution=128"] if args.dry_tiny else []), f"model.path={model_dir}", "model.dtype=float32", "model.device=cpu", "model.vae_slicing=true",
        "trainer.mixed_precision='no'", f"algo.num_candidates={args.candidates}", "algo.num_anchors=1",
        "trainer.prompts_per_step=1", f"features.checkpoint={mae_file}", "rewards=[{kind: hue_fraction}]"])
    assert cfg.model.gradient_checkpointing and cfg.trainer.micro_batch_prompts == 1 and cfg.model.x0 == "official"

    with mon.stage("load generator (UNet+CLIP-H+VAE, LoRA)"):
        gen = load_generator(cfg.model, cfg.lora)
    with mon.stage("load phi (official latent-MAE file)"):
        encoder = build_encoder(cfg.features, gen.latent_shape[0], gen.device, generator=gen)
    with mon.stage("encode prompt, free text encoder"):
        gen.encode_prompts([PROMPT])  # cached; the learner reuses the cache
        gen.text_encoder = None
    sampler = CandidateSampler.for_algo(gen, cfg.algo)
    seeds = [candidate_seed(cfg.trainer.seed, 0, 0, i) for i in range(args.candidates)]
    with mon.stage(f"sample K={args.candidates} policy+base, VAE decode"):
        group = sampler.sample("0:0", PROMPT, seeds)
    with mon.stage("score (hue reward), free VAE"):
        RewardScorer(build_rewards(cfg)).score([group])
        gen.vae = None
    learner = DrpoLearner(gen, encoder, cfg.algo, cfg.trainer)
    before = [p.detach().clone() for p in gen.trainable_parameters()]
    with mon.stage("DrPO update (forward, phi, drift, backward, AdamW)"):
        stats = learner.update([group])
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(gen.trainable_parameters(), before))
    mon._stop = True
    high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    update = mon.rows[-1]
    print(f"update applied={stats['update/applied']:.0f} loss={stats['loss']:.4f} grad_norm={stats['update/grad_norm']:.3g} "
          f"max |Δw|={moved:.3g}; process peak RSS {high_water / 2**30:.2f} GiB")
    result = {"candidates": args.candidates, "threads": torch.get_num_threads(), "stages": mon.rows,
              "process_peak_rss_gib": round(high_water / 2**30, 2), "update_activation_gib": round(update["rss_peak_gib"] - update["rss_start_gib"], 2),
              "loss": stats["loss"], "grad_norm": stats["update/grad_norm"], "max_weight_change": moved,
              "keys": sorted(k.split("/")[1] for k in stats if k.startswith("drift/") and k.endswith("/pref_norm"))}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    ok = stats["update/applied"] == 1.0 and moved > 0 and torch.isfinite(torch.tensor(stats["loss"]))
    print("smoke-real: OK" if ok else "smoke-real: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
