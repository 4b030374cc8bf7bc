"""HTML and Markdown rendering of a gathered report (no network assets: inline CSS, data-URI images)."""

from __future__ import annotations

import html
import math
from typing import Any

from diffing.evidence import visible_pieces

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;background:#f8f9fa;color:#212529}
main{max-width:1150px;margin:0 auto;padding:20px 28px}
h1{font-size:24px;margin:4px 0}h2{font-size:19px;margin:26px 0 8px;border-bottom:1px solid #dee2e6}
h3{font-size:15px;margin:12px 0 6px}.muted{color:#6c757d;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}td,th{border:1px solid #dee2e6;padding:3px 8px;text-align:right}
th{background:#e9ecef}td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}.grid img{max-width:100%;background:#fff;border:1px solid #dee2e6}
.kpis{display:flex;gap:10px;flex-wrap:wrap}.kpi{background:#fff;border:1px solid #dee2e6;border-radius:6px;padding:8px 12px}
.kpi b{display:block;font-size:18px}.card{background:#fff;border:1px solid #dee2e6;border-radius:8px;padding:10px 14px;margin:10px 0}
.card .head{display:flex;justify-content:space-between;flex-wrap:wrap;gap:8px;font-size:13px}
.tag{display:inline-block;border-radius:10px;padding:1px 8px;font-size:12px;color:#fff;background:#495057;margin-right:4px}
.tag.A{background:#d9480f}.tag.B{background:#1971c2}.tag.base{background:#868e96}.tag.cat{background:#2b8a3e}
.expl{margin:6px 0;font-size:14px}.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;white-space:pre-wrap;
line-height:1.7;border-left:3px solid #e9ecef;padding:2px 8px;margin:4px 0;word-break:break-all}
.ctx span{border-radius:2px}.ctx .pk{outline:1.5px solid #212529}.ctx .nl{color:#adb5bd}
.src{font-size:12px;color:#495057}.flag{color:#c92a2a;font-weight:600}
.note{background:#fff4e6;border-left:3px solid #d9480f;padding:6px 10px;font-size:13px;margin:6px 0}
"""


# C0 controls but tab and newline (CR is one by then), and DEL -> their visible symbols
# (U+2400...): raw, NUL is a parse error in HTML and the others are invisible
_CONTROLS = {c: chr(0x2400 + c) for c in range(32) if chr(c) not in "\t\n\r"} | {0x7F: "\u2421", 0x0D: None}


def esc(x: Any) -> str:
    text = str(x).replace("\r\n", "\n").replace("\r", "\n")  # CRLF, and old Mac line ends
    return html.escape(text, quote=True).translate(_CONTROLS)


def fmt(x: Any, nd: int = 3) -> str:
    if isinstance(x, float) and math.isinf(x):
        return "+∞" if x > 0 else "−∞"
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def context_html(tokens: list[str], acts: list[float], peak: int, scale: float, rgb: str) -> str:
    """One context, each token's background scaled by its activation (title: the value)."""
    tokens, acts, peak = visible_pieces(tokens, acts, peak)
    out = []
    for i, (t, a) in enumerate(zip(tokens, acts, strict=True)):
        alpha = 0.0 if scale <= 0 else min(1.0, max(0.0, a / scale)) * 0.85
        shown = esc(t).replace("\n", '<span class="nl">↵</span>\n')
        cls = ' class="pk"' if i == peak else ""
        style = f' style="background:rgba({rgb},{alpha:.2f})"' if alpha > 0 else ""
        out.append(f'<span{cls}{style} title="{a:.3g}">{shown}</span>')
    return f'<div class="ctx">{"".join(out)}</div>'


def card_html(c: dict, pair: tuple[str, str], n_contexts: int) -> str:
    a, _ = pair
    g = c["group"]
    kind = "A" if g == f"{a}-specific" else ("base" if g == "baseline" else "B")
    rgb = {"A": "217,72,15", "B": "25,113,194", "base": "134,142,150"}[kind]
    s = c.get("stats") or {}
    head = (
        f'<div><b>latent {c["latent"]}</b> <span class="tag {kind}">{esc(g)}</span>'
        + (f'<span class="tag cat">{esc(c["label"]["category"])}</span>' if c.get("label") else "")
        + "</div>"
        f'<div class="muted">Δnorm {fmt(s.get("delta_norm"))} · ν^ε {fmt(s.get("nu_eps"))} · ν^r '
        f"{fmt(s.get('nu_r'))} · freq {fmt(s.get('freq'))} · mean act {fmt(s.get('mean_act'))} · "
        f"max {fmt(s.get('max_act'))}"
        + (f" ({esc(c['stats_source'])})" if c.get("stats_source") else "")
        + "</div>"
    )
    body = []
    lab = c.get("label")
    if lab:
        extra = f" · secondary: {esc(lab['secondary'])}" if lab.get("secondary") else ""
        det = lab.get("detection_score")
        body.append(
            f'<div class="expl">{esc(lab["explanation"])}</div><div class="muted">confidence '
            f"{fmt(lab['confidence'], 2)}"
            + (f" · detection score {fmt(det, 2)}" if det is not None else "")
            + f"{extra}</div>"
        )
    else:
        body.append(f'<div class="muted">{esc(c.get("label_note") or "not labelled yet")}</div>')
    if c.get("source_mass"):
        parts = " · ".join(
            f"{esc(k)} {v:.0%}" for k, v in sorted(c["source_mass"].items(), key=lambda kv: -kv[1])
        )
        body.append(f'<div class="src">activation mass by source: {parts}</div>')
    top = c.get("top") or []
    scale = max((max(e["acts"], default=0.0) for e in top), default=0.0)
    for e in top[:n_contexts]:
        body.append(context_html(e["tokens"], e["acts"], e["peak"], scale, rgb))
    if not top:
        body.append('<div class="muted">no contexts collected (run `crossdiff analyze` with evidence)</div>')
    return f'<div class="card"><div class="head">{head}</div>{"".join(body)}</div>'


def table_html(rows: list[list[Any]], header: list[str]) -> str:
    th = "".join(f"<th>{esc(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{esc(fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def shift_table(shift: list[dict], ci_label: str = "95% CI", s_name: str = "S", i_name: str = "I") -> str:
    """The shift rows with signed percents (as report.md writes them) and "only in <group>"."""
    from jobs.report.md import _delta, _pct

    rows = []
    for r in shift:
        ci = f"[{_pct(r['ci_low'])}, {_pct(r['ci_high'])}]"
        flag = "small count" if r["small_count"] else ""
        rows.append(
            [r["category"], r["n_s"], r["N_s"], r["n_i"], r["N_i"], _delta(r, s_name, i_name), ci, flag]
        )
    return table_html(rows, ["category", "n_S", "N_S", "n_I", "N_I", "Δ_c", ci_label, ""])


def page(title: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f'<section><h2 id="s{i}">{esc(t)}</h2>{h}</section>' for i, (t, h) in enumerate(sections))
    toc = " · ".join(f'<a href="#s{i}">{esc(t)}</a>' for i, (t, _) in enumerate(sections))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main><h1>{esc(title)}</h1>"
        f'<nav class="muted">{toc}</nav>{body}'
        "</main></body></html>"
    )
