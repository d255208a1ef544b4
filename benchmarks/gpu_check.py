"""`make gpu-check`: the figures that need a GPU, from one run on one 80 GB GPU (< 8 min), in one JSON report.

    python benchmarks/gpu_check.py --out $OUT                                 # CUDA: real architectures
    python benchmarks/gpu_check.py --size tiny --device cpu --out /tmp/check  # the same code, tiny (tests/test_gpu_check.py)

Random weights of the real architectures (cost does not depend on weight values), nothing downloaded; the
builders are the other benchmarks' own (``gpu_model_costs.build_real``, ``compute_matched_batch``,
``reward_towers``, ``weight_publish``). Sections, each written to ``OUT/gpu_check.json`` as it finishes (a
section that fails records its error and the next one runs; one that would start past ``--budget-s`` is
skipped and says so):

    preset_update   the SD-Turbo preset's learner (deploy/configs/sd-turbo.yaml: official x0, latent-MAE φ of
                    width 256 in the official checkpoint layout, gradient checkpointing, one prompt = K = 24
                    candidates per micro-batch) on the real SD-Turbo architecture in bf16: seconds and peak GPU
                    memory of every micro-batch of one update of ``--prompts`` prompts; the preset's 32-prompt
                    update ≈ 32 × the median micro-batch + the optimizer step
    sampling        candidates/s of that generator (CandidateSampler, LoRA merged as the preset samples, bf16,
                    K per call), with and without the frozen base's latents
    drpo_vs_draft   compute_matched_batch.py at a matched effective batch (2 prompts × K): DrPO (reference drift
                    on / off) vs DRaFT seconds per update, with the ViT-H-14 tower (HPSv2 / PickScore size) and
                    the 1.8B-class Llama tower
    weight_publish  the SD 2.1 UNet's LoRA (r=16) and full (866 M) states in fp16: learner side (pack for the
                    object store, as LearnerActor.publish_weights; flatten to buckets, as SyncSender) and
                    generator side (unpack and copy into its GPU tensors); one process, no network

On CUDA: synchronised wall time and ``torch.cuda.max_memory_allocated``; on CPU: wall time and the process's
peak RSS (a smoke test of the code, not a figure).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPT = "a photo of a red car"


class Meter:
    """Wall seconds (synchronised on CUDA) and peak memory (GPU allocator on CUDA, process RSS on CPU)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def time(self, fn, repeats: int) -> list[float]:
        """Seconds of each of ``repeats`` calls after one warm-up call."""
        fn()
        out = []
        for _ in range(repeats):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            out.append(time.perf_counter() - t0)
        return out


def preset_config(args, model_path: str, mae_file: Path):
    """deploy/configs/sd-turbo.yaml with what a random-weight check must change: the model folder, bf16, the offline
    hue reward (PickScore's weights are not here), ``--prompts`` prompts; tiny: a small resolution and K."""
    from drpo_core.config import load_config

    tiny = args.size == "tiny"
    overrides = [f"model.path={model_path}", f"model.device={args.device}", "model.dtype=bfloat16",
                 "trainer.mixed_precision=bf16", f"features.checkpoint={mae_file}", "rewards=[{kind: hue_fraction}]",
                 f"trainer.prompts_per_step={args.prompts}", f"algo.num_candidates={args.candidates}",
                 f"algo.num_anchors={max(1, args.candidates // 3)}"]
    if tiny:  # 32 px = 8x8 latents: layer4 of the 4-stage MAE is 1x1 (no 2x2 / 4x4 patch keys)
        overrides += ["model.resolution=32", "features.keys=[layer4_mean, layer4_std]"]
    cfg = load_config([ROOT / "deploy" / "configs" / "sd-turbo.yaml"], overrides)
    assert cfg.model.gradient_checkpointing and cfg.trainer.micro_batch_prompts == 1 and cfg.model.x0 == "official"
    return cfg


def write_mae(folder: Path, size: str) -> Path:
    """The latent-MAE φ in the official checkpoint layout (Flax kernels), as ``mae_latent_256_torch.pth`` is."""
    from benchmarks.smoke_real import MAE_LAYERS, MAE_WIDTH
    from drpo_core.features.latent_mae import random_official_state

    width = MAE_WIDTH if size == "real" else 8
    path = folder / "mae_latent_torch.pth"
    torch.save({"state_dict": random_official_state(4, width, MAE_LAYERS, seed=0, flax=True),
                "metadata": {"model_config": {"layers": MAE_LAYERS, "in_channels": 4}}}, path)
    return path


