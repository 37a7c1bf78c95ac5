"""The per-run evaluation report: one self-contained HTML file (inline CSS and SVG, no scripts, no CDN).

    from loraforge.eval.report import render_html
    html = render_html(result)   # an EvalResult or a saved eval.json tree; eval.run writes eval/report.html

Sections: loss curves (train + validation) with the overfitting verdict, the metric table (base,
few-shot base, fine-tuned, each with its 95% bootstrap interval, plus a published reference result when
one is named) and a plot of it, the LLM judge (win/tie/loss and rubric scores), the serving-precision
variants (one row each, paired test and agreement against the adapter), the paired tests, the regression set, per-example answers side by side (wins and losses of the fine-tuned model
against the base highlighted), errors, and the run config.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from loraforge.eval.charts import Series, line_chart
from loraforge.eval.results import EvalResult

LABELS = {"base": "base", "fewshot": "few-shot base", "finetuned": "fine-tuned",
          "finetuned_constrained": "fine-tuned, structured decoding"}
COLORS = {"base": "#8c8c8c", "fewshot": "#e69f00", "finetuned": "#0072b2", "finetuned_constrained": "#009e73",
          "train": "#0072b2", "val": "#d55e00"}
MAX_EXAMPLES = 500

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;
text-align:left;font-size:.9em}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.win td{background:#e6f4ea}tr.loss td{background:#fce8e6}.pill{padding:2px 8px;border-radius:10px;color:#fff}
.ok{background:#188038}.watch{background:#e37400}.overfitting{background:#c5221f}.unknown{background:#777}
pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:.8em}.ans{white-space:pre-wrap;max-width:320px}
.nostop{color:#c5221f;font-size:.8em}.err{color:#c5221f}
.warn{background:#fce8e6;border:1px solid #c5221f;padding:8px 12px;border-radius:4px}
"""


def _f(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else escape(str(x))


def _p(x: float | None) -> str:
    return "–" if x is None else "<0.001" if x < 0.001 else f"{x:.3f}"


def loss_chart(curves: dict[str, list[list[float]]], *, title: str = "loss") -> str:
    """Train loss EMA-smoothed (raw faint behind it), validation loss as dots joined by a line."""
    return line_chart([Series("train", [tuple(p) for p in curves.get("train") or []], COLORS["train"], smooth=True,
                              css="series-train"),
                       Series("validation", [tuple(p) for p in curves.get("val") or []], COLORS["val"], markers=True,
                              css="series-val")], title=title, y_label="loss")


def interval_chart(models: dict[str, dict], metric: str, *, width: int = 640) -> str:
    """Horizontal bars of each model's score with its 95% bootstrap interval as whiskers."""
    if not models:
        return '<p class="empty-chart">no scores to plot</p>'
    vals = [v["value"] for v in models.values()] + [c for v in models.values() for c in v["ci"]]
    top = max(1.0, max(vals)) if metric != "bleu" else max(100.0, max(vals))
    lo = min(0.0, min(vals))
    ml, row = 110, 34
    w = width - ml - 30
    height = 30 + row * len(models)

    def sx(x: float) -> float:
        return ml + (x - lo) / (top - lo) * w

    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
              f'aria-label="{escape(metric)} by model"><rect width="100%" height="100%" fill="#fff"/>')]
    for i, (name, v) in enumerate(models.items()):
        y = 10 + row * i
        parts.append(f'<text x="{ml - 8}" y="{y + 16}" font-size="12" text-anchor="end">'
                     f'{escape(LABELS.get(name, name))}</text>')
        parts.append(f'<rect class="bar-{escape(name)}" x="{sx(lo):.1f}" y="{y + 4}" '
                     f'width="{max(sx(v["value"]) - sx(lo), 1):.1f}" height="18" fill="{COLORS.get(name, "#333")}"/>')
        a, b = v["ci"]
        parts.append(f'<line x1="{sx(a):.1f}" y1="{y + 13}" x2="{sx(b):.1f}" y2="{y + 13}" stroke="#000" '
                     f'stroke-width="1.5"/><line x1="{sx(a):.1f}" y1="{y + 7}" x2="{sx(a):.1f}" y2="{y + 19}" '
                     f'stroke="#000"/><line x1="{sx(b):.1f}" y1="{y + 7}" x2="{sx(b):.1f}" y2="{y + 19}" stroke="#000"/>')
        parts.append(f'<text x="{min(sx(b) + 6, width - 28):.1f}" y="{y + 17}" font-size="11">{v["value"]:.3f}</text>')
    y = 10 + row * len(models)
    parts.append(f'<line x1="{sx(lo)}" y1="{y}" x2="{sx(top)}" y2="{y}" stroke="#444"/>'
                 f'<text x="{sx(lo)}" y="{y + 14}" font-size="10">{lo:g}</text>'
                 f'<text x="{sx(top)}" y="{y + 14}" font-size="10" text-anchor="end">{top:g}</text></svg>')
    return "".join(parts)


