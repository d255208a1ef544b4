"""Per-image costs of the model paths on the real SD-Turbo and SDXL-Turbo architectures (random weights).

    python benchmarks/gpu_model_costs.py                  # CUDA: real-size models at 512 px, K=24
    python benchmarks/gpu_model_costs.py --size tiny      # the tiny models (the default without CUDA)
    python benchmarks/gpu_model_costs.py --check-configs  # parameter counts of the real configs (meta device)

Nothing is downloaded: each pipeline is built from the configs written below (the published
architectures of stabilityai/sd-turbo and stabilityai/sdxl-turbo), random-initialised, saved to a temp
folder and loaded back through ``load_generator`` (the real loading path). Reported per image, the best
of ``--repeats`` timed runs after one warm-up. On CUDA that is wall time (synchronised); on CPU it is the
process's CPU time with one torch thread, which other processes on a shared machine cannot inflate:

    generate        generate() of K candidates (UNet step + VAE decode), LoRA unmerged
    generate_merged the same with the LoRA merged (a sampling-only generator after loading weights)
    learner_step    DrpoLearner.update on one prompt group of K candidates (latent_resnet φ), ÷ K
    learner_ckpt    the same with gradient checkpointing (UNet + VAE)
    learner_preset  SD-Turbo only: the sd-turbo.yaml learner (official x0, latent-MAE φ of width 256 in the
                    official layout, checkpointing, one prompt per micro-batch); its peak GPU memory is the
                    per-micro-batch peak of the paper's 32 × 24 update (docs/models.md, memory plan)
    phi_<kind>      forward + backward of each feature encoder on K policy latents, ÷ K
and the peak GPU memory of each (CUDA only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# --- the published architectures -------------------------------------------------------------------
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
CLIP = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
REAL = {
    "sd-turbo": dict(  # SD 2.1-base UNet (865.9M), OpenCLIP-H text tower (340.4M, 23 layers), SD VAE (83.7M)
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
                  attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        vae=dict(VAE, scaling_factor=0.18215),
        text=[dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                   hidden_act="gelu", projection_dim=512, **CLIP)]),
    "sdxl-turbo": dict(  # SDXL UNet (2567.5M), CLIP-L (123.1M) + OpenCLIP-bigG with projection (694.7M), SDXL VAE
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
                  attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        vae=dict(VAE, scaling_factor=0.13025, force_upcast=True),
        text=[dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                   hidden_act="quick_gelu", projection_dim=768, **CLIP),
              dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                   hidden_act="gelu", projection_dim=1280, **CLIP)]),
}
PIXEL = {"dinov2": dict(image_size=224, patch_size=14), "vit_mae": dict(image_size=224, patch_size=16, mask_ratio=0.75)}


def build_real(kind: str, folder: Path, device: str, dtype: torch.dtype) -> Path:
    """Random-initialise the real architecture on ``device`` and save it as a pipeline folder."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from drpo_core.models.tiny_models import write_clip_tokenizer

    spec = REAL[kind]
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**spec["unet"]).to(dtype)
        vae = diffusers.AutoencoderKL(**spec["vae"]).to(dtype)
        encoders = [CLIPTextModel(CLIPTextConfig(**spec["text"][0])).to(dtype)]
        if kind == "sdxl-turbo":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**spec["text"][1])).to(dtype))
    scheduler_cls = diffusers.EulerDiscreteScheduler if kind == "sd-turbo" else diffusers.EulerAncestralDiscreteScheduler
    scheduler = scheduler_cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="trailing")
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok"))
    if kind == "sd-turbo":
        pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=encoders[0], tokenizer=tokenizer, unet=unet,
                                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    else:
        tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "_tok2", pad_token="!"))
        pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                                   tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                                   scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(folder)
    return folder


def build_pixel(kind: str, folder: Path) -> Path:
    from transformers import Dinov2Config, Dinov2Model, ViTMAEConfig, ViTMAEModel

    model = Dinov2Model(Dinov2Config(**PIXEL[kind])) if kind == "dinov2" else ViTMAEModel(ViTMAEConfig(**PIXEL[kind]))
    model.save_pretrained(folder)
    return folder


