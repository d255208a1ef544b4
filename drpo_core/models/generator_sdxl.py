"""One-step SDXL-Turbo generator: the SD-Turbo generator with SDXL's conditioning.

What differs from SD-Turbo (as ``StableDiffusionXLPipeline`` computes it, guidance off):

- two text encoders, ``CLIPTextModel`` and ``CLIPTextModelWithProjection``; each contributes its
  penultimate hidden states, concatenated on the channel axis → ``encoder_hidden_states`` `[B, 77, E₁+E₂]`;
- the second encoder's projected pooled output ``text_embeds`` `[B, P]`;
- six added time ids per image: original size (H, W), crop top-left (0, 0), target size (H, W);
- SDXL's VAE overflows in fp16, so it is kept in fp32 when the model runs in fp16 (``force_upcast``): its
  weights are upcast at load for ``model.dtype: float16``, and its decode runs with autocast off under an
  fp16 autocast (``trainer.mixed_precision: fp16``); bf16 has fp32's range and keeps the VAE in bf16.

The one UNet step at t=999 and the x0 conversion are the parent's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from drpo_core.models.generator import OneStepGenerator, tokenize_prompts
from drpo_core.training.precision import autocast_dtype, autocast_off


@dataclass(frozen=True)
class SdxlCondition:
    """SDXL's per-image conditioning; what :meth:`SdxlOneStepGenerator.encode_prompts` returns."""

    hidden: torch.Tensor  # [B, 77, E₁+E₂] penultimate hidden states of both encoders
    pooled: torch.Tensor  # [B, P] projected pooled output of the second encoder
    time_ids: torch.Tensor  # [B, 6] original size, crop top-left, target size

    def to(self, dtype: torch.dtype) -> "SdxlCondition":
        return SdxlCondition(self.hidden.to(dtype), self.pooled.to(dtype), self.time_ids.to(dtype))

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getitem__(self, idx) -> "SdxlCondition":
        return SdxlCondition(self.hidden[idx], self.pooled[idx], self.time_ids[idx])


class SdxlOneStepGenerator(OneStepGenerator):
    """SDXL-Turbo-family one-step generator; LoRA / full fine-tuning / base / seeding as the parent."""

    KIND = "sdxl-turbo"

    def _load_components(self, path: str):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        self.tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
        self.text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=self.dtype, variant=self.cfg.variant)
        self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=self.dtype, variant=self.cfg.variant)
        self.vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=self.dtype, variant=self.cfg.variant)
        if self.dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            self.vae.to(torch.float32)
        self.unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=self.dtype, variant=self.cfg.variant)
        expected = self.unet.add_embedding.linear_1.in_features
        passed = 6 * self.unet.config.addition_time_embed_dim + self.text_encoder_2.config.projection_dim
        if expected != passed:
            raise ValueError(f"UNet expects {expected} added-embedding inputs, text_encoder_2 and 6 time ids give {passed}")
        return DDPMScheduler.from_pretrained(path, subfolder="scheduler")

    def frozen_modules(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2, self.vae, self.unet]

    def vae_precision(self):
        """fp32 decode under an fp16 autocast when the VAE asks for it (``force_upcast``, as StableDiffusionXLPipeline)."""
        if self.vae.config.get("force_upcast", False) and autocast_dtype() == torch.float16:
            return autocast_off()
        return contextlib.nullcontext()

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> SdxlCondition:
        """Both encoders' penultimate states, pooled embeds and time ids, cached per prompt (frozen encoders)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            states = []
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                with autocast_off():  # in model.dtype, whatever role's autocast asks first (the cache is shared)
                    out = encoder(tokenize_prompts(tokenizer, missing).input_ids.to(self.device), output_hidden_states=True)
                states.append(out.hidden_states[-2])
            hidden, pooled = torch.cat(states, dim=-1), out.text_embeds  # `out` is text_encoder_2's
            for p, h, e in zip(missing, hidden, pooled):
                self._prompt_cache[p] = (h, e)
        side = self.cfg.resolution
        time_ids = torch.tensor([side, side, 0, 0, side, side], device=self.device, dtype=self.dtype)
        return SdxlCondition(hidden=torch.stack([self._prompt_cache[p][0] for p in prompts]),
                             pooled=torch.stack([self._prompt_cache[p][1] for p in prompts]),
                             time_ids=time_ids.expand(len(prompts), 6))

    def unet_forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: SdxlCondition) -> torch.Tensor:
        dtype = self.unet.conv_in.weight.dtype
        cond = cond.to(dtype)
        return self.unet(sample.to(dtype), timestep, encoder_hidden_states=cond.hidden,
                         added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": cond.time_ids}).sample
