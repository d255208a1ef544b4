"""One-step SD-Turbo-family generator x = G_θ(ε, c) on real diffusers classes.

``G_θ``: the UNet2DConditionModel is called once at t=999 on x_t = √(1−ᾱ_t)·ε for unit Gaussian ε,
and the scheduler's ᾱ_t converts its prediction to the clean latent:

    epsilon:       x0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t
    v_prediction:  x0 = √ᾱ_t x_t − √(1−ᾱ_t) v̂

``model.x0: official`` instead follows the official SD-Turbo code (``sdturbo.one_step_clean_latent``): the
UNet sees ε unscaled and a DDIM step to t=0 with its rounded constants gives

    x0 = ((ε − 0.9977 ε̂) / 0.0683) · 0.9996 + 0.0292 ε̂        (0.9977 ≈ √(1−ᾱ_999), 0.0683 ≈ √ᾱ_999,
                                                             0.9996 ≈ √ᾱ_0, 0.0292 ≈ √(1−ᾱ_0))

which, for the same ε̂ and SD-Turbo's ᾱ, is the pipeline form + 0.055 ε + 0.042 ε̂ (and the UNet sees a 0.23 %
larger input). Exported models reproduce the 'pipeline' form (stock diffusers). The default ('pipeline') is
exactly what the stock one-step pipeline computes (``StableDiffusion[XL]Pipeline`` with the
models' Euler "trailing" scheduler, ``num_inference_steps=1``, ``guidance_scale=0``, ``latents=ε``):
it scales ε by ``init_noise_sigma`` = σ_max and ``scale_model_input`` divides by √(σ_max²+1), which is
√(1−ᾱ_t)·ε; its Euler step to σ=0 returns x0. So an exported model reproduces training-time samples.

The frozen base ``G_base`` is the same UNet with its LoRA adapter disabled (no second copy). Every
candidate is reproducible from its seed: ε comes from a per-candidate ``torch.Generator``.
:class:`OneStepGenerator` is the SD-Turbo family; ``generator_sdxl.SdxlOneStepGenerator`` overrides
only loading, prompt encoding and the UNet call. :func:`load_generator` picks by ``model.kind``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from drpo_core.config import LoraConfig, ModelConfig
from drpo_core.models.model_arch import KIND_PIPELINE, ModelLoadError, check_architecture
from drpo_core.models.speed import LoraMerger, apply_speed_options
from drpo_core.models.tiny_models import tiny_sd_turbo_path, tiny_sdxl_path

__all__ = ["ModelLoadError", "OneStepGenerator", "load_generator", "candidate_noise", "resolve_model_path"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_model_path(path: str, revision: str | None = None) -> str:
    """'tiny' / 'tiny-sdxl' → the embedded random models (built on first use); 'toy' → the committed shapes-world
    base; a local folder must exist;
    a hub id → its snapshot in the Hugging Face cache at ``revision`` (drpo_core/models/hub.py)."""
    if path == "tiny":
        return str(tiny_sd_turbo_path())
    if path == "tiny-sdxl":
        return str(tiny_sdxl_path())
    if path == "toy":  # the committed pretrained base of the shapes world (drpo_core/toyworld/base_model)
        from drpo_core.toyworld import BASE_MODEL

        return str(BASE_MODEL)
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file() and not (local / "unet").is_dir():
            raise ModelLoadError(f"model.path {path!r} is a folder without model_index.json or unet/: not a diffusers pipeline")
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelLoadError(f"model.path {path!r} does not exist (expected a local pipeline folder or a hub id like org/name)")
    from drpo_core.models.hub import resolve_pretrained

    try:
        return str(resolve_pretrained(path, "model.path", want="dir", revision=revision))
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def candidate_noise(seeds: list[int], shape: tuple[int, int, int], device: torch.device, dtype=torch.float32) -> torch.Tensor:
    """ε for each candidate from its own generator seed, `[N, C, h, w]`; independent of global RNG."""
    out = torch.empty((len(seeds), *shape), dtype=torch.float32)
    for i, seed in enumerate(seeds):
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        out[i] = torch.randn(shape, generator=gen, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def clean_prompt(text: str) -> str:
    """open_clip's prompt cleaning (ftfy fix, HTML unescape, whitespace collapse) before BPE."""
    import html

    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split())


def tokenize_prompts(tokenizer, prompts: list[str]):
    """CLIP token ids `[B, 77]` (+ attention mask) that equal ``open_clip.tokenize`` on the content tokens."""
    return tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt")


