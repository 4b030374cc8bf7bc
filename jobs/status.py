"""`crossdiff status RUN`: where a run stands, read from its files (local, s3://, gs://).

No Ray and no config edits: the stage markers (RUN/stages/<stage>.json) say what finished, and the
outputs a running stage writes as it goes say how far it got:

- harvest: the store's shard sidecars against the shards its stamp names (harvest_config.json);
- fit: the last line of metrics.jsonl against run_config.json's total steps (a Ray Train fit
  rewrites it about once a minute and at every checkpoint), with an ETA from its token rate;
- label: lines of each comparison's labels.jsonl against the latents of the labelled groups.

A `running` marker also remains after a killed run: the age of the stage's newest output
tells the two apart (a remote run's local copy is synced every `sync_every_s`). A store or a run
of the single-stage commands has no markers: their outputs say what was made (`_standalone`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import fsspec

from jobs.pipeline_config import STAGES
from jobs.stamps import info_time as _info_time
from jobs.status_format import format_status  # noqa: F401  (re-exported: its home was here)

QUIET_S = 900.0  # a running stage with no output this much newer was probably killed
STATES = {"done": "done", "running": "running", "stale": "to redo", None: "pending"}
# without a pipeline's markers (a run of the single-stage commands): "started" = begun, not finished
# (running, or killed: rerun the command to resume); "present" = its output exists (the command may
# still be adding to it); "absent" = not made in this directory


def _read(fs, path: str) -> Any:
    """A JSON file, or None where it is missing or torn. Other errors (access denied, a bucket that
    does not answer) are raised: they are not a state of the run."""
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def _mtime(fs, path: str) -> float | None:
    """Seconds since the epoch of a file's last change, or None (missing; a store without mtimes)."""
    try:
        return _info_time(fs.info(path))
    except FileNotFoundError:
        return None


def _lines(fs, path: str) -> list[str]:
    try:
        # "\n" only: splitlines() also breaks at U+2028/U+2029/U+0085, which JSON strings may hold
        return [x for x in fs.cat_file(path).decode().split("\n") if x.strip()]
    except FileNotFoundError:
        return []


def _labelled(fs, path: str) -> int:
    """Distinct latents in a labels.jsonl (a torn last line or a latent written twice counts once)."""
    seen = set()
    for line in _lines(fs, path):
        try:
            seen.add(json.loads(line)["latent"])
        except (ValueError, KeyError, TypeError):
            pass
    return len(seen)


def _store_root(cfg: dict, run: str) -> tuple[Any, str]:
    """The harvest's store. A relative path is relative to where the pipeline ran: when RUN is
    given as some/dir/<out> for a relative `out`, that is some/dir."""
    uri = (cfg.get("harvest") or {}).get("store") or f"{run.rstrip('/')}/store"
    out = (cfg.get("out") or "").rstrip("/")
    if "://" not in uri and not os.path.isabs(uri) and out and "://" not in out and not os.path.isabs(out):
        base, out = os.path.normpath(run), os.path.normpath(out)  # ./runs/r is runs/r
        if base == out or base.endswith(os.sep + out):
            uri = os.path.join(base[: len(base) - len(out)], uri)
    return fsspec.core.url_to_fs(uri)


def _harvest(cfg: dict, run: str) -> dict:
    sfs, sroot = _store_root(cfg, run)
    sroot = sroot.rstrip("/")
    stamp = _read(sfs, f"{sroot}/harvest_config.json") or {}
    done = sfs.glob(f"{sroot}/shards/*.json", detail=True)  # one listing, with the files' times
    out: dict[str, Any] = {"shards_done": len(done), "shards": stamp.get("shards")}
    times = [t for t in (_info_time(info) for info in done.values()) if t]
    if times:  # the newest: a resume fills gaps among the shards an earlier attempt wrote
        out["last_write"] = max(times)
    return out


def _fit(fs, root: str) -> dict:
    lines = _lines(fs, f"{root}/metrics.jsonl")
    stamp = _read(fs, f"{root}/run_config.json") or {}
    out: dict[str, Any] = {"steps": stamp.get("total_steps")}
    rows = []
    for line in lines[-2:]:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a torn last line (an in-process fit killed mid-write)
            pass
    if rows:
        last = rows[-1]
        out["step"] = last.get("step")
        out["loss"] = last.get("loss")
        out["fve"] = {k[4:]: v for k, v in last.items() if k.startswith("fve/")}
        batch = (stamp.get("fit") or {}).get("train", {}).get("batch_size")
        tps = last.get("tokens_per_s")  # a Ray Train fit logs its rate; the in-process fit its clock
        if tps is None and len(rows) == 2 and all("elapsed_s" in r and "tokens_seen" in r for r in rows):
            dt = rows[1]["elapsed_s"] - rows[0]["elapsed_s"]
            tps = (rows[1]["tokens_seen"] - rows[0]["tokens_seen"]) / dt if dt > 0 else None
        if out["steps"] and out["step"] is not None and batch and tps:
            out["eta_s"] = round((out["steps"] - out["step"]) * batch / max(tps, 1e-9))
        if t := _mtime(fs, f"{root}/metrics.jsonl"):
            out["last_write"] = t
    return out