def _table(table_id: str, heads: list[str], rows: list[str]) -> str:
    """A table from header cells and finished <tr> rows (cells are HTML already)."""
    head = "".join(f"<th>{h}</th>" for h in heads)
    return f"<table id='{table_id}'><tr>{head}</tr>{''.join(rows)}</table>"


def _tr(*cells: str, cls: str | None = None) -> str:
    """A row; a cell given as ("num", text) is right-aligned."""
    tds = "".join(f"<td class='num'>{c[1]}</td>" if isinstance(c, tuple) else f"<td>{c}</td>" for c in cells)
    return f"<tr class='{cls}'>{tds}</tr>" if cls else f"<tr>{tds}</tr>"


def _ci(ci, digits: int = 3) -> str:
    return "–" if ci[0] is None else f"[{_f(ci[0], digits)}, {_f(ci[1], digits)}]"


def _metric_table(r: dict) -> str:
    rows = [_tr(escape(LABELS.get(name, name)), ("num", _f(v["value"])), ("num", _ci(v["ci"])),
                ("num", f"{v['stop_rate']:.0%}"), ("num", len(v.get("details", {}).get("failures", []))),
                ("num", _valid(v.get("details", {}))))
            for name, v in r["models"].items()]
    ref = r.get("reference")
    if ref:
        rows.append(_tr(f"reference: {escape(ref['text'])}", ("num", _f(ref.get("value"))),
                        "published, not rerun here", "–", "–", "–", cls="reference"))
    return _table("metric-table", ["model", escape(r["metric"]), "95% bootstrap CI", "stopped by itself",
                                   "answers not scorable", "valid answers (label / schema)"], rows)


def _valid(details: dict) -> str:
    """The share of answers with the task's structure (only where structured decoding was on)."""
    if "valid_rate" not in details:
        return "–"
    return f"{details['valid_rate']:.1%} {_ci(details['valid_ci'])}"


def _judge(r: dict) -> str:
    j = r.get("judge")
    if not j:
        return "<p>No judge configured (set eval.judge_url or pass --judge-url).</p>"
    rows = []
    p = j.get("pairwise")
    if p:
        rows.append(_tr(f"{escape(LABELS.get(p['a'], p['a']))} vs {escape(LABELS.get(p['b'], p['b']))} "
                        "(pairwise, positions swapped)",
                        f"win {p['win']:.0%} / tie {p['tie']:.0%} / loss {p['loss']:.0%}", "–",
                        ("num", p["judged"]), ("num", p["errors"])))
    for m, v in j["rubric"].items():
        rows.append(_tr(f"{escape(LABELS.get(m, m))} (rubric 1-10)", ("num", _f(v["mean"], 2)),
                        ("num", _ci(v["ci"], 2)), ("num", v["judged"]), ("num", v["errors"])))
    return (f"<p>Judge <b>{escape(str(j['model']))}</b> at {escape(str(j['url']))}.</p>"
            + _table("judge-table", ["judged", "result", "95% CI", "n judged", "errors"], rows))


