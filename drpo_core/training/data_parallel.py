"""Data-parallel learner arithmetic on a torch.distributed process group (gloo on CPU, NCCL on GPU).

The DrPO loss of a step is a mean over the kept prompt groups, L = (1/n) Σ_b L_b, and each L_b depends only
on group b (its candidates, anchors and base latents). With the B groups split over W workers, worker w
backpropagates Σ_{b ∈ w} L_b / n with n = Σ_w n_w (one all-reduce of the counts first), and the sum of the W
gradients (one all-reduce) is ∇L exactly, up to float summation order. Every worker then clips and steps
the same gradient from the same state: the optimizer states stay identical without being exchanged.

Who sets the group up (ranks, rendezvous) is the runtime's business (services/); this file only needs
``torch.distributed`` to be initialised, and does nothing when it is not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _device_for_collectives(like: torch.device) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU ones."""
    return like if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_count(n: int, device: torch.device) -> int:
    """Σ_w n_w over the workers (n itself when not distributed)."""
    if world_size() == 1:
        return n
    t = torch.tensor([float(n)], device=_device_for_collectives(device))
    dist.all_reduce(t)
    return int(t.item())


def all_reduce_gradients(params: list[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over the workers, in place, in one flat bucket (a worker whose groups
    were all skipped contributes zeros: it still joins the collective, or the others would wait forever)."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    device = _device_for_collectives(grads[0].device)
    flat = torch.cat([g.reshape(-1).to(device, torch.float32) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.device, g.dtype)
        offset += n


def sum_stats(stats: dict[str, float]) -> dict[str, float]:
    """Σ over the workers of each worker's additive statistics (keys present on any worker; missing = 0)."""
    if world_size() == 1:
        return dict(stats)
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, stats)
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def broadcast_state(module_params: list[torch.Tensor], extra: dict | None = None) -> dict | None:
    """Rank 0's parameters (in place) and ``extra`` (e.g. optimizer and scheduler state, returned) to every worker:
    a worker that joins from another checkpoint, or none, starts exactly where rank 0 is."""
    if world_size() == 1:
        return extra
    for p in module_params:
        device = _device_for_collectives(p.device)
        buf = p.detach().to(device)
        dist.broadcast(buf, src=0)
        with torch.no_grad():
            p.copy_(buf.to(p.device))
    box = [extra]
    dist.broadcast_object_list(box, src=0)
    return box[0]