def preset_update(args, meter: Meter, model_path: str, mae_file: Path) -> dict:
    from drpo_core.algorithms.groups import candidate_seed
    from drpo_core.features import build_encoder
    from drpo_core.models.generator_factory import load_generator
    from drpo_core.training.learner import DrpoLearner
    from drpo_core.training.sampler import CandidateSampler
    from drpo_core.training.scoring import RewardScorer
    from drpo_core.training.trainer import build_rewards

    cfg = preset_config(args, model_path, mae_file)
    gen = load_generator(cfg.model, cfg.lora)
    encoder = build_encoder(cfg.features, gen.latent_shape[0], gen.device, generator=gen)
    sampler = CandidateSampler.for_algo(gen, cfg.algo, cfg.trainer.mixed_precision)
    prompts = [f"a photo of a {c} car" for c in ("red", "green", "blue", "purple")] * args.prompts
    meter.sync()
    t0 = time.perf_counter()
    with gen.merged():  # the preset samples with the LoRA merged
        groups = [sampler.sample(f"0:{b}", prompts[b], [candidate_seed(0, 0, b, i) for i in range(args.candidates)])
                  for b in range(args.prompts)]
    meter.sync()
    sample_s = time.perf_counter() - t0
    RewardScorer(build_rewards(cfg)).score(groups)
    learner = DrpoLearner(gen, encoder, cfg.algo, cfg.trainer)
    marks: list[tuple[float, float]] = []  # (time, peak GiB since the previous mark) at each micro-batch's start

    def mark(fn):
        def wrapped(*a, **k):
            meter.sync()
            marks.append((time.perf_counter(), meter.peak_gib()))
            meter.reset_peak()
            return fn(*a, **k)
        return wrapped

    learner._chunk_loss, learner._step = mark(learner._chunk_loss), mark(learner._step)  # the last mark: the optimizer step
    meter.reset_peak()
    stats = learner.update(groups)
    meter.sync()
    end = time.perf_counter()
    micro = [{"seconds": marks[i + 1][0] - marks[i][0], "peak_gib": marks[i + 1][1]} for i in range(len(marks) - 1)]
    step_s = end - marks[-1][0]
    median = statistics.median(m["seconds"] for m in micro)
    result = {"prompts": args.prompts, "K": args.candidates, "candidates_per_micro_batch": args.candidates,
              "precision": "bf16", "latent": list(gen.latent_shape), "micro_batches": micro,
              "micro_batch_median_s": median, "micro_batch_peak_gib_max": max(m["peak_gib"] for m in micro),
              "optimizer_step_s": step_s, "sample_and_decode_s": sample_s,
              "update_32_prompts_estimate_s": 32 * median + step_s,
              "loss": stats["loss"], "grad_norm": stats["update/grad_norm"], "applied": stats["update/applied"]}
    del learner, groups, sampler, encoder, gen
    return result


def sampling(args, meter: Meter, model_path: str, mae_file: Path) -> dict:
    from drpo_core.models.generator_factory import load_generator
    from drpo_core.training.sampler import CandidateSampler

    cfg = preset_config(args, model_path, mae_file)
    gen = load_generator(cfg.model, cfg.lora)
    with torch.no_grad():  # a non-zero adapter, as after training
        for p in gen.trainable_parameters():
            p.normal_(0, 0.01)
    gen.merge_lora()
    out = {"K": args.candidates, "precision": "bf16", "resolution": cfg.model.resolution}
    seeds = list(range(args.candidates))
    for label, with_base in (("policy_only", False), ("with_base", True)):
        sampler = CandidateSampler(gen, with_base=with_base, mixed_precision="bf16")
        meter.reset_peak()
        seconds = meter.time(lambda: sampler.sample("bench", PROMPT, seeds), args.repeats)
        out[label] = {"seconds_per_call": statistics.median(seconds), "candidates_per_s": args.candidates / statistics.median(seconds),
                      "peak_gib": meter.peak_gib()}
    del gen
    return out


def drpo_vs_draft(args, model_path: str) -> dict:
    from benchmarks import compute_matched_batch

    towers = ["vit-h-14", "llama-1.8b"] if args.size == "real" else ["vit-tiny", "llama-tiny"]
    threads = torch.get_num_threads()
    try:
        rows = compute_matched_batch.main(["--size", args.size, "--device", args.device, "--rewards", *towers,
                                           "--prompts", "2", "--candidates", str(args.candidates), "--repeats", str(args.repeats),
                                           "--model-path", model_path, "--resolution", str(512 if args.size == "real" else 32)])
    finally:
        torch.set_num_threads(threads)  # it pins one CPU thread for CPU timings
    return {"effective_batch": 2 * args.candidates, "rows": [
        {"reward": r["reward"], "reward_params": r["reward_params"], "total_s": r["total_s"],
         "ratio_draft_over_drpo": r["ratio_draft_over_drpo"]} for r in rows]}


