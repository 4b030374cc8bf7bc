"""The harvest's Ray Data actor: loads every model once (`Harvester`), then harvests whole shards
and writes each to the store itself; returns only small metadata per shard."""

from __future__ import annotations

import json
import math
from typing import Any

from diffing.fingerprints import model_stamp, tokenizer_fingerprint
from diffing.harvest import HarvestConfig, Harvester, harvest_shards
from diffing.logs import get_logger
from diffing.models import HarvestInputError
from diffing.store import StoreWriter


def _writer(cfg: HarvestConfig, d_model: int) -> StoreWriter:
    return StoreWriter(
        cfg.store,
        model_names=[m.name for m in cfg.models],
        d_model=d_model,
        dtype=cfg.store_dtype,
        layer=cfg.layer,
        site=cfg.site,
        extra_columns=["source"],
        metadata={"harvest": cfg.model_dump(mode="json")},
    )


def check_assigned_gpu(cfg: HarvestConfig, gpu_ids: list | None = None) -> None:
    """An actor that Ray gave no GPU still sees every GPU of its node (Ray 2.60 leaves
    CUDA_VISIBLE_DEVICES alone at num_gpus=0): with device auto or cuda all such actors would load
    their models onto cuda:0 together."""
    import torch

    if cfg.device == "cpu" or not torch.cuda.is_available():
        return
    if gpu_ids is None:
        import ray

        gpu_ids = ray.get_gpu_ids()
    if not gpu_ids:
        raise HarvestInputError(
            f"harvest.ray.num_gpus_per_actor={cfg.ray.num_gpus_per_actor}: this actor has no GPU of its "
            f"own but sees {torch.cuda.device_count()} (harvest.device={cfg.device}); set "
            "harvest.ray.num_gpus_per_actor: 1 (or a fraction to share one), or harvest.device: cpu"
        )


class HarvestActor:
    """Ray Data callable class: loads the models once, then harvests whole shards."""

    def __init__(self, cfg_json: str, d_model: int):
        self.cfg = HarvestConfig.model_validate_json(cfg_json)
        check_assigned_gpu(self.cfg)
        self.harvester = Harvester(self.cfg)
        names = [m.name for m in self.cfg.models]
        self.producer = {
            "device": self.harvester.device.type,
            "dtypes": dict(zip(names, self.harvester.dtypes, strict=True)),
        }
        revisions = {  # the hub snapshot each model was loaded from (none for a local directory)
            n: rev
            for n, m in zip(names, self.harvester.models, strict=True)
            if (rev := getattr(m.config, "_commit_hash", None))
        }
        if revisions:
            self.producer["revisions"] = revisions
        toks = zip(names, self.harvester.tokenizers, strict=True)
        if fps := {n: fp for n, tok in toks if (fp := tokenizer_fingerprint(tok)) is not None}:
            self.producer["tokenizers"] = fps  # what the stored token ids mean (the evidence's text)
        stamps = {m.name: st for m in self.cfg.models if (st := model_stamp(m.path)) is not None}
        if stamps:  # the version of each local model directory (diffing.fingerprints.model_stamp)
            self.producer["model_stamps"] = stamps
        get_logger("harvest").info("harvest.actor.ready", **self.producer)
        self.writer = _writer(self.cfg, d_model)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        out: dict[str, list] = {
            "shard_id": [], "n_rows": [], "n_tokens": [], "n_outliers": [], "seconds": [], "skipped": []
        }  # fmt: skip
        todo = []
        for sid, start, recs in zip(batch["shard_id"], batch["start"], batch["records"], strict=True):
            done = self.writer.done_shard(sid)
            if done is None:
                todo.append((sid, int(start), json.loads(recs)))
            else:
                for k, v in zip(out, (sid, done.n_rows, 0, 0, 0.0, True), strict=True):
                    out[k].append(v)
        # the batch's shards: each written in the background while the models compute the next
        for r in harvest_shards(
            self.harvester,
            self.writer,
            todo,
            write_threads=self.cfg.ray.write_threads,
            producer=self.producer,
        ):
            for k in ("shard_id", "n_rows", "n_tokens", "n_outliers", "seconds"):
                out[k].append(r[k])
            out["skipped"].append(False)
        return out


def shards_per_call(n_todo: int, num_actors: int, write_threads: int) -> int:
    """Shards per actor call. A call takes several, so their writes overlap the next shards'
    forward passes, and waits for its last writes at the end: more shards per call, less of that
    tail (4 per writer thread). Never so many that some actors would get no call at all."""
    return max(1, min(4 * write_threads, math.ceil(n_todo / num_actors)))
