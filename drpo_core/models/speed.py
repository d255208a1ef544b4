"""Speed and memory options of a generator (``ModelConfig``), and exact LoRA merging for sampling.

Merging folds the adapter into the base weights, W = W₀ + s·BA, so sampling runs one matmul per
adapted layer instead of three. peft's own ``unmerge`` subtracts s·BA again, which in fp16/bf16 leaves
a rounding residue in W₀ that grows with every weight update (a sampler reloads weights every step);
:class:`LoraMerger` instead keeps a copy of W₀ of the adapted layers only and copies it back.
"""

from __future__ import annotations

import torch


class LoraMerger:
    """Merge / restore the active LoRA adapters of one peft-adapted model."""

    def __init__(self, model: torch.nn.Module):
        from peft.tuners.lora import LoraLayer

        self.layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
        self._pristine: dict[str, torch.Tensor] | None = None  # W₀ of every adapted layer, made on first merge
        self.merged = False
        # a sampling-only generator (its LoRA changes only through load_trainable_state_dict, which calls
        # invalidate) keeps W₀ + s·BA too, so a swap to the base model and back costs copies, not a re-merge
        self.keep_merged = False
        self._merged_copy: dict[str, torch.Tensor] | None = None
        self.merges = 0  # W₀ + s·BA computations (once per weight version when keep_merged)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W₀ + Σ_adapters s·BA, rounded once from fp32; peft's forward then skips the LoRA path."""
        if self.merged:
            return
        if self._pristine is None:
            self._pristine = {name: layer.get_base_layer().weight.detach().clone() for name, layer in self.layers}
        if self._merged_copy is None:
            copy = {}
            for name, layer in self.layers:
                weight = layer.get_base_layer().weight
                merged = self._pristine[name].float()
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        merged = merged + layer.get_delta_weight(adapter).float()
                copy[name] = merged.to(weight.dtype)
            self.merges += 1
            if self.keep_merged:
                self._merged_copy = copy
        else:
            copy = self._merged_copy
        for name, layer in self.layers:
            layer.get_base_layer().weight.copy_(copy[name])
            layer.merged_adapters.extend(a for a in layer.active_adapters if a in layer.lora_A)
        self.merged = True

    def invalidate(self) -> None:
        """The adapter weights changed: the next merge computes W₀ + s·BA again."""
        self._merged_copy = None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Copy W₀ back (bit-exact) and mark the adapters unmerged."""
        if not self.merged:
            return
        for name, layer in self.layers:
            layer.get_base_layer().weight.copy_(self._pristine[name])
            layer.merged_adapters.clear()
        self.merged = False


def apply_speed_options(generator) -> None:
    """Apply ``generator.cfg``'s attention / memory-format / VAE / checkpointing options to its modules."""
    cfg = generator.cfg
    unets = [generator.unet] + ([generator.base_unet] if generator.base_unet is not None else [])
    if cfg.attention != "default":
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        processor = AttnProcessor2_0 if cfg.attention == "sdpa" else AttnProcessor
        for module in (*unets, generator.vae):
            module.set_attn_processor(processor())
    if cfg.channels_last:
        for module in (*unets, generator.vae):
            module.to(memory_format=torch.channels_last)
    if cfg.vae_tiling:
        generator.vae.enable_tiling()
    if cfg.vae_slicing:
        generator.vae.enable_slicing()
    if cfg.gradient_checkpointing:
        generator.unet.enable_gradient_checkpointing()  # the trainable UNet; its frozen base copy never backprops
        generator.vae.enable_gradient_checkpointing()  # pixel encoders backprop through the VAE decoder


class gradient_checkpointing_off:
    """Context: run ``unet`` without gradient checkpointing, restoring the setting afterwards.

    A frozen-UNet feature encoder runs the *base* model (adapter disabled) inside a context that has
    ended by the time backward runs; recomputing its blocks then would use the enabled adapter.
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet, self.was_on = unet, bool(getattr(unet, "is_gradient_checkpointing", False))

    def __enter__(self):
        if self.was_on:
            self.unet.disable_gradient_checkpointing()
        return self.unet

    def __exit__(self, *exc) -> None:
        if self.was_on:
            self.unet.enable_gradient_checkpointing()
