"""One-step SD-Turbo-family generator x = G_θ(ε, c) on real diffusers classes.

``G_θ``: the UNet2DConditionModel is called once at t=999 on unit Gaussian noise ε (what the
SD-Turbo pipeline feeds it after ``scale_model_input``), and the scheduler's ᾱ_t converts its
prediction to the clean latent:

    epsilon:       x0 = (ε − √(1−ᾱ_t) ε̂) / √ᾱ_t
    v_prediction:  x0 = √ᾱ_t ε − √(1−ᾱ_t) v̂

The frozen base ``G_base`` is the same UNet with its LoRA adapter disabled (no second copy). Every
candidate is reproducible from its seed: ε comes from a per-candidate ``torch.Generator``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from drpo_core.config import LoraConfig, ModelConfig
from drpo_core.tiny_models import tiny_sd_turbo_path


class ModelLoadError(ValueError):
    """The model path is missing or does not hold a supported pipeline."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_model_path(path: str) -> str:
    """'tiny' → the embedded random model (built on first use); a local folder must exist."""
    if path == "tiny":
        return str(tiny_sd_turbo_path())
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file() and not (local / "unet").is_dir():
            raise ModelLoadError(f"model.path {path!r} is a folder without model_index.json or unet/: not a diffusers pipeline")
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelLoadError(f"model.path {path!r} does not exist (expected a local pipeline folder or a hub id like org/name)")
    return path  # hub id; from_pretrained resolves it (offline: from the local HF cache)


def candidate_noise(seeds: list[int], shape: tuple[int, int, int], device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """ε for each candidate from its own generator seed, `[N, C, h, w]`; independent of global RNG."""
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for i, seed in enumerate(seeds):
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        out[i] = torch.randn(shape, generator=gen, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


class OneStepGenerator:
    """SD-Turbo-family one-step generator with an optional LoRA adapter (peft) or full fine-tuning."""

    def __init__(self, model_cfg: ModelConfig, lora_cfg: LoraConfig):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.cfg, self.lora_cfg = model_cfg, lora_cfg
        self.device = resolve_device(model_cfg.device)
        self.dtype = getattr(torch, model_cfg.dtype)
        path = resolve_model_path(model_cfg.path)
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
            self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=self.dtype)
            self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=self.dtype)
            self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=self.dtype)
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot load an SD-Turbo-family pipeline from {model_cfg.path!r}: {str(e).splitlines()[0]}") from None
        if self.unet.config.get("addition_embed_type") is not None:
            raise ModelLoadError(f"model.path {model_cfg.path!r} is an SDXL-style UNet; model.kind 'sd-turbo' needs an SD 1.x/2.x UNet")
        self.prediction_type = scheduler.config.prediction_type
        alpha_bar = scheduler.alphas_cumprod[model_cfg.timestep].item()
        self.sqrt_alpha_bar, self.sqrt_one_minus_alpha_bar = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if model_cfg.resolution % self.vae_scale:
            raise ModelLoadError(f"model.resolution {model_cfg.resolution} is not a multiple of the VAE factor {self.vae_scale}")
        self.latent_shape = (self.unet.config.in_channels, model_cfg.resolution // self.vae_scale, model_cfg.resolution // self.vae_scale)

        for module in (self.text_encoder, self.vae, self.unet):
            module.requires_grad_(False).eval().to(self.device)
        self.base_unet = None
        if lora_cfg.enabled:
            self._add_lora()
        else:  # full fine-tuning keeps one frozen base copy for the reference drift
            self.base_unet = copy.deepcopy(self.unet).requires_grad_(False)
            self.unet.requires_grad_(True)
        self._prompt_cache: dict[str, torch.Tensor] = {}

    # -- parameters ---------------------------------------------------------------------------
    def _add_lora(self) -> None:
        from peft import LoraConfig as PeftLoraConfig

        cfg = self.lora_cfg
        targets = cfg.target_modules
        names = [n for n, _ in self.unet.named_modules()]
        if isinstance(targets, str):
            import re

            matched = [n for n in names if re.fullmatch(targets, n)]
        else:
            matched = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
        if not matched:
            raise ModelLoadError(f"lora.target_modules {targets!r} match no module of the UNet")
        self.unet.add_adapter(PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                             init_lora_weights="gaussian", target_modules=targets))
        # peft's gaussian init leaves B=0, so the policy starts exactly at the base model
        self.unet.to(self.device)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that training changes (LoRA tensors in peft naming, or the full UNet), on CPU."""
        if self.lora_cfg.enabled:
            from peft import get_peft_model_state_dict

            return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.unet).items()}
        return {k: v.detach().cpu().clone() for k, v in self.unet.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.lora_cfg.enabled:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.unet, state)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"LoRA state has keys this model lacks, e.g. {unexpected[:2]} (different base model?)")
        else:
            self.unet.load_state_dict(state)

    # -- forward ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """CLIP text hidden states `[B, 77, E]`, cached per prompt (the text encoder is frozen)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            hidden = self.text_encoder(ids)[0]
            for p, h in zip(missing, hidden):
                self._prompt_cache[p] = h
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def noise(self, seeds: list[int]) -> torch.Tensor:
        return candidate_noise(seeds, self.latent_shape, self.device, self.dtype)

    @contextlib.contextmanager
    def base_model(self):
        """Within the block, :meth:`predict_x0` runs the frozen base (adapter disabled)."""
        if self.base_unet is not None:
            policy, self.unet = self.unet, self.base_unet
            try:
                yield
            finally:
                self.unet = policy
            return
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def predict_x0(self, noise: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """G(ε, c): one UNet call at t and the scheduler's x0 conversion. `[N, C, h, w] -> [N, C, h, w]`."""
        t = torch.full((noise.shape[0],), self.cfg.timestep, device=noise.device, dtype=torch.long)
        pred = self.unet(noise, t, encoder_hidden_states=text_emb.to(noise.dtype)).sample
        if self.prediction_type == "epsilon":
            return (noise - self.sqrt_one_minus_alpha_bar * pred) / self.sqrt_alpha_bar
        if self.prediction_type == "v_prediction":
            return self.sqrt_alpha_bar * noise - self.sqrt_one_minus_alpha_bar * pred
        raise ModelLoadError(f"unsupported prediction_type {self.prediction_type!r}")

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode to images in [0, 1], `[N, 4, h, w] -> [N, 3, H, W]` (fp32)."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], base: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents and images for one candidate per (prompt, seed) pair; ``base`` uses G_base."""
        emb = self.encode_prompts(prompts)
        ctx = self.base_model() if base else contextlib.nullcontext()
        with ctx:
            latents = self.predict_x0(self.noise(seeds), emb)
        return latents, self.decode(latents)
