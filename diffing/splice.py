"""Splice evaluation: is the crosscoder a faithful stand-in for the models' layer-L activations?

For every model m, on held-out prompts, the residual stream after decoder layer L is replaced by
the crosscoder's reconstruction x̂_m (encoded from all models' activations at that token, with
the inference threshold) and the forward continues. Reported per model, over next-token
predictions at spliced positions:

    ΔCE          = CE(spliced) − CE(clean)
    KL           = mean KL(p_clean ‖ p_spliced)
    CE recovered = (CE(zero) − CE(spliced)) / (CE(zero) − CE(clean))

with CE(zero) the loss when the layer-L output is zero-ablated at the same positions. The
"shared_only" variant zeroes the selected model-specific latents before decoding, which shows
what they carry. The first `skip_first` tokens of each prompt (BOS / attention sinks, which
the harvest drops) are never spliced nor scored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffing.crosscoder import Crosscoder
from diffing.models import decoder_layers, residual_after_layer


def _pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, : len(p)] = 1
    return ids, mask


@torch.no_grad()
def _logits(model: nn.Module, ids: Tensor, mask: Tensor, layer: int, replace: Tensor | None, where: Tensor):
    """Logits [B, T, V] with layer `layer`'s output replaced by `replace` [B, T, D] at `where` [B, T]."""
    handle = None
    if replace is not None:

        def hook(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            new = torch.where(where[..., None], replace.to(h.dtype), h)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def reconstruct(crosscoder: Crosscoder, x: Tensor, drop: Tensor | None = None) -> Tensor:
    """Raw-space reconstruction [N, M, D] of raw x [N, M, D]; latents in `drop` are zeroed first."""
    dev = crosscoder.W_dec.device
    xn = crosscoder.normalise(x.to(dev))
    f = crosscoder.encode(xn)
    if drop is not None and len(drop):
        f[:, drop.to(dev)] = 0
    return (crosscoder.decode(f) / crosscoder.norm_scale[None, :, None]).to(x.device)


@torch.no_grad()
def splice_eval(
    models: Sequence[nn.Module],
    crosscoder: Crosscoder,
    layer: int,
    prompts: Sequence[Sequence[int]],
    *,
    drop_latents: Sequence[int] | None = None,
    skip_first: int = 1,
    pad_id: int = 0,
    batch_size: int = 8,
) -> dict:
    """ΔCE, KL and CE recovered per model (names from the crosscoder), for the full reconstruction
    and, when `drop_latents` is given, for the reconstruction without those latents."""
    names = list(crosscoder.cfg.model_names)
    if len(models) != len(names):
        raise ValueError(f"splice_eval got {len(models)} models for a crosscoder of {names}")
    prompts = [list(p) for p in prompts if len(p) > skip_first + 1]
    if not prompts:
        raise ValueError(f"splice_eval needs prompts longer than skip_first + 1 = {skip_first + 1} tokens")
    variants = {"full": None}
    if drop_latents is not None:
        variants["shared_only"] = torch.as_tensor(list(drop_latents), dtype=torch.long)
    keys = ("ce_clean", "ce_zero", *(f"{v}/{k}" for v in variants for k in ("ce", "kl")))
    sums = {n: dict.fromkeys(keys, 0.0) for n in names}
    n_tok = 0
    for s in range(0, len(prompts), batch_size):
        ids, mask = _pad(prompts[s : s + batch_size], pad_id)
        device = next(models[0].parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        where = mask.bool().clone()
        where[:, :skip_first] = False
        score = where[:, :-1] & mask[:, 1:].bool()  # predictions made at spliced positions
        targets = ids[:, 1:][score]
        acts = torch.stack([residual_after_layer(m, ids, mask, layer).float() for m in models], dim=2)
        sel = acts[where]  # [N, M, D]
        recons = {}
        for v, drop in variants.items():
            full = torch.zeros_like(acts)
            full[where] = reconstruct(crosscoder, sel, drop)
            recons[v] = full
        n_tok += int(score.sum())
        for m, (name, model) in enumerate(zip(names, models, strict=True)):
            clean = _logits(model, ids, mask, layer, None, where)[:, :-1][score]
            logp_clean = F.log_softmax(clean, -1)
            acc = sums[name]
            acc["ce_clean"] += float(F.nll_loss(logp_clean, targets, reduction="sum"))
            zero = _logits(model, ids, mask, layer, torch.zeros_like(acts[:, :, m]), where)[:, :-1][score]
            acc["ce_zero"] += float(F.cross_entropy(zero, targets, reduction="sum"))
            for v, rec in recons.items():
                logits = _logits(model, ids, mask, layer, rec[:, :, m], where)[:, :-1][score]
                logp = F.log_softmax(logits, -1)
                acc[f"{v}/ce"] += float(F.nll_loss(logp, targets, reduction="sum"))
                kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1)
                acc[f"{v}/kl"] += float(kl.clamp_min(0).sum())
    out: dict = {"n_tokens": n_tok, "n_prompts": len(prompts), "layer": layer, "models": {}}
    for name in names:
        mean = {k: v / max(n_tok, 1) for k, v in sums[name].items()}
        res = {"ce_clean": mean["ce_clean"], "ce_zero": mean["ce_zero"]}
        gap = mean["ce_zero"] - mean["ce_clean"]
        for v in variants:
            ce = mean[f"{v}/ce"]
            res[v] = {
                "ce": ce,
                "delta_ce": ce - mean["ce_clean"],
                "kl": mean[f"{v}/kl"],
                "ce_recovered": (mean["ce_zero"] - ce) / gap if abs(gap) > 1e-12 else float("nan"),
            }
        out["models"][name] = res
    return out


def heldout_prompts(store, cfg, *, bos_id: int | None = None) -> list[list[int]]:
    """Token ids of held-out documents (cfg.heldout / heldout_frac), rebuilt from the store rows in
    position order; BOS is put back when the harvest dropped it. Tokens the harvest dropped for
    other reasons (first raw-text tokens, outliers) are missing."""
    from diffing.examples import heldout_mask, heldout_shards

    docs: dict[int, dict[int, int]] = {}
    for i in heldout_shards(store, cfg):
        t = store.read_table(i, columns=["doc_id", "pos", "token_id"])
        doc, pos, tok = (t.column(c).to_numpy() for c in ("doc_id", "pos", "token_id"))
        keep = heldout_mask(doc, cfg)
        for d, p, k in zip(doc[keep].tolist(), pos[keep].tolist(), tok[keep].tolist(), strict=True):
            if d in docs or len(docs) < cfg.splice_prompts:
                docs.setdefault(d, {})[p] = k
        if len(docs) >= cfg.splice_prompts:
            break
    out = []
    for rows in docs.values():
        ids = [rows[p] for p in sorted(rows)]
        if bos_id is not None and min(rows) > 0 and (not ids or ids[0] != bos_id):
            ids = [bos_id, *ids]
        out.append(ids[: cfg.splice_max_len])
    return out


def splice_run(run_dir: str | Path, store, cfg, *, overwrite: bool = False) -> dict:
    """Splice evaluation of a run with the store's harvest models -> RUN/splice.json."""
    import pyarrow.parquet as pq

    from diffing.logs import get_logger
    from diffing.models import load_model, load_tokenizer

    run = Path(run_dir)
    out = run / "splice.json"
    log = get_logger("splice", run=str(run))
    if out.exists() and not overwrite:
        log.info("splice.skip", reason="splice.json exists; pass --overwrite to redo")
        return json.loads(out.read_text())
    harvest = store.manifest.metadata.get("harvest")
    if not harvest or store.manifest.layer is None:
        raise ValueError(
            f"store {store.uri} has no harvest metadata (models, layer): splice evaluation needs the models; "
            "set analysis.splice=false for stores written with write_arrays"
        )
    crosscoder = Crosscoder.load(run / "crosscoder")
    specs = {m["name"]: m for m in harvest["models"]}
    ran_in = store.manifest.metadata.get("resolved_dtypes", {})  # what the harvest's models ran in
    models = [
        load_model(specs[n]["path"], dtype=ran_in.get(n, specs[n].get("dtype", "float32")))
        for n in store.model_names
    ]
    tok = load_tokenizer(specs[store.model_names[0]]["path"])
    drop = None
    if (run / "latents.parquet").exists():
        t = pq.read_table(run / "latents.parquet", columns=["latent", "group"])
        g = np.asarray(t.column("group").to_pylist(), dtype=object)
        drop = t.column("latent").to_numpy()[np.char.endswith(g.astype(str), "-specific")].tolist()
    prompts = heldout_prompts(store, cfg, bos_id=tok.bos_token_id)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    res = splice_eval(
        models,
        crosscoder,
        store.manifest.layer,
        prompts,
        drop_latents=drop,
        skip_first=cfg.splice_skip_first,
        pad_id=pad,
    )
    res["dropped_latents"] = len(drop or [])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(out)
    log.info("splice.done", **{n: round(v["full"]["ce_recovered"], 4) for n, v in res["models"].items()})
    return res
