"""The crosscoder training step and the resumable trainer state.

`train_step(state, x)` is a plain function over one batch that returns named metrics. It knows
nothing about distribution: a `reduce` callable (identity here, an all-reduce under DDP) is the
only hook, used for the dead-latent counters, the inference threshold and the reported metrics,
so every rank agrees on them. The caller owns data, devices and checkpoints (see jobs/).
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from diffing.config import CrosscoderConfig, TrainConfig
from diffing.crosscoder import Crosscoder

ReduceOp = Literal["sum", "mean", "max"]
Reducer = Callable[[Tensor, ReduceOp], Tensor]


def local_reduce(t: Tensor, op: ReduceOp) -> Tensor:
    """Single-process reducer: the identity."""
    return t


def lr_lambda(step: int, total: int, warmup_frac: float, decay_frac: float) -> float:
    """Linear warm-up, constant, linear decay to 0 over the last decay_frac of steps."""
    warm = max(1, int(warmup_frac * total))
    decay_start = total - int(decay_frac * total)
    if step < warm:
        return (step + 1) / warm
    if step >= decay_start:
        return max(0.0, (total - step) / max(1, total - decay_start))
    return 1.0


def k_at(step: int, total: int, cfg: CrosscoderConfig) -> int:
    """Optional linear k annealing from k_anneal_start to k."""
    if cfg.k_anneal_start is None or cfg.k_anneal_frac <= 0:
        return cfg.k
    span = max(1, int(cfg.k_anneal_frac * total))
    t = min(1.0, step / span)
    return int(round(cfg.k_anneal_start + t * (cfg.k - cfg.k_anneal_start)))


class TrainerState:
    """Everything needed to continue training exactly: weights, optimiser, schedule, step,
    inference threshold, dead-latent counters, RNG and the caller's data position."""

    def __init__(
        self, model: Crosscoder, train_cfg: TrainConfig, total_steps: int, *, module: nn.Module | None = None
    ):
        self.model = model
        self.module = module or model  # possibly DDP-wrapped; forward goes through this
        self.cfg = train_cfg
        self.total_steps = total_steps
        self.optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, betas=train_cfg.adam_betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, total_steps, train_cfg.warmup_frac, train_cfg.decay_frac)
        )
        self.step = 0
        self.tokens_seen = 0
        # tokens since each latent last fired (global across ranks)
        self.since_fired = torch.zeros(model.n_latents, dtype=torch.long, device=model.W_dec.device)
        self.data_position: dict[str, Any] = {}
        self._threshold_n = 0  # threshold EMA updates so far (bias correction)
        self._threshold_ema = 0.0

    def dead_mask(self) -> Tensor:
        return self.since_fired >= self.model.cfg.dead_after_tokens

    def state_dict(self) -> dict[str, Any]:
        """A snapshot, on the CPU: later steps do not change it, and a checkpoint of a GPU fit holds
        no second copy of weights and optimiser state on the GPU (27 GiB for the Gemma 3-model fit)."""
        from torch.utils._pytree import tree_map

        return tree_map(
            lambda x: x.detach().to("cpu", copy=True) if isinstance(x, Tensor) else copy.copy(x),
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "total_steps": self.total_steps,
                "since_fired": self.since_fired.cpu(),
                "threshold_n": self._threshold_n,
                "threshold_ema": self._threshold_ema,
                "data_position": dict(self.data_position),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(),
                    "python": random.getstate(),
                },
            },
        )

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["total_steps"] != self.total_steps:
            raise ValueError(
                f"checkpoint was made for {sd['total_steps']} steps but this run has {self.total_steps}; "
                "resume with the same config or start a new run"
            )
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.step = sd["step"]
        self.tokens_seen = sd["tokens_seen"]
        self.since_fired = sd["since_fired"].to(self.since_fired.device)
        self._threshold_n = sd["threshold_n"]
        self._threshold_ema = sd["threshold_ema"]
        self.data_position = dict(sd["data_position"])
        torch.set_rng_state(sd["rng"]["torch"].cpu())  # loaded with map_location=cuda it is not
        np.random.set_state(sd["rng"]["numpy"])
        random.setstate(sd["rng"]["python"])


class FitDiverged(ValueError):
    """Non-finite loss or metrics: a setting to change (train.lr), not a resumable failure."""


