"""The one collective a Ray Train fit needs beyond DDP's gradient all-reduce: `train_step`'s
`reduce` hook (which latents fired, the global batch size, the BatchTopK threshold's and the logged
metrics' means) and the loop's check that every rank still has a batch."""

from __future__ import annotations

import torch


def dist_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """All-reduce across the DDP group (identity when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    if op == "max":
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    elif op == "min":
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    else:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        if op == "mean":
            t /= dist.get_world_size()
    return t
