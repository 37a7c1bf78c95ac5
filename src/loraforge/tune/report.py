"""The trials of a `loraforge tune` study: a rich table for the terminal, and tune.html beside trials.json
(the evaluation report's SVG line chart and table helpers: each trial's validation curve, the winner marked)."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path

from rich.table import Table

from loraforge.eval.charts import Series, line_chart
from loraforge.eval.report import CSS, _table, _tr
from loraforge.eval.runs import PALETTE
from loraforge.files import atomic_write_text

COLUMNS = ["trial", "state", "value", "learning rate", "r", "dropout", "best step", "steps", "seconds"]


def _cells(r: dict, best: dict | None) -> list[str]:
    p = r["params"]
    value = f"{r['value']:.4f}" if r.get("value") is not None else "–"
    mark = " (best)" if best is not None and r["number"] == best["number"] else ""
    state = r["state"] + (f": {r['note']}" if r.get("note") and r["state"] != "complete" else "")
    num = lambda key, fmt: format(p[key], fmt) if p.get(key) is not None else "–"  # noqa: E731 (a cut-off trial)
    return [f"{r['number']}{mark}", state, value, num("learning_rate", ".3g"), num("r", ""), num("dropout", ".3f"),
            str(r.get("selected_step", "–")), str(r.get("steps", r["curve"][-1][0] if r["curve"] else "–")),
            str(r.get("seconds", "–"))]


def trials_table(summary: dict) -> Table:
    table = Table(title=f"loraforge tune: validation {summary['metric']} by trial")
    for col in COLUMNS:
        table.add_column(col, justify="right" if col not in ("state",) else "left")
    for r in summary["trials"]:
        table.add_row(*(c[:60] for c in _cells(r, summary["best"])))
    return table


def render_html(summary: dict) -> str:
    best = summary["best"]
    rows = [_tr(*(escape(c) for c in _cells(r, best)), cls="win" if best and r["number"] == best["number"] else
                "loss" if r["state"] != "complete" else None) for r in summary["trials"]]
    curves = {f"trial {r['number']}" + (" (best)" if best and r["number"] == best["number"] else ""): r["curve"]
              for r in summary["trials"] if r["curve"]}
    c = summary["counts"]
    head = (f"<p>Best: trial <b>{best['number']}</b>, validation {escape(summary['metric'])} "
            f"<b>{best['value']:.4f}</b>; train it again with <code>loraforge train "
            f"{escape(summary.get('best_yaml', 'best.yaml'))}</code>.</p>") if best else "<p>No trial completed.</p>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>loraforge tune — {escape(summary['base_model'])}</title>
<style>{CSS}</style></head><body>
<h1>Hyperparameter search: {escape(summary['base_model'])}</h1>
{head}
<p>{len(summary['trials'])} trials ({c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed) in
{summary['seconds']:.0f} s; {escape(summary['pruner'])} pruner; learning rate searched in
[{summary['space']['learning_rate'][0]:.2g}, {summary['space']['learning_rate'][1]:.2g}] (centred by the model's
size), rank in {summary['space']['r']}, dropout in {summary['space']['dropout']}.</p>
<h2>Trials</h2>
{_table("trials-table", COLUMNS, rows)}
<h2>Validation {escape(summary['metric'])} by step</h2>
{line_chart([Series(name, [tuple(p) for p in pts], PALETTE[i % len(PALETTE)], markers=True)
             for i, (name, pts) in enumerate(curves.items())], title=f"validation {summary['metric']}",
            y_label=summary["metric"], log_y=False)}
</body></html>
"""


def write_report(out: Path, summary: dict) -> None:
    """trials.json and tune.html in `out`, each written atomically."""
    for name, text in (("trials.json", json.dumps(summary, indent=1, default=str)), ("tune.html", render_html(summary))):
        atomic_write_text(out / name, text)
