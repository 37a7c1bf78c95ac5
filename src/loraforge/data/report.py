"""The HTML report of `loraforge data inspect --html report.html`: one self-contained file.

Tables of counts and problems, and the token-length histogram as an inline SVG plot with
max_seq_length and the suggested length marked. No scripts, no CDN: it opens offline anywhere.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from loraforge.data.sinks import same_file
from loraforge.data.stats import DataStats
from loraforge.errors import LoraforgeError
from loraforge.files import atomic_write_text

STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:980px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}h2{margin-top:1.6em}
.warn{color:#a15c00}.err{color:#b00020}svg text{font:11px system-ui,sans-serif}"""


def _table(rows: list[tuple], head: tuple | None = None) -> str:
    def cell(v, tag="td"):
        cls = ' class="n"' if isinstance(v, (int, float)) and tag == "td" else ""
        return f"<{tag}{cls}>{escape(f'{v:,}' if isinstance(v, int) else str(v))}</{tag}>"

    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(cell(h, "th") for h in head) + "</tr>")
    out += ["<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows]
    return "".join(out) + "</table>"


def histogram_svg(stats: DataStats, width: int = 900, height: int = 280) -> str:
    """Bars of the token-length histogram, with dashed lines at max_seq_length and the suggestion."""
    bins = stats.histogram
    if not bins:
        return "<p>No lengths measured.</p>"
    left, bottom, top_pad = 60, 40, 20
    plot_w, plot_h = width - left - 20, height - bottom - top_pad
    x_max = max(bins[-1][1], stats.max_seq_length, stats.suggested_max_seq_length)
    y_max = max(c for _, _, c in bins) or 1

    def x(v: float) -> float:
        return left + plot_w * v / x_max

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="token length histogram">',
             f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" stroke="#888"/>',
             f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + plot_h}" stroke="#888"/>']
    for lo, hi, count in bins:
        h = plot_h * count / y_max
        parts.append(f'<rect x="{x(lo):.1f}" y="{top_pad + plot_h - h:.1f}" width="{max(1.0, x(hi) - x(lo) - 1):.1f}" '
                     f'height="{h:.1f}" fill="#4a7bd0"><title>{lo}-{hi - 1} tokens: {count:,}</title></rect>')
    for k in range(5):
        v = round(x_max * k / 4)
        parts.append(f'<text x="{x(v):.1f}" y="{height - 22}" text-anchor="middle">{v}</text>')
    parts.append(f'<text x="{left - 6}" y="{top_pad + 8}" text-anchor="end">{y_max:,}</text>'
                 f'<text x="{left - 6}" y="{top_pad + plot_h}" text-anchor="end">0</text>'
                 f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">tokens after the chat '
                 'template</text>')
    for value, colour, name in ((stats.max_seq_length, "#b00020", "max_seq_length"),
                                (stats.suggested_max_seq_length, "#2a8a2a", "suggested")):
        parts.append(f'<line x1="{x(value):.1f}" y1="{top_pad}" x2="{x(value):.1f}" y2="{top_pad + plot_h}" '
                     f'stroke="{colour}" stroke-dasharray="5,4"/><text x="{x(value) + 4:.1f}" y="{top_pad + 12}" '
                     f'fill="{colour}">{name} {value}</text>')
    return "".join(parts) + "</svg>"


def render_html(stats: DataStats) -> str:
    t = stats.input
    summary = [("file", t.path), ("format", f"{t.format} (detected at {t.detected_at})" if t.detected_at else t.format),
               ("records", t.records), ("valid", t.valid), ("invalid", t.invalid),
               ("model template", stats.model_family or "unknown"), ("max_seq_length", stats.max_seq_length),
               ("longer than max_seq_length", stats.truncated),
               ("suggested max_seq_length", f"{stats.suggested_max_seq_length} "
                                            f"(cuts {stats.suggested_truncated})"),
               (f"padding waste, batches of {stats.batch_size} grouped by length", f"{stats.padding_waste:.1%}"),
               ("packing waste", f"{stats.packing_waste:.1%} ({stats.packed_rows:,} rows)")]
    problems = [(g.kind, g.severity, g.count, "; ".join(g.examples[:3])) for g in t.groups.values()]
    body = [f"<h1>Data report: {escape(Path(t.path).name)}</h1>", _table(summary),
            "<h2>Token lengths</h2>", histogram_svg(stats),
            _table([(k, v) for k, v in stats.percentiles.items()], ("percentile", "tokens")),
            "<h2>Problems</h2>", _table(problems, ("kind", "severity", "count", "first examples"))
            if problems else "<p>None.</p>",
            "<h2>Conversations</h2>", _table(list(stats.turns.items()), ("turns", "records")),
            _table(list(stats.roles.items()), ("role", "turns"))]
    if stats.labels:
        body += [f"<h2>Labels ({stats.n_labels})</h2>", _table(list(stats.labels.items()), ("label", "records"))]
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{escape(Path(t.path).name)} - loraforge "
            f"data report</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def write_html(stats: DataStats, path: str | Path) -> Path:
    p = Path(path)
    if same_file(p, Path(stats.input.path)):
        raise LoraforgeError("the report would overwrite the input file", where=str(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, render_html(stats))
    return p
