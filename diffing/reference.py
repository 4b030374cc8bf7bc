"""A straightforward dense BatchTopK crosscoder: the correctness oracle for tests and the
baseline for bench/fit_throughput.py. Written the way a careful standard implementation
(dense einsum encoder and decoder, mask-based top-k) does it; no sparse tricks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dense_batch_topk(pre: Tensor, norm_sum: Tensor, k: int) -> Tensor:
    """f [B, L]: relu(pre) where relu(pre)*norm_sum is among the k*B largest of the batch, else 0."""
    act = F.relu(pre)
    score = (act * norm_sum).flatten()
    idx = torch.topk(score.detach(), min(k * pre.shape[0], score.numel())).indices
    mask = torch.zeros_like(score)
    mask[idx] = 1.0
    return act * mask.view_as(act) * (act > 0)


class DenseCrosscoder(nn.Module):
    def __init__(
        self, n_models: int, d_model: int, n_latents: int, k: int, auxk_alpha: float = 1 / 32, aux_k: int = 64
    ):
        super().__init__()
        self.k, self.auxk_alpha, self.aux_k = k, auxk_alpha, aux_k
        self.W_enc = nn.Parameter(torch.empty(n_models, d_model, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_models, n_latents, d_model))
        self.b_dec = nn.Parameter(torch.zeros(n_models, d_model))

    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, M, D] -> (loss, x_hat [B, M, D], f [B, L])."""
        pre = torch.einsum("bmd,mdl->bl", x, self.W_enc) + self.b_enc
        norm_sum = self.W_dec.norm(dim=-1).sum(0)
        f = dense_batch_topk(pre, norm_sum, self.k)
        x_hat = torch.einsum("bl,mld->bmd", f, self.W_dec) + self.b_dec
        err = x - x_hat
        loss = err.pow(2).sum((1, 2)).mean()
        if dead_mask is not None and dead_mask.any() and self.auxk_alpha > 0:
            kk = min(self.aux_k, int(dead_mask.sum()))
            masked = pre.masked_fill(~dead_mask, float("-inf"))
            top = torch.topk(masked, kk, dim=-1)
            f_aux = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
            e_hat = torch.einsum("bl,mld->bmd", f_aux, self.W_dec)
            e = err.detach()
            aux = (e_hat - e).pow(2).sum((1, 2)).mean() / e.pow(2).sum((1, 2)).mean().clamp_min(1e-8)
            loss = loss + self.auxk_alpha * aux
        return loss, x_hat, f
