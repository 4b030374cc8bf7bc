"""Crosscoder training throughput: crossdiff's step vs a careful dense reference, same process.

Both train on the same planted-dictionary batches from the same initialisation with the same
optimiser and schedule; their steps are interleaved (one each, in turn) so machine load hits
both alike. Reports tokens/s, the ratio, and FVE at equal tokens on held-out data.

    python bench/fit_throughput.py [--d-model 256 --n-latents 2048 --k 16 --batch 1024 --steps 150]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from diffing.config import CrosscoderConfig, TrainConfig
from diffing.crosscoder import Crosscoder, fve
from diffing.reference import DenseCrosscoder
from diffing.synthetic import make_planted
from diffing.train import TrainerState, lr_lambda, train_step


class ReferenceTrainer:
    """A straightforward loop: dense forward/backward, clip, Adam, dead counters."""

    def __init__(self, model: DenseCrosscoder, tcfg: TrainConfig, total: int, dead_after: int):
        self.model, self.total, self.dead_after = model, total, dead_after
        self.opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr, betas=tcfg.adam_betas)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_lambda(s, total, tcfg.warmup_frac, tcfg.decay_frac)
        )
        self.since = torch.zeros(model.W_dec.shape[1], dtype=torch.long)
        self.clip = tcfg.grad_clip

    def step(self, x: torch.Tensor) -> None:
        loss, _, f = self.model(x, dead_mask=self.since >= self.dead_after)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            self.since += x.shape[0]
            self.since[(f > 0).any(0)] = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-latents", type=int, default=2048)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=str, default=None, help="Also write results here.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    D, L, k, B = args.d_model, args.n_latents, args.k, args.batch

    planted = make_planted(D, n_shared=L // 4, n_only=(L // 16, L // 16), mean_active=k, seed=0)
    x_all = torch.from_numpy(planted.sample(B * args.steps + 8192, seed=1))
    # normalise once for both (crossdiff folds this into the model; the reference expects it done)
    scale = D**0.5 / x_all.norm(dim=-1).mean(0)
    x_all = x_all * scale[None, :, None]
    train_x, eval_x = x_all[: B * args.steps], x_all[B * args.steps :]

    cfg = CrosscoderConfig(
        n_models=2, d_model=D, n_latents=L, k=k, model_names=("A", "B"), dead_after_tokens=50_000
    )
    cfg = cfg.resolve(n_models=2, d_model=D, model_names=("A", "B"))
    tcfg = TrainConfig(batch_size=B, lr=args.lr)
    ours = Crosscoder(cfg, seed=0)
    ours.init_b_dec(train_x[:4096])
    ref = DenseCrosscoder(2, D, L, k, cfg.auxk_alpha, cfg.aux_k)
    ref.load_state_dict({n: p.detach().clone() for n, p in ours.named_parameters()})
    state = TrainerState(ours, tcfg, args.steps)
    ref_trainer = ReferenceTrainer(ref, tcfg, args.steps, cfg.dead_after_tokens)

    t_ours, t_ref = [], []
    for s in range(args.steps):
        xb = train_x[s * B : (s + 1) * B]
        t0 = time.perf_counter()
        train_step(state, xb)
        t1 = time.perf_counter()
        ref_trainer.step(xb)
        t2 = time.perf_counter()
        if s >= 5:  # warm-up
            t_ours.append(t1 - t0)
            t_ref.append(t2 - t1)

    with torch.no_grad():
        # both at their training-time encoding (batch top-k over the eval batch)
        x_hat_ours = ours.decode_sparse(
            ours.batch_topk(ours.encode_pre(eval_x), k, ours.decoder_norms().sum(0))[0]
        )
        _, x_hat_ref, _ = ref(eval_x)
        x_hat_thr = ours.reconstruct(eval_x)
    res = {
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__,
        "shape": {"d_model": D, "n_latents": L, "k": k, "batch": B, "steps": args.steps},
        "tokens_per_s": {
            "crossdiff": B / statistics.median(t_ours),
            "reference": B / statistics.median(t_ref),
        },
        "fve_at_equal_tokens": {
            "crossdiff": fve(eval_x, x_hat_ours).mean().item(),
            "crossdiff_threshold_encoding": fve(eval_x, x_hat_thr).mean().item(),
            "reference": fve(eval_x, x_hat_ref).mean().item(),
        },
    }
    res["speedup"] = res["tokens_per_s"]["crossdiff"] / res["tokens_per_s"]["reference"]
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
