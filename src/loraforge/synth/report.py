"""The synth report: the JSON summary, and a self-contained HTML page of it (no scripts, no downloads).

The page shows what was asked and kept, every reject reason with its count and first examples,
tokens and cost, and the diversity summary (n-gram repetition, openings, topic coverage bars,
embedding spread).
"""

from __future__ import annotations

import html
import json

REJECT_EXAMPLES = 3


def _table(rows: list[list], head: list[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _bars(values: dict) -> str:
    """Inline SVG: one bar per value, kept of asked."""
    if not values:
        return ""
    top = max(v["asked"] for v in values.values()) or 1
    rows, h = [], 18
    for k, (name, v) in enumerate(values.items()):
        y = k * h
        w_asked, w_kept = 300 * v["asked"] / top, 300 * v["kept"] / top
        rows.append(f'<text x="0" y="{y + 13}" font-size="12">{html.escape(name[:40])}</text>'
                    f'<rect x="260" y="{y + 3}" width="{w_asked:.1f}" height="12" fill="#ddd"/>'
                    f'<rect x="260" y="{y + 3}" width="{w_kept:.1f}" height="12" fill="#4a7"/>'
                    f'<text x="{266 + w_asked:.1f}" y="{y + 13}" font-size="11">{v["kept"]}/{v["asked"]}</text>')
    return f'<svg width="640" height="{len(values) * h + 4}">{"".join(rows)}</svg>'


def render_html(report: dict, rejects: list[dict]) -> str:
    r, d = report, report.get("diversity") or {}
    first: dict[str, list[dict]] = {}
    for row in rejects:
        lst = first.setdefault(row["reason"], [])
        if len(lst) < REJECT_EXAMPLES:
            lst.append(row)
    parts = [f"<h1>loraforge data synth</h1><p>{html.escape(r['spec_path'])} &rarr; "
             f"{html.escape(r['out'])}: <b>{r['kept']}</b> kept of {r['items']} items "
             f"({r['rejected']} rejected; endpoint {html.escape(r['model'])})</p>"]
    parts.append("<h2>Rejects by reason</h2>")
    parts.append(_table([[k, n, " | ".join(x["detail"][:160] for x in first.get(k, []))]
                         for k, n in r["reasons"].items()], ["reason", "count", "first examples"])
                 if r["reasons"] else "<p>none</p>")
    u = r["usage"]
    parts.append("<h2>Requests</h2>" + _table([[k, json.dumps(v) if isinstance(v, dict) else v]
                                                for k, v in u.items()], ["", "value"]))
    parts.append("<h2>Diversity of the kept user messages</h2>")
    parts.append(_table([[f"distinct-{n}", d.get(f"distinct_{n}")] for n in (1, 2, 3)], ["n-grams", "unique share"]))
    if d.get("openings"):
        parts.append("<h3>Most common openings</h3>" + _table([[o["opening"], o["share"]] for o in d["openings"]],
                                                               ["first words", "share"]))
    if d.get("top_ngrams"):
        parts.append("<h3>Most repeated 4-grams</h3>" + _table([[o["ngram"], o["share"]] for o in d["top_ngrams"]],
                                                                ["4-gram", "share of messages"]))
    for axis, cov in (d.get("coverage") or {}).items():
        empty = ", ".join(cov["empty"]) or "none"
        parts.append(f"<h3>{axis} coverage: {cov['covered']:.0%} (empty: {html.escape(empty)})</h3>{_bars(cov['values'])}")
    emb = d.get("embedding")
    parts.append("<h3>Embedding spread</h3>" + (_table([[k, v] for k, v in emb.items()], ["", "value"]) if emb else
                                                "<p>not measured (needs the <code>semantic</code> extra)</p>"))
    style = ("body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px;vertical-align:top}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>synth report</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
