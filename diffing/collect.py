"""Collect latent evidence for a run: RUN/examples/<a>-<b>.jsonl, resumable per latent range.

`collect_evidence` reads the `group` column of RUN/latents.parquet, splits the selected latents
into latent-index ranges of `latents_per_file` (one JSONL file each, zero-padded names so the
files sort in latent order), skips ranges whose file exists, and runs the two passes of
`diffing.examples` over the held-out shards for up to `latents_per_pass` latents at a time.
The per-shard work goes through `map_fn(fn, items) -> iterable` of the results in item order
(in-process and lazy by default; the Ray Data job in jobs/analyze.py passes a distributed one).
Results are merged as they arrive, so the driver holds one at a time, not one per shard (a
per-shard accumulator is ~100 MB at the Gemma shape, and a pass reads ~80 shards).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from functools import reduce
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from diffing.config import AnalysisConfig
from diffing.crosscoder import Crosscoder
from diffing.evidence import EXAMPLES_DIR, MAX_TOKEN_CHARS, Example, LatentEvidence, write_jsonl
from diffing.examples import Accumulator, SubsetEncoder, heldout_shards, mass_of_shard, scan_shard
from diffing.logs import get_logger
from diffing.windows import Request, merge_windows, plan_requests, route, window_shard

MapFn = Callable[[Callable, Sequence], Iterable]


def _local_map(fn: Callable, items: Sequence) -> Iterable:
    return (fn(i) for i in items)  # lazy: each result is merged before the next is computed


SOURCE_MASS_FILE = "source_mass.parquet"
_STATS_FROM_TABLE = ("delta_norm", "cosine", "nu_eps", "nu_r")


def _text(tok, ids) -> str:
    """The tokens' text as they are: no special tokens dropped, no legacy space clean-up (which
    turns " 's" into "'s" in some tokenizers' configs, and would differ from token to token)."""
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _window_pieces(tok, ids: list[int]) -> list[str]:
    """One string per token of a window whose per-token decodes do not join to the window's text
    (byte-level BPE splitting a character over tokens, SentencePiece's word-boundary markers): each
    token gets the text its id adds to the decode of the few tokens before it, and a token that ends
    inside a character adds nothing until the character is complete (vLLM's incremental detokenizer)."""
    out, prefix, read = [], 0, 0  # ids[prefix:read]: already shown, the context of the next piece
    for j, i in enumerate(ids):
        if i < 0:  # not a token: shown as its id, and no context across it
            out.append(f"<{i}>")
            prefix = read = j + 1
            continue
        before = _text(tok, ids[prefix:read]) if read > prefix else ""
        text = _text(tok, ids[prefix : j + 1])
        if text.endswith("\ufffd") and j + 1 < len(ids) and ids[j + 1] >= 0:
            out.append("")  # inside a character: its bytes are shown with the token that completes it
            continue
        # a decode that rewrites its context (byte fallback turning a finished byte into U+FFFD
        # once an unfinished one follows) shows only what differs, never the context again
        out.append(text[len(os.path.commonprefix([before, text])) :])
        prefix, read = read, j + 1
    return out


