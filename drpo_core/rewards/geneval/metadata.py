"""GenEval prompt metadata: the jsonl format of djghosh13/geneval ``prompts/evaluation_metadata.jsonl``.

One JSON object per prompt (prior-art.md §3.5)::

    {"tag": "counting", "prompt": "a photo of two clocks",
     "include": [{"class": "clock", "count": 2}],
     "exclude": [{"class": "clock", "count": 3}]}

Include clauses may carry ``"color"`` (one of :data:`COLORS`) and ``"position": [relation, index]``
(relation in :data:`RELATIONS`, index of an *earlier* include clause: the target object).
Malformed metadata is a data error: one ValueError line saying which field is wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")

# GenEval evaluation/object_names.txt: the 80 COCO classes in COCO order (detector class i ↔ entry i).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


@dataclass(frozen=True)
class Clause:
    """One include/exclude requirement: ``count`` objects of ``cls`` [with a colour] [placed relative to a target]."""

    cls: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None  # (relation, index of the target include clause)


@dataclass(frozen=True)
class GenEvalSpec:
    """A parsed metadata line: include clauses are ANDed, exclude clauses ORed."""

    tag: str
    prompt: str
    include: tuple[Clause, ...]
    exclude: tuple[Clause, ...] = ()

    @property
    def classes(self) -> list[str]:
        """Class names the metadata mentions, first-seen order (the queries of an open-vocabulary detector)."""
        return list(dict.fromkeys(c.cls for c in self.include + self.exclude))


def _clause(raw, where: str, n_earlier: int | None) -> Clause:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object, got {type(raw).__name__}")
    cls = raw.get("class")
    if not isinstance(cls, str) or not cls.strip():
        raise ValueError(f"{where}.class must be a non-empty string")
    count = raw.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{where}.count must be an integer ≥ 1, got {count!r}")
    color = raw.get("color")
    position = raw.get("position")
    if n_earlier is None and (color is not None or position is not None):
        raise ValueError(f"{where}: exclude clauses take only class and count")
    if color is not None and color not in COLORS:
        raise ValueError(f"{where}.color {color!r} is not one of {', '.join(COLORS)}")
    if position is not None:
        if (not isinstance(position, (list, tuple)) or len(position) != 2 or position[0] not in RELATIONS
                or isinstance(position[1], bool) or not isinstance(position[1], int)):
            raise ValueError(f"{where}.position must be [relation, index] with relation in {list(RELATIONS)}, got {position!r}")
        if not 0 <= position[1] < n_earlier:
            raise ValueError(f"{where}.position index {position[1]} must point to an earlier include clause")
        position = (position[0], position[1])
    return Clause(cls=cls, count=count, color=color, position=position)


def parse_metadata(raw: dict | str | GenEvalSpec) -> GenEvalSpec:
    """Validate one GenEval metadata object (dict or JSON text) and return its :class:`GenEvalSpec`."""
    if isinstance(raw, GenEvalSpec):
        return raw
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"geneval metadata is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"geneval metadata must be an object, got {type(raw).__name__}")
    tag = raw.get("tag")
    if tag not in TASKS:
        raise ValueError(f"geneval metadata tag {tag!r} is not one of {', '.join(TASKS)}")
    include, exclude = raw.get("include"), raw.get("exclude", [])
    if not isinstance(include, list) or not include:
        raise ValueError("geneval metadata needs a non-empty 'include' list")
    if not isinstance(exclude, list):
        raise ValueError("geneval metadata 'exclude' must be a list")
    return GenEvalSpec(
        tag=tag, prompt=str(raw.get("prompt", "")),
        include=tuple(_clause(c, f"include[{i}]", i) for i, c in enumerate(include)),
        exclude=tuple(_clause(c, f"exclude[{i}]", None) for i, c in enumerate(exclude)),
    )


def load_metadata_jsonl(path: str | Path) -> list[GenEvalSpec]:
    """Every line of a GenEval metadata file, parsed; errors name the file and line number."""
    specs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            specs.append(parse_metadata(line))
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
    return specs
