"""Training and held-out prompt lists, and a resumable epoch-shuffled prompt sampler."""

from __future__ import annotations

import random
from pathlib import Path

from drpo_core.config import PromptsConfig


def training_prompts(cfg: PromptsConfig) -> list[str]:
    if cfg.file:
        path = Path(cfg.file)
        if not path.is_file():
            raise ValueError(f"prompts.file not found: {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompts.file {path} holds no prompts")
        return prompts
    return [cfg.template.format(color=c, object=o) for c in cfg.colors for o in cfg.objects]


def heldout_prompts(cfg: PromptsConfig) -> list[str]:
    """Prompts never trained on: the colours with ``eval_objects``."""
    return [cfg.template.format(color=c, object=o) for c in cfg.colors for o in cfg.eval_objects]


class PromptSampler:
    """Draws prompts in shuffled epochs; ``state()`` / ``load_state()`` make the order resumable."""

    def __init__(self, prompts: list[str], seed: int):
        if not prompts:
            raise ValueError("no training prompts")
        self.prompts, self.seed = list(prompts), seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def next(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            out.append(self.prompts[self._order[self.position]])
            self.position += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffled(self.epoch)
