"""`drpo eval`: fixed prompts × fixed seeds → images, any rewards, GenEval-layout samples and a paired compare.

``run_eval`` generates one image per (prompt, seed) cell with the policy (a checkpoint) or the base model,
scores every cell with every reward, and returns the ``eval.json`` record:

* per reward: mean, std over cells, prompt-clustered standard error (seeds nested in prompts,
  :func:`~drpo_core.training.statistics.clustered_mean`), n; per GenEval task when the prompts carry
  GenEval metadata, and GenEval's ``overall`` (unweighted mean of the task means) for a GenEval reward;
* diversity: mean pairwise RMS pixel distance between the seeds of a prompt, averaged over prompts;
* distance to the base: per cell, RMS pixel distance and φ-feature distance (the config's frozen
  feature encoder) between the image and the base model's image for the same prompt and seed;
* the score tables themselves (prompts, tags, seeds, ``[P][S]`` per reward), which ``compare`` pairs.

Nothing time- or machine-dependent goes into the record, so the same command twice writes the same file.
:func:`write_geneval_layout` writes the images as djghosh13/geneval's generation script does
(``<index:05d>/metadata.jsonl``, ``<index:05d>/samples/<k:05d>.png``, ``<index:05d>/grid.png``), so the
official evaluator can score them too.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from drpo_core.training.evaluation import paired_gain
from drpo_core.training.statistics import clustered_mean

TOY_PRESETS = {"toy-heldout": "heldout", "toy-train": "train", "toy-all": "all"}


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` → ``[0, 1, 2, 3, 7]``; ValueError naming the bad part."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"--seeds {text!r}: {part!r} is not N or N-M (M ≥ N)")
        seeds += list(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r} lists a seed twice")
    return seeds


def resolve_prompts(spec: str | None, prompts_cfg) -> list[tuple[str, dict | None]]:
    """(prompt, GenEval metadata or None) pairs for ``--prompts``.

    Presets: ``toy-heldout`` / ``toy-train`` / ``toy-all`` (the shapes world, with metadata), ``train``
    (the config's training prompts) and ``heldout`` (the config's ``prompts.eval_file``, else its
    held-out template prompts; the default). Anything else is a file: ``.jsonl`` (GenEval metadata, one
    object with a ``prompt`` per line) or text (one prompt per line).
    """
    from drpo_core.training.prompts import _read_prompt_file, heldout_prompts, prompt_metadata, training_prompts

    spec = spec or "heldout"
    if spec in TOY_PRESETS:
        from drpo_core.toyworld.prompts import toy_prompts

        return [(p.text, p.metadata()) for p in toy_prompts(TOY_PRESETS[spec])]
    if spec == "train":
        meta = prompt_metadata(prompts_cfg)
        return [(p, meta.get(p)) for p in training_prompts(prompts_cfg)]
    if spec == "heldout":
        if getattr(prompts_cfg, "eval_file", None):
            return _read_prompt_file(Path(prompts_cfg.eval_file))
        return [(p, None) for p in heldout_prompts(prompts_cfg)]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"--prompts {spec!r} is neither a preset ({', '.join([*TOY_PRESETS, 'train', 'heldout'])}) "
                         "nor an existing file")
    return _read_prompt_file(path)


@torch.no_grad()
def generate_cells(generator, prompts: list[str], seeds: list[int], base: bool, batch: int = 64):
    """Latents `[P, S, C, h, w]` and images `[P, S, 3, H, W]` for every (prompt, seed) cell."""
    pairs = [(p, s) for p in prompts for s in seeds]
    latents, images = [], []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        lat, img = generator.generate([p for p, _ in chunk], [s for _, s in chunk], base=base)
        latents.append(lat.float().cpu())
        images.append(img.float().cpu())
    shape = (len(prompts), len(seeds))
    return torch.cat(latents).view(*shape, *latents[0].shape[1:]), torch.cat(images).view(*shape, *images[0].shape[1:])


def score_cells(reward, images: torch.Tensor, prompts: list[str], metadata: list[dict | None]) -> torch.Tensor:
    """Scores `[P, S]` of one reward (NaN where it returns none)."""
    P, S = images.shape[:2]
    flat_prompts = [p for p in prompts for _ in range(S)]
    flat_meta = [m for m in metadata for _ in range(S)] if any(m is not None for m in metadata) else None
    out = torch.as_tensor(reward(images.flatten(0, 1), flat_prompts, flat_meta), dtype=torch.float32).cpu()
    return out.view(P, S)


def describe(table: torch.Tensor) -> dict:
    """mean, std over valid cells, prompt-clustered se, n (cells), n_prompts."""
    cm = clustered_mean(table)
    valid = table[~torch.isnan(table)].double()
    std = float(valid.std(unbiased=False)) if valid.numel() else math.nan
    return {"mean": cm.mean, "std": std, "se": cm.se, "n": cm.n_cells, "n_prompts": cm.n_prompts}


def per_task(table: torch.Tensor, tags: list[str | None]) -> dict:
    """:func:`describe` per GenEval tag, and GenEval's ``overall`` = unweighted mean of the task means."""
    out = {}
    for tag in dict.fromkeys(t for t in tags if t):
        rows = [i for i, t in enumerate(tags) if t == tag]
        out[tag] = describe(table[rows])
    if out:
        out["overall"] = sum(v["mean"] for v in out.values()) / len(out)
    return out


