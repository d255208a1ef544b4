"""Slow, obviously correct loop implementations used only as oracles for the vectorised core."""

from __future__ import annotations

import math

import torch


def drift_field_loop(gen, pos, neg, *, pos_weight=3000.0, neg_weight=3000.0, self_weight=1.0,
                     radii=(0.02, 0.05, 0.2), kernel="laplacian", mask_negative_self=False):
    """Element-by-element transcription of drpo-method.md §1.6.1 in float64. Returns (V, sigma)."""
    x = [[float(v) for v in row] for row in gen]
    N, D = len(x), len(x[0])
    targets, weights, repel, self_index = [], [], [], []
    if self_weight > 0:
        for i, row in enumerate(x):
            targets.append(row); weights.append(self_weight); repel.append(True); self_index.append(i)
    def weight(w, j):  # one weight for all anchors, or one per anchor (reward-weighted variants)
        return float(w[j]) if hasattr(w, "__len__") else w

    for i, row in enumerate(neg.tolist()):
        targets.append(row); weights.append(weight(neg_weight, i)); repel.append(True)
        self_index.append(i if mask_negative_self else None)
    for j, row in enumerate(pos.tolist()):
        targets.append(row); weights.append(weight(pos_weight, j)); repel.append(False); self_index.append(None)
    T = len(targets)

    def dist(a, b):
        return math.sqrt(max(sum((p - q) ** 2 for p, q in zip(a, b)), 1e-8))

    d = [[dist(x[i], targets[j]) for j in range(T)] for i in range(N)]
    s = sum(d[i][j] * weights[j] for i in range(N) for j in range(T)) / (N * T) / (sum(weights) / T)
    s = max(s, 1e-3)
    sigma = max(s / math.sqrt(D), 1e-3)

    V = [[0.0] * D for _ in range(N)]
    for r in radii:
        logit = [[0.0] * T for _ in range(N)]
        for i in range(N):
            for j in range(T):
                if kernel == "laplacian":
                    logit[i][j] = -d[i][j] / (s * r)
                elif kernel == "rbf":
                    logit[i][j] = -0.5 * (d[i][j] / (s * r)) ** 2
                else:
                    na = math.sqrt(sum(v * v for v in x[i])) or 1e-12
                    nb = math.sqrt(sum(v * v for v in targets[j])) or 1e-12
                    logit[i][j] = sum(p * q for p, q in zip(x[i], targets[j])) / (na * nb) / r
                if self_index[j] == i:
                    logit[i][j] -= 100.0 / r
        row_sm = [[math.exp(logit[i][j] - max(logit[i])) for j in range(T)] for i in range(N)]
        row_sm = [[v / sum(row) for v in row] for row in row_sm]
        col_max = [max(logit[i][j] for i in range(N)) for j in range(T)]
        col_e = [[math.exp(logit[i][j] - col_max[j]) for j in range(T)] for i in range(N)]
        col_sum = [sum(col_e[i][j] for i in range(N)) for j in range(T)]
        A = [[math.sqrt(max(row_sm[i][j] * col_e[i][j] / col_sum[j], 1e-6)) * weights[j] for j in range(T)] for i in range(N)]
        F = [[0.0] * D for _ in range(N)]
        for i in range(N):
            P = sum(A[i][j] for j in range(T) if not repel[j])
            Nm = sum(A[i][j] for j in range(T) if repel[j])
            for k in range(D):
                pull = sum(A[i][j] * (targets[j][k] - x[i][k]) / sigma for j in range(T) if not repel[j])
                push = sum(A[i][j] * (targets[j][k] - x[i][k]) / sigma for j in range(T) if repel[j])
                F[i][k] = Nm * pull - P * push
        rms = math.sqrt(sum(v * v for row in F for v in row) / (N * D))
        for i in range(N):
            for k in range(D):
                V[i][k] += F[i][k] / max(rms, 1e-12)
    return torch.tensor(V, dtype=torch.float64), sigma
