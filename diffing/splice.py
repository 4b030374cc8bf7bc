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
what they carry. The prompts are held-out documents as the harvest read them, and only the
positions the harvest kept (the crosscoder's training distribution) are spliced and scored: never
BOS, the first raw-text tokens (attention sinks) or outlier-norm tokens; nor the first
`skip_first` tokens of any prompt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffing.batching import length_batches, length_regimes
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


# rows of [rows, vocab] float32 per step of the loss math: 256 MB at Gemma's 256k vocabulary
_LOSS_CHUNK_FLOATS = 1 << 26


def _ce_kl(logits: Tensor, targets: Tensor, logp_clean: Tensor | None) -> tuple[float, float]:
    """Σ cross-entropy of `logits` [N, V] at `targets` [N], and Σ_rows KL(clean ‖ spliced) (each
    row's clamped at 0) when `logp_clean` [N, V] is given; over row chunks, so only a chunk of the
    log-softmax and the KL terms exists at a time (six [N, V] float32 buffers were live at once)."""
    step = max(1, _LOSS_CHUNK_FLOATS // max(1, logits.shape[-1]))
    ce = kl = 0.0
    for s in range(0, logits.shape[0], step):
        logp = F.log_softmax(logits[s : s + step].float(), -1)
        ce += float(F.nll_loss(logp, targets[s : s + step], reduction="sum"))
        if logp_clean is not None:
            rows = F.kl_div(logp, logp_clean[s : s + step], reduction="none", log_target=True).sum(-1)
            kl += float(rows.clamp_min(0).sum())
    return ce, kl


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
    keep: Sequence[Sequence[bool]] | None = None,
) -> dict:
    """ΔCE, KL and CE recovered per model (names from the crosscoder), for the full reconstruction
    and, when `drop_latents` is given, for the reconstruction without those latents. `keep`, one
    mask per prompt: splice (and score) only there, e.g. the positions the harvest kept."""
    names = list(crosscoder.cfg.model_names)
    if len(models) != len(names):
        raise ValueError(f"splice_eval got {len(models)} models for a crosscoder of {names}")
    if keep is not None and [len(k) for k in keep] != [len(p) for p in prompts]:
        raise ValueError("splice_eval: `keep` needs one mask per prompt, as long as its prompt")
    pairs = [
        (list(p), list(k) if keep is not None else [True] * len(p))
        for p, k in zip(prompts, keep if keep is not None else prompts, strict=True)
    ]
    pairs = [(p, k) for p, k in pairs if len(p) > skip_first + 1 and any(k[skip_first:-1])]
    if not pairs:
        raise ValueError(f"splice_eval needs prompts longer than skip_first + 1 = {skip_first + 1} tokens")
    prompts = [p for p, _ in pairs]
    masks = [k for _, k in pairs]
    variants = {"full": None}
    if drop_latents is not None:
        variants["shared_only"] = torch.as_tensor(list(drop_latents), dtype=torch.long)
    keys = ("ce_clean", "ce_zero", *(f"{v}/{k}" for v in variants for k in ("ce", "kl")))
    sums = {n: dict.fromkeys(keys, 0.0) for n in names}
    n_tok = 0
    batches = [list(range(s, min(s + batch_size, len(prompts)))) for s in range(0, len(prompts), batch_size)]
    if regimes := sorted({r for m in models for r in length_regimes(m)}):  # as the harvest batched them
        docs = [SimpleNamespace(ids=p, i=i) for i, p in enumerate(prompts)]
        batches = [[d.i for d in b] for b in length_batches(docs, batch_size, regimes)]
    for batch in batches:
        ids, mask = _pad([prompts[i] for i in batch], pad_id)
        allowed, _ = _pad([[int(x) for x in masks[i]] for i in batch], 0)
        device = next(models[0].parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        where = mask.bool() & allowed.bool().to(device)
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
            logp_clean = F.log_softmax(_logits(model, ids, mask, layer, None, where)[:, :-1][score], -1)
            acc = sums[name]
            acc["ce_clean"] += float(F.nll_loss(logp_clean, targets, reduction="sum"))
            zero = _logits(model, ids, mask, layer, torch.zeros_like(acts[:, :, m]), where)[:, :-1][score]
            acc["ce_zero"] += _ce_kl(zero, targets, None)[0]
            del zero
            for v, rec in recons.items():
                logits = _logits(model, ids, mask, layer, rec[:, :, m], where)[:, :-1][score]
                ce, kl = _ce_kl(logits, targets, logp_clean)
                acc[f"{v}/ce"] += ce
                acc[f"{v}/kl"] += kl
                del logits
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


def _store_docs(store, cfg) -> dict[int, dict[int, int]]:
    """{doc_id: {pos: token_id}} of the first `splice_prompts` held-out documents' store rows."""
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
    return docs


def _harvest_tokens(store, doc_ids, tokenizers) -> dict[int, list[int]]:
    """The token ids the harvest read for these documents, from its corpus and settings (as the
    harvest tokenised them: the first model's tokenizer, chat template shared)."""
    from diffing.corpus import read_corpus
    from diffing.harvest import HarvestConfig
    from diffing.tokens import share_chat_template, tokenize_records

    hcfg = HarvestConfig.model_validate(store.manifest.metadata["harvest"])
    # doc ids are corpus row numbers: the rows up to the last one needed, not the whole corpus
    need = max(doc_ids, default=-1) + 1
    if need <= 0:
        return {}
    cap = hcfg.corpus.max_prompts
    records = read_corpus(
        hcfg.corpus.model_copy(update={"max_prompts": need if cap is None else min(cap, need)})
    )
    share_chat_template(tokenizers, [m.name for m in hcfg.models])
    out = {}
    for d in doc_ids:
        if 0 <= d < len(records):
            (doc,) = tokenize_records(
                [records[d]],
                tokenizers[0],
                context_length=hcfg.context_length,
                drop_first_raw_tokens=hcfg.drop_first_raw_tokens,
                doc_id_start=d,
            )
            out[d] = doc.ids
    return out


def specific_latents(run: Path) -> list[int] | None:
    """The model-specific latents of a run's selection (groups ending in "-specific"), which the
    shared-only splice variant drops; None where the run has no latents.parquet yet."""
    import pyarrow.parquet as pq

    if not (run / "latents.parquet").exists():
        return None
    t = pq.read_table(run / "latents.parquet", columns=["latent", "group"])
    g = np.asarray(t.column("group").to_pylist(), dtype=object)
    return t.column("latent").to_numpy()[np.char.endswith(g.astype(str), "-specific")].tolist()


def heldout_prompts(
    store, cfg, *, bos_id: int | None = None, tokenizers: Sequence | None = None
) -> tuple[list[list[int]], list[list[bool]], str]:
    """Held-out documents (cfg.heldout / heldout_frac) as splice prompts: (token ids, the positions
    the harvest kept, where the ids came from).

    The ids are the harvest's own, re-tokenised from its corpus with `tokenizers` (the store's
    models, in order) and checked against every stored token; only the kept positions are spliced,
    so tokens the harvest dropped (BOS, the first raw-text tokens, outliers) stay in the text but
    are never replaced. Where the corpus cannot be read (or has changed), a document is rebuilt
    from its store rows up to its first missing token (BOS put back), and documents whose start
    the harvest dropped are left out."""
    docs = _store_docs(store, cfg)
    full: dict[int, list[int]] = {}
    source = "store"
    if tokenizers is not None and docs:
        try:
            full = _harvest_tokens(store, list(docs), list(tokenizers))
            source = "corpus"
        except Exception as e:  # unreadable corpus, older metadata: the store rows alone
            from diffing.logs import get_logger

            get_logger("splice").warning(
                "splice.corpus_unreadable", error=f"{type(e).__name__}: {e}"[:300], fallback="store rows"
            )
    prompts, masks, stale = [], [], 0
    for d, rows in docs.items():
        ids = full.get(d)
        if ids is not None and all(p < len(ids) and ids[p] == k for p, k in rows.items()):
            mask = [p in rows for p in range(len(ids))]
        else:
            stale += ids is not None
            first = min(rows)
            ids = [] if first == 0 else ([bos_id] if first == 1 and bos_id is not None else None)
            if ids is None:  # the document's first tokens are not in the store
                continue
            p = first
            while p in rows:
                ids.append(rows[p])
                p += 1
            mask = [False] * first + [True] * (len(ids) - first)
        last = max((i for i, m in enumerate(mask) if m), default=-1)
        ids, mask = ids[: last + 2], mask[: last + 2]  # nothing after the last kept token's target
        prompts.append(ids[: cfg.splice_max_len])
        masks.append(mask[: cfg.splice_max_len])
    if stale:
        source = "corpus+store" if stale < len(docs) else "store"
    return prompts, masks, source


def splice_run(run_dir: str | Path, store, cfg, *, overwrite: bool = False) -> dict:
    """Splice evaluation of a run with the store's harvest models -> RUN/splice.json."""
    from diffing.logs import get_logger
    from diffing.models import load_model, load_tokenizer, resolve_device

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
    dev = resolve_device(cfg.device, "analyze.device")  # three 9B models: 55 GB in bf16, a GPU's
    crosscoder = Crosscoder.load(run / "crosscoder", device=dev)
    specs = {m["name"]: m for m in harvest["models"]}
    ran_in = store.manifest.metadata.get("resolved_dtypes", {})  # what the harvest's models ran in
    # the hub commit the harvest's shards were computed from (or the one it pinned): not whatever
    # the default branch holds today
    pinned = store.manifest.metadata.get("revisions", {})

    def rev(n: str) -> str | None:
        return pinned.get(n) or specs[n].get("revision")  # the commit recorded beats a branch name

    def remote(n: str) -> bool:
        return bool(specs[n].get("trust_remote_code"))  # set on the harvest's models[] entry

    models = [
        load_model(
            specs[n]["path"],
            dtype=ran_in.get(n, specs[n].get("dtype", "float32")),
            device=dev,
            revision=rev(n),
            trust_remote_code=remote(n),
        )
        for n in store.model_names
    ]
    tok = load_tokenizer(
        specs[store.model_names[0]]["path"], rev(store.model_names[0]), remote(store.model_names[0])
    )
    drop = specific_latents(run)
    tokenizers = [tok, *(load_tokenizer(specs[n]["path"], rev(n), remote(n)) for n in store.model_names[1:])]
    prompts, keep, source = heldout_prompts(store, cfg, bos_id=tok.bos_token_id, tokenizers=tokenizers)
    if not prompts:
        raise ValueError(
            f"no held-out document of store {store.uri} can be rebuilt for the splice evaluation: the "
            "harvest's corpus is not readable here and the store lacks each document's first tokens "
            "(drop_first_raw_tokens); make the corpus reachable, or set splice=false"
        )
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    pad = pad if pad < min(m.get_input_embeddings().num_embeddings for m in models) else 0
    res = splice_eval(
        models,
        crosscoder,
        store.manifest.layer,
        prompts,
        drop_latents=drop,
        skip_first=cfg.splice_skip_first,
        pad_id=pad,
        keep=keep,
    )
    res["dropped_latents"] = len(drop or [])
    res["prompts_from"] = source
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    tmp.replace(out)
    log.info("splice.done", **{n: round(v["full"]["ce_recovered"], 4) for n, v in res["models"].items()})
    return res