def _label(cfg: dict, fs, root: str) -> dict:
    """Labels written per comparison, against the labelled groups' sizes where analyze says them."""
    pairs = _pairs(cfg)
    groups = set((cfg.get("label") or {}).get("groups") or ())
    analyze_summary = (_read(fs, f"{root}/stages/analyze.json") or {}).get("summary")
    out: dict[str, Any] = {}
    for a, b in pairs:
        key = f"{a}-vs-{b}"
        d = root if len(pairs) == 1 else f"{root}/compare/{key}"
        summ = (analyze_summary or {}) if len(pairs) == 1 else (analyze_summary or {}).get(key, {})
        sizes = (summ or {}).get("groups") or {}
        want = sum(n for g, n in sizes.items() if g in groups) if groups else sum(sizes.values())
        entry: dict[str, Any] = {"labelled": _labelled(fs, f"{d}/labels.jsonl"), "latents": want or None}
        if t := _mtime(fs, f"{d}/labels.jsonl"):
            entry["last_write"] = t
        out[key] = entry
    return out


def _pairs(cfg: dict) -> list[tuple[str, str]]:
    if cfg.get("comparisons"):
        return [tuple(p) for p in cfg["comparisons"]]
    if cfg.get("pair"):
        return [tuple(cfg["pair"])]
    models = [m["name"] for m in (cfg.get("harvest") or {}).get("models", [])]
    return [(models[0], models[1])] if len(models) >= 2 else []


def _gone(fs, root: str, cfg: dict, stage: str) -> list[str]:
    """Outputs a `done` stage's marker vouches for that are not there (deleted since): the
    pipeline redoes such a stage (jobs.stage_outputs.missing checks the same files)."""
    pairs = _pairs(cfg)
    dirs = [root] if len(pairs) <= 1 else [f"{root}/compare/{a}-vs-{b}" for a, b in pairs]
    want = {
        "fit": [f"{root}/metrics.json", f"{root}/crosscoder/model.safetensors"],
        "analyze": [f"{d}/latents.parquet" for d in dirs],
        "label": [f"{d}/labels.jsonl" for d in dirs if fs.glob(f"{d}/examples/*.jsonl")],
        "report": [
            f"{d}/{name}"
            for d in (dirs if len(dirs) == 1 else [*dirs, root])
            for name in ("report.json", "report.html")
        ],
    }.get(stage, [])
    return [w for w in want if not fs.exists(w)]


def run_status(run: str) -> dict[str, Any]:
    """Each configured stage's state (done, running, to redo, pending), seconds and summary, and
    the running (or first unfinished) stage's progress."""
    fs, root = fsspec.core.url_to_fs(run)
    root = root.rstrip("/")
    cfg = _read(fs, f"{root}/pipeline.json")
    if cfg is None:
        return _standalone(fs, root, run)
    now = time.time()
    stages, current, started = [], None, None
    for stage in [s for s in STAGES if s in (cfg.get("stages") or STAGES)]:  # pipeline order
        marker = _read(fs, f"{root}/stages/{stage}.json")
        if marker is None and fs.exists(f"{root}/stages/{stage}.json"):
            marker = {"stale": True}  # torn: vouches for nothing, as in the pipeline
        key = None
        if marker is not None:
            key = "stale" if marker.get("stale") else "running" if marker.get("running") else "done"
        row: dict[str, Any] = {"stage": stage, "state": STATES[key]}
        if key == "done" and (gone := _gone(fs, root, cfg, stage)):
            key, row["state"], row["missing"] = "stale", STATES["stale"], gone  # a rerun redoes it
        if key == "done":
            row["seconds"] = marker.get("seconds")
            row["summary"] = marker.get("summary")
        elif current is None:
            current = stage
            if key == "running":  # marked when it started (the pipeline rewrites it on a fresh start)
                started = _mtime(fs, f"{root}/stages/{stage}.json")
        stages.append(row)
    progress: dict[str, Any] = {}
    if current == "harvest":
        progress = _harvest(cfg, run)
    elif current == "fit":
        progress = _fit(fs, root)
    elif current == "label":
        progress = _label(cfg, fs, root)
    writes = [started, progress.get("last_write")] + [
        v.get("last_write") for v in progress.values() if isinstance(v, dict)
    ]
    writes = [w for w in writes if w]
    out: dict[str, Any] = {"run": run, "stages": stages, "current": current, "progress": progress}
    if writes:
        out["last_write_age_s"] = round(now - max(writes), 1)
        # a remote run's local copy reaches the bucket every sync_every_s (0: at the stage's end)
        sync = float(cfg.get("sync_every_s") or 0) if "://" in run else 0.0
        # only a `running` stage can look killed; or one with outputs but no marker at all (a
        # crossdiff from before the markers, killed mid-stage: nothing else says it stopped)
        unmarked = (
            started is None
            and current is not None
            and progress
            and not fs.exists(f"{root}/stages/{current}.json")
        )
        if (started or unmarked) and ("://" not in run or sync > 0):
            out["quiet_after_s"] = max(QUIET_S, 3 * sync)
            out["probably_killed"] = out["last_write_age_s"] > out["quiet_after_s"]
            if out["probably_killed"]:
                progress.pop("eta_s", None)  # the dead attempt's: a rerun resumes and logs its own
    if started or "probably_killed" in out:  # who holds the run says more than how old its files are
        _apply_holder(out, fs, root, run, now, progress)
    if current is None and fs.exists(f"{root}/report.html"):
        out["report"] = _report_path(run)
    return out


