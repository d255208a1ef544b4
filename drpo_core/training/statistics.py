"""Standard errors that respect how evaluation cells are drawn: seeds are nested within prompts.

An evaluation scores a table ``x[P, S]`` (P prompts × S seeds). Cells of one prompt are correlated (the
prompt decides most of the reward), so treating the P·S cells as independent understates the standard
error, often by several times. Every gain this project reports uses the prompt-clustered (cluster-robust,
CR1) standard error of the mean instead:

    x̄  = Σ_i Σ_j x_ij / N                                  (N valid cells, G prompts with ≥ 1 valid cell)
    r_i = Σ_j (x_ij − x̄)                                    (residual total of prompt i)
    se  = sqrt( G / (G − 1) · Σ_i r_i² ) / N

With every prompt having the same number of valid seeds this is exactly the standard error of the G
per-prompt means, ``std(mean_j x_ij, ddof=1) / sqrt(G)``. NaN cells (a reward that returned nothing) are
dropped cell by cell. A paired comparison (same prompts and seeds, base vs policy) applies the same formula
to the per-cell differences.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ClusteredMean:
    mean: float
    se: float          # prompt-clustered (CR1) standard error of the mean
    n_cells: int       # valid (prompt, seed) cells
    n_prompts: int     # prompts with at least one valid cell (the clusters)

    def as_dict(self) -> dict:
        return asdict(self)


def clustered_mean(x: torch.Tensor) -> ClusteredMean:
    """Mean of `x[P, S]` and its prompt-clustered standard error; NaN cells are dropped.

    With a single prompt there is no between-prompt spread to estimate: ``se`` is NaN. No valid cell at all
    raises ``ValueError``.
    """
    if x.dim() != 2:
        raise ValueError(f"expected a [prompts, seeds] table, got shape {tuple(x.shape)}")
    x = x.double()
    valid = ~torch.isnan(x)
    counts = valid.sum(dim=1)                                   # [P] valid seeds per prompt
    G, N = int((counts > 0).sum()), int(counts.sum())
    if G == 0:
        raise ValueError("no valid score in the table (every cell is NaN)")
    filled = torch.where(valid, x, torch.zeros_like(x))
    mean = filled.sum() / N
    residual_totals = torch.where(valid, x - mean, torch.zeros_like(x)).sum(dim=1)   # [P] r_i
    se = math.sqrt(G / (G - 1) * float((residual_totals ** 2).sum())) / N if G > 1 else math.nan
    return ClusteredMean(mean=float(mean), se=se, n_cells=N, n_prompts=G)


def spread_over_runs(values: list[float]) -> dict:
    """Mean and spread of one figure over independent training runs (seeds): mean, sample std, min, max, n."""
    if not values:
        raise ValueError("no runs to summarise")
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std(unbiased=True)) if len(values) > 1 else float("nan")
    return {"mean": float(t.mean()), "std": std, "min": float(t.min()), "max": float(t.max()), "n": len(values)}