def _harvested_fingerprint(store) -> str | None:
    """The vocabulary fingerprint of the first harvested model's tokenizer, whose token ids the
    store holds (stores harvested before fingerprints: None)."""
    try:
        meta = store.manifest.metadata
        first = meta["harvest"]["models"][0]["name"]
        return (meta.get("tokenizers") or {}).get(first)
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def token_decoder(store, tokenizer: str | None = None) -> Callable[[Sequence[int]], list[str]]:
    """A context window's token ids -> one string per token, joining to the window's text, through
    `tokenizer` (analyze.tokenizer) or the first harvested model's; "<id>" strings when the store
    names no model (a synthetic store). A named tokenizer that cannot be loaded here is an error:
    evidence of bare ids would be labelled without a word of text."""
    path, revision, remote = tokenizer, None, False
    if path is None:
        try:
            first = store.manifest.metadata["harvest"]["models"][0]
            path = first["path"]
            recorded = (store.manifest.metadata.get("revisions") or {}).get(first.get("name"))
            revision = recorded or first.get("revision")  # the commit the shards were made from first
            remote = bool(first.get("trust_remote_code"))  # its tokenizer may be custom code too
        except (AttributeError, KeyError, IndexError, TypeError):
            path = None
    tok = None
    if path is not None:
        from diffing.fingerprints import tokenizer_fingerprint
        from diffing.models import HarvestInputError, load_tokenizer

        field = "analyze.tokenizer" if tokenizer else "the harvested model's path"
        try:
            tok = load_tokenizer(path, revision, remote)
        except HarvestInputError as e:
            raise HarvestInputError(
                f"{e} ({field}); the evidence's text needs it: set analyze.tokenizer to a copy of that "
                "tokenizer this machine can read (a local directory or a cached hub id)"
            ) from None
        want = _harvested_fingerprint(store)
        if want and (have := tokenizer_fingerprint(tok)) and have != want:
            raise HarvestInputError(
                f"{field} {path} is not the tokenizer the store {getattr(store, 'uri', '')} was harvested "
                f"with (vocabulary {have}, harvested {want}): the evidence would show other text than "
                "the tokens the latents fired on; set analyze.tokenizer to the harvested model's tokenizer"
            )
    else:
        get_logger("crossdiff.evidence").warning(
            "evidence.no_tokenizer", store=str(getattr(store, "uri", "")), shown="token ids"
        )
    cache: dict[int, str] = {}

    def piece(i: int) -> str:
        if i not in cache:
            cache[i] = _text(tok, [i]) if i >= 0 else f"<{i}>"
        return cache[i]

    def decode(ids: Sequence[int]) -> list[str]:
        ids = [int(i) for i in ids]
        if tok is None:
            return [f"<{i}>" for i in ids]
        pieces = [piece(i) for i in ids]
        real = [i for i in ids if i >= 0]
        if "".join(p for i, p in zip(ids, pieces, strict=True) if i >= 0) == _text(tok, real):
            return pieces  # the common case: per-token strings already join to the text
        return _window_pieces(tok, ids)

    return decode


def range_file(a: int, b: int) -> str:
    return f"{a:07d}-{b:07d}.jsonl"


class ScanTask:
    """Picklable per-shard pass-1 task. It carries its encoder (the selected latents' columns,
    built once on the driver), so Ray workers on other nodes need no copy of the run directory."""

    def __init__(self, store_uri: str, encoder: SubsetEncoder, cfg: AnalysisConfig):
        self.store_uri, self.enc, self.cfg = store_uri, encoder, cfg
        self._store = None

    def _setup(self):
        if self._store is None:
            from diffing.store import open_store

            self._store = open_store(self.store_uri)
        return self._store, self.enc

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    def __call__(self, shard: int) -> Accumulator:
        store, enc = self._setup()
        return scan_shard(store, int(shard), enc, self.cfg)


class WindowTask(ScanTask):
    """Picklable per-shard pass-2 task: item = (shard, [(request id, Request), ...])."""

    def __call__(self, item) -> dict[int, dict]:
        store, enc = self._setup()
        shard, reqs = item
        return window_shard(store, int(shard), enc, reqs, self.cfg)


def _example(frag: dict, r: Request, decode, quantile: int | None = None) -> Example | None:
    pos = frag["pos"]
    hit = np.flatnonzero(pos == r.pos)
    if not len(hit):
        return None
    return Example(  # a token string longer than evidence allows (a run of spaces, say) is cut
        tokens=[
            t if len(t) <= MAX_TOKEN_CHARS else t[: MAX_TOKEN_CHARS - 1] + "…"
            for t in decode(frag["token_id"].tolist())
        ],
        acts=[round(float(a), 6) for a in frag["act"]],
        peak=int(hit[0]),
        doc_id=r.doc,
        pos=r.pos,
        source=frag.get("source"),
        quantile=quantile,
    )


