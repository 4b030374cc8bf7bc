"""The crosscoder: one shared latent dictionary, one decoder per model.

For M models with activations x_m in R^D at the same token, a crosscoder with L latents computes

    pre   = sum_m x_m @ W_enc[m] + b_enc                     [B, L]
    f     = sparsify(relu(pre))                              [B, L]   (BatchTopK or L1)
    x̂_m   = f @ W_dec[m] + b_dec[m]                          [B, M, D]

Shapes: W_enc [M, D, L], W_dec [M, L, D], b_enc [L], b_dec [M, D]. Latent l has one decoder
row per model, d_{m,l} = W_dec[m, l]; a latent whose row is ~0 in model A but not in B exists
only in B. The model works in *normalised* units (x_m * c_m with c_m = sqrt(D) / E||x_m||, stored
in `norm_scale`); `export_raw()` exports weights that act on raw activations.

BatchTopK (Bussmann et al. 2024, crosscoder form of Minder et al. 2025): per batch keep the
k * B largest entries of relu(pre) * sum_m ||d_{m,l}|| and zero the rest. After training,
an EMA threshold on that score makes encoding batch-independent. Decoding is sparse
(`embedding_bag` over the kept entries), which is what makes training fast on CPU: only the
encoder matmul is dense.

L1 (Anthropic 2024 / Kissane et al.): f = relu(pre), penalty sum_l f_l * sum_m ||d_{m,l}||.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffing.config import CrosscoderConfig


@dataclass
class SparseActs:
    """Kept (token, latent) entries of a batch, sorted by token."""

    rows: Tensor  # [K] int64 token index in the batch
    cols: Tensor  # [K] int64 latent index
    vals: Tensor  # [K] activation values (carry grad)
    offsets: Tensor  # [B] start of each token's entries in rows/cols/vals
    batch: int

    def to_dense(self, n_latents: int) -> Tensor:
        out = torch.zeros(self.batch, n_latents, dtype=self.vals.dtype, device=self.vals.device)
        out[self.rows, self.cols] = self.vals
        return out


@dataclass
class Output:
    x_hat: Tensor  # [B, M, D] reconstruction (normalised units)
    loss: Tensor  # scalar: what the optimiser minimises
    mse: Tensor  # scalar: mean over tokens of sum_{m,d} err^2
    aux: Tensor  # scalar: AuxK loss (normalised) or 0
    sparsity: Tensor  # scalar: weighted L1 term (L1 kind) or 0
    acts: SparseActs | None  # BatchTopK kept entries
    dense_acts: Tensor | None  # L1 activations [B, L]
    min_score: Tensor | None  # smallest kept positive score (BatchTopK), for the inference threshold


class Crosscoder(nn.Module):
    def __init__(self, cfg: CrosscoderConfig, *, seed: int | None = 0):
        super().__init__()
        if not cfg.is_resolved:
            raise ValueError(
                "Crosscoder needs a resolved config: call cfg.resolve(...) with the store's shape"
            )
        self.cfg = cfg
        M, D, L = cfg.n_models, cfg.d_model, cfg.n_latents
        self.W_enc = nn.Parameter(torch.empty(M, D, L))
        self.b_enc = nn.Parameter(torch.zeros(L))
        self.W_dec = nn.Parameter(torch.empty(M, L, D))
        self.b_dec = nn.Parameter(torch.zeros(M, D))
        self.register_buffer("norm_scale", torch.ones(M))  # c_m: raw -> normalised units
        self.register_buffer("threshold", torch.tensor(-1.0))  # BatchTopK inference threshold; <0 = unset
        if seed is not None:
            self.reset_parameters(seed)

    # -- init -------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Random decoder rows of norm dec_init_norm per model; encoder = decoder transpose."""
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(self.W_dec.shape, generator=g)
        w = w / w.norm(dim=-1, keepdim=True) * self.cfg.dec_init_norm
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.transpose(1, 2))
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def init_b_dec(self, x: Tensor) -> None:
        """Set b_dec to the per-model geometric median of a normalised sample x [N, M, D]."""
        self.b_dec.copy_(geometric_median(x.float()))

    # -- pieces -----------------------------------------------------------------------------
    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    def normalise(self, x: Tensor) -> Tensor:
        """Raw activations [B, M, D] -> normalised units (float32)."""
        return x.float() * self.norm_scale[None, :, None]

    def decoder_norms(self) -> Tensor:
        """||d_{m,l}|| [M, L]."""
        return self.W_dec.norm(dim=-1)

    def encode_pre(self, x: Tensor) -> Tensor:
        """Pre-activations [B, L] from normalised x [B, M, D]: one dense matmul over M*D."""
        B, M, D = x.shape
        return x.reshape(B, M * D) @ self.W_enc.reshape(M * D, -1) + self.b_enc

    def decode(self, f: Tensor) -> Tensor:
        """Dense decode: f [B, L] -> x̂ [B, M, D]."""
        return torch.einsum("bl,mld->bmd", f, self.W_dec) + self.b_dec

    def decode_sparse(self, acts: SparseActs, *, bias: bool = True) -> Tensor:
        """Sparse decode of kept entries -> [B, M, D]; cost O(K * M * D) instead of O(B * L * M * D).

        One embedding_bag over W_dec viewed as [M * L, D] (model m's rows at m * L): per-model calls
        on W_dec[m] would each allocate a zero [M, L, D] gradient in the backward (5 GB per call at
        the Gemma-2-9b shape)."""
        M, L, D = self.W_dec.shape
        K, B = acts.cols.numel(), acts.batch
        shift = torch.arange(M, device=acts.cols.device)
        cols = (acts.cols[None, :] + shift[:, None] * L).flatten()  # [M * K]
        offsets = (acts.offsets[None, :] + shift[:, None] * K).flatten()  # [M * B]
        vals = acts.vals.repeat(M)  # [M * K]
        out = F.embedding_bag(cols, self.W_dec.view(M * L, D), offsets, mode="sum", per_sample_weights=vals)
        out = out.view(M, B, D).transpose(0, 1)  # [B, M, D]
        return out + self.b_dec if bias else out

    def batch_topk(self, pre: Tensor, k: int, norm_sum: Tensor) -> tuple[SparseActs, Tensor]:
        """Keep the k*B entries of relu(pre) * norm_sum with the highest score."""
        B, L = pre.shape
        act = F.relu(pre)
        score = (act * norm_sum).detach().flatten()
        idx = topk_indices(score, min(k * B, score.numel()))
        idx = idx[score[idx] > 0]  # a kept entry must be active
        min_score = score[idx].min() if idx.numel() else score.new_tensor(0.0)
        return _sparse_from_flat(idx.sort().values, act, L, B), min_score

    def threshold_acts(self, pre: Tensor, norm_sum: Tensor) -> Tensor:
        """Batch-independent BatchTopK encoding: keep entries whose score exceeds the EMA threshold."""
        act = F.relu(pre)
        return act * (act * norm_sum > self.threshold)

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        *,
        k: int | None = None,
        dead_mask: Tensor | None = None,
        l1_coeff: float | None = None,
    ) -> Output:
        """Training forward on normalised x [B, M, D] (DDP-safe: everything goes through here)."""
        cfg = self.cfg
        pre = self.encode_pre(x)
        norm_sum = self.decoder_norms().sum(0)  # [L]
        zero = pre.new_zeros(())
        if cfg.kind == "l1":
            f = F.relu(pre)
            x_hat = self.decode(f)
            mse = (x - x_hat).pow(2).sum((1, 2)).mean()
            sparsity = (f * norm_sum).sum(-1).mean()
            coeff = cfg.l1_coeff if l1_coeff is None else l1_coeff
            return Output(x_hat, mse + coeff * sparsity, mse, zero, sparsity, None, f, None)

        acts, min_score = self.batch_topk(pre, k or cfg.k, norm_sum)
        x_hat = self.decode_sparse(acts)
        err = x - x_hat
        mse = err.pow(2).sum((1, 2)).mean()
        aux = zero
        if cfg.auxk_alpha > 0 and dead_mask is not None and bool(dead_mask.any()):
            aux = self._auxk_loss(pre, err.detach(), dead_mask)
        loss = mse + cfg.auxk_alpha * aux
        return Output(x_hat, loss, mse, aux, zero, acts, None, min_score)

    def _auxk_loss(self, pre: Tensor, err: Tensor, dead_mask: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024): the top aux_k dead latents per token reconstruct the residual error."""
        B, L = pre.shape
        dead = torch.nonzero(dead_mask).squeeze(1)  # [n_dead]
        kk = min(self.cfg.aux_k, dead.numel())
        top = torch.topk(pre.detach()[:, dead], kk, dim=-1, sorted=False).indices  # [B, kk]
        if pre.device.type == "cpu" and kk >= AUXK_DENSE_MIN_DENSITY * dead.numel():
            # most dead latents are kept: on CPU a dense decode over the dead rows beats embedding_bag
            # (not on GPU: unmeasured there, and the [M, n_dead, D] gather is GBs at Gemma's shape)
            pre_dead = pre[:, dead]  # [B, n_dead]
            keep = torch.zeros_like(pre_dead, dtype=torch.bool).scatter_(1, top, True)
            f_dead = F.relu(pre_dead) * keep
            e_hat = torch.einsum("bl,mld->bmd", f_dead, self.W_dec[:, dead])  # [B, M, D]
        else:
            rows = torch.arange(B, device=pre.device).repeat_interleave(kk)
            cols = dead[top.flatten()]
            vals = F.relu(pre[rows, cols])
            offsets = torch.arange(0, B * kk, kk, device=pre.device)
            e_hat = self.decode_sparse(SparseActs(rows, cols, vals, offsets, B), bias=False)
        denom = err.pow(2).sum((1, 2)).mean().clamp_min(1e-8)
        return (e_hat - err).pow(2).sum((1, 2)).mean() / denom

    # -- inference --------------------------------------------------------------------------
    def _inference_input(self, x: Tensor, normalised: bool) -> Tensor:
        """x [B, M, D] of any float dtype (numpy too) on this model's device, in normalised units."""
        x = torch.as_tensor(x, device=self.W_enc.device)
        M, D = self.cfg.n_models, self.cfg.d_model
        if x.ndim != 3 or tuple(x.shape[1:]) != (M, D):
            raise ValueError(
                f"x must be [batch, n_models={M}, d_model={D}] (models {list(self.cfg.model_names or ())}), "
                f"got {list(x.shape)}"
            )
        return x.float() if normalised else self.normalise(x)

    @torch.no_grad()
    def encode(self, x: Tensor, *, normalised: bool = True) -> Tensor:
        """Latent activations [B, L]; batch-independent once the BatchTopK threshold is set.

        x [B, M, D]: by default in normalised units (raw activations times ``norm_scale``, what
        ``normalise`` returns); pass ``normalised=False`` for raw activations, such as a store's
        batches or a model's hidden states."""
        x = self._inference_input(x, normalised)
        pre = self.encode_pre(x)
        if self.cfg.kind == "l1":
            return F.relu(pre)
        norm_sum = self.decoder_norms().sum(0)
        if self.threshold.item() < 0:  # untrained threshold: fall back to batch top-k
            return self.batch_topk(pre, self.cfg.k, norm_sum)[0].to_dense(self.n_latents)
        return self.threshold_acts(pre, norm_sum)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, *, normalised: bool = True) -> Tensor:
        """x̂ [B, M, D] in the units of x (see ``encode`` for ``normalised``)."""
        x = self._inference_input(x, normalised)
        x_hat = self.decode(self.encode(x))
        return x_hat if normalised else x_hat / self.norm_scale[None, :, None]

    @torch.no_grad()
    def export_raw(self) -> dict[str, Tensor]:
        """Weights acting on raw activations, normalisation folded in (for other tools).

        x̂_m = f @ W_dec[m] + b_dec[m] and pre = sum_m x_m @ W_enc[m] + b_enc with raw x_m. For
        BatchTopK the score threshold becomes a per-latent activation threshold (JumpReLU form):
        keep f_l when relu(pre_l) > act_threshold[l].
        """
        c = self.norm_scale
        out = {
            "W_enc": self.W_enc * c[:, None, None],
            "b_enc": self.b_enc.clone(),
            "W_dec": self.W_dec / c[:, None, None],
            "b_dec": self.b_dec / c[:, None],
        }
        if self.cfg.kind == "batchtopk":
            if self.threshold.item() < 0:  # clamped to 0 it would keep every positive latent
                raise ValueError(
                    "this BatchTopK crosscoder has no inference threshold yet (no training step ran); "
                    "fit it before exporting"
                )
            out["act_threshold"] = self.threshold / self.decoder_norms().sum(0).clamp_min(1e-12)
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write `model.safetensors` (W_enc, W_dec, b_enc, b_dec, norm_scale, threshold) and `cfg.json`."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = p / "model.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(p / "model.safetensors")
        (p / "cfg.json.tmp").write_text(json.dumps(self.cfg.model_dump(mode="json"), indent=2))
        (p / "cfg.json.tmp").replace(p / "cfg.json")

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu") -> Crosscoder:
        p = Path(path)
        if not (p / "cfg.json").exists() or not (p / "model.safetensors").exists():
            raise FileNotFoundError(f"{p} is not a saved crosscoder (needs cfg.json and model.safetensors)")
        cfg = CrosscoderConfig.model_validate_json((p / "cfg.json").read_text())
        model = cls(cfg, seed=None)  # uninitialised parameters: no memory is touched for them
        # the file's tensors become the parameters (assign): one copy in memory, not two (10 GB
        # each at the Gemma shape), read straight onto `device`
        sd = load_file(str(p / "model.safetensors"), device=str(torch.device(device)))
        model.load_state_dict(sd, assign=True)
        return model.to(device)


