"""Prompts of the shapes world in GenEval's templates, their metadata, and the train / held-out split.

A :class:`ToyPrompt` is a structured description — one or two groups (kind, count, colour or any) and
an optional relation — from which come its text (GenEval's wording: "a photo of two red circles",
"a photo of a circle left of a bar"), its GenEval metadata line (djghosh13/geneval
``evaluation_metadata.jsonl`` format, so the project's GenEval rules score it unchanged) and its scenes
(:meth:`ToyPrompt.scene`, deterministic from a seed).

Tasks (GenEval tags): ``single_object`` (a circle, any colour), ``counting`` (two/three shapes, any or
one named colour), ``colors`` (a red circle), ``two_object`` (a circle and a bar), ``position``
(a circle left of a bar) and ``color_attr`` (a red circle and a blue bar).

Split: every prompt is either ``train`` or ``heldout`` by a fixed arithmetic rule on the indices of its
words, chosen so every word (colour, shape, number, relation) still occurs in training; held-out
prompts are combinations the generator never saw in pretraining or alignment.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from drpo_core.toyworld.world import COLORS, SHAPES, Scene, place

NUMBERS = {1: "a", 2: "two", 3: "three"}
RELATIONS = ("left of", "right of", "above", "below")
TOY_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# Pretraining draws a task with these probabilities, then a training prompt of that task. The autoencoder and
# the scene encoder learn from counting-heavy renders (counts are what the scene encoder reads)...
RENDER_TASK_WEIGHTS = {"single_object": 0.1, "counting": 0.4, "colors": 0.2,
                       "two_object": 0.1, "position": 0.1, "color_attr": 0.1}
# ...and the generator from a colour-attribution-heavy mix: with RENDER_TASK_WEIGHTS the bar world's fourth base
# never learned which colour goes with which kind (held-out color_attr 0.105); with this mix it does (0.545).
PRETRAIN_TASK_WEIGHTS = {"single_object": 0.05, "counting": 0.25, "colors": 0.1,
                         "two_object": 0.1, "position": 0.15, "color_attr": 0.35}
POSITION_MARGIN = 0.2  # rendered position scenes satisfy the relation with twice GenEval's 0.1 dead zone


@dataclass(frozen=True)
class Group:
    """``count`` shapes of ``kind``, all ``color`` (or each a random colour when None)."""

    kind: str
    count: int = 1
    color: str | None = None

    def words(self) -> str:
        plural = "s" if self.count > 1 else ""
        color = f"{self.color} " if self.color else ""
        return f"{NUMBERS[self.count]} {color}{self.kind}{plural}"


@dataclass(frozen=True)
class ToyPrompt:
    """A prompt of the world: its GenEval task, one or two groups, and ``relation`` (first group w.r.t. second)."""

    tag: str
    groups: tuple[Group, ...]
    relation: str | None = None

    @property
    def text(self) -> str:
        if self.relation:
            return f"a photo of {self.groups[0].words()} {self.relation} {self.groups[1].words()}"
        return "a photo of " + " and ".join(g.words() for g in self.groups)

    def metadata(self) -> dict:
        """The GenEval metadata line (position: the second-named object is clause 0, as GenEval writes it)."""
        def clause(g: Group) -> dict:
            out = {"class": g.kind, "count": g.count}
            if g.color:
                out["color"] = g.color
            return out

        if self.relation:
            include = [clause(self.groups[1]), {**clause(self.groups[0]), "position": [self.relation, 0]}]
        else:
            include = [clause(g) for g in self.groups]
        meta = {"tag": self.tag, "include": include, "prompt": self.text}
        if self.tag == "counting":
            meta["exclude"] = [{"class": self.groups[0].kind, "count": self.groups[0].count + 1}]
        return meta

    def scene(self, seed: int) -> Scene:
        """A scene that satisfies the prompt, the same for the same seed (colour "any" drawn per object)."""
        rng = random.Random(f"{self.text}/{seed}")
        items = [(g.kind, g.color or rng.choice(COLORS)) for g in self.groups for _ in range(g.count)]
        accept = None
        if self.relation:
            from drpo_core.rewards.geneval.rules import relative_position

            def accept(scene: Scene) -> bool:  # shape 0 is the first-named group, shape 1 the second
                a, b = (torch.tensor(s.box, dtype=torch.float64) for s in scene)
                return self.relation in relative_position(a, b, POSITION_MARGIN)
        return place(items, rng, accept=accept)


def miscaptioned(prompt: ToyPrompt, seed: int, rate: float) -> ToyPrompt:
    """What an image captioned ``prompt`` shows when captions are noisy, as web alt-text is: with probability
    ``rate`` per named colour, the image's object has a different colour (uniform over the other three). The
    same (prompt, seed, rate) always gives the same answer; colour-free groups and ``rate = 0`` are unchanged."""
    if rate <= 0 or not any(g.color for g in prompt.groups):
        return prompt
    rng = random.Random(f"miscaption/{prompt.text}/{seed}")
    groups = tuple(Group(g.kind, g.count, rng.choice([c for c in COLORS if c != g.color]))
                   if g.color and rng.random() < rate else g for g in prompt.groups)
    return ToyPrompt(prompt.tag, groups, prompt.relation)


def _all_prompts() -> list[tuple[ToyPrompt, bool]]:
    """Every prompt of the world with its held-out flag (the split rule is in the module docstring)."""
    out: list[tuple[ToyPrompt, bool]] = []
    S, C = range(len(SHAPES)), range(len(COLORS))
    for s in S:
        out.append((ToyPrompt("single_object", (Group(SHAPES[s]),)), s == 1))  # "a photo of a bar"
    for s in S:
        for n in (2, 3):
            out.append((ToyPrompt("counting", (Group(SHAPES[s], n),)), (s + n) % 3 == 0))
    for n in (1, 2, 3):
        for c in C:
            for s in S:
                tag = "colors" if n == 1 else "counting"
                out.append((ToyPrompt(tag, (Group(SHAPES[s], n, COLORS[c]),)), (c + s + n) % 4 == 0))
    for a in S:
        for b in S:
            if a == b:
                continue
            out.append((ToyPrompt("two_object", (Group(SHAPES[a]), Group(SHAPES[b]))), {a, b} == {0, 2}))
            for r, relation in enumerate(RELATIONS):
                out.append((ToyPrompt("position", (Group(SHAPES[a]), Group(SHAPES[b])), relation), (a + b + r) % 4 == 0))
            for c1 in C:
                for c2 in C:
                    if c1 != c2:
                        groups = (Group(SHAPES[a], 1, COLORS[c1]), Group(SHAPES[b], 1, COLORS[c2]))
                        out.append((ToyPrompt("color_attr", groups), (a + b + c1 + c2) % 4 == 0))
    return out


@lru_cache(maxsize=None)
def toy_prompts(split: str = "all", tasks: tuple[str, ...] = TOY_TASKS) -> tuple[ToyPrompt, ...]:
    """Prompts of ``split`` (``train``, ``heldout`` or ``all``) whose task is in ``tasks``, in a fixed order."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split {split!r} is not one of train, heldout, all")
    unknown = set(tasks) - set(TOY_TASKS)
    if unknown:
        raise ValueError(f"unknown toy task(s) {sorted(unknown)}; tasks are {', '.join(TOY_TASKS)}")
    return tuple(p for p, held in _all_prompts()
                 if p.tag in tasks and (split == "all" or held == (split == "heldout")))