def build_evidence(
    acc: Accumulator,
    requests: Sequence[Request],
    windows: dict[int, dict],
    table_rows: dict[int, dict],
    decode: Callable[[Sequence[int]], list[str]],
) -> list[LatentEvidence]:
    """LatentEvidence per latent of the pass (latent order)."""
    cfg = acc.cfg
    per: dict[int, dict[str, list]] = {
        k: {"top": [], "quantile": [], "neg": []} for k in range(len(acc.latents))
    }
    for rid, r in enumerate(requests):
        frag = windows.get(rid)
        if frag is None:
            continue
        if r.kind == "neg" and np.any(frag["act"] > 0):  # doc continued (and fired) in another shard
            continue
        ex = _example(frag, r, decode, r.quantile)
        if ex is not None:
            per[r.k][r.kind].append(ex)
    total_mass = sum(acc.mass.values()) if acc.mass else None
    out = []
    for k, lat in enumerate(acc.latents.tolist()):
        row = table_rows[lat]
        nf = int(acc.n_fire[k])
        stats = {
            "freq": nf / max(acc.n_rows, 1),
            "mean_act": float(acc.s_act[k] / nf) if nf else 0.0,
            "max_act": float(acc.max_act[k]),
            "heldout_tokens": float(acc.n_rows),
        }
        for name in _STATS_FROM_TABLE:
            v = row.get(name)
            stats[name] = None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)
        mass = {}
        if total_mass is not None and total_mass[k] > 0:
            mass = {s: float(m[k] / total_mass[k]) for s, m in sorted(acc.mass.items()) if m[k] > 0}
        out.append(
            LatentEvidence(
                latent=lat,
                group=row["group"],
                stats=stats,
                top=sorted(per[k]["top"], key=lambda e: -e.max_act)[: cfg.n_top],
                quantiles=sorted(per[k]["quantile"], key=lambda e: e.quantile)[
                    : cfg.n_quantiles * cfg.per_quantile
                ],
                negatives=per[k]["neg"][: cfg.n_negatives],
                source_mass=mass,
            )
        )
    return out


def evidence_for_latents(
    store,
    model: Crosscoder | str | Path,
    latents: Sequence[int],
    cfg: AnalysisConfig,
    table_rows: dict[int, dict],
    *,
    map_fn: MapFn | None = None,
    decode: Callable | None = None,
) -> list[LatentEvidence]:
    """Both passes for one set of latents (``model``: the crosscoder or its directory); returns
    their evidence in latent order."""
    map_fn = map_fn or _local_map
    lat = np.asarray(sorted(latents), np.int64)
    shards = heldout_shards(store, cfg)
    if not isinstance(model, Crosscoder):
        model = Crosscoder.load(model)
    enc = SubsetEncoder(model, lat)
    scan = ScanTask(store.uri, enc, cfg)
    acc = reduce(lambda a, b: a.merge(b), map_fn(scan, shards))
    if acc.n_rows == 0:  # every latent would get empty evidence, and the judge nothing to read
        raise ValueError(
            f"no held-out rows for the evidence (analyze.heldout={cfg.heldout}, heldout_frac={cfg.heldout_frac}, "
            f"{len(shards)} shards read): 'hash' keeps whole documents, and a store whose rows share one "
            "doc_id (written without doc_ids) may keep none; set analyze.heldout to 'all' or 'last_shards', "
            "or write the store with doc_ids"
        )
    requests = plan_requests(acc)
    routes = route(requests, [sh.n_rows for sh in store.manifest.shards], cfg.window)
    items = [(s, [(i, requests[i]) for i in ids]) for s, ids in sorted(routes.items())]
    windows = merge_windows(map_fn(WindowTask(store.uri, enc, cfg), items))
    return build_evidence(acc, requests, windows, table_rows, decode or token_decoder(store, cfg.tokenizer))


def _range_done(path: Path, latents: list[int], log) -> bool:
    """A range file counts as done when it holds exactly the range's selected latents."""
    if not path.exists():
        return False
    have = [json.loads(line)["latent"] for line in path.read_text().split("\n") if line.strip()]
    if have != latents:
        log.warning("evidence.stale", file=path.name, reason="selection changed; redoing this range")
        return False
    return True