# AuxK decodes densely over the dead latents when it keeps at least this share of them: a dense
# [B, n_dead] x [n_dead, M*D] matmul costs 1/share of the sparse path's FLOPs but runs several
# times faster than embedding_bag's forward and backward (1.75x a CPU step with half the latents dead;
# bench/cpu_bf16.py, docs/benchmarks.md).
AUXK_DENSE_MIN_DENSITY = 0.25


def topk_indices(flat: Tensor, n: int, *, oversample: float = 1.5, stride: int = 31) -> Tensor:
    """Indices of the n largest entries of a 1-D tensor (unordered), exactly as torch.topk.

    A full top-k over B*L scores dominates a CPU training step, so: estimate the n-th largest
    value from a strided sample (stride coprime to typical L), keep the candidates above a
    slightly lower cut-off, and run the exact top-k on those. Falls back to the full top-k when
    the sample under-shoots (fewer than n candidates), so the result is always exact.
    """
    N = flat.numel()
    if n >= N or N < 65_536:
        return torch.topk(flat, n, sorted=False).indices
    sample = flat[::stride]
    n_s = max(1, min(sample.numel(), int(n * oversample * sample.numel() / N)))
    cut = torch.topk(sample, n_s, sorted=False).values.min()
    cand = torch.nonzero(flat >= cut).squeeze(1)
    if cand.numel() < n:
        return torch.topk(flat, n, sorted=False).indices
    return cand[torch.topk(flat[cand], n, sorted=False).indices]


def _sparse_from_flat(idx: Tensor, act: Tensor, L: int, B: int) -> SparseActs:
    rows, cols = idx // L, idx % L
    vals = act.flatten()[idx]
    offsets = torch.searchsorted(rows, torch.arange(B, device=rows.device))
    return SparseActs(rows, cols, vals, offsets, B)


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 64, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm per model: x [N, M, D] -> [M, D]."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=-1).clamp_min(eps)  # [N, M]
        y_new = (w[..., None] * x).sum(0) / w.sum(0)[:, None]
        if (y_new - y).norm() < eps * max(1.0, y.norm().item()):
            return y_new
        y = y_new
    return y


def fve(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance explained per model: 1 - sum_d Var(err_d) / sum_d Var(x_d). -> [M]."""
    err = (x - x_hat).float()
    return 1 - err.var(0, unbiased=False).sum(-1) / x.float().var(0, unbiased=False).sum(-1).clamp_min(1e-12)


def norm_scale_from_mean_norms(mean_norms: list[float], d_model: int) -> Tensor:
    """c_m = sqrt(D) / E||x_m||."""
    return torch.tensor([math.sqrt(d_model) / max(n, 1e-12) for n in mean_norms])