class OneStepGenerator:
    """SD-Turbo-family one-step generator with an optional LoRA adapter (peft) or full fine-tuning."""

    KIND = "sd-turbo"

    def __init__(self, model_cfg: ModelConfig, lora_cfg: LoraConfig):
        self.cfg, self.lora_cfg = model_cfg, lora_cfg
        self.device = resolve_device(model_cfg.device)
        self.dtype = getattr(torch, model_cfg.dtype)
        self.pipeline_class = KIND_PIPELINE[self.KIND]  # the stock diffusers pipeline this generator reproduces
        path = resolve_model_path(model_cfg.path, model_cfg.revision)
        check_architecture(path, model_cfg.path, self.KIND)
        try:
            scheduler = self._load_components(path)
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"cannot load a {self.KIND} pipeline from {model_cfg.path!r}: {str(e).splitlines()[0]}") from None
        self.prediction_type = scheduler.config.prediction_type
        alpha_bar = scheduler.alphas_cumprod[model_cfg.timestep].item()
        self.sqrt_alpha_bar, self.sqrt_one_minus_alpha_bar = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if model_cfg.resolution % self.vae_scale:
            raise ModelLoadError(f"model.resolution {model_cfg.resolution} is not a multiple of the VAE factor {self.vae_scale}")
        self.latent_shape = (self.unet.config.in_channels, model_cfg.resolution // self.vae_scale, model_cfg.resolution // self.vae_scale)

        for module in self.frozen_modules():
            module.requires_grad_(False).eval().to(self.device)
        self.base_unet, self._merger = None, None
        if lora_cfg.enabled:
            self._add_lora()
            self._merger = LoraMerger(self.unet)
        else:  # full fine-tuning keeps one frozen base copy for the reference drift
            self.base_unet = copy.deepcopy(self.unet).requires_grad_(False)
            # fp32 master weights: AdamW steps of ~lr·1e-3 vanish below half precision's resolution
            self.unet.to(torch.float32).requires_grad_(True)
        apply_speed_options(self)
        self._prompt_cache: dict = {}

    def _load_components(self, path: str):
        """Load tokenizer, text encoder, VAE and UNet onto ``self``; return the scheduler."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=self.dtype, variant=self.cfg.variant)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=self.dtype, variant=self.cfg.variant)
        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=self.dtype, variant=self.cfg.variant)
        return DDPMScheduler.from_pretrained(path, subfolder="scheduler")

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.vae, self.unet]

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
                                             init_lora_weights=True if cfg.init == "default" else "gaussian",
                                             target_modules=targets))
        # both inits leave B=0, so the policy starts exactly at the base model
        self.unet.to(self.device)
        for p in self.trainable_parameters():  # fp32 LoRA weights under a half-precision base (peft casts inputs)
            p.data = p.data.float()
        if cfg.init_from:  # start from an existing LoRA instead of B = 0
            from drpo_core.models.model_card import read_lora

            try:
                state = read_lora(cfg.init_from)
                self._load_trainable({k: v.to(self.device, torch.float32) for k, v in state.items()})
            except (ValueError, RuntimeError) as e:
                detail = next((l.strip() for l in str(e).splitlines() if "mismatch" in l), str(e).splitlines()[0])
                raise ModelLoadError(f"lora.init_from {cfg.init_from!r} does not fit lora.rank={cfg.rank}, "
                                     f"target_modules={targets!r}: {detail}" if "mismatch" in detail else str(e)) from None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that training changes (LoRA tensors in peft naming, or the full UNet), on CPU."""
        if self.lora_cfg.enabled:
            from peft import get_peft_model_state_dict

            return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(self.unet).items()}
        return {k: v.detach().cpu().clone() for k, v in self.unet.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        was_merged = self._merger is not None and self._merger.merged
        if was_merged:  # a sampling-only generator stays merged: restore W₀, load, merge the new adapter
            self._merger.unmerge()
        try:
            self._load_trainable(state)
        finally:
            if self._merger is not None:
                self._merger.invalidate()
            if was_merged:
                self._merger.merge()

    def _load_trainable(self, state: dict[str, torch.Tensor]) -> None:
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
            ids = tokenize_prompts(self.tokenizer, missing).input_ids.to(self.device)
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
        was_merged = self._merger.merged
        self._merger.unmerge()  # peft would otherwise unmerge by subtraction (inexact) when disabled
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()
            if was_merged:
                self._merger.merge()

    # -- merged LoRA for sampling -----------------------------------------------------------------
    def merge_lora(self, keep: bool = False) -> None:
        """Fold the LoRA into the UNet weights until :meth:`unmerge_lora` (a sampling-only generator calls
        this once; :meth:`load_trainable_state_dict` keeps it merged: W₀ restored bit-exactly, new adapter
        loaded, merged once). ``keep``: also keep the merged weights, so the frozen-base forward of
        :meth:`base_model` and back costs two copies instead of a re-merge (only for a generator whose LoRA
        changes through :meth:`load_trainable_state_dict` alone, never through an optimizer)."""
        if self._merger is not None:
            self._merger.keep_merged = keep
            self._merger.merge()

    def unmerge_lora(self) -> None:
        if self._merger is not None:
            self._merger.unmerge()

    @contextlib.contextmanager
    def merged(self):
        """Within the block the LoRA is merged (no-op if already merged or full fine-tuning)."""
        if self._merger is None or self._merger.merged:
            yield
            return
        self._merger.merge()
        try:
            yield
        finally:
            self._merger.unmerge()

    def unet_forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond) -> torch.Tensor:
        """The UNet's raw prediction for ``sample`` `[N, C, h, w]` at ``timestep`` `[N]` given :meth:`encode_prompts` output."""
        dtype = self.unet.conv_in.weight.dtype
        return self.unet(sample.to(dtype), timestep, encoder_hidden_states=cond.to(dtype)).sample

    def predict_x0(self, noise: torch.Tensor, text_emb) -> torch.Tensor:
        """G(ε, c): one UNet call at t and the scheduler's x0 conversion. `[N, C, h, w] -> [N, C, h, w]`."""
        if self._merger is not None and self._merger.merged and torch.is_grad_enabled():
            raise RuntimeError("the LoRA is merged for sampling; a forward that trains it needs unmerge_lora() first")
        t = torch.full((noise.shape[0],), self.cfg.timestep, device=noise.device, dtype=torch.long)
        if self.cfg.x0 == "official":  # the official SD-Turbo conversion (module docstring)
            pred = self.unet_forward(noise, t, text_emb)
            return (((noise - 0.9977 * pred) / 0.0683) * 0.9996 + 0.0292 * pred).to(noise.dtype)
        x_t = self.sqrt_one_minus_alpha_bar * noise
        pred = self.unet_forward(x_t, t, text_emb)
        if self.prediction_type == "epsilon":
            x0 = (x_t - self.sqrt_one_minus_alpha_bar * pred) / self.sqrt_alpha_bar
        elif self.prediction_type == "v_prediction":
            x0 = self.sqrt_alpha_bar * x_t - self.sqrt_one_minus_alpha_bar * pred
        else:
            raise ModelLoadError(f"unsupported prediction_type {self.prediction_type!r}")
        return x0.to(noise.dtype)  # policy (fp32 master UNet) and base latents share one dtype

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Differentiable VAE decode to images in [0, 1], `[N, 4, h, w] -> [N, 3, H, W]` (fp32)."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE decode to images in [0, 1], `[N, 4, h, w] -> [N, 3, H, W]` (fp32), without gradients."""
        return self.vae_decode(latents)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], base: bool = False,
                 noise: torch.Tensor | None = None, decode: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents and images for one candidate per (prompt, seed) pair; ``base`` uses G_base.
        ``noise`` `[N, C, h, w]` replaces the seeds' own ε (Neighbor-GRPO's correlated noises).
        ``decode=False``: the latents only (images None; the caller decodes them with :meth:`decode`)."""
        emb = self.encode_prompts(prompts)
        merge = self.merged() if self.cfg.merge_lora_for_sampling and not base else contextlib.nullcontext()
        eps = self.noise(seeds) if noise is None else noise.to(device=self.device, dtype=self.dtype)
        with merge, (self.base_model() if base else contextlib.nullcontext()):
            latents = self.predict_x0(eps, emb)
        return latents, self.decode(latents) if decode else None


def load_generator(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> OneStepGenerator:
    """The generator class for ``model_cfg.kind`` (sd-turbo → OneStepGenerator, sdxl-turbo → SdxlOneStepGenerator)."""
    if model_cfg.kind == "sdxl-turbo":
        from drpo_core.models.generator_sdxl import SdxlOneStepGenerator

        return SdxlOneStepGenerator(model_cfg, lora_cfg)
    return OneStepGenerator(model_cfg, lora_cfg)