def collect_evidence(
    run_dir: str | Path,
    store,
    cfg: AnalysisConfig,
    *,
    map_fn: MapFn | None = None,
    overwrite: bool = False,
    decode: Callable | None = None,
) -> list[Path]:
    """Write RUN/examples/<a>-<b>.jsonl for every latent range holding selected latents.

    Ranges whose file exists are skipped (resume); `overwrite` redoes them all. Returns the files.
    """
    run = Path(run_dir)
    log = get_logger("evidence", run=str(run))
    path = run / "latents.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `crossdiff analyze --run {run}` first")
    table = pq.read_table(path)
    if "group" not in table.column_names:
        raise ValueError(
            f"{path} has no `group` column (written by an older crossdiff); rerun with --overwrite"
        )
    rows = {int(r["latent"]): r for r in table.to_pylist() if r["group"]}
    out_dir = run / EXAMPLES_DIR
    if overwrite and out_dir.exists():
        for p in out_dir.glob("*.jsonl"):
            p.unlink()
    F = cfg.latents_per_file
    ranges: dict[tuple[int, int], list[int]] = {}
    for lat in sorted(rows):
        a = lat // F * F
        ranges.setdefault((a, a + F), []).append(lat)
    files = [out_dir / range_file(a, b) for a, b in ranges]
    todo = [
        (ab, lats) for ab, lats in ranges.items() if not _range_done(out_dir / range_file(*ab), lats, log)
    ]
    log.info("evidence.plan", selected=len(rows), ranges=len(ranges), todo=len(todo))
    decode = decode or token_decoder(store, cfg.tokenizer)
    model = Crosscoder.load(run / "crosscoder") if todo else None  # once for every pass
    while todo:
        batch, n = [], 0
        while todo and (not batch or n + len(todo[0][1]) <= cfg.latents_per_pass):
            batch.append(todo.pop(0))
            n += len(batch[-1][1])
        lats = [x for _, ls in batch for x in ls]
        ev = evidence_for_latents(store, model, lats, cfg, rows, map_fn=map_fn, decode=decode)
        by_lat = {e.latent: e for e in ev}
        for (a, b), ls in batch:
            write_jsonl(out_dir / range_file(a, b), [by_lat[x] for x in ls])
            log.info("evidence.range", range=f"{a}-{b}", latents=len(ls))
    return files


class MassTask(ScanTask):
    """Picklable per-shard task: ``mass_of_shard`` for every latent."""

    def __call__(self, shard: int) -> dict[str, np.ndarray]:
        store, enc = self._setup()
        return mass_of_shard(store, int(shard), enc, self.cfg)


def collect_source_mass(
    run_dir: str | Path, store, cfg: AnalysisConfig, *, map_fn: MapFn | None = None, overwrite: bool = False
) -> Path | None:
    """RUN/source_mass.parquet: every latent's activation mass per corpus source (held-out rows).

    The planted-truth check compares the selected latents against *all* shared latents with it,
    not only the sampled baseline group. None when the store has no ``source`` column.
    """
    import pyarrow as pa

    run = Path(run_dir)
    path = run / SOURCE_MASS_FILE
    if path.exists() and not overwrite:
        return path
    if "source" not in store.manifest.extra_columns:  # nothing to attribute: load nothing
        return None
    model = Crosscoder.load(run / "crosscoder")
    lat = np.arange(model.cfg.n_latents, dtype=np.int64)
    enc = SubsetEncoder(model, lat)  # every latent's encoder column: W_enc itself (no copy)
    del model
    map_fn = map_fn or _local_map
    parts = map_fn(MassTask(store.uri, enc, cfg), heldout_shards(store, cfg))
    total: dict[str, np.ndarray] = {}
    for part in parts:
        for name, m in part.items():
            total[name] = total.get(name, 0) + m
    if not total:
        return None
    cols = {"latent": pa.array(lat)} | {f"mass/{k}": pa.array(v) for k, v in sorted(total.items())}
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table(cols), tmp)
    tmp.replace(path)
    get_logger("evidence", run=str(run)).info("evidence.source_mass", latents=len(lat), sources=len(total))
    return path
