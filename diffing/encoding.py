"""Encoding a subset of a crosscoder's latents without the others: what the evidence passes run
on every held-out row (diffing.examples, diffing.collect)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffing.crosscoder import Crosscoder


class SubsetEncoder:
    """Threshold encoding of a subset of latents: f[:, latents] without computing the others.

    Matches `Crosscoder.encode(x)[:, latents]` whenever that is batch-independent (L1, or BatchTopK
    with its inference threshold set); an untrained threshold falls back to the full batch encode.
    """

    def __init__(self, model: Crosscoder, latents: Sequence[int]):
        # only the selected latents' encoder columns are kept (the tasks that carry this to Ray
        # workers pickle it: 22 MB for 512 latents at the Gemma-2-9b shape, not the 9.9 GB model)
        self.norm_scale = model.norm_scale.detach().float().cpu().clone()
        self.latents = torch.as_tensor(np.asarray(latents, np.int64))
        M, D, L = model.W_enc.shape
        with torch.no_grad():
            W = model.W_enc.detach().reshape(M * D, L)
            every = len(self.latents) == L and bool((self.latents == torch.arange(L)).all())
            self.W = (W if every else W[:, self.latents]).float().cpu().contiguous()  # all: a view
            self.b = model.b_enc.detach()[self.latents].float().cpu()
            self.norm_sum = model.decoder_norms().detach().sum(0)[self.latents].float().cpu()
        self.threshold = float(model.threshold)
        self.kind = model.cfg.kind
        if self.kind == "batchtopk" and self.threshold < 0:
            # batch top-k would make a latent's activation depend on the rows encoded with it, so
            # the scan and the window passes (different rows) would disagree
            raise ValueError(
                "the crosscoder has no BatchTopK inference threshold (saved before any training "
                "step): fit it before collecting evidence"
            )

    @torch.no_grad()
    def __call__(self, x_raw: torch.Tensor | np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(x_raw)) if isinstance(x_raw, np.ndarray) else x_raw
        x = x.float() * self.norm_scale[None, :, None]  # Crosscoder.normalise
        act = torch.relu(x.reshape(x.shape[0], -1) @ self.W + self.b)
        if self.kind == "batchtopk":
            act = act * (act * self.norm_sum > self.threshold)
        return act.numpy()
