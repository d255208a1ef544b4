"""Loop oracles (float64, element by element) for the baseline losses and the reward-weighted drifts."""

from __future__ import annotations

import math

from tests.reference import drift_field_loop


def _mse(a, b):
    return sum((p - q) ** 2 for p, q in zip(a, b)) / len(a)


def pseudo_log_prob_loop(gen, targets):
    g, t = gen.tolist(), targets.tolist()
    return -sum(_mse(x, y) for x in g for y in t) / (len(g) * len(t))


def dpo_loss_loop(policy, reference, chosen, rejected, beta):
    gap = pseudo_log_prob_loop(policy, chosen) - pseudo_log_prob_loop(policy, rejected)
    ref_gap = pseudo_log_prob_loop(reference, chosen) - pseudo_log_prob_loop(reference, rejected)
    logit = beta * (gap - ref_gap)
    return math.log1p(math.exp(-logit))  # −log σ(logit)


def quasi_norm_advantages_loop(rewards, p, clip):
    r = [float(v) for v in rewards]
    mean = sum(r) / len(r)
    c = [v - mean for v in r]
    norm = sum(abs(v) ** p for v in c) ** (1 / p)
    adv = [math.sqrt(len(r)) * v / norm for v in c]
    return [max(-clip, min(clip, a)) for a in adv]


def neighbor_grpo_loss_loop(candidates, current, old, adv, clip_range, temperature):
    xs, cur, prev = candidates.tolist(), current.tolist(), old.tolist()
    total, count = 0.0, 0
    for a_cur, a_old in zip(cur, prev):
        lc = [-_mse(x, a_cur) / temperature for x in xs]
        lo = [-_mse(x, a_old) / temperature for x in xs]
        zc = math.log(sum(math.exp(v) for v in lc))
        zo = math.log(sum(math.exp(v) for v in lo))
        for k in range(len(xs)):
            ratio = math.exp((lc[k] - zc) - (lo[k] - zo))
            clipped = max(1 - clip_range, min(1 + clip_range, ratio))
            total += min(ratio * adv[k], clipped * adv[k])
            count += 1
    return -total / count


def _dist(a, b):
    return math.sqrt(max(sum((p - q) ** 2 for p, q in zip(a, b)), 1e-8))


def _softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def _awr_logits(scores, alpha, clip):
    v = [s / alpha for s in scores]
    m = max(v)
    return [max(-clip, min(clip, x - m)) for x in v]


def _kernel_force_loss(x, force, sigma):
    """Value of mean (x/σ − sg(x/σ + F))² = mean F² (the regression's value at the current point)."""
    n, d = len(x), len(x[0])
    return sum(f * f for row in force for f in row) / (n * d)


def awr_kernel_loss_loop(gen, ref, scores, alpha, radii, clip=20.0, topk_fraction=None, force_scale=1.0):
    """drpo-awr (``topk_fraction`` None) or drpo-awr-topk, laplacian kernel, value of the loss."""
    K, L, D = gen.shape
    x = gen.reshape(K * L, D).tolist()
    r = ref.reshape(K * L, D).tolist()
    pts = [float(scores[k]) for k in range(K) for _ in range(L)]
    N = len(x)
    both = x + r
    s = max(sum(_dist(a, b) for a in x for b in both) / (N * len(both)), 1e-3)
    sigma = max(s / math.sqrt(D), 1e-3)
    if topk_fraction is None:
        sets = None
    else:
        n = max(1, min(K, math.ceil(K * topk_fraction)))
        order = sorted(range(K), key=lambda k: (-float(scores[k]), k))
        top, bottom = order[:n], sorted(range(K), key=lambda k: (float(scores[k]), -k))[:n]
        sets = ([gen[k, l].tolist() for k in top for l in range(L)], [float(scores[k]) for k in top for _ in range(L)],
                [gen[k, l].tolist() for k in bottom for l in range(L)], [float(scores[k]) for k in bottom for _ in range(L)])
    force = [[0.0] * D for _ in range(N)]
    for radius in radii:
        F = []
        for i in range(N):
            k_r = [-_dist(x[i], b) / (s * radius) for b in r]
            w_r = _softmax(k_r)
            base = [sum(w_r[m] * r[m][d] for m in range(N)) / sigma for d in range(D)]
            if sets is None:
                k_x = [-_dist(x[i], b) / (s * radius) for b in x]
                rho = _awr_logits(pts, alpha, clip)
                w_rew, w_x = _softmax([a + b for a, b in zip(k_x, rho)]), _softmax(k_x)
                pos = [sum(w_rew[m] * x[m][d] for m in range(N)) / sigma for d in range(D)]
                neg = [sum(w_x[m] * x[m][d] for m in range(N)) / sigma for d in range(D)]
            else:
                T, ts, B, bs = sets
                wp = _softmax([-_dist(x[i], t) / (s * radius) + q for t, q in zip(T, _awr_logits(ts, alpha, clip))])
                wn = _softmax([-_dist(x[i], t) / (s * radius) + q for t, q in zip(B, _awr_logits([-v for v in bs], alpha, clip))])
                pos = [sum(wp[m] * T[m][d] for m in range(len(T))) / sigma for d in range(D)]
                neg = [sum(wn[m] * B[m][d] for m in range(len(B))) / sigma for d in range(D)]
            F.append([pos[d] - x[i][d] / sigma + base[d] - neg[d] for d in range(D)])
        rms = math.sqrt(max(sum(v * v for row in F for v in row) / (N * D), 1e-8))
        for i in range(N):
            for d in range(D):
                force[i][d] += force_scale * F[i][d] / rms
    return _kernel_force_loss(x, force, sigma)


def awr_hard_loss_loop(gen, scores, alpha, pos_weight, neg_weight, radii, top_fraction, clip=20.0):
    K, L, D = gen.shape
    n = max(1, min(K, math.ceil(K * top_fraction)))
    top = sorted(range(K), key=lambda k: (-float(scores[k]), k))[:n]
    bottom = sorted(range(K), key=lambda k: (float(scores[k]), -k))[:n]
    p_pos = _softmax(_awr_logits([float(scores[k]) for k in top for _ in range(L)], alpha, clip))
    p_neg = _softmax(_awr_logits([-float(scores[k]) for k in bottom for _ in range(L)], alpha, clip))
    pos = gen[top].reshape(-1, D)
    neg = gen[bottom].reshape(-1, D)
    V, _ = drift_field_loop(gen.reshape(-1, D), pos, neg, pos_weight=[pos_weight * len(p_pos) * p for p in p_pos],
                            neg_weight=[neg_weight * len(p_neg) * p for p in p_neg], radii=radii)
    return float(V.pow(2).mean())


def awr_advsign_loss_loop(gen, scores, alpha, pos_weight, neg_weight, radii, clip=20.0):
    K, L, D = gen.shape
    s = [float(v) for v in scores]
    mean = sum(s) / K
    adv = [v - mean for v in s]
    pos_side, neg_side = [a > 0 for a in adv], [a < 0 for a in adv]

    def weights(sign, side, w):
        idx = [k for k in range(K) if side[k]]
        logits = [max(-clip, min(clip, sign * adv[k] / alpha)) for k in idx]
        probs = dict(zip(idx, _softmax(logits)))
        return [w * len(idx) * probs.get(k, 0.0) for k in range(K) for _ in range(L)]

    points = gen.reshape(-1, D)
    V, _ = drift_field_loop(points, points, points, pos_weight=weights(1, pos_side, pos_weight),
                            neg_weight=weights(-1, neg_side, neg_weight), radii=radii)
    return float(V.pow(2).mean())
