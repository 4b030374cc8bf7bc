"""Label cache: what the judge sees of a latent, the key a label is stored under, and the LRU
(optionally mirrored to one JSON file per key in a directory)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid
from collections import OrderedDict
from pathlib import Path

from diffing.evidence import LatentEvidence, LatentLabel
from diffing.logs import get_logger
from serve import prompts
from serve.settings import MethodSettings
from serve.taxonomy import Taxonomy

log = get_logger("crossdiff.serve")


def judge_view(ev: LatentEvidence, context: str | None) -> dict:
    """Exactly what the judge may see: tokens and activations (no ids, sources, groups or stats)."""

    def ex(x):  # 9 significant digits: float32-exact, and small activations stay apart (not 6 decimals)
        return {
            "tokens": x.tokens,
            "acts": [float(f"{a:.9g}") for a in x.acts],
            "peak": x.peak,
            "q": x.quantile,
        }

    return {
        "top": [ex(x) for x in ev.top],
        "quantiles": [ex(x) for x in ev.quantiles],
        "negatives": [ex(x) for x in ev.negatives],
        "context": context,
    }


def _service_fields(judge_model: str, taxonomy: Taxonomy, method: MethodSettings) -> dict:
    """What every label of a service depends on besides its request and the judge's setup."""
    return {
        "prompt": prompts.PROMPT_VERSION,
        "judge": judge_model,
        "taxonomy": taxonomy.fingerprint,
        "method": method.model_dump(exclude={"max_concurrent_calls"}),
    }


def cache_key(
    ev: LatentEvidence,
    context: str | None,
    *,
    judge_model: str,
    taxonomy: Taxonomy,
    method: MethodSettings,
    detection: bool,
    calibration: str | None = None,
    folded_system: bool = False,
    judge_setup: dict | None = None,
) -> str:
    """`calibration`: fingerprint of the channel calibration texts (None: the fixed neutral text).
    `folded_system`: the judge reads the system message folded into the first user turn.
    `judge_setup`: the judge's configuration beside its name (JudgeSettings.setup)."""
    fields = {
        "evidence": judge_view(ev, context),
        **_service_fields(judge_model, taxonomy, method),
        "detection": detection,
    }
    if calibration is not None:  # absent otherwise, so keys of uncalibrated labels stay as they were
        fields["calibration"] = calibration
    if folded_system:  # likewise: a different prompt, so a different label
        fields["system"] = "folded"
    if judge_setup is not None:  # the model behind the name, its engine, the temperature
        fields["judge_setup"] = judge_setup
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def calibration_texts(items, method: MethodSettings) -> tuple[str, ...]:
    """The text channel scoring reads from each calibration latent (its top examples), empty ones
    dropped, sorted (the mean does not depend on the order, so neither does the fingerprint)."""
    texts = (prompts.channel_text(ev, method) for ev in items)
    return tuple(sorted(t for t in texts if t.strip()))


def settings_fingerprint(
    *, judge_model: str, taxonomy: Taxonomy, method: MethodSettings, judge_setup: dict | None = None
) -> str:
    # `judge_setup`: JudgeSettings.identity() (not setup(): no server address, no machine-local path)
    """What decides every label a service gives besides the request itself (evidence, context,
    detection, calibration): sent with each response, so a client resuming a labels file can tell
    that the endpoint now labels differently (another taxonomy, method, judge or prompt version)."""
    fields = _service_fields(judge_model, taxonomy, method)
    if judge_setup is not None:
        fields["judge_setup"] = judge_setup
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint(texts: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()[:16]


class LabelCache:
    """LRU in memory, optionally mirrored to one JSON file per key in a directory."""

    def __init__(self, size: int, directory: str | None = None):
        self.size = size
        self.mem: OrderedDict[str, LatentLabel] = OrderedDict()
        self.dir = Path(directory) if directory else None
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> LatentLabel | None:
        if key in self.mem:
            self.mem.move_to_end(key)
            return self.mem[key]
        lab = self._read(key)
        if lab is not None:
            self._put_mem(key, lab)
        return lab

    async def aget(self, key: str) -> LatentLabel | None:
        """``get`` for an event loop: the disk copy is read on a worker thread (a shared cache_dir
        on NFS must not stall every request of the replica)."""
        if key in self.mem or not self.dir:
            return self.get(key)
        lab = await asyncio.to_thread(self._read, key)
        if lab is not None:
            self._put_mem(key, lab)  # the memory LRU is only touched on the loop
        return lab

    async def aput(self, key: str, lab: LatentLabel) -> None:
        self._put_mem(key, lab)
        if self.dir:
            await asyncio.to_thread(self._write, key, lab)

    def _read(self, key: str) -> LatentLabel | None:
        if self.dir and (p := self.dir / f"{key}.json").exists():
            try:
                return LatentLabel.model_validate_json(p.read_text())
            except (ValueError, OSError):
                return None
        return None

    def _put_mem(self, key: str, lab: LatentLabel) -> None:
        if self.size <= 0:
            return
        self.mem[key] = lab
        self.mem.move_to_end(key)
        while len(self.mem) > self.size:
            self.mem.popitem(last=False)

    def put(self, key: str, lab: LatentLabel) -> None:
        self._put_mem(key, lab)
        if self.dir:
            self._write(key, lab)

    def _write(self, key: str, lab: LatentLabel) -> None:
        if self.dir:  # a unique temp name: replicas sharing the directory never collide
            tmp = self.dir / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                tmp.write_text(lab.model_dump_json())
                tmp.replace(self.dir / f"{key}.json")
            except OSError as e:  # the label is good; only its disk copy is lost
                log.warning("label_cache.write_failed", key=key[:16], error=f"{type(e).__name__}: {e}")
                tmp.unlink(missing_ok=True)
