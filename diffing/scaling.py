"""Latent Scaling (Minder et al. 2025) in one streaming pass, for every latent at once: the
firing statistics and the β fits that diffing.analysis turns into ν (the formulas are in its
module docstring).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffing.crosscoder import Crosscoder, SparseActs
from diffing.logs import get_logger

# A batch whose activations keep at most this share of (token, latent) entries is reduced over
# its kept entries alone: O(K * M * D) instead of the dense O(B * L * M * D) decode and projections
# (at the Gemma shape, k = 100 of 114,688 latents: 30 of a batch's 40 TFLOP, and 4 [B, L] buffers).
SPARSE_MAX_DENSITY = 0.1


def _per_latent(v: Tensor, by_latent: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """[L, D] Σ_b f_bl v_b over the kept entries, = f.T @ v without the dense f: one
    embedding_bag with a bag per latent. v [B, D]; by_latent: (token rows, values, per-latent
    offsets) of the kept entries ordered by latent."""
    rows, vals, offsets = by_latent
    return F.embedding_bag(rows, v, offsets, mode="sum", per_sample_weights=vals)


@dataclass
class LatentStats:
    freq: np.ndarray  # [L] fraction of tokens where the latent fires
    mean_act: np.ndarray  # [L] mean activation when firing
    max_act: np.ndarray  # [L]
    beta_eps: (
        np.ndarray
    )  # [M, L] β of each model on the error target, direction of the latent's strongest model
    beta_r: np.ndarray  # [M, L] same, reconstruction target
    n_tokens: int
    target: np.ndarray | None = None  # [L] the model whose decoder direction β was measured along
    pair: tuple[int, int] | None = None  # the model indices (a, b) the targets were chosen from


def scaling_targets(norms: Tensor | np.ndarray, a: int, b: int) -> np.ndarray:
    """[L] the model of the pair (a, b) whose decoder is stronger: Latent Scaling measures every
    model's β along that decoder direction (ties: the lower index, as argmax over two models)."""
    n = np.asarray(norms.detach().cpu() if isinstance(norms, Tensor) else norms, dtype=np.float64)
    lo, hi = sorted((a, b))
    return np.where(n[lo] >= n[hi], lo, hi)