def weight_publish(args, meter: Meter, model_path: str) -> dict:
    from benchmarks.weight_publish import Learner, Puller, sd21_shapes
    from services.runtime.weights import unpack_state

    if args.size == "real":
        full, lora = sd21_shapes()
    else:  # the tiny UNet's shapes, its LoRA's named as peft does
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_path, subfolder="unet"))
        full = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
        lora = {f"{n}.lora_{ab}.weight": (16, m.in_features) if ab == "A" else (m.out_features, 16)
                for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("to_q", "to_k", "to_v", "to_out.0"))
                for ab in ("A", "B")}
    out = {}
    for name, shapes in (("lora", lora), ("full_unet", full)):
        learner, puller = Learner(shapes, args.device), Puller(shapes, args.device)
        payload = {}

        def publish():
            payload["state"] = learner.publish()

        def receive():
            with torch.no_grad():
                for k, t in unpack_state(payload["state"]).items():
                    puller.params[k].copy_(t)

        out[name] = {"params_M": sum(torch.Size(s).numel() for s in shapes.values()) / 1e6,
                     "MiB": sum(torch.Size(s).numel() for s in shapes.values()) * 2 / 2**20,
                     "publish_s": statistics.median(meter.time(publish, args.repeats)),
                     "flatten_s": statistics.median(meter.time(lambda: learner.layout.flatten(learner.state, learner.device), args.repeats)),
                     "receive_s": statistics.median(meter.time(receive, args.repeats))}
        del learner, puller, payload
    return out


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu-check")), help="report folder ($OUT)")
    ap.add_argument("--size", choices=["real", "tiny"], default="real" if torch.cuda.is_available() else "tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompts", type=int, default=None, help="prompts in the timed preset update (default 4 real / 2 tiny)")
    ap.add_argument("--candidates", type=int, default=None, help="K (default 24 real / 4 tiny)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats after a warm-up (default 2 real / 1 tiny)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the sections that would start after this")
    ap.add_argument("--sections", default="preset_update,sampling,drpo_vs_draft,weight_publish")
    args = ap.parse_args(argv)
    real = args.size == "real"
    args.prompts = args.prompts or (4 if real else 2)
    args.candidates = args.candidates or (24 if real else 4)
    args.repeats = args.repeats or (2 if real else 1)
    args.out.mkdir(parents=True, exist_ok=True)
    meter, start = Meter(args.device), time.perf_counter()
    report = {"device": device_name(args.device), "size": args.size, "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "argv": sys.argv[1:] if argv is None else argv, "sections": {}}
    path = args.out / "gpu_check.json"
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if real:
            from benchmarks.gpu_model_costs import build_real

            model_path = str(build_real("sd-turbo", Path(tmp) / "sd-turbo", args.device, torch.bfloat16))
        else:
            model_path = "tiny"
        mae_file = write_mae(Path(tmp), args.size)
        report["build_s"] = time.perf_counter() - t0
        from drpo_core.models.generator import resolve_model_path

        sections = {"preset_update": lambda: preset_update(args, meter, model_path, mae_file),
                    "sampling": lambda: sampling(args, meter, model_path, mae_file),
                    "drpo_vs_draft": lambda: drpo_vs_draft(args, model_path),
                    "weight_publish": lambda: weight_publish(args, meter, resolve_model_path(model_path))}
        for name in args.sections.split(","):
            if time.perf_counter() - start > args.budget_s:
                report["sections"][name] = {"skipped": f"past the {args.budget_s:.0f} s budget"}
                continue
            t0 = time.perf_counter()
            try:
                report["sections"][name] = {**sections[name](), "section_s": time.perf_counter() - t0}
            except Exception as e:  # noqa: BLE001 - one section's failure must not lose the others' figures
                report["sections"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            if meter.cuda:
                torch.cuda.empty_cache()
            report["wall_s"] = time.perf_counter() - start
            path.write_text(json.dumps(report, indent=2))
            print(f"gpu-check: {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
    report["wall_s"] = time.perf_counter() - start
    path.write_text(json.dumps(report, indent=2))
    print(f"gpu-check: {path} ({report['wall_s']:.0f} s on {report['device']})")
    return report


if __name__ == "__main__":
    failed = [k for k, v in main()["sections"].items() if "error" in v]
    sys.exit(1 if failed else 0)