def _pairwise_rms(images: torch.Tensor) -> float:
    flat = images.flatten(1).double()
    n = flat.shape[0]
    if n < 2:
        return math.nan
    d = torch.cdist(flat, flat) / math.sqrt(flat.shape[1])
    return float(d.sum() / (n * (n - 1)))


def feature_distance(encoder, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-cell φ distance `[N]`: mean over keys of ‖φ_k(a) − φ_k(b)‖ / √D_k (a, b: latents `[N, C, h, w]`)."""
    fa, fb = encoder(a), encoder(b)
    parts = [(fa[k].flatten(1) - fb[k].flatten(1)).norm(dim=1) / math.sqrt(fa[k].flatten(1).shape[1]) for k in fa]
    return torch.stack(parts).mean(0)


@torch.no_grad()
def run_eval(generator, rewards: dict, prompts: list[tuple[str, dict | None]], seeds: list[int], *, base: bool,
             encoder=None, source: dict | None = None) -> tuple[dict, dict]:
    """The ``eval.json`` record and the arrays behind it (``images``, ``base_images``, ``tables``)."""
    texts, metadata = [p for p, _ in prompts], [m for _, m in prompts]
    tags = [m.get("tag") if isinstance(m, dict) else None for m in metadata]
    latents, images = generate_cells(generator, texts, seeds, base=base)
    record: dict = {"source": source or {}, "prompts": texts, "tags": tags, "seeds": seeds, "rewards": {}, "tables": {}}
    tables = {}
    for label, reward in rewards.items():
        table = score_cells(reward, images, texts, metadata)
        tables[label] = table
        entry = describe(table)
        tasks = per_task(table, tags)
        if tasks:
            entry["per_task"] = tasks
        record["rewards"][label] = entry
        record["tables"][label] = [[None if math.isnan(v) else v for v in row] for row in table.tolist()]
    per_prompt_div = torch.tensor([[_pairwise_rms(images[i])] for i in range(len(texts))], dtype=torch.float64)
    record["diversity"] = describe(per_prompt_div) | {"what": "mean pairwise RMS pixel distance between seeds of a prompt"}
    base_images = images
    if base:
        record["distance_to_base"] = {"pixel_rms": 0.0, "features": 0.0}
    else:
        base_latents, base_images = generate_cells(generator, texts, seeds, base=True)
        pixel = (images - base_images).flatten(2).pow(2).mean(-1).sqrt()  # [P, S]
        record["distance_to_base"] = {"pixel_rms": describe(pixel)}
        if encoder is not None:
            feat = feature_distance(encoder, latents.flatten(0, 1), base_latents.flatten(0, 1)).view(len(texts), len(seeds))
            record["distance_to_base"]["features"] = describe(feat.cpu())
    return json_safe(record), {"images": images, "base_images": base_images, "tables": tables}


def json_safe(value):
    """NaN/inf → None, recursively (eval.json stays strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def compare(a: dict, b: dict) -> dict:
    """Paired differences B − A per reward (and per GenEval task) over the cells both records share."""
    cells_a = {(p, s): (i, j) for i, p in enumerate(a["prompts"]) for j, s in enumerate(a["seeds"])}
    prompts = [p for p in b["prompts"] if any((p, s) in cells_a for s in b["seeds"])]
    seeds = [s for s in b["seeds"] if any((p, s) in cells_a for p in prompts)]
    if not prompts or not seeds:
        raise ValueError("the two eval files share no (prompt, seed) cell")
    idx_b = {p: i for i, p in enumerate(b["prompts"])}
    seed_b = {s: j for j, s in enumerate(b["seeds"])}
    tags = [b["tags"][idx_b[p]] for p in prompts]
    out = {"prompts": len(prompts), "seeds": len(seeds), "rewards": {}}
    for label in [k for k in b["tables"] if k in a["tables"]]:
        def table(rec, lookup):
            rows = []
            for p in prompts:
                row = []
                for s in seeds:
                    cell = lookup(p, s)
                    v = rec["tables"][label][cell[0]][cell[1]] if cell is not None else None
                    row.append(math.nan if v is None else v)
                rows.append(row)
            return torch.tensor(rows, dtype=torch.float64)

        ta = table(a, lambda p, s: cells_a.get((p, s)))
        tb = table(b, lambda p, s: (idx_b[p], seed_b[s]))
        entry = {"all": paired_gain(ta, tb).as_dict()}
        for tag in dict.fromkeys(t for t in tags if t):
            rows = [i for i, t in enumerate(tags) if t == tag]
            entry[tag] = paired_gain(ta[rows], tb[rows]).as_dict()
        out["rewards"][label] = entry
    return out


def format_se_z(r: dict, digits: int = 4) -> tuple[str, str]:
    """A paired result's standard error and z as printed: n/a where they are undefined, never ``inf``."""
    one_prompt = r["n_prompts"] < 2  # no between-prompt spread: no standard error
    se = "n/a" if one_prompt else f"{r['gain_se']:.{digits}f}"
    # prompts whose gains are all equal have s.e. 0: z is undefined (null in the JSON), not "inf"
    z = "n/a" if one_prompt or r["z"] is None or not math.isfinite(r["z"]) else f"{r['z']:.1f}"
    return se, z


def format_compare(result: dict, name_a: str, name_b: str, columns: tuple[str, str, str] = ("A", "B", "B−A")) -> str:
    """The comparison as a table, one row per reward × subset; ``columns`` names A, B and the gain
    (`drpo eval summary` says base, final, gain)."""
    a, b, gain = columns
    lines = [f"paired {b} − {a} ({a} = {name_a}, {b} = {name_b}) over {result['prompts']} prompts × {result['seeds']} seeds; "
             "standard errors clustered by prompt", f"{'reward':24s} {'subset':14s} {a:>8s} {b:>8s} {gain:>8s} {'± se':>8s} {'z':>6s}"]
    for label, entry in result["rewards"].items():
        for subset, r in entry.items():
            se, z = format_se_z(r)
            lines.append(f"{label:24s} {subset:14s} {r['base_mean']:8.4f} {r['policy_mean']:8.4f} {r['gain']:+8.4f} {se:>8s} {z:>6s}")
    return "\n".join(lines)