@torch.no_grad()
def latent_stats(
    model: Crosscoder,
    batches: Iterable[Tensor],
    *,
    max_tokens: int | None = None,
    pair: tuple[int, int] | tuple[str, str] = (0, 1),
) -> LatentStats:
    """One pass over raw batches [B, M, D]: firing statistics and Latent Scaling β for every latent,
    along the decoder direction of the stronger model of `pair` (model indices or names; with more
    than two models a third model's decoder must not stand in for the pair's)."""
    device = model.W_dec.device
    W = model.W_dec.float()  # [M, L, D]
    M, L, D = W.shape
    names = list(model.cfg.model_names or ())
    if any(isinstance(p, str) for p in pair):  # names, as latent_table takes them
        if unknown := [p for p in pair if isinstance(p, str) and p not in names]:
            raise ValueError(f"pair names {unknown}, not one of the crosscoder's models {names}")
        pair = tuple(names.index(p) if isinstance(p, str) else int(p) for p in pair)
    if len(pair) != 2 or not all(0 <= int(p) < M for p in pair) or pair[0] == pair[1]:
        raise ValueError(
            f"pair must be two different models: indices in 0..{M - 1} or names {names}; got {pair}"
        )
    target_np = scaling_targets(model.decoder_norms(), *pair)
    target = torch.as_tensor(target_np, device=device)  # [L]
    d = W[target, torch.arange(L, device=device)]  # [L, D] direction tested per latent
    d_sq = d.pow(2).sum(-1)  # [L]
    d_dot_own = torch.einsum("ld,mld->ml", d, W)  # [M, L] ⟨d, d_{m,l}⟩
    n_fire = torch.zeros(L, dtype=torch.float64, device=device)
    s_act = torch.zeros_like(n_fire)
    s_f2 = torch.zeros_like(n_fire)
    max_act = torch.zeros(L, device=device)
    num_eps = torch.zeros(M, L, dtype=torch.float64, device=device)
    num_r = torch.zeros_like(num_eps)
    n = 0
    t0 = last = time.monotonic()
    for xb in batches:
        if time.monotonic() - last >= 30:  # minutes per pass at the Gemma shape: say how far it is
            last = time.monotonic()
            rate = n / max(last - t0, 1e-9)
            eta = round((max_tokens - n) / max(rate, 1e-9)) if max_tokens else None
            get_logger("analyze").info("analyze.stats_progress", tokens=n, of=max_tokens, eta_s=eta)
        if max_tokens and n + xb.shape[0] > max_tokens:
            xb = xb[: max_tokens - n]  # exactly max_tokens, whatever the batch size
        x = model.normalise(xb.to(device))
        f = model.encode(x)  # [B, L]
        B = x.shape[0]
        if int(torch.count_nonzero(f)) <= SPARSE_MAX_DENSITY * f.numel():
            nz = f.nonzero()  # [K, 2] (token, latent), sorted by token
            rows, cols = nz[:, 0], nz[:, 1]
            vals = f[rows, cols]  # [K]
            del f  # every sum below runs over the K kept entries
            offsets = torch.searchsorted(rows, torch.arange(B, device=device))
            x_hat = model.decode_sparse(SparseActs(rows, cols, vals, offsets, B))
            f2 = torch.zeros_like(s_f2).index_add_(0, cols, vals.pow(2).double())  # [L] Σ f²
            n_fire.index_add_(0, cols, torch.ones_like(f2[cols]))
            s_act.index_add_(0, cols, vals.double())
            s_f2 += f2
            max_act.scatter_reduce_(0, cols, vals, reduce="amax")  # vals > 0: as the dense max with 0
            order = torch.argsort(cols, stable=True)
            by_latent = (
                rows[order],
                vals[order],
                torch.searchsorted(cols[order], torch.arange(L, device=device)),
            )
            for m in range(M):
                own = f2 * d_dot_own[m].double()  # Σ f² ⟨d, d_m⟩
                num_eps[m] += (_per_latent(x[:, m] - x_hat[:, m], by_latent) * d).sum(-1).double() + own
                num_r[m] += (_per_latent(x_hat[:, m] - model.b_dec[m], by_latent) * d).sum(-1).double()
        else:  # dense activations (an L1 crosscoder early in training, say): dense products
            x_hat = model.decode(f)
            err = x - x_hat
            recon = x_hat - model.b_dec
            f2 = f.pow(2).sum(0).double()
            n_fire += (f > 0).sum(0).double()
            s_act += f.sum(0).double()
            s_f2 += f2
            max_act = torch.maximum(max_act, f.max(0).values)
            for m in range(M):
                own = f2 * d_dot_own[m].double()  # Σ f² ⟨d, d_m⟩
                num_eps[m] += (f * (err[:, m] @ d.T)).sum(0).double() + own
                num_r[m] += (f * (recon[:, m] @ d.T)).sum(0).double()
        n += x.shape[0]
        if max_tokens and n >= max_tokens:
            break
    if n == 0:
        raise ValueError("latent_stats() got no data")
    den = (d_sq.double() * s_f2).clamp_min(1e-12)
    return LatentStats(
        freq=(n_fire / n).cpu().numpy(),
        mean_act=(s_act / n_fire.clamp_min(1)).cpu().numpy(),
        max_act=max_act.cpu().numpy(),
        beta_eps=(num_eps / den).cpu().numpy(),
        beta_r=(num_r / den).cpu().numpy(),
        n_tokens=n,
        target=target_np,
        pair=(int(pair[0]), int(pair[1])),
    )
