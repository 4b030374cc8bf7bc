"""Planted-dictionary data: ground truth for crosscoder tests and benchmarks.

Features are sparse, non-negative and have one direction per model. A shared feature has a
unit direction in every model; a feature specific to model m has a direction in m and none
elsewhere. Activations are x_m = offset_m + sum_i a_i(t) * d_{i,m} + noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PlantedDictionary:
    model_names: tuple[str, ...]
    directions: np.ndarray  # [n_features, M, D]; all-zero rows where a feature is absent
    kinds: list[str]  # "shared" or the name of the only model that has the feature
    freqs: np.ndarray  # [n_features] firing probability per token
    offsets: np.ndarray  # [M, D] per-model mean offset

    @property
    def n_features(self) -> int:
        return len(self.kinds)

    def sample(self, n_tokens: int, *, noise: float = 0.02, seed: int = 0) -> np.ndarray:
        """Activations [n_tokens, M, D] (float32)."""
        rng = np.random.default_rng(seed)
        F, M, D = self.directions.shape
        on = rng.random((n_tokens, F)) < self.freqs
        mag = rng.uniform(0.5, 1.5, size=(n_tokens, F)) * on  # [N, F]
        x = np.einsum("nf,fmd->nmd", mag.astype(np.float32), self.directions.astype(np.float32))
        x += self.offsets[None]
        x += noise * rng.standard_normal(x.shape).astype(np.float32)
        return x.astype(np.float32)


def make_planted(
    d_model: int = 64,
    *,
    n_shared: int = 96,
    n_only: tuple[int, ...] = (32, 32),
    model_names: tuple[str, ...] = ("A", "B"),
    mean_active: float = 4.0,
    offset_scale: float = 1.0,
    seed: int = 0,
) -> PlantedDictionary:
    """Random unit directions per model; frequencies spread log-uniformly over a 10x range and
    scaled so a token has `mean_active` features on average."""
    if len(n_only) != len(model_names):
        raise ValueError("n_only needs one count per model")
    rng = np.random.default_rng(seed)
    M = len(model_names)
    F = n_shared + sum(n_only)
    dirs = rng.standard_normal((F, M, d_model))
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    kinds = ["shared"] * n_shared
    start = n_shared
    for m, count in enumerate(n_only):
        for i in range(start, start + count):
            keep = np.zeros(M, bool)
            keep[m] = True
            dirs[i, ~keep] = 0.0
            kinds.append(model_names[m])
        start += count
    freqs = np.exp(rng.uniform(np.log(0.1), np.log(1.0), size=F))
    freqs *= mean_active / freqs.sum()
    offsets = offset_scale * rng.standard_normal((M, d_model)) / np.sqrt(d_model)
    return PlantedDictionary(tuple(model_names), dirs, kinds, np.clip(freqs, 0, 1), offsets)


def match_features(planted: PlantedDictionary, W_dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each planted feature, the latent whose decoder best matches it and that cosine.

    Cosine is taken over the models where the feature exists (concatenated rows), so a
    model-specific feature is matched on its own model's decoder. W_dec: [M, L, D] acting on raw
    activations (``Crosscoder.export_raw()["W_dec"]``): the normalised-unit decoder scales each
    model's rows by its own factor, which tilts the concatenated cosine of a shared feature.
    Returns (best_latent [F], best_cos [F]).
    """
    F, M, D = planted.directions.shape
    best = np.zeros(F, dtype=np.int64)
    cos = np.zeros(F)
    for i in range(F):
        present = np.linalg.norm(planted.directions[i], axis=-1) > 0  # [M]
        target = planted.directions[i, present].reshape(-1)  # [|present| * D]
        cand = W_dec[present].transpose(1, 0, 2).reshape(W_dec.shape[1], -1)  # [L, |present| * D]
        c = cand @ target / (np.linalg.norm(cand, axis=-1) * np.linalg.norm(target) + 1e-12)
        best[i] = int(np.argmax(c))
        cos[i] = float(c[best[i]])
    return best, cos


def recovery_report(
    planted: PlantedDictionary, W_dec: np.ndarray, classes: np.ndarray, *, cos_min: float = 0.9
) -> dict:
    """How well a crosscoder recovered a planted dictionary.

    recovered: share of planted features whose best latent has cosine >= cos_min;
    class_accuracy: among recovered features, share whose latent's class matches the planted
    kind ("shared" or "<model>-only"); per_kind: the same, split by planted kind.
    """
    best, cos = match_features(planted, W_dec)
    rec = cos >= cos_min
    want = np.array(["shared" if k == "shared" else f"{k}-only" for k in planted.kinds], dtype=object)
    got = np.asarray(classes, dtype=object)[best]
    correct = got == want
    per_kind = {}
    for kind in sorted(set(planted.kinds)):
        sel = np.array([k == kind for k in planted.kinds])
        per_kind[kind] = {
            "n": int(sel.sum()),
            "recovered": float(rec[sel].mean()),
            "class_accuracy": float(correct[sel & rec].mean()) if (sel & rec).any() else 0.0,
        }
    return {
        "recovered": float(rec.mean()),
        "class_accuracy": float(correct[rec].mean()) if rec.any() else 0.0,
        "median_cos": float(np.median(cos)),
        "per_kind": per_kind,
    }
