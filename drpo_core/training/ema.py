"""An exponential moving average of the trained weights, for evaluation and export.

After every optimizer step, θ_ema ← β·θ_ema + (1 − β)·θ over the generator's trainable tensors (the LoRA
or the full UNet); the first step's weights start it (θ_ema = θ_1, as diffusers' ``EMAModel`` does). Sampling and the gradient keep using θ:
DrPO's candidates must come from the current policy. Evaluation, the final grids and the exported model use
θ_ema, which averages out the step-to-step noise of a small-batch policy update (the shapes world measures
what that is worth: docs/toyworld.md).

The arithmetic is diffusers' ``EMAModel`` (``diffusers.training_utils``), the one diffusers' own training
scripts use. Its default ramps β as (1 + s)/(10 + s), which after s steps averages only about the last s/9
of them; a DrPO run is a few hundred to a few thousand steps, so β here is constant (``min_decay = decay``)
and the mean age of the average is β/(1 − β) steps (199 for β = 0.995).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from diffusers.training_utils import EMAModel


class TrainableEMA:
    """θ_ema of ``generator``'s trainable parameters with constant decay ``decay`` (β).

    ``state_dict()`` / ``load_state_dict()`` use the same names as ``generator.trainable_state_dict()``, so a
    checkpoint's ``ema.safetensors`` loads wherever its ``trainable.safetensors`` does.
    """

    def __init__(self, generator, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.generator, self.decay = generator, decay
        self.params = generator.trainable_parameters()
        self.average = EMAModel(self.params, decay=decay, min_decay=decay)

    @property
    def steps(self) -> int:
        """Optimizer steps averaged so far."""
        return int(self.average.optimization_step)

    def step(self) -> None:
        """Fold the current θ in (call after each optimizer step)."""
        self.average.step(self.params)

    def reset(self) -> None:
        """Start the average again from the current θ (a resumed run whose checkpoint has no average)."""
        self.average = EMAModel(self.params, decay=self.decay, min_decay=self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The generator holds θ_ema inside the block and θ again after it (bit-exact)."""
        self.average.store(self.params)
        self.average.copy_to(self.params)
        try:
            yield
        finally:
            self.average.restore(self.params)

    # -- state: trainable-state-dict naming for files, plain tensors for the data-parallel broadcast ---------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """θ_ema named like ``generator.trainable_state_dict()`` (on CPU)."""
        with self.applied():
            return self.generator.trainable_state_dict()

    def load_state_dict(self, tensors: dict[str, torch.Tensor], steps: int) -> None:
        """Set θ_ema from a ``state_dict()`` and the number of steps it averaged; θ is left as it was."""
        self.average.store(self.params)
        try:
            self.generator.load_trainable_state_dict({k: v.to(self.generator.device) for k, v in tensors.items()})
            with torch.no_grad():
                for shadow, p in zip(self.average.shadow_params, self.params, strict=True):
                    shadow.copy_(p.detach())
        finally:
            self.average.restore(self.params)
        self.average.optimization_step = steps

    def state(self) -> dict:
        """Everything to continue the average exactly, as plain tensors in parameter order."""
        return {"steps": self.steps, "shadow": [s.detach().cpu() for s in self.average.shadow_params]}

    def load_state(self, state: dict) -> None:
        with torch.no_grad():
            for shadow, value in zip(self.average.shadow_params, state["shadow"], strict=True):
                shadow.copy_(value.to(shadow.device))
        self.average.optimization_step = int(state["steps"])