def _variants(r: dict) -> str:
    var = r.get("variants")
    if not var:
        return "<p>Not run (pass --serve-as adapter,merged,gguf-q8_0,...).</p>"
    rows = []
    for kind, v in var.items():
        c = v.get("vs_adapter") or {}
        diff = f"{c['diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]" if c else "–"
        agree = "–" if v.get("agreement") is None else f"{v['agreement']:.0%}"
        rows.append(_tr(escape(kind), ("num", _f(v["value"])), ("num", _ci(v["ci"])), ("num", diff),
                        ("num", _p(c.get("p_bootstrap"))), ("num", _p(c.get("p_mcnemar"))), ("num", agree),
                        ("num", f"{v['stop_rate']:.0%}")))
    return _table("variants-table", ["served as", escape(r["metric"]), "95% CI", "difference vs adapter",
                                     "p (paired bootstrap)", "p (exact McNemar)", "identical answers to adapter",
                                     "stopped by itself"], rows)


def _judge_td(e: dict) -> str:
    j = e.get("judge") or {}
    parts = []
    if "pairwise" in j:
        parts.append(f"A/B: <b class='jv-{escape(j['pairwise'])}'>{escape(j['pairwise'])}</b>")
    parts += [f"{escape(LABELS.get(m, m))}: {_f(s)}" for m, s in j.get("rubric", {}).items()]
    if j.get("reason"):
        parts.append(f"<span class='err'>{escape(j['reason'][:160])}</span>")
    return f"<td class='judge'>{'<br>'.join(parts)}</td>"