def train_step(state: TrainerState, x_raw: Tensor, *, reduce: Reducer = local_reduce) -> dict[str, float]:
    """One optimiser step on a batch of raw activations x_raw [B, M, D]. Returns named metrics."""
    model, cfg, tcfg = state.model, state.model.cfg, state.cfg
    device = model.W_dec.device
    x = model.normalise(x_raw.to(device, non_blocking=True))
    B = x.shape[0]
    k = k_at(state.step, state.total_steps, cfg)
    l1_coeff = cfg.l1_coeff * min(1.0, (state.step + 1) / max(1, int(cfg.l1_warmup_frac * state.total_steps)))

    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda" and tcfg.bf16_autocast
        else contextlib.nullcontext()
    )
    with autocast:
        out = state.module(x, k=k, dead_mask=state.dead_mask(), l1_coeff=l1_coeff)
    state.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_norm = (
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        if tcfg.grad_clip
        else torch.zeros((), device=device)
    )
    state.optimizer.step()
    state.scheduler.step()

    with torch.no_grad():
        # which latents fired anywhere (all ranks) -> dead counters
        if out.acts is not None:
            fired = torch.zeros(model.n_latents, dtype=torch.float32, device=device)
            fired[out.acts.cols] = 1.0
            n_active = out.acts.vals.numel()
        else:
            fired = (out.dense_acts > 0).any(0).float()
            n_active = int((out.dense_acts > 0).sum())
        fired = reduce(fired, "max") > 0
        b_total = int(reduce(torch.tensor(float(B), device=device), "sum").item())
        state.since_fired += b_total
        state.since_fired[fired] = 0

        if out.min_score is not None:  # EMA of the smallest kept score, bias-corrected
            m = reduce(out.min_score.float().detach(), "mean")
            mom = cfg.threshold_momentum
            state._threshold_n += 1
            state._threshold_ema = mom * state._threshold_ema + (1 - mom) * float(m)
            model.threshold.fill_(state._threshold_ema / (1 - mom**state._threshold_n))

        err = (x - out.x_hat.float()).detach()
        stats = torch.stack(
            [
                out.loss.detach().float(),
                out.mse.detach().float(),
                out.aux.detach().float(),
                torch.tensor(n_active / B, device=device),
                grad_norm.float(),
                *err.var(0, unbiased=False).sum(-1),  # [M]
                *x.var(0, unbiased=False).sum(-1),  # [M]
            ]
        )
        stats = reduce(stats, "mean").cpu().tolist()

    state.step += 1
    state.tokens_seen += b_total
    M = cfg.n_models
    names = cfg.model_names
    metrics = {
        "step": state.step,
        "loss": stats[0],
        "mse": stats[1],
        "aux_loss": stats[2],
        "l0": stats[3],
        "grad_norm": stats[4],
        "dead_fraction": float(state.dead_mask().float().mean()),
        "lr": state.scheduler.get_last_lr()[0],
        "k": k,
        "threshold": float(model.threshold),
        "tokens_seen": state.tokens_seen,
    }
    for i in range(M):
        metrics[f"fve/{names[i]}"] = 1.0 - stats[5 + i] / max(stats[5 + M + i], 1e-12)
    if cfg.kind == "l1":
        metrics["l1_coeff"] = l1_coeff
    if not all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)):
        bad = sorted(k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v))
        raise FitDiverged(
            f"the fit diverged at step {state.step}: {', '.join(bad)} not finite (train.lr={tcfg.lr}, "
            f"grad_clip={tcfg.grad_clip}); lower train.lr (the default is 5e-4) and refit with --overwrite "
            "(crossdiff pipeline: --redo-changed)"
        )
    return metrics


@torch.no_grad()
def evaluate(model: Crosscoder, batches, *, max_tokens: int | None = None) -> dict[str, Any]:
    """Batch-independent evaluation (threshold encoding) over raw batches [B, M, D]:
    FVE per model, L0, fraction of latents that never fired, tokens used."""
    device = model.W_dec.device
    M = model.cfg.n_models
    n = 0
    sum_x = torch.zeros(M, model.cfg.d_model, dtype=torch.float64, device=device)
    sum_x2 = torch.zeros_like(sum_x)
    sum_e = torch.zeros_like(sum_x)
    sum_e2 = torch.zeros_like(sum_x)
    l0 = 0.0
    fired = torch.zeros(model.n_latents, dtype=torch.bool, device=device)
    for xb in batches:
        x = model.normalise(xb.to(device))
        f = model.encode(x)
        e = (x - model.decode(f)).double()
        xd = x.double()
        sum_x += xd.sum(0)
        sum_x2 += xd.pow(2).sum(0)
        sum_e += e.sum(0)
        sum_e2 += e.pow(2).sum(0)
        l0 += float((f > 0).sum())
        fired |= (f > 0).any(0)
        n += x.shape[0]
        if max_tokens and n >= max_tokens:
            break
    if n == 0:
        raise ValueError("evaluate() got no data")
    var_x = (sum_x2 / n - (sum_x / n).pow(2)).sum(-1)
    var_e = (sum_e2 / n - (sum_e / n).pow(2)).sum(-1)
    # a model whose activations do not vary has nothing to explain: NaN, not a perfect 1.0
    fves = torch.where(var_x > 1e-12, 1 - var_e / var_x.clamp_min(1e-12), torch.nan).tolist()
    return {
        "fve": dict(zip(model.cfg.model_names, fves, strict=True)),
        "l0": l0 / n,
        "dead_fraction": float((~fired).float().mean()),
        "eval_tokens": n,
    }