def _report_path(run: str) -> str:
    """Where to open the report: absolute for a local run (status may run from another directory
    than the one that will open it), the URL as given for a remote one."""
    if "://" in run:
        return f"{run.rstrip('/')}/report.html"
    return str(Path(run).expanduser().resolve() / "report.html")


def _apply_holder(out: dict, fs, root: str, run: str, now: float, progress: dict) -> None:
    """A running stage's run held by a live process is running, however quiet (a long fit step);
    one nobody holds was stopped: a local run's lock is free (its holder was on this host), or a
    remote run's lease was given back or is stale. Runs from before locks (no lock file, no lease)
    keep the file-age rule."""
    import socket
    from pathlib import Path

    from jobs.runlock import LEASE_FILE, LOCK_FILE, STALE_S, holder, object_age

    if "://" not in run:
        lock = Path(root) / LOCK_FILE
        if not lock.exists():
            return
        if (h := holder(Path(root))) is not None:
            out["held_by"], out["probably_killed"] = h, False
            return
        try:
            last = json.loads(lock.read_text() or "{}")
        except (OSError, ValueError):
            last = {}
        if last.get("host") == socket.gethostname():  # a flock seen from its own host is the truth
            out["probably_killed"], out["holder_gone"] = True, True
    else:
        lease = _read(fs, f"{root}/{LEASE_FILE}")
        if lease is None:
            return  # never leased (a run from before leases): the file-age rule stands
        if lease.get("released"):  # given back with a stage still `running`: it failed or was stopped
            out["probably_killed"], out["holder_gone"] = True, True
        else:
            age = now - float(lease.get("heartbeat") or 0)
            if age > STALE_S:  # the holder's clock: the store's own time may say it was just written
                try:
                    written = object_age(fs.info(f"{root}/{LEASE_FILE}"))
                except Exception:  # noqa: BLE001 - the heartbeat alone decides
                    written = None
                age = age if written is None else min(age, written)
            if age <= STALE_S:
                out["held_by"] = {**lease, "heartbeat_age_s": round(age, 1)}
                out["probably_killed"] = False
                return
            out["probably_killed"], out["holder_gone"] = True, True
    if out.get("probably_killed"):
        progress.pop("eta_s", None)


def _standalone(fs, root: str, run: str) -> dict[str, Any]:
    """A store of `crossdiff harvest`, or a run of `crossdiff fit` / `analyze` / `label` / `report`
    (no pipeline.json, no markers): each stage's state from the outputs it writes last."""
    has = lambda rel: fs.exists(f"{root}/{rel}")  # noqa: E731
    rows: list[dict[str, Any]] = []
    progress: dict[str, Any] = {}
    current = None
    if has("harvest_config.json") or has("manifest.json"):  # an activation store
        rows.append({"stage": "harvest", "state": "done" if has("manifest.json") else "started"})
        if rows[0]["state"] == "started":
            current, progress = "harvest", _harvest({"harvest": {"store": run}}, run)
    elif has("run_config.json") or has("metrics.json") or has("latents.parquet"):
        done = {
            "fit": has("metrics.json") and has("crosscoder/model.safetensors"),
            "analyze": has("latents.parquet"),
            "label": has("labels.jsonl"),
            "report": has("report.html"),
        }
        for stage, ok in done.items():
            if stage == "fit":
                state = "done" if ok else "started" if has("run_config.json") else "absent"
            else:  # written as they go (evidence after latents.parquet, labels batch by batch)
                state = "present" if ok else "absent"
            rows.append({"stage": stage, "state": state})
        if not done["fit"] and has("run_config.json"):
            current, progress = "fit", _fit(fs, root)
    elif not fs.exists(root):
        raise FileNotFoundError(f"{run} does not exist")
    else:
        raise FileNotFoundError(
            f"{run} holds no crossdiff run: no pipeline.json (a `crossdiff pipeline` --out), no store "
            "(harvest_config.json) and no fit (run_config.json); give the directory a command wrote"
        )
    out: dict[str, Any] = {"run": run, "stages": rows, "current": current, "progress": progress}
    if t := progress.get("last_write"):
        out["last_write_age_s"] = round(time.time() - t, 1)
    if has("report.html"):
        out["report"] = _report_path(run)
    return out
