"""SVG line charts for the HTML reports (the run report and `loraforge runs compare`): inline, no scripts.

    from loraforge.eval.charts import Series, line_chart
    svg = line_chart([Series("train", pts, "#0072b2", smooth=True), Series("val", vpts, "#d55e00", markers=True)],
                     title="loss")

A smoothed series is drawn as its EMA (TensorBoard's debiased exponential moving average) with the raw
points faint behind it; the y axis turns logarithmic when the values span more than a factor of 20; ticks
are "nice" (1, 2, 2.5, 5 x 10^k) and printed compactly (0.5, 1.2e-4, 12k), never as 0.000127.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

MAX_POINTS = 800   # points drawn per polyline; longer series are thinned (the EMA is computed on all of them)


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    color: str = "#333"
    smooth: bool = False          # EMA line, the raw data faint behind it
    markers: bool = False         # a dot on every point (validation evaluations)
    css: str = ""                 # class of the main path (tests and styles find series by it)
    dash: str | None = None
    meta: dict = field(default_factory=dict)


def ema_weight(n: int) -> float:
    """Smoothing weight for n points: an effective window of about n/30 points (0 for short series)."""
    return 0.0 if n < 30 else min(0.98, 1 - 30 / n)


def ema(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing slider): the first point is not pulled
    toward zero."""
    out, last, num = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        num += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** num) if weight else v)
    return out


def fmt(v: float) -> str:
    """A value label: 3 significant digits at most, scientific below 1e-3, k/M from 1e4 on."""
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e4:
        return f"{v / 1e3:.3g}k"
    if a >= 100:
        return f"{v:.0f}"
    if a < 1e-3:
        return _sci(v)
    return f"{v:.3g}"


def _sci(v: float) -> str:
    m, e = f"{v:.2e}".split("e")
    return f"{float(m):g}e{int(e)}"


def fmt_ticks(ticks: list[float]) -> list[str]:
    """An axis' labels in one style: all scientific when the largest is under 0.01 (0, 2.5e-4, 5e-4)."""
    if 0 < max(abs(t) for t in ticks) < 0.01:
        return ["0" if t == 0 else _sci(t) for t in ticks]
    return [fmt(t) for t in ticks]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi] (steps 1, 2, 2.5 or 5 times a power of ten)."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks, t = [], start
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten covering [lo, hi] (with 2 and 5 between them when the range is under two decades)."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1, 2, 5) if b - a <= 2 else (1,)
    ticks = [m * 10 ** k for k in range(a, b + 1) for m in mults]
    inside = [t for t in ticks if lo <= t <= hi]
    below = [t for t in ticks if t < lo]
    above = [t for t in ticks if t > hi]
    return ([below[-1]] if below else []) + inside + ([above[0]] if above else [])


def _thin(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(pts) <= MAX_POINTS:
        return pts
    k = math.ceil(len(pts) / MAX_POINTS)
    return pts[::k] + ([pts[-1]] if (len(pts) - 1) % k else [])


def _smoothed(pts: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The EMA of a series (the same list when it is too short to smooth)."""
    weight = ema_weight(len(pts))
    return list(zip([x for x, _ in pts], ema([y for _, y in pts], weight))) if weight else pts


def use_log(ys: list[float]) -> bool:
    """A log axis helps when every value is positive and they span more than a factor of 20."""
    return bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 20


def line_chart(series: list[Series], *, title: str = "", x_label: str = "step", y_label: str = "",
               log_y: bool | None = None, width: int = 640, height: int = 300) -> str:
    """An SVG chart of the series (x, y) with nice ticks, a legend and (log_y None) an automatic log axis."""
    series = [s for s in series if s.points]
    pts = [(x, y) for s in series for x, y in s.points if math.isfinite(y)]
    if not pts:
        return '<p class="empty-chart">no data to plot</p>'
    ys = [y for _, y in pts]
    shown = [y for s in series for _, y in (_smoothed(s.points) if s.smooth else s.points) if math.isfinite(y)]
    log = use_log(shown) and min(ys) > 0 if log_y is None else (log_y and min(ys) > 0)   # by the lines, not the noise
    xt = nice_ticks(min(x for x, _ in pts), max(x for x, _ in pts))
    yt = log_ticks(min(ys), max(ys)) if log else nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    ty = (lambda y: math.log10(y)) if log else (lambda y: y)
    ml, mr, mt, mb = 58, 16, 28, 40
    w, h = width - ml - mr, height - mt - mb

    def sx(x: float) -> float:
        return ml + (x - x0) / ((x1 - x0) or 1) * w

    def sy(y: float) -> float:
        return mt + h - (ty(y) - ty(y0)) / ((ty(y1) - ty(y0)) or 1) * h

    def path(p: list[tuple[float, float]]) -> str:
        return " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in _thin(p) if math.isfinite(y))

    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{escape(title)}"><rect width="100%" height="100%" fill="#fff"/>'),
           f'<text x="{ml}" y="18" font-size="13" font-weight="bold">{escape(title)}'
           f'{" (log scale)" if log else ""}</text>']
    for t, label in zip(yt, fmt_ticks(yt)):
        out.append(f'<line x1="{ml}" y1="{sy(t):.1f}" x2="{ml + w}" y2="{sy(t):.1f}" stroke="#eee"/>'
                   f'<text x="{ml - 6}" y="{sy(t) + 4:.1f}" font-size="10" text-anchor="end">{label}</text>')
    for t, label in zip(xt, fmt_ticks(xt)):
        out.append(f'<text x="{sx(t):.1f}" y="{mt + h + 14}" font-size="10" text-anchor="middle">{label}</text>')
    out += [f'<line x1="{ml}" y1="{mt + h}" x2="{ml + w}" y2="{mt + h}" stroke="#444"/>',
            f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{mt + h}" stroke="#444"/>',
            f'<text x="{ml + w / 2}" y="{height - 6}" font-size="11" text-anchor="middle">{escape(x_label)}</text>']
    if y_label:
        out.append(f'<text x="12" y="{mt + h / 2}" font-size="11" text-anchor="middle" '
                   f'transform="rotate(-90 12 {mt + h / 2})">{escape(y_label)}</text>')
    for s in series:
        css = f' class="{escape(s.css)}"' if s.css else ""
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        main = _smoothed(s.points) if s.smooth else s.points
        if main is not s.points:
            out.append(f'<polyline class="raw" fill="none" stroke="{s.color}" stroke-opacity="0.2" '
                       f'stroke-width="1" points="{path(s.points)}"/>')
        if len(main) > 1:
            out.append(f'<polyline{css} fill="none" stroke="{s.color}" stroke-width="2"{dash} points="{path(main)}"/>')
        if s.markers or len(main) == 1:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{s.color}" stroke="#fff" '
                    f'stroke-width="1"/>' for x, y in _thin(s.points) if math.isfinite(y)]
    lx = ml + w - 190
    out.append(f'<rect x="{lx - 4}" y="{mt + 2}" width="190" height="{16 * len(series) + 6}" fill="#fff" '
               f'fill-opacity="0.8"/>')
    for k, s in enumerate(series):
        y = mt + 6 + 16 * k
        out.append(f'<rect x="{lx}" y="{y}" width="14" height="4" fill="{s.color}"/>'
                   f'<text x="{lx + 20}" y="{y + 6}" font-size="11">{escape(s.name)}</text>')
    out.append("</svg>")
    return "".join(out)
