"""The text `crossdiff status` prints from `run_status`'s record (`--json` prints the record)."""

from __future__ import annotations

import math
from typing import Any


def _fmt_s(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return ""
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _done_detail(stage: str, summ: Any) -> str:
    if not isinstance(summ, dict):
        return ""
    if stage == "harvest":
        return f"{summ.get('shards')} shards, {summ.get('rows', 0):,} rows"
    if stage == "fit" and "fve" in summ:
        fve = ", ".join(f"{k} {v:.3f}" for k, v in summ["fve"].items())
        return f"{summ.get('steps')} steps, FVE {fve}, dead {summ.get('dead_fraction', 0):.0%}"
    if stage == "analyze" and "groups" in summ:
        return ", ".join(f"{g} {n}" for g, n in summ["groups"].items())
    if stage == "label" and "total" in summ:
        return f"{summ['total']} latents labelled"
    if stage == "report" and "html" in summ:
        return str(summ["html"])
    return f"{len(summ)} comparisons" if summ and all(isinstance(v, dict) for v in summ.values()) else ""


def _progress_detail(stage: str, p: dict) -> str:
    if stage == "harvest":
        return f"{p.get('shards_done', 0)}/{p.get('shards') or '?'} shards written"
    if stage == "fit":
        if p.get("step") is None:
            return "no step logged yet"
        total = p.get("steps")
        pct = f" ({p['step'] / total:.0%})" if total else ""
        eta = f", ETA {_fmt_s(p['eta_s'])}" if p.get("eta_s") is not None else ""
        return f"step {p['step']}/{total or '?'}{pct}, loss {p.get('loss', float('nan')):.4g}{eta}"
    if stage == "label":
        return "; ".join(f"{k}: {v['labelled']}/{v['latents'] or '?'} labelled" for k, v in p.items())
    return ""


def format_status(st: dict[str, Any]) -> str:
    lines = [f"run {st['run']}"]
    for row in st["stages"]:
        stage, state = row["stage"], row["state"]
        detail = _done_detail(stage, row.get("summary")) if state == "done" else ""
        if stage == st["current"]:
            detail = _progress_detail(stage, st["progress"])
        if row.get("missing"):
            detail = f"outputs gone: {', '.join(row['missing'])} (a rerun of the pipeline redoes it)"
        lines.append(f"  {stage:<8} {state:<8} {_fmt_s(row.get('seconds')):>9}  {detail}".rstrip())
    if h := st.get("held_by"):
        beat = f", heartbeat {_fmt_s(h['heartbeat_age_s'])} ago" if "heartbeat_age_s" in h else ""
        lines.append(
            f"held by {h.get('command', 'crossdiff')} (pid {h.get('pid', '?')} on {h.get('host', '?')}{beat})"
        )
    if st.get("holder_gone"):
        lines.append("no process holds the run: it was stopped or killed; rerun the pipeline to resume")
    if "last_write_age_s" in st:
        lines.append(
            f"last output written {_fmt_s(st['last_write_age_s'])} ago"
            + (
                " (a `running` stage with no recent write was probably killed: rerun the pipeline to resume)"
                if st.get("probably_killed") and not st.get("holder_gone")
                else ""
            )
        )
    if st.get("report"):
        lines.append(f"report: {st['report']}")
    return "\n".join(lines)
