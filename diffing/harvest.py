"""Harvest: paired activations of several models on the same tokens (the Ray-free core).

`Harvester` loads every model once and turns a shard of corpus records into store rows. The Ray
Data job (jobs/harvest.py) runs one Harvester per actor; the naive benchmark and tests call it
directly. Shards are deterministic prompt ranges, so a rerun writes exactly the same rows.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from diffing.batching import length_batches, length_regimes
from diffing.config import Frozen, PathOrURL
from diffing.corpus import CorpusSpec
from diffing.models import (
    HarvestInputError,
    load_model,
    load_tokenizer,
    n_layers,
    residual_after_layer,
    resolve_device,
    resolve_dtype,
    torch_dtype,
)
from diffing.store import StoreWriter
from diffing.tokens import check_tokenizers_agree, pad_batch, share_chat_template, tokenize_records


class ModelSpec(Frozen):
    name: str = Field(
        min_length=1,
        # a directory name (RUN/compare/<A>-vs-<B>/) and a report heading: no path separator, no "."
        # or "..", no markup, no commas (the store lists names with them); `_safe_name` checks the rest
        pattern=r'^[^/\\,<>"&\x00-\x1f]+$',
        description="Short name used in the store, directory names and reports (e.g. 'base', 'simpo', "
        "'gemma-2-9b-it'); no / \\ , < > \" &, not '.' or '..'.",
    )
    path: PathOrURL = Field(
        description="HF model id or local directory (must be loadable offline on the workers)."
    )
    revision: str | None = Field(
        None,
        description="A hub model's commit hash (or tag/branch) to load, so a resumed or repeated harvest "
        "reads the same weights; None: the default branch (or a local directory). The commit used is "
        "recorded per shard either way.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the model's own Python code from its directory or hub repo (transformers' "
        "trust_remote_code), for an architecture transformers does not ship. It executes that code "
        "wherever the model loads (the driver's checks, every harvest worker, the splice).",
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description="Weights dtype for the forward. auto: bfloat16 where the worker computes it natively "
        "(CUDA with bf16, a CPU with AVX512-BF16 or AMX: 1.75x float32 on a 2-core Zen 4), else float32 "
        "(bfloat16 is emulated on AVX2-only CPUs, about 4x slower). The dtype each worker used is logged.",
    )

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if v in (".", "..") or v != v.strip():
            raise ValueError(f"models[].name={v!r} names a directory: not '.' or '..', no surrounding spaces")
        return v


def unpinned_as_before(model: dict[str, Any]) -> dict[str, Any]:
    """A dumped ModelSpec as identities saw it before `revision` and `trust_remote_code` existed,
    where they are unset: the harvests and runs made then keep their identity."""
    unset = {"revision": None, "trust_remote_code": False}
    return {k: v for k, v in model.items() if not (k in unset and v is unset[k])}


class RayHarvestConfig(Frozen):
    num_actors: int = Field(1, ge=1, description="Harvest actors (each loads every model once).")
    write_threads: int = Field(
        1,
        ge=0,
        description="Shards each actor writes in the background while its models compute the next "
        "(0: write inline). Each write in flight holds up to about three times its shard's float16 "
        "rows in host memory. On a GPU the write (Parquet encoding, one core per shard) is slower "
        "than the forward: raise it to 3-4 and keep shards small (docs/benchmarks.md).",
    )
    num_gpus_per_actor: float = Field(0.0, ge=0.0, description="GPUs per actor (1 on a GPU cluster).")
    num_cpus_per_actor: float = Field(
        0.5, gt=0.0, description="CPUs per actor; fractional on small machines."
    )


class HarvestConfig(Frozen):
    models: tuple[ModelSpec, ...] = Field(
        description="Two or more models sharing one tokenizer; the first is the reference."
    )
    layer: int = Field(
        ge=0,
        description="Decoder layer L: the site is the residual stream after it (HF hidden_states[L+1]; "
        "at the last layer, before the final norm that HF's last hidden state includes).",
    )
    site: Literal["resid_post"] = Field("resid_post", description="Activation site.")
    corpus: CorpusSpec = Field(description="Prompt corpus.")
    store: PathOrURL = Field(
        description="Output store URI (local path or s3://...); in a pipeline config it defaults to OUT/store."
    )
    store_dtype: Literal["float16", "float32"] = Field("float16", description="Stored activation dtype.")
    context_length: int = Field(256, ge=8, description="Tokens per document (longer ones are truncated).")
    prompts_per_shard: int = Field(64, ge=1, description="Records per store shard (the unit of resume).")
    batch_prompts: int = Field(
        8,
        ge=1,
        description="Records per forward pass, of similar lengths. Where a model's rotary positions "
        "scale with the batch's length (LongRoPE, dynamic NTK), no batch mixes documents from both "
        "sides of that length, so the rows do not depend on this setting.",
    )
    drop_first_raw_tokens: int = Field(
        1, ge=0, description="Drop this many first tokens of raw-text documents (attention sinks)."
    )
    outlier_norm_mult: float | None = Field(
        10.0,
        gt=1.0,
        description="Drop tokens whose norm exceeds this multiple of the batch median in any model.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the models run.")
    ray: RayHarvestConfig = Field(default_factory=RayHarvestConfig, description="Ray Data actor pool.")

    @model_validator(mode="after")
    def _check(self) -> HarvestConfig:
        if len(self.models) < 2:
            raise ValueError("models: a comparison needs at least two models")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        return self


def shard_ranges(n_records: int, per_shard: int) -> list[tuple[str, int, int]]:
    """Deterministic (shard_id, start, end) prompt ranges."""
    n = (n_records + per_shard - 1) // per_shard
    width = max(5, len(str(n)))
    return [(f"{i:0{width}d}", i * per_shard, min(n_records, (i + 1) * per_shard)) for i in range(n)]


class Harvester:
    """Loads all models once; `run(records, doc_id_start)` -> store rows for one shard."""

    def __init__(
        self, cfg: HarvestConfig, *, models: Sequence[nn.Module] | None = None, tokenizer: Any = None
    ):
        """``models`` and ``tokenizer``: already loaded, on the device (a notebook, a benchmark with
        random weights); by default every ``cfg.models`` entry is loaded from its path."""
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if models is None:
            self.tokenizers = [load_tokenizer(m.path, m.revision, m.trust_remote_code) for m in cfg.models]
            self.dtypes = [resolve_dtype(m.dtype, self.device) for m in cfg.models]
            self.models = [
                load_model(
                    m.path,
                    dtype=dt,
                    device=self.device,
                    keep_layers=cfg.layer + 1,
                    revision=m.revision,
                    trust_remote_code=m.trust_remote_code,
                )
                for m, dt in zip(cfg.models, self.dtypes, strict=True)
            ]
        else:
            self.models = list(models)
            self.tokenizers = [tokenizer] * len(self.models)
            self.dtypes = [str(next(m.parameters()).dtype).removeprefix("torch.") for m in self.models]
        names = [m.name for m in cfg.models]
        share_chat_template(self.tokenizers, names)
        self.tokenizer = self.tokenizers[0]
        texts = [getattr(m.config, "text_config", None) or m.config for m in self.models]  # Gemma 3: nested
        widths = {t.hidden_size for t in texts}
        if len(widths) != 1:
            raise HarvestInputError(
                f"models have different widths {sorted(widths)}; a crosscoder needs one d_model"
            )
        self.d_model = widths.pop()
        self.regimes = sorted({r for m in self.models for r in length_regimes(m)})
        for spec, model in zip(cfg.models, self.models, strict=True):
            if cfg.layer >= n_layers(model):
                raise HarvestInputError(
                    f"layer={cfg.layer} is out of range for model {spec.name!r} ({n_layers(model)} decoder layers)"
                )
        # the smallest vocabulary: token ids past it (an added [PAD], say) would index out of range
        self.vocab = min(m.get_input_embeddings().num_embeddings for m in self.models)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.tokenizer.eos_token_id
        self.pad_id = pad if pad is not None and pad < self.vocab else 0  # masked: any valid id does

    def _check_ids(self, docs) -> None:
        for d in docs:
            if d.ids and max(d.ids) >= self.vocab:
                small = [
                    s.name
                    for s, m in zip(self.cfg.models, self.models, strict=True)
                    if m.get_input_embeddings().num_embeddings == self.vocab
                ]
                raise HarvestInputError(
                    f"record {d.record_id!r} has token id {max(d.ids)}, past the vocabulary of model(s) "
                    f"{small} ({self.vocab} embeddings): the tokenizer has tokens those models lack"
                )

    def _check_finite(self, acts: torch.Tensor, mask: torch.Tensor) -> None:
        """acts [B, T, M, D]: inf/NaN on a real token (an overflow in a model's dtype) is an error naming
        the model. One reduction and one device sync per batch; no copy of the activations."""
        bad = (~torch.isfinite(acts).all(-1) & mask.bool()[..., None]).any(0).any(0)  # [M]
        if bool(bad.any()):
            m = int(bad.nonzero()[0])
            raise HarvestInputError(
                f"model {self.cfg.models[m].name!r} produced inf/NaN activations at layer {self.cfg.layer} in "
                f"dtype {self.dtypes[m]} (float16 overflows in Gemma-2-like models): set "
                f"models.{m}.dtype to bfloat16 or float32"
            )

    def _to_store_dtype(self, acts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Cast on the device; a value the store's dtype cannot hold is an error, not an inf."""
        out = acts.to(dtype)
        if dtype != acts.dtype and bool(torch.isfinite(acts).all()) and not bool(torch.isfinite(out).all()):
            big = float(acts.abs().max())
            raise HarvestInputError(
                f"an activation of magnitude {big:.4g} overflows store_dtype={self.cfg.store_dtype} "
                f"(largest {torch.finfo(dtype).max:.4g}); set store_dtype: float32 or lower "
                "outlier_norm_mult so such tokens are dropped"
            )
        return out

    def check_tokens(self, records: Sequence[dict[str, Any]]) -> None:
        check_tokenizers_agree(
            self.tokenizers, records, [m.name for m in self.cfg.models], self.cfg.context_length
        )

    @torch.no_grad()
    def run(self, records: Sequence[dict[str, Any]], doc_id_start: int) -> dict[str, Any]:
        """Rows for a shard: acts [N, M, D] in the store's dtype, doc_id, pos, token_id, source;
        plus counts. Host memory stays near twice the shard's rows in the store's dtype: they leave the
        device already in the store's dtype and are put into document order in one pass."""
        cfg = self.cfg
        out_dtype = torch_dtype(cfg.store_dtype)
        self.check_tokens(records)
        docs = tokenize_records(
            records,
            self.tokenizer,
            context_length=cfg.context_length,
            drop_first_raw_tokens=cfg.drop_first_raw_tokens,
            doc_id_start=doc_id_start,
        )
        self._check_ids(docs)
        parts: dict[str, list] = {"acts": [], "doc_id": [], "pos": [], "token_id": [], "source": []}
        n_tokens = n_outliers = 0
        # Batches of similar length (less padding), none across a length where a model's positions
        # change with the batch (diffing/batching.py); rows are put back in document order below.
        for batch in length_batches(docs, cfg.batch_prompts, self.regimes):
            ids, mask = pad_batch(batch, self.pad_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            acts = torch.stack(
                [residual_after_layer(m, ids, mask, cfg.layer).float() for m in self.models], dim=2
            )  # [B, T, M, D]
            self._check_finite(acts, mask)
            keep = torch.zeros(ids.shape, dtype=torch.bool)
            for i, d in enumerate(batch):
                keep[i, : len(d.keep)] = torch.tensor(d.keep)
            keep = keep.to(self.device) & mask.bool()
            n_tokens += int(mask.sum())
            if cfg.outlier_norm_mult is not None and keep.any():
                norms = acts.norm(dim=-1)  # [B, T, M]
                med = norms[keep].median(dim=0).values  # [M]
                outlier = (norms > cfg.outlier_norm_mult * med).any(-1) & keep
                n_outliers += int(outlier.sum())
                keep &= ~outlier
            bi, ti = torch.nonzero(keep, as_tuple=True)
            parts["acts"].append(self._to_store_dtype(acts[bi, ti], out_dtype).cpu())
            parts["doc_id"].append(np.array([batch[i].doc_id for i in bi.tolist()], np.int64))
            parts["pos"].append(ti.cpu().numpy().astype(np.int32))
            parts["token_id"].append(ids[bi, ti].cpu().numpy().astype(np.int32))
            parts["source"].extend(batch[i].source for i in bi.tolist())
        if not parts["acts"]:
            acts_all = torch.zeros(0, len(self.models), self.d_model, dtype=out_dtype)
            cat = dict(
                doc_id=np.zeros(0, np.int64), pos=np.zeros(0, np.int32), token_id=np.zeros(0, np.int32)
            )
        else:
            cat = {k: np.concatenate(parts[k]) for k in ("doc_id", "pos", "token_id")}
            order = np.lexsort((cat["pos"], cat["doc_id"]))  # document order, then position
            cat = {k: v[order] for k, v in cat.items()}
            dest = np.empty_like(order)
            dest[order] = np.arange(len(order))  # where each batch row goes
            acts_all = torch.empty(len(order), len(self.models), self.d_model, dtype=out_dtype)
            start = 0
            while parts["acts"]:  # each batch's rows straight to their place, freed as we go
                part = parts["acts"].pop(0)
                acts_all[torch.from_numpy(dest[start : start + len(part)])] = part
                start += len(part)
            parts["source"] = [parts["source"][i] for i in order.tolist()]
        return {
            "acts": acts_all,
            **cat,
            "source": parts["source"],
            "n_tokens": n_tokens,
            "n_kept": int(acts_all.shape[0]),
            "n_outliers": n_outliers,
        }


def harvest_shards(
    harvester: Harvester,
    writer: StoreWriter,
    shards: Sequence[tuple[str, int, Sequence[dict[str, Any]]]],
    *,
    write_threads: int = 1,
    producer: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Harvest (shard_id, doc_id_start, records) shards in order; each shard is written (atomically)
    on one of ``write_threads`` threads while the models compute the next. At most that many
    writes are in flight, so host memory stays bounded. Returns per shard: shard_id, n_rows,
    n_tokens and seconds (its forward plus its write). Every write has finished (or failed, and the
    first failure is raised) when this returns."""
    results: list[dict[str, Any]] = []

    def write(sid: str, rows: dict[str, Any], t_run: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        info = writer.write_shard(
            sid,
            rows.pop("acts").numpy(),
            doc_ids=rows["doc_id"],
            positions=rows["pos"],
            token_ids=rows["token_id"],
            extra={"source": rows["source"]},
            # the shard's own token counts: how many kept tokens the outlier rule dropped
            producer={**(producer or {}), "n_tokens": rows["n_tokens"], "n_outliers": rows["n_outliers"]},
        )
        seconds = t_run + time.perf_counter() - t0
        return {
            "shard_id": sid,
            "n_rows": info.n_rows,
            "n_tokens": rows["n_tokens"],
            "n_outliers": rows["n_outliers"],
            "seconds": seconds,
        }

    pending: deque[Future] = deque()
    # leaving the pool waits for every write started, also on an error (each write is atomic)
    with ThreadPoolExecutor(max_workers=max(1, write_threads), thread_name_prefix="shard-writer") as pool:
        for sid, start, recs in shards:
            while pending and pending[0].done():  # a failed write stops the work here, not later
                results.append(pending.popleft().result())
            t0 = time.perf_counter()
            rows = harvester.run(recs, start)
            if write_threads == 0:  # inline
                results.append(write(sid, rows, time.perf_counter() - t0))
                continue
            while len(pending) >= write_threads:  # bound the shards held in memory
                results.append(pending.popleft().result())
            pending.append(pool.submit(write, sid, rows, time.perf_counter() - t0))
            del rows
        while pending:
            results.append(pending.popleft().result())
    return results
