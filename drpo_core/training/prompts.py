"""Training and held-out prompt lists, and a resumable epoch-shuffled prompt sampler."""

from __future__ import annotations

import json
import random
from pathlib import Path

from drpo_core.config import PromptsConfig


def _read_prompt_file(path: Path) -> list[tuple[str, dict | None]]:
    """Text file: one prompt per line. ``.jsonl``: one object per line with a ``prompt`` key; the whole
    object is that prompt's metadata (GenEval's evaluation_metadata.jsonl format works as is)."""
    if not path.is_file():
        raise ValueError(f"prompts.file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts.file {path} is not UTF-8 text (byte {e.start})") from None
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"prompts.file {path} line {n}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
                raise ValueError(f"prompts.file {path} line {n}: expected an object with a non-empty string 'prompt'")
            entries.append((record["prompt"], record))
        else:
            entries.append((line.strip(), None))
    if not entries:
        raise ValueError(f"prompts.file {path} holds no prompts")
    return entries


def training_prompts(cfg: PromptsConfig) -> list[str]:
    if cfg.file:
        return [p for p, _ in _read_prompt_file(Path(cfg.file))]
    return [cfg.template.format(color=c, object=o) for c in cfg.colors for o in cfg.objects]


def prompt_metadata(cfg: PromptsConfig) -> dict[str, dict]:
    """Per-prompt metadata passed to the rewards (from a ``.jsonl`` prompts file), else empty."""
    if not cfg.file:
        return {}
    return {p: m for p, m in _read_prompt_file(Path(cfg.file)) if m is not None}


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