def _comparisons(r: dict) -> str:
    if not r["comparisons"]:
        return "<p>No paired comparison (only one model was evaluated).</p>"
    rows = [("<table id='paired-tests'><tr><th>comparison</th><th>n</th><th>difference</th><th>95% CI of difference"
             "</th><th>p (paired bootstrap)</th><th>p (exact McNemar)</th><th>A only / B only right</th></tr>")]
    for name, c in r["comparisons"].items():
        disc = "–" if c.get("discordant") is None else f"{c['discordant'][0]} / {c['discordant'][1]}"
        rows.append(f"<tr><td>{escape(name.replace('_', ' '))}</td><td class='num'>{c['n']}</td>"
                    f"<td class='num'>{c['diff']:+.3f}</td><td class='num'>[{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"
                    f"</td><td class='num'>{_p(c['p_bootstrap'])}</td><td class='num'>{_p(c.get('p_mcnemar'))}</td>"
                    f"<td class='num'>{disc}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def _overfit(v: dict) -> str:
    signals = "".join(f"<li>{escape(s)}</li>" for s in v.get("signals", [])) or "<li>no overfitting signal</li>"
    note = f"<p>{escape(v['note'])}</p>" if v.get("note") else ""
    return (f"<p id='overfit-verdict'>Verdict: <span class='pill {escape(v['status'])}'>{escape(v['status'])}</span>"
            f" &nbsp; best step by validation loss: <b>{_f(v.get('best_step'))}</b> "
            f"(validation loss {_f(v.get('best_val_loss'), 4)}); final train loss {_f(v.get('final_train_loss'), 4)}"
            f"</p><ul>{signals}</ul>{note}")


def _regression(r: dict) -> str:
    reg = r.get("regression") or {}
    if not reg:
        return "<p>Not run.</p>"
    cats = sorted({c for v in reg.values() for c in v["by_category"]})
    head = "".join(f"<th>{escape(LABELS.get(m, m))}</th>" for m in reg)
    rows = [f"<table id='regression-table'><tr><th>category</th>{head}</tr>",
            "<tr><td><b>all</b></td>" + "".join(f"<td class='num'><b>{v['rate']:.0%}</b></td>" for v in reg.values())
            + "</tr>"]
    for c in cats:
        rows.append(f"<tr><td>{escape(c)}</td>" + "".join(
            f"<td class='num'>{v['by_category'].get(c, 0):.0%}</td>" for v in reg.values()) + "</tr>")
    rows.append("</table>")
    return "".join(rows)


def _examples(r: dict) -> str:
    models = list(r["models"])
    head = "".join(f"<th>{escape(LABELS.get(m, m))}</th>" for m in models)
    judge_head = "<th>judge</th>" if r.get("judge") else ""
    ex = r["examples"]
    counts = {k: sum(e["outcome"] == k for e in ex) for k in ("win", "loss", "tie")}
    against = LABELS.get(r.get("outcome_against") or "", "–")
    more = f" Showing the first {MAX_EXAMPLES} of {len(ex)}." if len(ex) > MAX_EXAMPLES else ""
    rows = [(f"<p>Fine-tuned against {escape(against)}: <b>{counts['win']}</b> wins (green), "
             f"<b>{counts['loss']}</b> losses (red), {counts['tie']} ties.{more}</p>"),
            f"<table id='examples'><tr><th>#</th><th>prompt</th><th>reference</th>{head}{judge_head}</tr>"]
    for e in ex[:MAX_EXAMPLES]:
        cells = []
        for m in models:
            stop = "" if e["stopped"].get(m, True) else "<div class='nostop'>did not stop</div>"
            cells.append(f"<td class='ans'>{escape(str(e['answers'].get(m, '')))}{stop}"
                         f"<div class='num'>score {_f(e['scores'].get(m))}</div></td>")
        ref = e["reference"] if isinstance(e["reference"], str) else json.dumps(e["reference"])
        rows.append(f"<tr class='{e['outcome']}'><td>{e['index']}</td><td class='ans'>{escape(e['prompt'])}</td>"
                    f"<td class='ans'>{escape(ref)}</td>{''.join(cells)}{_judge_td(e) if judge_head else ''}</tr>")
    rows.append("</table>")
    return "".join(rows)


def _metric_curve(r: dict) -> str:
    """The validation metric by step (train.select_by=metric), with the step adapter/ holds."""
    pts = r["curves"].get("val_metric")
    if not pts:
        return ""
    best = max(pts, key=lambda p: p[1])
    chart = line_chart([Series("validation", [tuple(p) for p in pts], COLORS["val"], markers=True, css="series-val")],
                       title=f"validation {r['metric']}", y_label=r["metric"], log_y=False)
    return (chart +
            f"<p id='selected-step'>adapter/ holds step {best[0]} (validation {r['metric']} {best[1]:.3f}).</p>")


def _forgetting_banner(r: dict) -> str:
    """The forgetting guard's warning, shown at the top (eval.forgetting)."""
    f = r.get("forgetting") or {}
    return f"<p id='forgetting-warning' class='warn'><b>Warning:</b> {escape(f['warning'])}</p>" if f.get("warning") \
        else ""


def render_html(r: dict | EvalResult) -> str:
    """The whole report as one HTML string, from an EvalResult or the eval.json tree it is saved as (so a
    saved eval.json can be rendered again)."""
    r = r.to_json() if isinstance(r, EvalResult) else r
    errors = "".join(f"<li class='err'>{escape(e['stage'])}: {escape(e['error'])}</li>" for e in r.get("errors", []))
    never = ", ".join(f"{LABELS.get(m, m)}: {n}" for m, n in r.get("never_stopped", {}).items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>loraforge eval — {escape(r['run_dir'])}</title>
<style>{CSS}</style></head><body>
<h1>Evaluation of {escape(r['run_dir'])}</h1>
<p>{r['n']} test examples from {escape(str(r['test']))}; metric <b>{escape(r['metric'])}</b>; greedy decoding,
max_new_tokens={r.get('decoding', {}).get('max_new_tokens', '–')}, stop at the end-of-turn token; structured
decoding: {escape(str(r.get('decoding', {}).get('constrained', '–')))}.
Answers cut by max_new_tokens (model never stopped): {escape(never) or '–'}. Created {escape(r['created'])}.</p>
{_forgetting_banner(r)}
{f"<h2>Errors</h2><ul>{errors}</ul>" if errors else ""}
<h2>Training and validation loss</h2>
{loss_chart(r["curves"])}
{_metric_curve(r)}
<h2>Overfitting</h2>
{_overfit(r['overfit'])}
<h2>Scores</h2>
{_metric_table(r)}
{interval_chart(r['models'], r['metric'])}
<h2>LLM judge</h2>
{_judge(r)}
<h2>Serving precision</h2>
{_variants(r)}
<h2>Paired tests</h2>
{_comparisons(r)}
<h2>General-prompt regression</h2>
{_regression(r)}
<h2>Per-example answers</h2>
{_examples(r)}
<h2>Run config</h2>
<pre>{escape(json.dumps(r['config'], indent=1), quote=False)}</pre>
</body></html>
"""