def find_prompt(text: str) -> ToyPrompt:
    """The :class:`ToyPrompt` whose text is ``text`` (ValueError if the world has no such prompt)."""
    for p, _ in _all_prompts():
        if p.text == text:
            return p
    raise ValueError(f"{text!r} is not a prompt of the shapes world")


def write_metadata_jsonl(prompts, path: str | Path) -> Path:
    """GenEval's evaluation_metadata.jsonl for ``prompts`` (one JSON object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p.metadata()) + "\n" for p in prompts))
    return path


def task_weights(overrides: str | dict | None = None) -> dict[str, float]:
    """:data:`PRETRAIN_TASK_WEIGHTS` with ``overrides`` (a dict, or ``"color_attr=0.35,counting=0.25"``) applied;
    ValueError naming an unknown task, a value that is not a number ≥ 0, or weights that sum to 0."""
    weights = dict(PRETRAIN_TASK_WEIGHTS)
    if isinstance(overrides, str):
        pairs = [item.split("=", 1) for item in overrides.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"task weights {overrides!r}: expected task=weight, comma-separated")
        overrides = {k.strip(): v.strip() for k, v in pairs}
    for task, value in (overrides or {}).items():
        if task not in weights:
            raise ValueError(f"task weights: unknown task {task!r}; tasks are {', '.join(TOY_TASKS)}")
        try:
            weights[task] = float(value)
        except ValueError:
            raise ValueError(f"task weights: {task}={value!r} is not a number") from None
        if not weights[task] >= 0:
            raise ValueError(f"task weights: {task}={value} is negative")
    if sum(weights.values()) <= 0:
        raise ValueError("task weights: all weights are 0")
    return weights


def pretraining_sampler(seed: int, split: str = "train", weights: dict[str, float] | None = None):
    """``draw(n) -> list[ToyPrompt]``: a task by ``weights`` (default :data:`PRETRAIN_TASK_WEIGHTS`), then a
    prompt of it, n times."""
    weights_of = weights or PRETRAIN_TASK_WEIGHTS
    rng = random.Random(seed)
    by_task = {t: toy_prompts(split, (t,)) for t in weights_of}
    tasks = [t for t in by_task if by_task[t] and weights_of[t] > 0]
    weights = [weights_of[t] for t in tasks]

    def draw(n: int) -> list[ToyPrompt]:
        return [rng.choice(by_task[t]) for t in rng.choices(tasks, weights, k=n)]

    return draw
