"""GenEval's correctness rules over kept detections (djghosh13/geneval ``evaluate_images.py``).

Two rule sets, both documented in prior-art.md §3.5:

* :func:`evaluate_geneval` — the benchmark rule (``evaluate``): per include clause take the top-``count``
  detections (fewer → wrong), then ≥ ``count`` of them must have the requested colour, then every one
  must stand in the requested relation to every object of the target clause; an exclude clause fails
  the image when ≥ ``count`` objects of its class were kept. Score = 1.0 or 0.0.
* :func:`evaluate_exact` — flow_grpo's training variant (``evaluate_reward``): *all* kept detections of
  the class, exactly ``count`` of them, exactly ``count`` with the colour. ``correct`` is the strict
  0/1 reward, ``score`` the partial credit: the mean of per-clause terms
  ``1 − |count − found| / count`` (found = detections, then colour matches), a 0 term when the count is
  wrong but colour/position was asked, and 1/0 for a passed/failed position check.
  Deviations, on purpose: flow_grpo appends a 1 *after* a failed position check as well (so a failure
  scores 0 and 1); here it scores 0 only. flow_grpo ignores exclude clauses; here they also fail the
  strict reward (in GenEval's metadata only counting prompts have them, with count + 1 of the same
  class, which the exact-count rule already rejects), while the partial score ignores them as flow_grpo
  does. The count term is not clamped: finding more than twice ``count`` gives a negative term.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from drpo_core.rewards.geneval.detection import ColorClassifier, Found, Thresholds
from drpo_core.rewards.geneval.metadata import COLORS, Clause, GenEvalSpec

GREY_999 = 0x99 / 255  # GenEval composites masked objects over a flat #999 canvas before cropping


@dataclass
class ClauseVerdict:
    """What one include clause asked for and what was found."""

    cls: str
    count: int
    found: int  # detections considered (top-count for the benchmark rule, all for the exact rule)
    color: str | None = None
    colors_found: list[str] | None = None  # classifier output per considered object
    relation: str | None = None
    position_ok: bool | None = None
    matched: bool = False


@dataclass
class ImageVerdict:
    """Verdict for one image: ``correct`` (0/1 rule), ``score`` (reward value), reasons and per-clause detail."""

    tag: str
    correct: bool
    score: float
    reasons: list[str] = field(default_factory=list)
    clauses: list[ClauseVerdict] = field(default_factory=list)


def relative_position(box_a: torch.Tensor, box_b: torch.Tensor, threshold: float = 0.1) -> set[str]:
    """Relations of A w.r.t. B ("left of", "right of", "above", "below"; y grows downward).

    offset = centre_A − centre_B; each axis shrinks toward 0 by threshold·(size_A + size_B) (sign kept,
    clamped at 0); both shrunk axes < 1e-3 → no relation; else the shrunk offset divided by the
    *unshrunk* offset's norm gives (dx, dy), and |d| > 0.5 on an axis names that side.
    """
    a, b = box_a.double(), box_b.double()
    center_a, center_b = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    size_a, size_b = (a[2:] - a[:2]).abs(), (b[2:] - b[:2]).abs()
    offset = center_a - center_b
    revised = (offset.abs() - threshold * (size_a + size_b)).clamp_min(0) * offset.sign()
    if bool((revised.abs() < 1e-3).all()):
        return set()
    dx, dy = (revised / offset.norm()).tolist()
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def crop_for_color(image: torch.Tensor, obj: Found) -> torch.Tensor:
    """GenEval's ``ImageCrops``: object over a #999 canvas (when masked), cropped to its box. `[3, h, w]`.

    The box is rounded like PIL's ``Image.crop`` and clamped to the image (PIL would pad with black).
    """
    if obj.mask is not None:
        if tuple(obj.mask.shape) != tuple(image.shape[-2:]):
            raise ValueError(f"mask {tuple(obj.mask.shape)} does not match image {tuple(image.shape[-2:])}")
        image = torch.where(obj.mask.to(image.device)[None], image, torch.full_like(image, GREY_999))
    h, w = image.shape[-2:]
    x1, y1, x2, y2 = (round(float(v)) for v in obj.box)
    x1, y1 = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
    x2, y2 = min(max(x2, x1 + 1), w), min(max(y2, y1 + 1), h)
    return image[:, y1:y2, x1:x2]


def _colors(image, objs: list[Found], clause: Clause, classify: ColorClassifier | None,
            colors: Sequence[str]) -> list[str]:
    if classify is None:
        raise ValueError(f"geneval metadata asks for a {clause.color} {clause.cls} but no colour classifier is set")
    return list(classify([crop_for_color(image, o) for o in objs], clause.cls, colors))


def _position_failure(objs, targets, relation, th: Thresholds) -> set[str] | None:
    """None when every object is ``relation`` every target, else the relations found for the first failure."""
    for obj in objs:
        for target in targets:
            found = relative_position(obj.box, target.box, th.position_threshold)
            if relation not in found:
                return found
    return None


def evaluate_geneval(image: torch.Tensor, objects: dict[str, list[Found]], spec: GenEvalSpec,
                     classify: ColorClassifier | None = None, th: Thresholds = Thresholds(),
                     colors: Sequence[str] = COLORS) -> ImageVerdict:
    """The GenEval benchmark rule (see module docstring). ``objects`` from :func:`keep_detections`."""
    verdict = ImageVerdict(tag=spec.tag, correct=True, score=1.0)
    groups: list[list[Found] | None] = []
    for clause in spec.include:
        objs = objects.get(clause.cls, [])[: clause.count]
        cv = ClauseVerdict(clause.cls, clause.count, len(objs), clause.color, relation=clause.position and clause.position[0])
        matched = len(objs) >= clause.count
        if not matched:
            verdict.reasons.append(f"expected {clause.cls}>={clause.count}, found {len(objs)}")
        else:
            if clause.color is not None:
                cv.colors_found = _colors(image, objs, clause, classify, colors)
                if cv.colors_found.count(clause.color) < clause.count:
                    matched = False
                    verdict.reasons.append(f"expected {clause.color} {clause.cls}>={clause.count}, found "
                                           f"{cv.colors_found.count(clause.color)} {clause.color} ({cv.colors_found})")
            if clause.position is not None and matched:
                relation, target = clause.position
                if groups[target] is None:
                    matched = cv.position_ok = False
                    verdict.reasons.append(f"no target for {clause.cls} to be {relation}")
                else:
                    failure = _position_failure(objs, groups[target], relation, th)
                    cv.position_ok = failure is None
                    if failure is not None:
                        matched = False
                        verdict.reasons.append(f"expected {clause.cls} {relation} target, found "
                                               f"{' and '.join(sorted(failure)) or 'no relation to'} target")
        cv.matched = matched
        verdict.clauses.append(cv)
        groups.append(objs if matched else None)
        verdict.correct &= matched
    _apply_exclusions(spec, objects, verdict)
    verdict.score = float(verdict.correct)
    return verdict


def evaluate_exact(image: torch.Tensor, objects: dict[str, list[Found]], spec: GenEvalSpec,
                   classify: ColorClassifier | None = None, th: Thresholds = Thresholds(),
                   colors: Sequence[str] = COLORS) -> ImageVerdict:
    """flow_grpo's exact-count rule: ``correct`` = strict 0/1, ``score`` = partial credit (module docstring)."""
    verdict = ImageVerdict(tag=spec.tag, correct=True, score=0.0)
    terms: list[float] = []
    groups: list[list[Found] | None] = []
    for clause in spec.include:
        objs = objects.get(clause.cls, [])
        cv = ClauseVerdict(clause.cls, clause.count, len(objs), clause.color, relation=clause.position and clause.position[0])
        terms.append(1 - abs(clause.count - len(objs)) / clause.count)
        matched = len(objs) == clause.count
        if not matched:
            verdict.reasons.append(f"expected {clause.cls}=={clause.count}, found {len(objs)}")
            if clause.color is not None or clause.position is not None:
                terms.append(0.0)
        else:
            if clause.color is not None:
                cv.colors_found = _colors(image, objs, clause, classify, colors)
                hits = cv.colors_found.count(clause.color)
                terms.append(1 - abs(clause.count - hits) / clause.count)
                if hits != clause.count:
                    matched = False
                    verdict.reasons.append(f"expected {clause.color} {clause.cls}=={clause.count}, found {hits} "
                                           f"{clause.color} ({cv.colors_found})")
            if clause.position is not None and matched:
                relation, target = clause.position
                failure = None if groups[target] is None else _position_failure(objs, groups[target], relation, th)
                cv.position_ok = groups[target] is not None and failure is None
                terms.append(float(cv.position_ok))
                if not cv.position_ok:
                    matched = False
                    verdict.reasons.append(f"no target for {clause.cls} to be {relation}" if groups[target] is None
                                           else f"expected {clause.cls} {relation} target, found "
                                                f"{' and '.join(sorted(failure)) or 'no relation to'} target")
        cv.matched = matched
        verdict.clauses.append(cv)
        groups.append(objs if matched else None)
        verdict.correct &= matched
    _apply_exclusions(spec, objects, verdict)
    verdict.score = sum(terms) / len(terms) if terms else 0.0
    return verdict


def _apply_exclusions(spec, objects, verdict) -> None:
    """Exclude clauses are ORed: any class present ``count`` times or more fails the image."""
    for clause in spec.exclude:
        n = len(objects.get(clause.cls, []))
        if n >= clause.count:
            verdict.correct = False
            verdict.reasons.append(f"expected {clause.cls}<{clause.count}, found {n}")