def check_configs() -> None:
    """Parameter counts of the real configs, built on the meta device (no memory, no weights)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        for kind, spec in REAL.items():
            counts = {"unet": diffusers.UNet2DConditionModel(**spec["unet"]), "vae": diffusers.AutoencoderKL(**spec["vae"])}
            counts.update({f"text{i}": CLIPTextModel(CLIPTextConfig(**t)) for i, t in enumerate(spec["text"])})
            print(kind, {k: f"{sum(p.numel() for p in m.parameters()) / 1e6:.1f}M" for k, m in counts.items()})


def timed(fn, repeats: int, cuda: bool) -> tuple[float, float]:
    """(best seconds, peak GPU GiB) of ``fn`` after one warm-up call; CPU time off CUDA (see the docstring)."""
    clock = time.perf_counter if cuda else time.process_time
    fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        t0 = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return min(times), peak


def measure(kind: str, path: str, args, pixel_paths: dict[str, str]) -> dict[str, tuple[float, float]]:
    from drpo_core.config import AlgoConfig, FeaturesConfig, LoraConfig, ModelConfig, TrainerConfig
    from drpo_core.features import build_encoder
    from drpo_core.models.generator_factory import load_generator
    from drpo_core.training.learner import DrpoLearner
    from drpo_core.training.sampler import CandidateSampler

    cuda, K = args.device == "cuda", args.candidates
    dtype = {"sd-turbo": "float16", "sdxl-turbo": "bfloat16"}[kind] if cuda else "float32"
    precision = {"float16": "fp16", "bfloat16": "bf16", "float32": "no"}[dtype]
    prompts, seeds = ["a photo of a red car"] * K, list(range(K))
    results: dict[str, tuple[float, float]] = {}

    def model(**options):
        return load_generator(ModelConfig(kind=kind, path=path, resolution=args.resolution, dtype=dtype, device=args.device,
                                          **options), LoraConfig())

    gen = model()
    with torch.no_grad():  # a non-zero adapter, as after training
        for p in gen.trainable_parameters():
            p.normal_(0, 0.01)
    results["generate"] = timed(lambda: gen.generate(prompts, seeds), args.repeats, cuda)
    gen.merge_lora()
    results["generate_merged"] = timed(lambda: gen.generate(prompts, seeds), args.repeats, cuda)
    gen.unmerge_lora()

    # the latent-MAE layout at width 256 (the Drifting ablation's); tiny latents (8×8) are too small to downsample
    real = args.size == "real"
    resnet = FeaturesConfig(kind="latent_resnet", width=256 if real else 32, stage_blocks=[3, 4, 6, 3], downsample=real,
                            groups=32 if real else 8)
    encoders = {"latent_resnet": resnet, "unet_hidden": FeaturesConfig(kind="unet_hidden"),
                **{k: FeaturesConfig(kind=k, path=p) for k, p in pixel_paths.items()}}
    for name, fcfg in encoders.items():
        phi = build_encoder(fcfg, gen.latent_shape[0], gen.device, generator=gen)

        def phi_step():
            x = gen.predict_x0(gen.noise(seeds), gen.encode_prompts(prompts))
            sum(v.float().pow(2).mean() for v in phi(x).values()).backward()
            for p in gen.trainable_parameters():
                p.grad = None
        results[f"phi_{name}"] = timed(phi_step, args.repeats, cuda)

    algo = AlgoConfig(num_candidates=K, num_anchors=max(1, K // 3))
    for label, options in (("learner_step", {}), ("learner_ckpt", {"gradient_checkpointing": True})):
        g = gen if not options else model(**options)
        sampler = CandidateSampler(g, with_base=True)
        group = sampler.sample("bench", prompts[0], seeds)
        group.scores = torch.randn(K, generator=torch.Generator().manual_seed(0))
        learner = DrpoLearner(g, build_encoder(resnet, g.latent_shape[0], g.device), algo,
                              TrainerConfig(lr=1e-5, mixed_precision=precision))
        results[label] = timed(lambda: learner.update([group]), args.repeats, cuda)
        del learner, sampler, group
    if kind == "sd-turbo":  # the SD-Turbo preset's learner: official x0 and latent-MAE φ, checkpointing, M = K/3
        g = model(gradient_checkpointing=True, x0="official")
        mae = FeaturesConfig(kind="latent_mae", width=256 if real else 8, stage_blocks=[3, 4, 6, 3],
                             keys=None if real else ["layer4_mean", "layer4_std"])  # tiny latents: layer4 is 1×1
        group = CandidateSampler(g, with_base=True).sample("bench", prompts[0], seeds)
        group.scores = torch.randn(K, generator=torch.Generator().manual_seed(0))
        learner = DrpoLearner(g, build_encoder(mae, g.latent_shape[0], g.device), algo,
                              TrainerConfig(lr=1e-4, mixed_precision=precision, micro_batch_prompts=1))
        results["learner_preset"] = timed(lambda: learner.update([group]), args.repeats, cuda)
        del learner, group
    return {name: (seconds * 1000 / K, peak) for name, (seconds, peak) in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["real", "tiny"], default="real" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--candidates", type=int, default=None, help="K (default 24 on CUDA, 8 on CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="default 512 (real) / 32 (tiny)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=["sd-turbo", "sdxl-turbo"])
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--check-configs", action="store_true")
    args = parser.parse_args()
    if args.check_configs:
        return check_configs()
    args.candidates = args.candidates or (24 if args.device == "cuda" else 8)
    args.resolution = args.resolution or (512 if args.size == "real" else 32)
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)  # CPU time of one thread: no spin-waiting, no neighbours in the number
    report: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        from drpo_core.models.tiny_models import tiny_pixel_encoder_path

        if args.size == "real":
            pixel = {k: str(build_pixel(k, Path(tmp) / k)) for k in PIXEL}
        else:
            pixel = {k: str(tiny_pixel_encoder_path(k)) for k in PIXEL}
        for kind in args.kinds:
            if args.size == "real":
                dtype = torch.float16 if kind == "sd-turbo" else torch.bfloat16
                path = str(build_real(kind, Path(tmp) / kind, args.device, dtype if args.device == "cuda" else torch.float32))
            else:
                path = {"sd-turbo": "tiny", "sdxl-turbo": "tiny-sdxl"}[kind]
            report[kind] = measure(kind, path, args, pixel)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU, 1 thread, CPU time"
    print(f"\n{args.size} models, {device}, K={args.candidates}, {args.resolution} px, best of {args.repeats}")
    print("| model | " + " | ".join(next(iter(report.values()))) + " |")
    print("|---|" + "---|" * len(next(iter(report.values()))))
    for kind, row in report.items():
        cells = [f"{ms:.1f} ms" + (f" / {gib:.1f} GiB" if gib == gib else "") for ms, gib in row.values()]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "size": args.size, "K": args.candidates,
                                         "resolution": args.resolution, "ms_per_image_and_peak_gib": report}, indent=2))


if __name__ == "__main__":
    main()
